"""write_factor_slots on the CPU: the reference against a float64 hand computation, the Triton
kernel (interpreter) against the reference, the plan cache, the op's schema and fake
implementation, validation, and an ahead-of-time compile of the kernel for sm_90.

Triton runs in its interpreter: fp32 and fp16 bitwise. bf16 only loosely: the interpreter's
fp32 -> bf16 conversion is not round-to-nearest-even (measured: 1-ulp differences in the
scaled B slots, A copies exact); tests/test_factor_slots_gpu.py checks bf16 bitwise.
"""
import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch


from adafuse_compile.cutlass_kernels import factor_slots as fs
from adafuse_compile.cutlass_kernels.factor_slots import (
    make_slots, reference_write_factor_slots, write_factor_slots_,
)

N_EXPERTS, SCALING = 5, 0.7
# (in, out, r) per linear. ALIGNED: every r a multiple of 8 (the kernel's vectorisation hints
# on). ODD: ranks 12, 3, 5 (columns masked within the power-of-two tile), sizes that are no
# multiple of anything.
ALIGNED = [(40, 72, 8), (24, 16, 16), (48, 40, 8)]
ODD = [(40, 72, 12), (33, 5, 3), (7, 130, 5)]
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _problem(shapes, k, dtype, seed=0, n_experts=N_EXPERTS):
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(n_experts, r, i, generator=gen).to(dtype) for i, o, r in shapes]
    lora_B = [torch.randn(n_experts, o, r, generator=gen).to(dtype) for i, o, r in shapes]
    experts = torch.randperm(n_experts, generator=gen)[:k]
    gates = torch.softmax(torch.randn(k, generator=gen), 0)
    return lora_A, lora_B, experts, gates


def _poisoned_slots(lora_A, lora_B, k):
    a_slots, b_slots = make_slots(lora_A, lora_B, k)
    for s in a_slots + b_slots:
        s.fill_(float("nan"))
    return a_slots, b_slots


def _hand(lora_A, lora_B, experts, gates, scaling):
    """float64, one slot at a time, by the definition."""
    a_exp, b_exp = [], []
    for a, b in zip(lora_A, lora_B):
        a_exp.append(torch.cat([a[e].double() for e in experts.tolist()], 0))
        b_exp.append(torch.cat([scaling * g * b[e].double()
                                for e, g in zip(experts.tolist(), gates.double().tolist())], 1))
    return a_exp, b_exp


def _ulps(got, exp64, dtype):
    """|got - exp| in units of the dtype's spacing at exp (subnormal spacing at the bottom)."""
    info = torch.finfo(dtype)
    mag = exp64.abs().clamp_min(info.smallest_normal)
    spacing = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA[dtype])
    return ((got.double() - exp64).abs() / spacing).max().item()


# ------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------
def test_hand_example():
    """One linear, N = 2, r = 1, k = 2: every slot entry written out."""
    a = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])  # [2, 1, 3]
    b = torch.tensor([[[7.0], [8.0]], [[9.0], [10.0]]])  # [2, 2, 1]
    a_slots, b_slots = make_slots([a], [b], 2)
    reference_write_factor_slots([a], [b], torch.tensor([1, 0]), torch.tensor([0.25, 0.75]), 2.0,
                                 a_slots, b_slots)
    assert a_slots[0].tolist() == [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]
    assert b_slots[0].tolist() == [[2 * 0.25 * 9, 2 * 0.75 * 7], [2 * 0.25 * 10, 2 * 0.75 * 8]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_reference_matches_float64(dtype, k):
    lora_A, lora_B, experts, gates = _problem(ALIGNED + ODD, k, dtype)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, k)
    reference_write_factor_slots(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
    a_exp, b_exp = _hand(lora_A, lora_B, experts, gates, SCALING)
    for m, (sa, sb, ea, eb) in enumerate(zip(a_slots, b_slots, a_exp, b_exp)):
        assert torch.equal(sa.double(), ea), f"linear {m}: A slots are not an exact copy"
        # The coefficient and the product each round in fp32, then the store rounds to the
        # dtype: within one unit of the dtype (fp32: 2, both roundings in fp32).
        worst = _ulps(sb, eb, dtype)
        assert worst <= (2.0 if dtype == torch.float32 else 1.0), f"linear {m}: B slots {worst:.2f} ulp"


def test_auto_on_cpu_is_reference():
    lora_A, lora_B, experts, gates = _problem(ALIGNED, 2, torch.float32)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, 2)
    ra, rb = make_slots(lora_A, lora_B, 2)
    fs.clear_plan_cache()
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)  # impl="auto"
    reference_write_factor_slots(lora_A, lora_B, experts, gates, SCALING, ra, rb)
    assert all(torch.equal(x, y) for x, y in zip(a_slots + b_slots, ra + rb))
    assert len(fs._plans) == 0


# ------------------------------------------------------------------------------------------
# Triton kernel in the interpreter
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_slots():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter tests; the GPU runs tests/test_factor_slots_gpu.py")
    name = "adafuse_compile.cutlass_kernels.triton_factor_slots"
    mod = sys.modules.get(name)
    if mod is not None:  # imported earlier in this process without the interpreter
        mod = importlib.reload(mod)
    else:
        mod = importlib.import_module(name)
    fs.clear_plan_cache()
    yield mod
    fs.clear_plan_cache()


def _reference_slots(lora_A, lora_B, experts, gates, k):
    ra, rb = make_slots(lora_A, lora_B, k)
    reference_write_factor_slots(lora_A, lora_B, experts, gates, SCALING, ra, rb)
    return ra, rb


def _assert_equal_slots(got_a, got_b, want_a, want_b, what):
    for m, (ga, gb, wa, wb) in enumerate(zip(got_a, got_b, want_a, want_b)):
        assert torch.equal(ga, wa), f"{what}: linear {m} A slots {tuple(ga.shape)} differ"
        assert torch.equal(gb, wb), f"{what}: linear {m} B slots {tuple(gb.shape)} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("shapes", [ALIGNED, ODD], ids=["aligned", "odd"])
def test_triton_matches_reference(triton_slots, dtype, k, shapes):
    """Through the op (default tiles: one per slot part here) and a plan with 64-element tiles
    (several tiles per part, the last one partly masked). Bitwise: a copy and one fp32 product."""
    lora_A, lora_B, experts, gates = _problem(shapes, k, dtype, seed=k)
    want_a, want_b = _reference_slots(lora_A, lora_B, experts, gates, k)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, k)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    _assert_equal_slots(a_slots, b_slots, want_a, want_b, "op")
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, k)
    plan = triton_slots.SlotPlan(lora_A, lora_B, a_slots, b_slots, k, dict(BLOCK=64))
    assert plan.aligned == (shapes is ALIGNED)
    plan.run(experts, gates, SCALING)
    _assert_equal_slots(a_slots, b_slots, want_a, want_b, "64-element tiles")


def test_triton_bf16_within_one_ulp(triton_slots):
    """bf16 in the interpreter (see the module doc): A exact, B within one bf16 ulp."""
    lora_A, lora_B, experts, gates = _problem(ALIGNED + ODD, 3, torch.bfloat16)
    want_a, want_b = _reference_slots(lora_A, lora_B, experts, gates, 3)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, 3)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    for m, (ga, gb, wa, wb) in enumerate(zip(a_slots, b_slots, want_a, want_b)):
        assert torch.equal(ga, wa), f"linear {m}: A slots differ"
        assert _ulps(gb, wb.double(), torch.bfloat16) <= 1.0, f"linear {m}: B slots"


def test_triton_plan_cache(triton_slots):
    """One plan per set of buffers: reused with new experts (no stale state), rebuilt for
    new slot buffers, which are then the ones written."""
    k = 2
    lora_A, lora_B, experts, gates = _problem(ODD, k, torch.float32)
    fs.clear_plan_cache()
    a1, b1 = _poisoned_slots(lora_A, lora_B, k)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a1, b1, impl="triton")
    assert len(fs._plans) == 1
    plan = next(iter(fs._plans.values()))

    experts2, gates2 = torch.tensor([4, 0]), torch.tensor([0.9, 0.1])
    write_factor_slots_(lora_A, lora_B, experts2, gates2, SCALING, a1, b1, impl="triton")
    assert len(fs._plans) == 1 and next(iter(fs._plans.values())) is plan
    _assert_equal_slots(a1, b1, *_reference_slots(lora_A, lora_B, experts2, gates2, k), "reused plan")

    a2, b2 = _poisoned_slots(lora_A, lora_B, k)
    before = [s.clone() for s in a1 + b1]
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a2, b2, impl="triton")
    assert len(fs._plans) == 2
    _assert_equal_slots(a2, b2, *_reference_slots(lora_A, lora_B, experts, gates, k), "new slots")
    assert all(torch.equal(s, b) for s, b in zip(a1 + b1, before)), "old slots written"


def test_triton_strided_int32_experts_and_other_gate_dtypes(triton_slots):
    """experts/gates are read on the device through their stride, in their own dtype."""
    k = 3
    lora_A, lora_B, experts, gates = _problem(ALIGNED, k, torch.float16)
    e_strided = torch.stack([experts, experts.flip(0)], 1).to(torch.int32)[:, 0]  # stride 2
    g_strided = torch.stack([gates, gates], 1).double()[:, 0]
    assert e_strided.stride(0) == 2 and g_strided.stride(0) == 2
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, k)
    write_factor_slots_(lora_A, lora_B, e_strided, g_strided, SCALING, a_slots, b_slots, impl="triton")
    _assert_equal_slots(a_slots, b_slots, *_reference_slots(lora_A, lora_B, e_strided, g_strided, k),
                        "strided")


def test_triton_out_of_range_expert_writes_zero_slots(triton_slots):
    lora_A, lora_B, _, _ = _problem(ALIGNED, 2, torch.float32)
    experts, gates = torch.tensor([1, N_EXPERTS]), torch.tensor([0.5, 0.5])
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, 2)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    for a, b, sa, sb in zip(lora_A, lora_B, a_slots, b_slots):
        r = a.shape[1]
        assert torch.equal(sa[:r], a[1]) and torch.equal(sa[r:], torch.zeros_like(sa[r:]))
        assert torch.equal(sb[:, :r], 0.5 * SCALING * b[1])
        assert torch.equal(sb[:, r:], torch.zeros_like(sb[:, r:]))


def test_triton_no_linears_is_a_no_op(triton_slots):
    write_factor_slots_([], [], torch.tensor([0, 1]), torch.tensor([0.5, 0.5]), SCALING, [], [],
                        impl="triton")


def test_triton_refuses_what_it_cannot_take(triton_slots):
    lora_A, lora_B, experts, gates = _problem(ALIGNED, 2, torch.float32)
    a_slots, b_slots = make_slots(lora_A, lora_B, 2)
    b_slots[1] = torch.zeros(2 * 16, 16).T  # right shape, not contiguous
    fs.clear_plan_cache()
    with pytest.raises(ValueError, match=r"b_slots\[1\] \(16, 32\) is not contiguous"):
        write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    with warnings.catch_warnings(record=True) as caught:  # auto falls back, once per buffer set
        warnings.simplefilter("always")
        assert fs._get_plan("auto", lora_A, lora_B, experts, gates, a_slots, b_slots) == "reference"
        assert fs._get_plan("auto", lora_A, lora_B, experts, gates, a_slots, b_slots) == "reference"
    assert len(caught) == 1 and "not contiguous" in str(caught[0].message)


# ------------------------------------------------------------------------------------------
# The op: schema, fake implementation, torch.compile, validation
# ------------------------------------------------------------------------------------------
def test_schema_declares_the_slot_mutations():
    schema = torch.ops.adafuse.write_factor_slots.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["a_slots", "b_slots"]
    assert schema.arguments[-1].name == "impl" and schema.arguments[-1].default_value == "auto"


def test_opcheck():
    lora_A, lora_B, experts, gates = _problem(ODD, 2, torch.float32)
    a_slots, b_slots = make_slots(lora_A, lora_B, 2)
    torch.library.opcheck(torch.ops.adafuse.write_factor_slots.default,
                          (lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, "reference"))


def test_fake_impl_validates():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        lora_A, lora_B, experts, gates = _problem(ALIGNED, 2, torch.bfloat16)
        a_slots, b_slots = make_slots(lora_A, lora_B, 2)
        torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
        with pytest.raises(ValueError, match="slot 0 has shapes"):
            torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts[:1], gates[:1], SCALING,
                                                 a_slots, b_slots)


def test_inside_torch_compile():
    """The slots are written through the compiled function (the mutation is not dropped)."""
    lora_A, lora_B, experts, gates = _problem(ODD, 2, torch.float32)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, 2)

    def step(x, experts, gates):
        torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
        return x @ a_slots[0].T

    torch._dynamo.reset()
    x = torch.randn(1, ODD[0][0])
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x, experts, gates)
    want_a, want_b = _reference_slots(lora_A, lora_B, experts, gates, 2)
    _assert_equal_slots(a_slots, b_slots, want_a, want_b, "compiled")
    torch.testing.assert_close(got, x @ want_a[0].T)


@pytest.mark.parametrize("change,match", [
    (lambda p: p.update(lora_B=p["lora_B"][:1]), "list lengths differ"),
    (lambda p: p.update(gates=torch.rand(3)), "experts has 2 entries but gates has 3"),
    (lambda p: p.update(experts=torch.tensor([0.0, 1.0])), "experts must be integer"),
    (lambda p: p.update(gates=torch.tensor([1, 2])), "gates must be floating point"),
    (lambda p: p["a_slots"].__setitem__(1, torch.zeros(2 * 16, 25)), r"slot 1 has shapes \(32, 25\)"),
    (lambda p: p["lora_B"].__setitem__(0, torch.zeros(N_EXPERTS, 72, 4)), r"lora_B\[0\] \(5, 72, 4\)"),
    (lambda p: p.update(impl="cutlass"), "impl must be one of"),
])
def test_validation_errors(change, match):
    lora_A, lora_B, experts, gates = _problem(ALIGNED, 2, torch.float32)
    a_slots, b_slots = make_slots(lora_A, lora_B, 2)
    p = dict(lora_A=lora_A, lora_B=lora_B, experts=experts, gates=gates, scaling=SCALING,
             a_slots=a_slots, b_slots=b_slots, impl="reference")
    change(p)
    with pytest.raises(ValueError, match=match):
        if p["impl"] not in fs.IMPLS:  # the impl is checked in the op, not in validate
            torch.ops.adafuse.write_factor_slots(*p.values())
        else:
            write_factor_slots_(**p)


# ------------------------------------------------------------------------------------------
# The GPU code path, compiled ahead of time for sm_90 on this CPU machine
# ------------------------------------------------------------------------------------------
_AOT = textwrap.dedent("""
    import re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adafuse_compile.cutlass_kernels import triton_factor_slots as tf
    target = GPUTarget("cuda", 90, 32)
    C = "constexpr"
    for dt in ("*bf16", "*fp16", "*fp32"):
        for aligned in (True, False):
            sig = dict(tiles_ptr="*i32", desc_ptr="*i64", src_ref=dt, dst_ref=dt,
                       experts_ptr="*i64", gates_ptr="*fp32", e_stride="i32", g_stride="i32",
                       scaling="fp32", K_SEL=C, R_P2=C, BLOCK=C, ALIGNED=C)
            cst = dict(K_SEL=2, R_P2=64, BLOCK=4096, ALIGNED=aligned)
            k = triton.compile(ASTSource(tf._write_slots_kernel, sig, cst), target=target)
            assert "cubin" in k.asm
            vec = re.search(r"ld\\.global\\.v4", k.asm["ptx"]) and re.search(r"st\\.global\\.v4", k.asm["ptx"])
            assert vec or not aligned, f"{dt}: no 16-byte loads and stores with the alignment hints"
    print("AOT-OK")
""")


def test_kernel_compiles_for_sm90():
    """triton.compile to PTX and cubin for sm_90 without a GPU (needs Triton's ptxas)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0 and "AOT-OK" in res.stdout, res.stderr[-4000:]
