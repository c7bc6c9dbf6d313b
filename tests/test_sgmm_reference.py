"""SGMM PyTorch reference and the op's contract, on the CPU, against a float64 oracle."""
import pytest
import torch

from adafuse_compile.cutlass_kernels import ops
from adafuse_compile.cutlass_kernels.reference import (
    assert_matches_oracle, delta_error, make_problem, oracle_switch, reference_switch_, simple_merge_switch_,
)

SHAPES = [(96, 200), (40, 72)]
# Error of the update relative to the update's size (see make_problem): output rounding of W
# is ~1e-3 (bf16) / ~1.5e-4 (fp16) of it; a wrong expert or gate gives ~1.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


def _args(p):
    return (p["weights"], p["lora_A"], p["lora_B"], p["experts"], p["gates"],
            p["prev_experts"], p["prev_gates"], p["scaling"])


def _check(p, expected, before, dtype):
    assert_matches_oracle(p["weights"], expected, before, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_inplace_matches_oracle(dtype, k, impl):
    p = make_problem(SHAPES, k=k, dtype=dtype)
    before = [w.clone() for w in p["weights"]]
    expected = oracle_switch(*_args(p))
    e, g = p["experts"].clone(), p["gates"].clone()
    ops.sgmm_switch_(*_args(p), impl=impl)
    _check(p, expected, before, dtype)
    assert torch.equal(p["prev_experts"], e) and torch.equal(p["prev_gates"], g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pristine_matches_oracle(dtype, k):
    p = make_problem(SHAPES, k=k, dtype=dtype, pristine=True)
    expected = oracle_switch(*_args(p), pristine=p["pristine"])
    for w in p["weights"]:
        w.fill_(float("nan"))  # pristine mode must write every element
    ops.sgmm_switch_(*_args(p), pristine=p["pristine"])
    _check(p, expected, p["pristine"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simple_merge_matches_oracle(dtype):
    p = make_problem(SHAPES, k=2, dtype=dtype)
    before = [w.clone() for w in p["weights"]]
    expected = oracle_switch(*_args(p))
    simple_merge_switch_(*_args(p))
    _check(p, expected, before, dtype)


def test_first_token_unmerges_nothing():
    p = make_problem(SHAPES, k=2)
    p["prev_experts"].zero_()
    p["prev_gates"].zero_()  # initial buffer state
    before = [w.clone() for w in p["weights"]]
    ops.sgmm_switch_(*_args(p))
    for i, w in enumerate(p["weights"]):
        a, b = p["lora_A"][i].double(), p["lora_B"][i].double()
        delta = sum(p["scaling"] * g * (b[e] @ a[e])
                    for e, g in zip(p["experts"].tolist(), p["gates"].double().tolist()))
        assert delta_error(w, before[i], before[i].double() + delta) < TOL[torch.float32]


def test_inplace_sequence_returns_to_base():
    """Merge t1, t2, ..., tn then a switch with zero gates: W back to W_initial (fp32)."""
    p = make_problem(SHAPES, k=2)
    p["prev_gates"].zero_()
    w_init = [w.clone() for w in p["weights"]]
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        p["experts"].copy_(torch.randperm(8, generator=gen)[:2])
        p["gates"].copy_(torch.softmax(torch.randn(2, generator=gen), 0))
        ops.sgmm_switch_(*_args(p))
    p["gates"].zero_()
    ops.sgmm_switch_(*_args(p))
    for w, w0 in zip(p["weights"], w_init):
        assert (w - w0).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pristine_long_sequence_is_exact(dtype):
    """After many switches W is bit-identical to one switch from W0 with the last experts."""
    p = make_problem(SHAPES, k=2, dtype=dtype, pristine=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        p["experts"].copy_(torch.randperm(8, generator=gen)[:2])
        p["gates"].copy_(torch.softmax(torch.randn(2, generator=gen), 0))
        ops.sgmm_switch_(*_args(p), pristine=p["pristine"])
    fresh = [torch.full_like(w, float("nan")) for w in p["weights"]]
    reference_switch_(fresh, p["lora_A"], p["lora_B"], p["experts"], p["gates"],
                      p["prev_experts"].clone(), p["prev_gates"].clone(), p["scaling"],
                      p["pristine"])
    for w, f in zip(p["weights"], fresh):
        assert torch.equal(w, f)
    expected = oracle_switch(*_args(p), pristine=p["pristine"])
    _check(p, expected, p["pristine"], dtype)


def test_a_cached_plan_still_checks_each_call():
    """A plan is cached on the weight table; a later call with the same table and bad per-call tensors,
    or with a factor of another dtype at the same address, must still raise (CI once saw a plan
    reused through an address a freed tensor had held, and the gates check skipped)."""
    p = make_problem(SHAPES, k=2, dtype=torch.bfloat16)
    a = _args(p)
    ops.sgmm_switch_(*a, impl="reference")  # builds and caches the plan for this table
    with pytest.raises(ValueError, match=r"gates has shape \(3,\), expected \(2,\)"):
        ops.sgmm_switch_(*a[:4], torch.ones(3), *a[5:], impl="reference")
    with pytest.raises(ValueError, match=r"prev_gates must be torch.float32"):
        ops.sgmm_switch_(*a[:6], a[6].double(), *a[7:], impl="reference")
    same_address = [a[2][0].view(torch.float16), a[2][1]]  # same data_ptr and shape, another dtype
    with pytest.raises(ValueError, match=r"lora_B\[0\] is torch.float16"):
        ops.sgmm_switch_(a[0], a[1], same_address, *a[3:], impl="reference")


def test_validation_errors():
    p = make_problem(SHAPES, k=2)
    a = _args(p)
    with pytest.raises(ValueError, match="2 weights, 1 lora_A"):
        ops.sgmm_switch_(a[0], a[1][:1], *a[2:])
    with pytest.raises(ValueError, match=r"weights\[1\] .*does not match lora_A\[1\]"):
        ops.sgmm_switch_(a[0], [a[1][0], a[1][0]], *a[2:])
    with pytest.raises(ValueError, match=r"lora_B\[0\] is torch.float16"):
        ops.sgmm_switch_(a[0], a[1], [a[2][0].half(), a[2][1]], *a[3:])
    with pytest.raises(ValueError, match=r"gates has shape \(3,\), expected \(2,\)"):
        ops.sgmm_switch_(*a[:4], torch.ones(3), *a[5:])
    with pytest.raises(ValueError, match="k in 1..4"):
        ops.sgmm_switch_(*a[:3], torch.arange(5), torch.ones(5), torch.arange(5),
                         torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="prev_experts must be torch.int64"):
        ops.sgmm_switch_(*a[:5], a[5].int(), *a[6:])
    with pytest.raises(ValueError, match=r"pristine\[1\]"):
        ops.sgmm_switch_(*a, pristine=[p["weights"][0].clone(), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.sgmm_switch_(*a, impl="cuda")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ops.sgmm_switch_(*a, impl="cutlass")


def test_fake_impl_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = make_problem(SHAPES, k=2, pristine=True)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        f = {k_: ([mode.from_tensor(t) for t in v] if isinstance(v, list)
                  else mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
             for k_, v in p.items()}
        out = torch.ops.adafuse.sgmm_switch(*_args(f), f["pristine"], "auto")
    assert out is None


def test_op_traces_under_torch_compile():
    p = make_problem(SHAPES, k=2)
    before = [w.clone() for w in p["weights"]]
    expected = oracle_switch(*_args(p))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates):
        ops.sgmm_switch_(weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates, 0.5)

    step(*_args(p)[:7])
    _check(p, expected, before, torch.float32)


@pytest.mark.parametrize("error", [RuntimeError, ValueError, OSError])
def test_auto_falls_back_to_triton_when_the_cutlass_plan_fails(monkeypatch, error):
    """impl='auto': a CUTLASS plan that fails to build (every candidate GEMM refused: RuntimeError; a
    factor it cannot address: ValueError; a build directory it cannot write: OSError) warns and
    takes the Triton plan; impl='cutlass' raises. (Stand-ins for both plans: no GPU here.)"""
    import adafuse_compile.cutlass_kernels.cutlass_sgmm as cutlass_sgmm
    import adafuse_compile.cutlass_kernels.triton_sgmm as triton_sgmm

    def refuse(*args, **kwargs):
        raise error("SGMM CUTLASS: no candidate GEMM could be planned: variant 14: can_implement")

    class TritonStandIn:
        def __init__(self, weights, *args):
            self.weights = weights

    monkeypatch.setattr(ops, "_resolve_impl", lambda impl, *a: "cutlass")
    monkeypatch.setattr(cutlass_sgmm, "CutlassPlan", refuse)
    monkeypatch.setattr(triton_sgmm, "TritonPlan", TritonStandIn)
    ops.clear_plan_cache()
    p = make_problem(SHAPES, k=2, dtype=torch.bfloat16)
    a = _args(p)
    with pytest.warns(UserWarning, match="CUTLASS plan failed .*no candidate GEMM.*; using Triton"):
        plan = ops._get_plan("auto", p["weights"], p["lora_A"], p["lora_B"], *a[3:7], None)
    assert isinstance(plan, TritonStandIn) and plan.weights is p["weights"]
    ops.clear_plan_cache()
    with pytest.raises(error, match="no candidate GEMM"):
        ops._get_plan("cutlass", p["weights"], p["lora_A"], p["lora_B"], *a[3:7], None)
    ops.clear_plan_cache()


def test_impls_that_cannot_run_on_the_cpu_say_what_to_use(monkeypatch):
    """Off CUDA, 'cutlass' never runs and 'triton' only in Triton's interpreter: both name the
    device and the fix (impl='auto') instead of failing inside a kernel launch."""
    from adafuse_compile.cutlass_kernels import gather_lora

    p = make_problem(SHAPES[:1], k=2)
    a = _args(p)
    ops.clear_plan_cache()
    with pytest.raises(ValueError, match="needs a CUDA device.*impl='auto'"):
        ops._get_plan("cutlass", p["weights"], p["lora_A"], p["lora_B"], *a[3:7], None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl 'triton' needs a CUDA device.*TRITON_INTERPRET=1.*impl='auto'"):
        ops._get_plan("triton", p["weights"], p["lora_A"], p["lora_B"], *a[3:7], None)
    with pytest.raises(ValueError, match="impl 'triton' needs a CUDA device.*impl='auto'"):
        gather_lora.prepare_plan(p["lora_A"], p["lora_B"], "triton")
    ops.clear_plan_cache()


def test_an_unwritable_build_directory_is_a_clear_runtime_error(monkeypatch, tmp_path):
    """The CUTLASS build's directory set-up fails like the build itself (RuntimeError, remembered,
    naming ADAFUSE_CACHE), which the auto dispatch turns into the Triton path."""
    from adafuse_compile.cutlass_kernels import build

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("ADAFUSE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(build, "cutlass_include_dirs", lambda: [tmp_path])
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(build, "_failed", {})
    monkeypatch.setattr(build, "_loaded", {})
    for _ in range(2):  # the second call answers from the remembered failure
        with pytest.raises(RuntimeError, match="not writable.*ADAFUSE_CACHE"):
            build.load_extension((27,))


def test_a_built_superset_is_loaded_instead_of_a_new_build(monkeypatch, tmp_path):
    """A request for a few variants loads the smallest extension already built in the cache that
    holds them all (a finished build: its .so exists), and builds its own only when none does."""
    from adafuse_compile.cutlass_kernels import build

    monkeypatch.setenv("ADAFUSE_CACHE", str(tmp_path))
    base = set(build.BUILD_VARIANTS)

    def built(variants, finished=True):
        d = tmp_path / (build._NAME_PREFIX + "_".join(str(v) for v in sorted(variants)))
        d.mkdir()
        if finished:
            (d / (d.name + ".so")).write_bytes(b"")
        return tuple(sorted(variants))

    assert build._built_superset(base | {23}) is None  # empty cache: build
    big = built(base | {23, 24, 25, 30, 31, 32})
    small = built(base | {23, 30})
    built(base | {23}, finished=False)  # still building elsewhere (no .so): not taken
    (tmp_path / (build._NAME_PREFIX + "x_1")).mkdir()  # not a build directory of ours
    assert build._built_superset(base | {23}) == small
    assert build._built_superset(base | {31}) == big
    assert build._built_superset(base | {26}) is None
