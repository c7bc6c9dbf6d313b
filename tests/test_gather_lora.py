"""gather_lora on the CPU: reference and Triton kernels (interpreter) vs a float64 per-token
oracle, the fake implementation, the op under torch.compile, validation, and an
ahead-of-time compile of the kernels for sm_90 (catches what the interpreter does not).

Triton runs in its interpreter: fp32 and fp16 only (bf16 tl.dot is wrong there; the GPU file
tests bf16).
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch


from adafuse_compile.cutlass_kernels import gather_lora as gl
from adafuse_compile.cutlass_kernels.gather_lora import (
    gather_lora, make_gather_problem, oracle_gather_lora, reference_gather_lora, token_errors,
)

OUTS = [64, 32, 48]  # q,k,v-like group with three different widths
IN = 40  # odd: not a multiple of the K block
# Worst per-token relative error allowed, about 4x the worst measured over this file's cases
# (fp32 3e-7; fp16 reference 3e-4, Triton 4.6e-4; bf16 reference 2.5e-3): the output's one
# rounding. A wrong expert, a dropped slot or a wrong gate is O(1e-1) or more.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the backend's graphs compute the step's sort and sets through these ops (one buffer for every consumer)
SORT_OP, SETS_OP = torch.ops.adafuse.expert_segments.default, torch.ops.adafuse.tuple_blocks.default


def _problem(T, k, dtype, outs=OUTS, n_in=IN, n_experts=5, rank=16):
    return make_gather_problem(T, n_in, outs, k=k, n_experts=n_experts, rank=rank, dtype=dtype)


def _check(got, p, dtype, what):
    expected = oracle_gather_lora(**p)
    assert len(got) == len(expected)
    for m, (y, exp) in enumerate(zip(got, expected)):
        assert y.shape == exp.shape and y.dtype == p["x"].dtype, f"{what} module {m}"
        assert torch.isfinite(y).all(), f"{what} module {m}: non-finite output"
        err = token_errors(y, exp)
        worst = int(err.argmax())
        assert err[worst] < TOL[dtype], (
            f"{what} module {m} out={exp.shape[1]}: token {worst} rel. error {err[worst]:.2e}"
        )


# ------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 4, 17, 64])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_reference_matches_oracle(dtype, k, T, M):
    p = _problem(T, k, dtype, outs=OUTS[:M])
    _check(reference_gather_lora(**p), p, dtype, "reference")


def test_reference_repeated_expert_in_one_token():
    """Two slots of a token naming the same expert add up (no dedup by accident)."""
    p = _problem(3, 2, torch.float32)
    p["experts"][1] = torch.tensor([2, 2])
    _check(reference_gather_lora(**p), p, torch.float32, "reference")


def test_auto_on_cpu_is_reference():
    p = _problem(5, 2, torch.float32)
    got = gather_lora(**p)  # impl="auto"
    for y, r in zip(got, reference_gather_lora(**p)):
        assert torch.equal(y, r)


def test_oracle_is_not_trivial():
    """The oracle itself: one token, one expert, by hand."""
    x = torch.tensor([[1.0, 2.0]])
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # N=2, r=1, in=2
    b = torch.tensor([[[3.0]], [[5.0]]])  # out=1
    y = oracle_gather_lora(x, [a], [b], torch.tensor([[1, 0]]), torch.tensor([[0.25, 0.75]]),
                           2.0)[0]
    assert y.item() == pytest.approx(2.0 * (0.25 * 5 * 2 + 0.75 * 3 * 1))


# ------------------------------------------------------------------------------------------
# Triton kernels in the interpreter
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_gather():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter tests; the GPU runs tests/test_gather_lora_gpu.py")
    mod = sys.modules.get("adafuse_compile.cutlass_kernels.triton_gather")
    if mod is not None:  # imported earlier in this process without the interpreter
        mod = importlib.reload(mod)
    else:
        mod = importlib.import_module("adafuse_compile.cutlass_kernels.triton_gather")
    gl.clear_plan_cache()
    yield mod
    gl.clear_plan_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 4, 17, 40])  # 17 x 4 and 40 x 2+ rows: sorted shrink
def test_triton_matches_oracle(triton_gather, dtype, k, T):
    p = _problem(T, k, dtype)
    _check(gather_lora(**p, impl="triton"), p, dtype, f"triton T={T} k={k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k", [(1, 2), (5, 2), (40, 2)])  # decode, masked shrink, sorted shrink
def test_triton_reads_x_by_its_row_stride(triton_gather, dtype, T, k):
    """x with padded rows, as Inductor lays out a GPU buffer whose rows are not a multiple of 128
    bytes (the ops take it as it is, gather_lora._STRIDE_ORDER): the shrink reads it by its row
    stride, no copy; the padding holds NaN, so a kernel that assumed dense rows would show it."""
    p = _problem(T, k, dtype, n_in=48)
    padded = torch.full((T, 56), float("nan"), dtype=dtype)
    padded[:, :48] = p["x"]
    p["x"] = padded[:, :48]
    assert p["x"].stride() == (56, 1)
    _check(gather_lora(**p, impl="triton"), p, dtype, f"triton padded rows T={T}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", [
    dict(SORTED=False, BLOCK_M=32, BLOCK_K=16, SPLIT_K=2),  # masked, split K (partials summed by the expand)
    dict(SORTED=True, BLOCK_M=16, BLOCK_K=16, SPLIT_K=3),  # several row blocks per expert
    dict(SORTED=True, BLOCK_M=16, BLOCK_K=32, SPLIT_K=1, BLOCK_T=16, BLOCK_O=16),
    dict(SORTED=False, BLOCK_M=64, BLOCK_K=16, SPLIT_K=2, EXPAND_UNROLL=True),  # every expert, unrolled
    dict(SORTED=True, BLOCK_M=16, BLOCK_K=16, SPLIT_K=2, EXPAND_SETS=True),  # prefill: expand by sets
    dict(SORTED=True, BLOCK_M=16, BLOCK_K=16, SPLIT_K=2, EXPAND_SETS=False),  # prefill, per token block
    # Several out blocks per program (h read once): 2 (outs of 3 and 4 blocks of 16), and
    # one larger than the blocks there are (the extra iterations store nothing).
    dict(SORTED=True, BLOCK_M=16, BLOCK_K=16, SPLIT_K=2, EXPAND_SETS=False, BLOCK_O=16, O_ITERS=2),
    dict(SORTED=False, BLOCK_M=64, BLOCK_K=16, SPLIT_K=2, EXPAND_UNROLL=True, BLOCK_O=16, O_ITERS=16),
    dict(SORTED=True, BLOCK_M=16, BLOCK_K=16, SPLIT_K=2, EXPAND_SETS=True, SETS_BLOCK_O=16, SETS_O_ITERS=2),
])
def test_triton_config_paths(triton_gather, dtype, cfg, monkeypatch):
    """Every shrink form and the split-K partials, forced (the default config picks by shape). The
    partial buffer h is allocated uninitialized: poisoned with NaN here, any slot the expand reads
    but no shrink program wrote would show."""
    p = _problem(21, 2, dtype, rank=8)  # r=8: padded to 16 lanes, masked
    p["experts"][5, 1] = -1  # an out-of-range id: contributes nothing, its unwritten h rows unread
    p["experts"][7] = 3  # a repeated expert: both slots count
    plan = gl._get_triton_plan(p["lora_A"], p["lora_B"])
    empty = torch.empty

    def poisoned_empty(*shape, **kw):
        return empty(*shape, **kw).fill_(float("nan"))
    monkeypatch.setattr(torch, "empty", poisoned_empty)  # the launcher's allocations, during this call
    got = plan.run(p["x"], p["experts"], p["gates"], p["scaling"], config=cfg)
    monkeypatch.undo()
    assert all(not y.isnan().any() for y in got)
    p["gates"][5, 1] = 0.0  # what the oracle should ignore for the out-of-range slot
    p["experts"][5, 1] = 0
    _check(got, p, dtype, f"triton {cfg}")


def test_config_env_override_applies_and_rejects_unknown_keys(triton_gather, monkeypatch):
    """ADAFUSE_GATHER_CONFIG (a benchmark's tuning knob) reaches the chosen config, and still computes right."""
    p = _problem(3, 2, torch.float32)
    plan = gl._get_triton_plan(p["lora_A"], p["lora_B"])
    default = plan.config(3, 2)
    monkeypatch.setenv(triton_gather.CONFIG_ENV, '{"SPLIT_K": 3, "BLOCK_K": 16}')
    assert plan.config(3, 2) == {**default, "SPLIT_K": 3, "BLOCK_K": 16}
    _check(plan.run(p["x"], p["experts"], p["gates"], p["scaling"]), p, torch.float32, "env split 3")
    monkeypatch.setenv(triton_gather.CONFIG_ENV, '{"SPLITK": 3}')
    with pytest.raises(ValueError, match=r"unknown keys \['SPLITK'\].*allowed"):
        plan.config(3, 2)
    monkeypatch.setenv(triton_gather.CONFIG_ENV, "SPLIT_K=3")
    with pytest.raises(ValueError, match="not JSON"):
        plan.config(3, 2)


def test_triton_many_modules_and_unused_experts(triton_gather):
    """M = 10 > 8 modules per expand launch; N = 12 experts, most unused; odd outs."""
    outs = [16, 24, 8, 40, 64, 32, 8, 16, 56, 72]
    p = make_gather_problem(3, 24, outs, k=2, n_experts=12, rank=16, dtype=torch.float32)
    _check(gather_lora(**p, impl="triton"), p, torch.float32, "triton M=10")


def test_triton_repeated_expert_and_plan_reuse(triton_gather):
    p = _problem(6, 3, torch.float32)
    p["experts"][2] = torch.tensor([4, 4, 1])
    _check(gather_lora(**p, impl="triton"), p, torch.float32, "triton first call")
    # Same adapter set, new tokens and experts: the cached plan must not hold stale state.
    q = dict(p, x=torch.randn(9, IN), experts=torch.randint(0, 5, (9, 3)),
             gates=torch.rand(9, 3, dtype=torch.float64))  # gates in another float dtype
    n_plans = len(gl._plans)
    _check(gather_lora(**q, impl="triton"), q, torch.float32, "triton second call")
    assert len(gl._plans) == n_plans


def _check_slots(got, p, dtype, what):
    """Per-slot terms [T, k, out]: their sum is the delta, and each slot is its own expert's term."""
    k = p["experts"].shape[1]
    assert all(tuple(y.shape) == (p["x"].shape[0], k, b.shape[1]) for y, b in zip(got, p["lora_B"])), what
    _check([y.float().sum(1).to(dtype) for y in got], p, dtype, what + " (sum over slots)")
    for j in range(k):
        one = dict(p, experts=p["experts"][:, j:j + 1], gates=p["gates"][:, j:j + 1])
        _check([y[:, j] for y in got], one, dtype, f"{what} (slot {j})")


@pytest.mark.parametrize("T, k", [(40, 2), (5, 3), (17, 4)])  # 5 x 3 rows: sorted anyway
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_slot_expand_by_expert(triton_gather, T, k, dtype):
    p = _problem(T, k, dtype)
    _check_slots(gather_lora(**p, impl="triton", per_slot=True), p, dtype, f"triton per slot T={T} k={k}")


@pytest.mark.parametrize("o_iters", [1, 2])
def test_per_slot_reference_and_forced_config(triton_gather, monkeypatch, o_iters):
    """The reference's per-slot form; the Triton one with split K, several row blocks per expert,
    one or two out blocks per program (outs of 4, 2 and 3 blocks), h poisoned with NaN, an
    out-of-range id (its slot must come out zero) and a repeated expert."""
    p = _problem(21, 2, torch.float32, rank=8)
    _check_slots(gather_lora(**p, impl="reference", per_slot=True), p, torch.float32, "reference per slot")
    p["experts"][5, 1] = 11  # out of range, above: sorted after every segment
    p["experts"][9, 0] = -1  # and below: sorted before them
    p["experts"][7] = 3
    plan = gl._get_triton_plan(p["lora_A"], p["lora_B"])
    empty = torch.empty

    def poisoned_empty(*shape, **kw):
        return empty(*shape, **kw).fill_(float("nan"))
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    got = plan.run(p["x"], p["experts"], p["gates"], p["scaling"], per_slot=True,
                   config=dict(BLOCK_M=16, BLOCK_K=16, SPLIT_K=3, SLOTS_BLOCK_O=16, SLOTS_O_ITERS=o_iters))
    monkeypatch.undo()
    assert all(not y.isnan().any() for y in got)
    assert all(not y[5, 1].any() and not y[9, 0].any() for y in got)
    p["gates"][5, 1] = p["gates"][9, 0] = 0.0
    p["experts"][5, 1] = p["experts"][9, 0] = 0
    _check_slots(got, p, torch.float32, "triton per slot, forced")


def test_sets_expand_with_a_work_list_of_larger_blocks(triton_gather):
    """A work list built with blocks larger than the kernel's (a caller's tuple_blocks(..., 64))
    still covers every token: the kernel walks a block in several passes."""
    p = _problem(40, 2, torch.float32)
    plan = gl._get_triton_plan(p["lora_A"], p["lora_B"])
    order, work = gl.tuple_blocks(p["experts"], p["lora_A"][0].shape[0], 64)
    got = plan.run(p["x"], p["experts"], p["gates"], p["scaling"], set_order=order, set_work=work,
                   config={"SORTED": True, "EXPAND_SETS": True, "SETS_BLOCK_T": 16})
    _check(got, p, torch.float32, "sets, list of 64-token blocks, kernel block 16")


def test_out_iters_keep_enough_programs_per_sm(triton_gather):
    """Out blocks per expand program: grouped only while EXPAND_PROGRAMS_PER_SM programs per SM
    remain, never past the blocks there are or MAX_O_ITERS."""
    per_sm, most = triton_gather.EXPAND_PROGRAMS_PER_SM, triton_gather.MAX_O_ITERS
    out_iters = triton_gather._out_iters
    assert out_iters(per_sm * 132, 64, 132) == 1
    assert out_iters(per_sm * 132 * 2, 64, 132) == 2
    assert out_iters(per_sm * 132 * 1000, 64, 132) == most
    assert out_iters(per_sm * 132 * 1000, 2, 132) == 2
    assert out_iters(344, 172, 132, per_sm=1) == 2  # the unrolled gate,up expand at T = 32 on an H200


def test_default_config_at_the_measured_7b_shapes(triton_gather):
    """The shape-picked config where the H200 measured it: one out block per program at decode
    but for the unrolled gate,up at T = 32 (the only group unrolled), 4 per program in the prefill
    expand by sets."""
    from adafuse_compile.cutlass_kernels.triton_gather import GatherPlan

    def cfg(n_in, outs, T):
        plan = GatherPlan([torch.zeros(8, 64, n_in, dtype=torch.bfloat16, device="meta")] * len(outs),
                          [torch.zeros(8, o, 64, dtype=torch.bfloat16, device="meta") for o in outs])
        plan.sms = 132
        return plan.config(T, 2)
    assert [cfg(4096, [4096] * 3, T)["O_ITERS"] for T in (1, 8, 32)] == [1, 1, 1]
    assert [cfg(4096, [11008] * 2, T)["O_ITERS"] for T in (1, 8, 32)] == [1, 1, 2]
    assert cfg(4096, [11008] * 2, 32)["EXPAND_UNROLL"]  # unrolled only where it measured faster: gate,up at T = 32
    assert not any(cfg(n_in, outs, 32)["EXPAND_UNROLL"] for n_in, outs in
                   ((4096, [4096] * 3), (4096, [4096]), (11008, [4096])))
    assert all(cfg(n_in, outs, 512)["SETS_O_ITERS"] == 4 for n_in, outs in
               ((4096, [4096] * 3), (4096, [4096]), (4096, [11008] * 2), (11008, [4096])))


def test_shrink_block_k_by_dtype_and_rank():
    """K block 128 for 16-bit factors (measured faster on the H200 at r = 64), 64 for fp32 and for
    r > 128 (not measured there)."""
    from adafuse_compile.cutlass_kernels.triton_gather import GatherPlan

    def block_k(dtype, r):
        a = [torch.zeros(4, r, 64, dtype=dtype)]
        b = [torch.zeros(4, 32, r, dtype=dtype)]
        return GatherPlan(a, b).config(1, 2)["BLOCK_K"]
    assert block_k(torch.bfloat16, 64) == 128 and block_k(torch.float16, 128) == 128
    assert block_k(torch.float32, 64) == 64 and block_k(torch.bfloat16, 256) == 64


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tuple_blocks_cover_every_token_once_with_its_set(k):
    """tuple_blocks' work list: every token in exactly one block, blocks no larger than block_t,
    every token of a block with the block's set (sorted ids, base N + 1; N for an out-of-range id)."""
    n_experts, T, block_t = 5, 70, 4
    g = torch.Generator().manual_seed(k)
    experts = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(T)])
    experts[3, 0] = 7
    experts[4, -1] = -2
    if k > 1:
        experts[5] = 2  # a repeated expert
    order, work = gl.tuple_blocks(experts, n_experts, block_t)
    assert work.shape == (3, -(-T // block_t) + min(T, (n_experts + 1) ** k))
    seen = []
    for key, start, end in work.t().tolist():
        assert 0 <= end - start <= block_t
        for t in order[start:end].tolist():
            ids = sorted(i if 0 <= i < n_experts else n_experts for i in experts[t].tolist())
            assert sum(d * (n_experts + 1) ** (k - 1 - i) for i, d in enumerate(ids)) == key, t
            seen.append(t)
    assert sorted(seen) == list(range(T))


@pytest.mark.parametrize("T, k", [(40, 2), (17, 4), (3, 2)])
def test_triton_with_segments_computed_once(triton_gather, T, k):
    """expert_segments computed by the caller (once per step in the backend) give the same result
    as the launcher's own sort; below SORTED_MIN_ROWS rows the masked shrink ignores them."""
    p = _problem(T, k, torch.float32)
    rows, segments = gl.expert_segments(p["experts"], p["lora_A"][0].shape[0])
    assert torch.equal(p["experts"].reshape(-1)[rows], p["experts"].reshape(-1).sort(stable=True).values)
    got = gather_lora(**p, impl="triton", rows=rows, segments=segments)
    _check(got, p, torch.float32, f"triton T={T} k={k}, given segments")
    if T * k >= gl.SORTED_MIN_ROWS:  # the sorted shrink really reads the given order: a wrong one shows
        wrong = gather_lora(**p, impl="triton", rows=rows.flip(0), segments=segments)
        assert not all(torch.allclose(a, b) for a, b in zip(wrong, got))
    with pytest.raises(ValueError, match="pass both"):
        gather_lora(**p, impl="triton", rows=rows)


def _compiled_40_token_prefill(num_layers: int, seed: int, **adapters):
    """A 40-token prefill (80 rows: the sorted shrink) of a TinyLlama with q, v, o adapters, through
    the backend with the Triton kernels and the sets expand; checked against eager. -> its graph."""
    import adafuse_compile as af
    from adafuse_compile import backend

    cfg = af.TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                             num_attention_heads=2, num_key_value_heads=2, max_seq_len=48)
    torch.manual_seed(0)
    model = af.TinyLlama(cfg).init_weights(std=0.1, seed=seed)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, top_k=2, init_lora_b="normal",
                                      target_modules=("q_proj", "v_proj", "o_proj"), **adapters))
    model.eval().setup_cache(1)
    tokens, pos = torch.randint(0, 64, (1, 40)), torch.arange(40)
    with torch.no_grad():
        ref = model(tokens, pos)
        torch._dynamo.reset()
        backend.last_compilations.clear()
        model.setup_cache(1)
        got = torch.compile(model, backend="adafuse", options={
            "codegen": "eager", "sgmm_impl": "triton", "prefill_expand": "sets"})(tokens, pos)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    af.restore(model)
    return backend.last_compilations[0]["graph"]


def test_prefill_step_sorts_experts_once_for_every_gather_call(triton_gather):
    """A 40-token prefill of a 3-layer model (80 rows: the sorted shrink): one expert_segments node
    and one tuple_blocks node in the step's graph, feeding all six gather calls; the step matches
    the eager model."""
    import operator

    gm = _compiled_40_token_prefill(num_layers=3, seed=0)
    sorts = [n for n in gm.graph.nodes if n.target is SORT_OP]
    calls = [n for n in gm.graph.nodes if "gather_lora" in str(n.target)]
    assert len(sorts) == 1 and len(calls) == 6  # q,v share x (one call), o alone: 2 per layer
    shared = {tuple(n.args[7:9]) for n in calls}
    assert len(shared) == 1
    rows, segments = next(iter(shared))
    assert rows.target is operator.getitem and rows.args == (sorts[0], 0)
    assert segments.target is operator.getitem and segments.args == (sorts[0], 1)
    # and the tokens' sets of experts for the prefill expand, also once for the step
    sets = [n for n in gm.graph.nodes if n.target is SETS_OP]
    assert len(sets) == 1 and {tuple(a.args for a in n.args[9:11]) for n in calls} == {((sets[0], 0), (sets[0], 1))}


def test_layerwise_prefill_sorts_once_per_router(triton_gather):
    """Layer-wise routing (a router in every adapted linear): the same 40-token prefill sorts its
    rows once per router, each gather call reading its own router's order and sets; matches eager."""
    gm = _compiled_40_token_prefill(num_layers=2, seed=1, router_placement="every_adapted")
    sorts = [n for n in gm.graph.nodes if n.target is SORT_OP]
    sets = [n for n in gm.graph.nodes if n.target is SETS_OP]
    calls = [n for n in gm.graph.nodes if "gather_lora" in str(n.target)]
    assert len(sorts) == len(sets) == len(calls) == 6  # q, v and o of two layers, each its own router
    assert {n.args[7].args[0] for n in calls} == set(sorts) and {n.args[9].args[0] for n in calls} == set(sets)
    for call in calls:  # the order and the experts of a call come from the same router
        assert call.args[7].args[0].args[0] is call.args[3]


def _tiny_qv_model(max_seq_len: int, seed: int):
    """A 2-layer model with q,v adapters (4 experts, r = 8, top-2), in eval mode."""
    import adafuse_compile as af

    cfg = af.TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_seq_len=max_seq_len)
    model = af.TinyLlama(cfg).init_weights(std=0.1, seed=seed)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, top_k=2, init_lora_b="normal",
                                      target_modules=("q_proj", "v_proj")))
    return model.eval()


@pytest.mark.parametrize("prefill_expand", ["sets", "auto"])
def test_prefill_of_a_second_length_recompiles_dynamic_and_stays_exact(triton_gather, prefill_expand):
    """A prefill of another length recompiles with a symbolic token count. With "sets" the step's
    sort and sets (tuple_blocks' work bound uses the symbolic T) are still computed once; with
    "auto" (the default) a dynamic prefill is dense (one gate matrix of symbolic size). The result
    matches eager for both lengths."""
    from adafuse_compile import backend

    model = _tiny_qv_model(max_seq_len=64, seed=1)
    torch._dynamo.reset()
    backend.last_compilations.clear()
    step = torch.compile(model, backend="adafuse", options={"sgmm_impl": "triton", "prefill_expand": prefill_expand})
    with torch.no_grad():
        for n in (40, 47):
            tokens, pos = torch.randint(0, 64, (1, n)), torch.arange(n)
            model.setup_cache(1)
            ref = model(tokens, pos)
            model.setup_cache(1)
            torch.testing.assert_close(step(tokens, pos), ref, rtol=1e-4, atol=1e-4)
    assert len(backend.last_compilations) == 2
    gm = backend.last_compilations[-1]["graph"]
    tokens_in = next(v for n in gm.graph.nodes if n.op == "placeholder"
                     and isinstance(v := n.meta.get("example_value"), torch.Tensor))
    assert isinstance(tokens_in.shape[1], torch.SymInt)  # the second compile is dynamic in T
    count = {f: len([n for n in gm.graph.nodes if n.target is f]) for f in (SETS_OP, gl.dense_gates)}
    assert count == ({SETS_OP: 1, gl.dense_gates: 0} if prefill_expand == "sets"
                     else {SETS_OP: 0, gl.dense_gates: 1})


def test_decode_with_a_dynamic_batch_keeps_the_gather_kernels():
    """A decode step recompiled for a second batch size has a symbolic token count, but x is
    [batch, 1, features]: still a decode step, so prefill_expand="auto" keeps the gather call (dense
    measured 1.3x slower than gather at batch-32 decode)."""
    from adafuse_compile import backend

    model = _tiny_qv_model(max_seq_len=16, seed=4)
    torch._dynamo.reset()
    backend.last_compilations.clear()
    step = torch.compile(model, backend="adafuse", options={"path": "gather"})
    with torch.no_grad():
        for b in (2, 3):
            tokens, pos = torch.randint(0, 64, (b, 1)), torch.tensor([5])
            model.setup_cache(b)
            ref = model(tokens, pos)
            model.setup_cache(b)
            torch.testing.assert_close(step(tokens, pos), ref, rtol=1e-4, atol=1e-4)
    gm = backend.last_compilations[-1]["graph"]
    tokens_in = next(v for n in gm.graph.nodes if n.op == "placeholder"
                     and isinstance(v := n.meta.get("example_value"), torch.Tensor))
    assert isinstance(tokens_in.shape[0], torch.SymInt)  # the second compile is dynamic in the batch
    assert not [n for n in gm.graph.nodes if n.target in (gl.dense_gates, gl.dense_lora, gl.dense_lora_packed)]
    assert [n for n in gm.graph.nodes if "gather_lora" in str(n.target)]


def _tiny_prefill(targets, seed: int, n_tokens: int = 40, n_experts: int = 4):
    """An n-token prefill of a small adapted model: (model, tokens, pos, eager logits)."""
    import adafuse_compile as af

    cfg = af.TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_seq_len=max(48, n_tokens))
    model = af.TinyLlama(cfg).init_weights(std=0.1, seed=seed)
    af.inject(model, af.AdaFuseConfig(num_experts=n_experts, rank=8, top_k=2, init_lora_b="normal",
                                      target_modules=targets))
    model.eval().setup_cache(1)
    tokens, pos = torch.randint(0, 64, (1, n_tokens)), torch.arange(n_tokens)
    with torch.no_grad():
        ref = model(tokens, pos)
    model.setup_cache(1)
    return model, tokens, pos, ref


@pytest.mark.parametrize("side_stream", [False, True])
def test_prefill_with_the_per_slot_expand_matches_eager(triton_gather, side_stream):
    """prefill_expand="slots": every prefill gather call returns per-slot terms, summed in the add
    by Inductor; no tuple_blocks in the graph; the step matches eager (also through the split
    start/join form, which runs in place on the CPU)."""
    from adafuse_compile import backend

    model, tokens, pos, ref = _tiny_prefill("all-linear", seed=2)
    torch._dynamo.reset()
    backend.last_compilations.clear()
    with torch.no_grad():
        got = torch.compile(model, backend="adafuse", options={
            "sgmm_impl": "triton", "prefill_expand": "slots", "side_stream": side_stream})(tokens, pos)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    gm = backend.last_compilations[0]["graph"]
    calls = [n for n in gm.graph.nodes if "gather_lora" in str(n.target) and "join" not in str(n.target)]
    assert len(calls) == 4 * model.config.num_hidden_layers and all(n.args[-1] is True for n in calls)
    assert not [n for n in gm.graph.nodes if n.target is SETS_OP]


@pytest.mark.parametrize("n_tokens, n_experts, expand, dense", [
    (gl.DENSE_MIN_TOKENS, 4, "auto", True),
    (40, 4, "auto", False),  # below DENSE_MIN_TOKENS
    (gl.DENSE_MIN_TOKENS, 2 * gl.DENSE_MAX_EXPANSION + 2, "auto", False),  # N / k above DENSE_MAX_EXPANSION
    (40, 4, "dense", True),  # forced: any multi-token step
])
def test_prefill_expand_auto_is_dense_from_dense_min_tokens(n_tokens, n_experts, expand, dense):
    """The default prefill_expand ("auto"): a step of DENSE_MIN_TOKENS tokens or more computes its
    deltas in dense matmuls (one dense_lora call per group, one gate matrix for the step, no gather
    op) when N / k is at most DENSE_MAX_EXPANSION; a shorter step, or more experts per slot, keeps
    the gather kernels; "dense" forces it. All match the eager model."""
    from adafuse_compile import backend

    model, tokens, pos, ref = _tiny_prefill("all-linear", seed=3, n_tokens=n_tokens, n_experts=n_experts)
    torch._dynamo.reset()
    backend.last_compilations.clear()
    with torch.no_grad():
        got = torch.compile(model, backend="adafuse", options={
            "sgmm_impl": "reference", "prefill_expand": expand})(tokens, pos)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    nodes = backend.last_compilations[0]["graph"].graph.nodes
    n_dense = len([n for n in nodes if n.target in (gl.dense_lora, gl.dense_lora_packed)])
    n_gather = len([n for n in nodes if "gather_lora" in str(n.target)])
    groups = 4 * model.config.num_hidden_layers  # q,k,v / o / gate,up / down
    assert (n_dense, n_gather) == ((groups, 0) if dense else (0, groups))
    assert len([n for n in nodes if n.target is gl.dense_gates]) == int(dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_gates_and_dense_lora_match_the_oracle(dtype):
    """dense_gates: a repeated expert sums its slots, out-of-range ids count for nothing; dense_lora
    with it equals the per-token oracle (fp16: within its tolerance, two roundings of h)."""
    p = _problem(9, 3, dtype)
    p["experts"][2] = torch.tensor([1, 1, 3])
    p["experts"][4, 2] = 5  # N = 5 experts: out of range
    p["experts"][6, 0] = -1
    g = gl.dense_gates(p["experts"], p["gates"], 5)
    assert torch.allclose(g[2, 1], p["gates"][2, :2].sum()) and g[4].sum() == p["gates"][4, :2].sum()
    assert (g > 0).sum(1).tolist()[6] == 2
    got = gl.dense_lora(p["x"], p["lora_A"], p["lora_B"], g, p["scaling"])
    p["gates"][4, 2] = p["gates"][6, 0] = 0.0
    p["experts"][4, 2] = p["experts"][6, 0] = 0
    _check(got, p, dtype, "dense")


def test_triton_zero_tokens(triton_gather):
    p = _problem(0, 2, torch.float32)
    got = gather_lora(**p, impl="triton")
    assert [tuple(y.shape) for y in got] == [(0, o) for o in OUTS]


# ------------------------------------------------------------------------------------------
# Fake implementation and torch.compile
# ------------------------------------------------------------------------------------------
def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = _problem(7, 2, torch.bfloat16)
        got = torch.ops.adafuse.gather_lora(p["x"], p["lora_A"], p["lora_B"], p["experts"],
                                            p["gates"], 0.5, "auto")
        assert [tuple(y.shape) for y in got] == [(7, o) for o in OUTS]
        assert all(y.dtype == torch.bfloat16 for y in got)


def test_opcheck():
    p = _problem(4, 2, torch.float32)
    args = (p["x"], p["lora_A"], p["lora_B"], p["experts"], p["gates"], 0.5, "reference")
    torch.library.opcheck(torch.ops.adafuse.gather_lora.default, args)
    torch.library.opcheck(torch.ops.adafuse.gather_lora.default, (*args, None, None, None, None, True))


def test_side_stream_ops_off_cuda_run_in_place_and_pass_opcheck():
    """gather_lora_start / gather_lora_join (the backend's fork and join): off CUDA the start is
    gather_lora itself and the join changes nothing."""
    p = _problem(6, 2, torch.float32)
    args = (p["x"], p["lora_A"], p["lora_B"], p["experts"], p["gates"], 0.5, "reference")
    deltas = torch.ops.adafuse.gather_lora_start(*args)
    want = reference_gather_lora(**p)
    kept = [d.clone() for d in deltas]
    torch.ops.adafuse.gather_lora_join(deltas, [p["x"], p["experts"]])
    for d, k, w in zip(deltas, kept, want):
        assert torch.equal(d, k) and torch.equal(d, w)
    torch.library.opcheck(torch.ops.adafuse.gather_lora_start.default, args)
    torch.library.opcheck(torch.ops.adafuse.gather_lora_join.default, ([d.clone() for d in deltas], [p["x"]]))


@pytest.mark.parametrize("n_tok,k,n_experts", [(1, 2, 8), (5, 1, 4), (40, 2, 4), (33, 3, 6)])
def test_step_ops_match_their_functions_and_pass_opcheck(n_tok, k, n_experts):
    """The ops the backend puts in a step's graph for the side stream (the sort, the sets, the gates'
    own buffer): each equals the function it wraps, and its fake (the shapes, dtypes and strides
    Inductor plans buffers with) matches the real output, checked by opcheck; out-of-range ids
    (the sets' padding digit) included."""
    gen = torch.Generator().manual_seed(n_tok)
    experts = torch.randint(0, n_experts, (n_tok, k), generator=gen)
    experts[0, -1] = n_experts  # out of range: the sets key it with digit N, the sort puts it last
    rows, seg = SORT_OP(experts, n_experts)
    want_rows, want_seg = gl.expert_segments(experts, n_experts)
    assert torch.equal(rows, want_rows) and torch.equal(seg, want_seg)
    order, work = SETS_OP(experts, n_experts)
    want_order, want_work = gl.tuple_blocks(experts, n_experts)
    assert torch.equal(order, want_order) and torch.equal(work, want_work)
    gates = torch.rand(n_tok, k, generator=gen)
    copy = torch.ops.adafuse.side_input(gates)
    assert torch.equal(copy, gates) and copy.data_ptr() != gates.data_ptr()  # a buffer of its own
    torch.library.opcheck(SORT_OP, (experts, n_experts))
    torch.library.opcheck(SETS_OP, (experts, n_experts))
    torch.library.opcheck(torch.ops.adafuse.side_input.default, (gates,))


def test_inside_torch_compile():
    p = _problem(5, 2, torch.float32)

    def layer(x, experts, gates):
        q, k, v = gather_lora(x, p["lora_A"], p["lora_B"], experts, gates, 0.5)
        return q.sum(1) + k.sum(1) + v.sum(1), q

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(p["x"], p["experts"], p["gates"])
    want = layer(p["x"], p["experts"], p["gates"])
    torch.testing.assert_close(got, want)
    # another batch size and other experts: recompiles or stays dynamic, still correct
    p2 = _problem(9, 2, torch.float32)
    torch.testing.assert_close(compiled(p2["x"], p2["experts"], p2["gates"]),
                               layer(p2["x"], p2["experts"], p2["gates"]))


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
def _bad(**changes):
    p = _problem(4, 2, torch.float32)
    p.update(changes)
    return p


@pytest.mark.parametrize("make,match", [
    (lambda: _bad(x=torch.randn(4, 40, 1)), r"x must be 2-D"),
    (lambda: _bad(x=torch.randn(4, 40).to(torch.float64)), r"x has dtype"),
    (lambda: _bad(lora_A=[], lora_B=[]), r"lora_A. is empty"),
    (lambda: _bad(lora_B=[torch.randn(5, 64, 16)]), r"3 lora_A and 1 lora_B"),
    (lambda: _bad(experts=torch.zeros(3, 2, dtype=torch.int64)), r"experts must be \[T, k\]"),
    (lambda: _bad(experts=torch.zeros(4, 5, dtype=torch.int64),
                  gates=torch.rand(4, 5)), r"k in 1..4"),
    (lambda: _bad(experts=torch.zeros(4, 2, dtype=torch.int32)), r"experts must be int64"),
    (lambda: _bad(gates=torch.rand(4, 3)), r"gates \(4, 3\) != experts \(4, 2\)"),
    (lambda: _bad(gates=torch.ones(4, 2, dtype=torch.int64)), r"gates must be floating"),
    (lambda: _bad(lora_A=[torch.randn(5, 16, 40), torch.randn(5, 16, 41),
                          torch.randn(5, 16, 40)]), r"lora_A\[1\] is \(5, 16, 41\)"),
    (lambda: _bad(lora_A=[torch.randn(5, 16, 40), torch.randn(5, 16, 40),
                          torch.randn(6, 16, 40)]), r"lora_A\[2\] is \(6, 16, 40\)"),
    (lambda: _bad(lora_B=[torch.randn(5, 64, 16), torch.randn(5, 32, 8),
                          torch.randn(5, 48, 16)]), r"lora_B\[1\] is \(5, 32, 8\)"),
    (lambda: _bad(lora_B=[torch.randn(5, 64, 16), torch.randn(5, 32, 16),
                          torch.randn(5, 48, 16).half()]), r"lora_B\[2\] is torch.float16"),
    (lambda: _bad(lora_A=[torch.randn(5, 40, 16).transpose(1, 2)] * 3),
     r"lora_A\[0\] \(5, 16, 40\) must be contiguous"),
])
def test_validation_errors(make, match):
    p = make()
    with pytest.raises(ValueError, match=match):
        gather_lora(**p, impl="reference")


def test_validation_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        gather_lora(**_problem(2, 1, torch.float32), impl="cutlass")


# ------------------------------------------------------------------------------------------
# The GPU code path, compiled ahead of time for sm_90 on this CPU machine
# ------------------------------------------------------------------------------------------
_AOT = textwrap.dedent("""
    import re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adafuse_compile.cutlass_kernels import triton_gather as tg
    target = GPUTarget("cuda", 90, 32)
    C = "constexpr"

    def attrs(fn, sig):
        # what the JIT specializes at run time: 16-byte aligned tensors and ints that are multiples
        # of 16 (n_in and x_stride = 4096 or 11008; the outputs' element offsets y0..y7)
        return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                if t.startswith("*") or re.fullmatch(r"y[0-7]|n_in|x_stride", n)}

    def loads_16b(k, what):
        # every 16-bit tile load of the kernel (x, A, B) 8 elements per thread at a time: Triton 3.6
        # loaded B 2 bytes at a time when its pointer came from an integer (int_to_ptr)
        ttg = k.asm["ttgir"]
        layouts = dict(re.findall(r"^(#blocked[0-9]*) = #ttg[.]blocked<[{]sizePerThread = ([^]]*[]])", ttg, re.M))
        narrow = [line.strip()[:160] for line in ttg.splitlines()
                  if re.search(r"= tt[.]load .*x!tt[.]ptr<(bf16|f16)>", line)
                  and layouts.get(re.search(r"(#blocked[0-9]*)>", line).group(1)) in ("[1, 1]", "[1]")]
        assert not narrow, (what, narrow)
    for dt, ieee in (("*bf16", False), ("*fp16", False), ("*fp32", True)):
        for srt in (False, True):
            sig = dict(x_ptr=dt, desc_ptr="*i64", ref_ptr=dt, experts_ptr="*i64", gates_ptr="*fp32",
                       rows_ptr="*i64", seg_ptr="*i64", h_ptr="*fp32", n_rows="i32",
                       n_in="i32", x_stride="i32", n_modules="i32", scaling="fp32", K_SEL=C, R=C, R_P2=C, SPLIT_K=C,
                       SORTED=C, BLOCK_M=C, BLOCK_K=C, ALIGNED=C, IEEE=C)
            # fp32's and 16-bit's K blocks at r = 64, and r = 256's (64): each within the H200's
            # 227 KB of shared memory per block (sm_90 compile here: 20-64 KB)
            for r, block_k in ((64, 64), (64, 128), (256, 64)):
                cst = dict(K_SEL=2, R=r, R_P2=r, SPLIT_K=4, SORTED=srt,
                           BLOCK_M=64 if srt else 16, BLOCK_K=block_k, ALIGNED=True, IEEE=ieee)
                k = triton.compile(ASTSource(tg._shrink_kernel, sig, cst, attrs=attrs(tg._shrink_kernel, sig)), target=target)
                assert "cubin" in k.asm
                assert ieee or re.search(r"mma", k.asm["ptx"]), "shrink: no tensor-core MMA"
                loads_16b(k, "shrink")
                assert k.metadata.shared <= 227 * 1024, (r, block_k, k.metadata.shared)
        sig = dict(h_ptr="*fp32", desc_ptr="*i64", experts_ptr="*i64", dtype_ref=dt,
                   **{f"y{i}": "i64" for i in range(8)}, n_tokens="i32", n_rows="i32",
                   n_experts="i32", n_modules="i32", m_first="i32", K_SEL=C, K_P2=C, R=C, R_P2=C,
                   SPLIT_K=C, BLOCK_T=C, BLOCK_O=C, ALIGNED=C, IEEE=C, N_EXP=C, UNROLL=C, O_ITERS=C)
        for unroll, o_iters in ((False, 1), (True, 1), (True, 4)):
            cst = dict(K_SEL=2, K_P2=2, R=64, R_P2=64, SPLIT_K=4, BLOCK_T=32, BLOCK_O=64, ALIGNED=True,
                       IEEE=ieee, N_EXP=8, UNROLL=unroll, O_ITERS=o_iters)
            k = triton.compile(ASTSource(tg._expand_kernel, sig, cst, attrs=attrs(tg._expand_kernel, sig)), target=target)
            assert "cubin" in k.asm
            assert ieee or re.search(r"mma", k.asm["ptx"]), "expand: no tensor-core MMA"
            loads_16b(k, "expand")
            # 16-B loads: ld.global.v4, or with several out blocks per program Triton's pipelined
            # 16-B cp.async copies to shared memory
            assert ieee or re.search(r"ld\\.global\\.v4|cp\\.async\\.cg\\.shared\\.global .*0x10", k.asm["ptx"]), \
                "expand: no 16-B loads"
        sig = dict(h_ptr="*fp32", desc_ptr="*i64", experts_ptr="*i64", order_ptr="*i64", work_ptr="*i64",
                   dtype_ref=dt, **{f"y{i}": "i64" for i in range(8)}, n_rows="i32", n_work="i32",
                   n_experts="i32", n_modules="i32", m_first="i32", K_SEL=C, K_P2=C, R=C, R_P2=C,
                   SPLIT_K=C, BLOCK_T=C, BLOCK_O=C, ALIGNED=C, IEEE=C, O_ITERS=C)
        for block_t, block_o, warps, o_iters in ((32, 64, 4, 1), (32, 64, 4, 8), (16, 128, 4, 2), (64, 256, 8, 1)):
            cst = dict(K_SEL=2, K_P2=2, R=64, R_P2=64, SPLIT_K=2, BLOCK_T=block_t, BLOCK_O=block_o,
                       ALIGNED=True, IEEE=ieee, O_ITERS=o_iters)
            k = triton.compile(ASTSource(tg._expand_sets_kernel, sig, cst, attrs=attrs(tg._expand_sets_kernel, sig)), target=target,
                               options=dict(num_warps=warps))
            assert "cubin" in k.asm
            assert ieee or re.search(r"mma", k.asm["ptx"]), "expand by sets: no tensor-core MMA"
            loads_16b(k, "expand by sets")
            assert ieee or re.search(r"st\\.global\\.v4", k.asm["ptx"]), "expand by sets: no 16-B stores"
        sig = dict(h_ptr="*fp32", desc_ptr="*i64", rows_ptr="*i64", seg_ptr="*i64", dtype_ref=dt,
                   **{f"y{i}": "i64" for i in range(8)}, n_rows="i32", n_experts="i32", m_first="i32",
                   n_modules="i32", n_out_groups="i32", R=C, R_P2=C, SPLIT_K=C, BLOCK_M=C, BLOCK_O=C,
                   ALIGNED=C, IEEE=C, O_ITERS=C)
        for o_iters in (1, 4):
            cst = dict(R=64, R_P2=64, SPLIT_K=2, BLOCK_M=64, BLOCK_O=64, ALIGNED=True, IEEE=ieee, O_ITERS=o_iters)
            k = triton.compile(ASTSource(tg._expand_experts_kernel, sig, cst, attrs=attrs(tg._expand_experts_kernel, sig)), target=target)
            assert "cubin" in k.asm
            assert ieee or re.search(r"mma", k.asm["ptx"]), "expand by expert: no tensor-core MMA"
            loads_16b(k, "expand by expert")
            assert ieee or re.search(r"st\\.global\\.v4", k.asm["ptx"]), "expand by expert: no 16-B stores"
    print("AOT-OK")
""")


def test_kernels_compile_for_sm90():
    """triton.compile to PTX and cubin for sm_90 without a GPU (needs Triton's ptxas)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0 and "AOT-OK" in res.stdout, res.stderr[-4000:]


def test_join_check_names_side_stream_inputs_the_join_does_not_keep():
    """The join's check (run on CUDA while a graph is captured): a tensor the side stream read must
    share storage with one the join keeps; views of a kept tensor count, another copy does not."""
    x, gates = torch.randn(4, 8), torch.rand(4, 2)
    gl._check_join_keeps((x.view(2, 16), gates, None), [x, gates])  # views and None pass
    with pytest.raises(RuntimeError, match=r"not among those its join keeps alive.*side_stream': False"):
        gl._check_join_keeps((x, gates.clone()), [x, gates])
