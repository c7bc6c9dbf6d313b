"""SGMM on a CUDA GPU: every implementation vs a float64 oracle, CUDA-graph replay, launch
count, and 10,000 exact pristine switches. The CUTLASS cases need an sm_90 GPU and the
nvidia-cutlass wheel (they are skipped otherwise, with the reason)."""
import warnings

import pytest
import torch

from adafuse_compile.cutlass_kernels import ops
from adafuse_compile.cutlass_kernels.reference import (
    assert_matches_oracle, gather_factors, make_problem, oracle_switch, oracle_then_poison, reference_switch_,
)

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824), (96, 200), (4096, 1000)]
# (rank, k): every rank and every k, each at least once, without the full product.
CASES = [(8, 1), (16, 2), (64, 3), (128, 4), (64, 2)]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
IMPLS = ["reference", "triton", "cutlass"]


def _args(p):
    return (p["weights"], p["lora_A"], p["lora_B"], p["experts"], p["gates"],
            p["prev_experts"], p["prev_gates"], p["scaling"])


def _need(impl, dtype=torch.bfloat16):
    if impl == "cutlass":
        from adafuse_compile.cutlass_kernels import cutlass_sgmm

        probe = [torch.empty(64, 64, dtype=dtype, device="cuda")]
        why = cutlass_sgmm.unsupported_reason(probe, [torch.empty(2, 16, 64, device="cuda")], None)
        if why is not None:
            pytest.skip(f"CUTLASS path unavailable: {why}")


def _check(p, expected, bases, dtype, what=""):
    assert_matches_oracle(p["weights"], expected, bases, TOL[dtype], f"{what} " if what else "")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("rank,k", CASES)
def test_matches_oracle(impl, dtype, mode, rank, k):
    _need(impl, dtype)
    p = make_problem(SHAPES, k=k, rank=rank, dtype=dtype, device="cuda",
                     pristine=mode == "pristine")
    before, expected, e, g = oracle_then_poison(p)
    with warnings.catch_warnings():
        # no silent fallback from CUTLASS to Triton here
        warnings.filterwarnings("error", message=".*CUTLASS path not taken")
        ops.sgmm_switch_(*_args(p), pristine=p["pristine"], impl=impl)
    torch.cuda.synchronize()
    _check(p, expected, p["pristine"] or before, dtype, impl)
    assert torch.equal(p["prev_experts"], e) and torch.equal(p["prev_gates"], g)


def test_unaligned_shape_falls_back_to_triton_with_warning():
    _need("cutlass")
    p = make_problem([(64, 100), (96, 200)], k=2, dtype=torch.bfloat16, device="cuda")
    before = [w.clone() for w in p["weights"]]
    expected = oracle_switch(*_args(p))
    with pytest.warns(UserWarning, match="unaligned"):
        ops.sgmm_switch_(*_args(p), impl="cutlass")
    _check(p, expected, before, torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
def test_cuda_graph_replay(impl, mode):
    """Capture one switch; replay it after copying new experts/gates into the static inputs."""
    _need(impl)
    dtype = torch.bfloat16
    p = make_problem(SHAPES[:1] + SHAPES[4:], k=2, rank=64, dtype=dtype, device="cuda",
                     pristine=mode == "pristine")
    args = _args(p)
    # Warm up (builds the plan and its device tables) on a side stream, then capture.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.sgmm_switch_(*args, pristine=p["pristine"], impl=impl)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sgmm_switch_(*args, pristine=p["pristine"], impl=impl)
    for experts, gates in (([3, 5], [0.7, 0.3]), ([5, 0], [0.4, 0.6])):
        before = [w.clone() for w in p["weights"]]
        p["experts"].copy_(torch.tensor(experts))
        p["gates"].copy_(torch.tensor(gates))
        expected = oracle_switch(*_args(p), pristine=p["pristine"])
        graph.replay()
        torch.cuda.synchronize()
        _check(p, expected, p["pristine"] or before, dtype, f"{impl} replay")
        assert p["prev_experts"].tolist() == experts


@pytest.mark.parametrize("impl,launches", [("triton", 1), ("cutlass", 2)])
def test_one_launch_per_switch(impl, launches):
    """Triton: one kernel; CUTLASS: the light pack kernel + one grouped GEMM. All weights."""
    _need(impl)
    p = make_problem([(4096, 4096)] * 8 + [(11008, 4096), (4096, 11008)], k=2, rank=64,
                     dtype=torch.bfloat16, device="cuda")
    ops.sgmm_switch_(*_args(p), impl=impl)  # plan built outside the profiled region
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.sgmm_switch_(*_args(p), impl=impl)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == launches, [e.name for e in kernels]


@pytest.mark.parametrize("impl", ["triton", "cutlass"])
def test_ten_thousand_pristine_switches_exact(impl):
    _need(impl)
    p = make_problem([(4096, 4096), (96, 200), (4096, 1000)], k=2, rank=64,
                     dtype=torch.bfloat16, device="cuda", pristine=True)
    steps = 10_000
    gen = torch.Generator().manual_seed(3)
    all_e = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(steps)]).cuda()
    all_g = torch.softmax(torch.randn(steps, 2, generator=gen), 1).cuda()
    for t in range(steps):
        p["experts"].copy_(all_e[t])
        p["gates"].copy_(all_g[t])
        ops.sgmm_switch_(*_args(p), pristine=p["pristine"], impl=impl)
    torch.cuda.synchronize()
    # Same kernel, one switch from W0 with the last experts: bit-identical.
    fresh = [torch.full_like(w, float("nan")) for w in p["weights"]]
    ops.sgmm_switch_(fresh, p["lora_A"], p["lora_B"], p["experts"], p["gates"],
                     p["prev_experts"].clone(), p["prev_gates"].clone(), p["scaling"],
                     pristine=p["pristine"], impl=impl)
    for w, f in zip(p["weights"], fresh):
        assert torch.equal(w, f)
    expected = oracle_switch(*_args(p), pristine=p["pristine"])
    _check(p, expected, p["pristine"], torch.bfloat16, f"{impl} after {steps}")
    # And within bf16 rounding of the fp32 reference (max |W - (W0 + delta_t)|): one rounding
    # of W plus one of the update (CUTLASS and Triton round the gate-scaled factor to bf16).
    ref = [torch.empty_like(w) for w in p["weights"]]
    reference_switch_(ref, p["lora_A"], p["lora_B"], p["experts"], p["gates"],
                      p["prev_experts"].clone(), p["prev_gates"].clone(), p["scaling"],
                      p["pristine"])
    coef = p["gates"].float() * p["scaling"]
    for i, (w, r) in enumerate(zip(p["weights"], ref)):
        lhs, rhs = gather_factors(p["lora_A"][i], p["lora_B"][i], p["experts"], coef,
                                  torch.float32)
        # |W - ref| <= 1 ulp of |ref| + 2^-8 (|L| @ |R|) (a half-ulp rounding of each L element)
        tol = 2 ** -7 * r.float().abs() + 2 ** -8 * (lhs.abs() @ rhs.abs()) + 1e-6
        assert ((w.float() - r.float()).abs() <= tol).all()


def _timing_problem(mode: str, seed: int):
    """Two 7B-shaped weights (r = 64, top-2) and a copy of W, for the tests of a plan's timing."""
    torch.manual_seed(seed)
    p = make_problem([(4096, 4096), (11008, 4096)], n_experts=8, rank=64, k=2,
                     dtype=torch.bfloat16, device="cuda", pristine=mode == "pristine")
    return p, [w.clone() for w in p["weights"]]


def _assert_timing_left_the_weights(p, before, mode: str) -> None:
    torch.cuda.synchronize()
    if mode == "inplace":  # W + 0 (only -0.0 may come back as +0.0, which equal() accepts)
        assert all(torch.equal(w, b) for w, b in zip(p["weights"], before))
    else:  # W0 + 0: the targets hold W0 until the next switch rewrites them
        assert all(torch.equal(w, w0) for w, w0 in zip(p["weights"], p["pristine"]))


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
def test_cutlass_plan_times_its_candidates_without_touching_the_weights(mode, gather):
    """A plan's first build times each candidate GEMM on a twin plan over the same weights with
    cancelling factors and gates (`CutlassPlan.for_timing`): in place the weights come out as they
    went in (W + 0), in pristine mode as W0 (W0 + 0); the choice is one of the candidates,
    remembered per shape."""
    _need("cutlass")
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    p, before = _timing_problem(mode, seed=5)
    cutlass_sgmm._chosen.clear()
    plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"],
                                    gather=gather)
    table = cutlass_sgmm.GATHER_CANDIDATES if gather else cutlass_sgmm.GEMM_CANDIDATES
    timed = len(table[mode]) > 1  # the gather form in place has one candidate: nothing to time
    assert plan.choice["how"] == ("timed (on a twin plan with cancelling inputs)" if timed else "given"), plan.choice
    assert plan.gathers == gather
    assert (plan.variant, plan.raster, plan.grid_share) in table[mode]
    _assert_timing_left_the_weights(p, before, mode)
    again = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"],
                                     gather=gather)
    assert again.choice["how"] == ("chosen earlier in this process" if timed else "given")
    assert (again.variant, again.raster, again.grid_share) == (plan.variant, plan.raster, plan.grid_share)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("rank,k", [(64, 1), (64, 2), (64, 4), (128, 3)])
def test_a_timing_plan_switch_adds_exactly_zero(gather, mode, rank, k):
    """What every timing launch runs (`cancelling`): a timing plan's whole switch on its step, for
    every candidate GEMM of the form and mode, through the loops real gates take (the gather
    form's four-slot loop at r = 64, k = 2 in place and k = 4 pristine), leaves W bit for bit (W0
    in pristine mode), call after call; the same plan with one gate changed changes W (the check
    can fail)."""
    _need("cutlass")
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    table = cutlass_sgmm.GATHER_CANDIDATES if gather else cutlass_sgmm.GEMM_CANDIDATES
    torch.manual_seed(8)
    p = make_problem(SHAPES, n_experts=8, rank=rank, k=k, dtype=torch.bfloat16, device="cuda",
                     pristine=mode == "pristine")
    target = [w.clone() for w in (p["pristine"] or p["weights"])]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for variant, raster, share in table[mode]:
        plan = cutlass_sgmm.CutlassPlan.for_timing(p["weights"], rank, k, p["pristine"], gather=gather,
                                                   variant=variant, raster=raster,
                                                   sm_count=0 if share >= 1 else round(share * sms))
        assert plan.gathers == gather and plan.timing_step is not None
        for experts, gates, prev_experts, prev_gates in (plan.timing_steps * 3)[:3]:  # as time_switch
            plan.run(experts, gates, prev_experts, prev_gates, 1.0)
            torch.cuda.synchronize()
            assert all(torch.equal(w.view(torch.int16), t.view(torch.int16))
                       for w, t in zip(p["weights"], target)), f"variant {variant}"
    gates[0] = 0.5
    plan.run(experts, gates, prev_experts, prev_gates, 1.0)
    torch.cuda.synchronize()
    assert not torch.equal(p["weights"][0], target[0])


def test_launch_timing_runs_each_call_after_an_idle_gap_and_leaves_the_gap_out():
    """The plans' timer (`launch_elapsed_s`): every call runs once, each right after a sleep kernel
    of IDLE_CYCLES on the stream, and the figure is one call's time, not the gap's: a copy of
    1200 MiB each way timed this way takes what it takes back to back (within a factor 2), far
    from the ~5 ms gap added to it."""
    from adafuse_compile.cutlass_kernels import cutlass_sgmm
    from adafuse_compile.runtime.cost_model import cuda_elapsed_s

    counter = torch.zeros((), device="cuda")
    order, sleep = [], torch.cuda._sleep

    def logged_sleep(cycles):
        order.append(("sleep", cycles))
        sleep(cycles)

    def call():
        order.append("call")
        counter.add_(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "_sleep", logged_sleep)
        small_ms = cutlass_sgmm.launch_elapsed_s(call, 5) * 1e3
    torch.cuda.synchronize()
    assert order == [("sleep", cutlass_sgmm.IDLE_CYCLES), "call"] * 5
    assert counter.item() == 5
    src = torch.empty(1200 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_back_to_back_ms = cuda_elapsed_s(lambda: dst.copy_(src), 3) * 1e3
    copy_ms = cutlass_sgmm.launch_elapsed_s(lambda: dst.copy_(src), 3) * 1e3
    gap_ms = cuda_elapsed_s(lambda: torch.cuda._sleep(cutlass_sgmm.IDLE_CYCLES), 3) * 1e3
    print(f"small {small_ms:.4f} ms, copy {copy_ms:.3f} (back to back {copy_back_to_back_ms:.3f}), gap {gap_ms:.3f}")
    assert gap_ms > 1.0  # the gap is long enough to let the clock recover
    assert small_ms < 0.2 * gap_ms
    assert 0.5 * copy_back_to_back_ms < copy_ms < 2 * copy_back_to_back_ms


@pytest.mark.parametrize("mode", ["inplace", "pristine"])
def test_the_switch_times_both_forms_and_keeps_the_faster(mode):
    """The switch op's plan (plan_fastest_form): a timing plan of each form (cancelling factors
    and gates) and their whole switches timed, so the weights come out as W (in place) or W0
    (pristine); the kept plan is the form it names, on the real factors, and switches right."""
    _need("cutlass")
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    p, before = _timing_problem(mode, seed=6)
    cutlass_sgmm._form_chosen.clear()
    plan = cutlass_sgmm.plan_fastest_form(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"])
    print(mode, plan.choice)
    kept = plan.choice["form"].split(" ")[0]
    assert plan.choice["form"] == f"{kept} (timed)", plan.choice
    assert set(plan.choice["form_ms"]) == {"pack", "gather"}
    assert plan.choice["form_ms"][kept] == min(plan.choice["form_ms"].values()), plan.choice
    assert plan.gathers == (kept == "gather")
    _assert_timing_left_the_weights(p, before, mode)
    before, expected, e, g = oracle_then_poison(p)
    plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
    torch.cuda.synchronize()
    _check(p, expected, p["pristine"] or before, torch.bfloat16, f"{plan.choice['form']}, {mode}")


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("rank,k", [(64, 1), (64, 2), (128, 3), (128, 4)])
def test_cutlass_pack_and_gather_match_oracle(gather, dtype, mode, rank, k):
    """Both ways of feeding the GEMM (pack launch, or experts gathered in the GEMM's loads with
    the L tile scaled in shared memory) on every shape, with the outputs poisoned first (pristine)
    and two consecutive switches (in place: the second unmerges the first's experts)."""
    _need("cutlass", dtype)
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    p = make_problem(SHAPES, k=k, rank=rank, dtype=dtype, device="cuda", pristine=mode == "pristine")
    plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], k, p["pristine"],
                                    gather=gather)
    assert plan.gathers == gather
    n_experts = p["lora_A"][0].shape[0]
    for step in range(2):
        if step:  # other experts (each one up: never the same set) and gates for the second switch
            p["experts"].copy_((p["experts"] + 1) % n_experts)
            p["gates"].copy_(p["gates"].flip(0) * 0.75)
        before, expected, e, g = oracle_then_poison(p)
        plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
        torch.cuda.synchronize()
        _check(p, expected, p["pristine"] or before, dtype, f"gather={gather} step {step}")
        assert torch.equal(p["prev_experts"], e) and torch.equal(p["prev_gates"], g)


def _two_switches_then_graph_replay(plan, p, dtype, what: str) -> None:
    """Two eager switches of `plan` (the second to other experts and gates: in place it unmerges
    the first's), then one captured in a CUDA graph and replayed with new experts; each against
    the float64 oracle with the outputs poisoned first."""
    n_experts = p["lora_A"][0].shape[0]
    run = lambda: plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])  # noqa: E731
    for step in range(2):
        if step:
            p["experts"].copy_((p["experts"] + 1) % n_experts)
            p["gates"].copy_(p["gates"].flip(0) * 0.75)
        before, expected, e, g = oracle_then_poison(p)
        run()
        torch.cuda.synchronize()
        _check(p, expected, p["pristine"] or before, dtype, f"{what} step {step}")
        assert torch.equal(p["prev_experts"], e) and torch.equal(p["prev_gates"], g)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    # capture does not execute: W is still the second switch's result
    p["experts"].copy_((p["experts"] + 3) % n_experts)
    before, expected, e, g = oracle_then_poison(p)
    graph.replay()
    torch.cuda.synchronize()
    _check(p, expected, p["pristine"] or before, dtype, f"{what} graph replay")
    assert torch.equal(p["prev_experts"], e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [27, 28, 29])
@pytest.mark.parametrize("rank,k", [(8, 1), (64, 2), (128, 4)])
def test_cutlass_reduce_add_variants_match_oracle_in_place(variant, dtype, rank, k):
    """The reduce-add GEMMs (no C load; the store adds D into W in L2) on every shape, the odd
    ones included (partial tiles: TMA must not add outside W): two eager switches (the second
    unmerges the first's experts), then one captured in a CUDA graph and replayed with new
    experts. The weights after the timing-free plan build are W exactly."""
    _need("cutlass", dtype)
    from adafuse_compile.cutlass_kernels import build, cutlass_sgmm

    assert variant in build.REDUCE_VARIANTS
    p = make_problem(SHAPES, k=k, rank=rank, dtype=dtype, device="cuda")
    start = [w.clone() for w in p["weights"]]
    plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], k, None,
                                    variant=variant, raster=1)
    torch.cuda.synchronize()
    assert all(torch.equal(w, b) for w, b in zip(p["weights"], start))
    _two_switches_then_graph_replay(plan, p, dtype, f"variant {variant}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [30, 31, 32])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("rank,k", [(8, 1), (64, 2), (128, 4)])
def test_cutlass_pingpong_full_tile_variants_match_oracle(variant, mode, dtype, rank, k):
    """The pingpong GEMMs with a whole 128x128 tile per consumer warp group (30-32: probe
    candidates, not yet a plan's) on every shape, odd ones included: two eager switches (in place
    the second unmerges the first's experts), then one captured in a CUDA graph and replayed."""
    _need("cutlass", dtype)
    from adafuse_compile.cutlass_kernels import build, cutlass_sgmm

    build.load_extension((30, 31, 32))  # one build for all (a plan asks for its variant alone)
    p = make_problem(SHAPES, k=k, rank=rank, dtype=dtype, device="cuda", pristine=mode == "pristine")
    plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], k, p["pristine"],
                                    variant=variant, raster=1)
    assert plan.choice["how"] == "given" and not plan.gathers
    _two_switches_then_graph_replay(plan, p, dtype, f"variant {variant} {mode}")
