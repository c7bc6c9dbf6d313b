"""gather_lora on a CUDA GPU: reference and Triton vs the float64 per-token oracle on
Llama-2-7B shapes (bf16, fp16), CUDA-graph capture and replay with new tokens, no host
sync once warm, and a timing print (the benchmark proper is benchmarks/bench_gather.py).

Passed on the H200 (41 tests; benchmarks/results/gpu_gather_tests_run{1,2}.log).
"""
import statistics

import pytest
import torch

from adafuse_compile.cutlass_kernels import gather_lora as gl
from adafuse_compile.cutlass_kernels.gather_lora import (
    gather_lora, make_gather_problem, oracle_gather_lora, token_errors,
)

pytestmark = pytest.mark.gpu

HIDDEN, FFN, RANK, N_EXPERTS, TOP_K = 4096, 11008, 64, 8, 2
GROUPS = {"qkv": [HIDDEN] * 3, "gate_up": [FFN] * 2}
# Per-token relative error: one rounding of the output plus, in the Triton expand, one of h
# to the input dtype for the tensor cores (about 2^-9 each in bf16, 2^-12 in fp16).
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _problem(T, group, dtype, k=TOP_K):
    return make_gather_problem(T, HIDDEN, GROUPS[group], n_experts=N_EXPERTS, rank=RANK, k=k,
                               dtype=dtype, device="cuda")


def _check(got, p, dtype, what):
    expected = oracle_gather_lora(**p)
    for m, (y, exp) in enumerate(zip(got, expected)):
        assert y.shape == exp.shape and y.dtype == dtype, what
        assert torch.isfinite(y).all(), f"{what} module {m}: non-finite"
        err = token_errors(y, exp)
        worst = int(err.argmax())
        assert err[worst] < TOL[dtype], (
            f"{what} module {m}: token {worst} rel. error {err[worst]:.2e}"
        )


def _captured(step) -> torch.cuda.CUDAGraph:
    """`step` warmed up on a side stream (plans built, kernels compiled), then captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g



@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("T", [1, 8, 32, 512])
def test_matches_oracle(impl, dtype, group, T):
    p = _problem(T, group, dtype)
    got = gather_lora(**p, impl=impl)
    torch.cuda.synchronize()
    _check(got, p, dtype, f"{impl} {group} T={T}")


@pytest.mark.parametrize("cfg", [{"EXPAND_UNROLL": True}, {"SPLIT_K": 32}, {"BLOCK_K": 32, "SPLIT_K": 16},
                                 {"O_ITERS": 4}, {"BLOCK_K": 64, "O_ITERS": 2}])
@pytest.mark.parametrize("T", [1, 8, 512])
def test_swept_configs_match_oracle_in_bf16(cfg, T):
    """The configs bench_gather.py --sweep times (and ADAFUSE_GATHER_CONFIG can force) compute right in bf16."""
    p = _problem(T, "qkv", torch.bfloat16)
    plan = gl._get_triton_plan(p["lora_A"], p["lora_B"])
    got = plan.run(p["x"], p["experts"], p["gates"], p["scaling"], config=cfg)
    torch.cuda.synchronize()
    _check(got, p, torch.bfloat16, f"triton {cfg} T={T}")


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("T", [17, 512])
def test_per_slot_expand_matches_oracle_in_bf16(group, T):
    """The per-slot prefill expand (prefill_expand="slots"): each slot's term apart, [T, k, out];
    their sum is the delta."""
    p = _problem(T, group, torch.bfloat16)
    plan = gl._get_triton_plan(p["lora_A"], p["lora_B"])
    got = plan.run(p["x"], p["experts"], p["gates"], p["scaling"], per_slot=True)
    torch.cuda.synchronize()
    assert all(y.shape == (T, TOP_K, o) for y, o in zip(got, GROUPS[group]))
    _check([y.float().sum(1).to(torch.bfloat16) for y in got], p, torch.bfloat16, f"per slot {group} T={T}")


@pytest.mark.parametrize("k", [1, 3, 4])
def test_triton_other_k_and_odd_shapes(k):
    p = make_gather_problem(37, 1000, [96, 200, 4104], n_experts=5, rank=24, k=k,
                            dtype=torch.bfloat16, device="cuda")  # unaligned: no hints
    _check(gather_lora(**p, impl="triton"), p, torch.bfloat16, f"odd k={k}")


@pytest.mark.parametrize("padded_to", [1408, 1381])  # Inductor's padding (hints on); an odd stride (hints off)
@pytest.mark.parametrize("T", [1, 5, 40])
def test_triton_reads_padded_rows_in_bf16(T, padded_to):
    """x with padded rows, as Inductor lays out the GPU tests' 1376-wide MLP input (the ops take it
    as it is, gather_lora._STRIDE_ORDER): the compiled shrink with its alignment hints reads it by
    its row stride; the padding holds NaN. (The CPU's interpreter ignores the hints.)"""
    p = make_gather_problem(T, 1376, [512, 96], n_experts=N_EXPERTS, rank=RANK, k=TOP_K,
                            dtype=torch.bfloat16, device="cuda")
    padded = torch.full((T, padded_to), float("nan"), dtype=torch.bfloat16, device="cuda")
    padded[:, :1376] = p["x"]
    p["x"] = padded[:, :1376]
    _check(gather_lora(**p, impl="triton"), p, torch.bfloat16, f"padded to {padded_to}, T={T}")


def test_auto_is_triton_on_cuda():
    p = _problem(4, "qkv", torch.bfloat16)
    a = gather_lora(**p, impl="auto")
    t = gather_lora(**p, impl="triton")
    for x, y in zip(a, t):
        assert torch.equal(x, y)


@pytest.mark.parametrize("T", [8, 512])
def test_cuda_graph_replay_with_new_tokens(T):
    p = _problem(T, "qkv", torch.bfloat16)
    x, experts, gates = p["x"], p["experts"], p["gates"]
    out = {}

    def step():
        out["y"] = gather_lora(x, p["lora_A"], p["lora_B"], experts, gates, p["scaling"],
                               impl="triton")

    g = _captured(step)
    q = _problem(T, "qkv", torch.bfloat16)
    x.copy_(q["x"])
    experts.copy_(q["experts"])
    gates.copy_(q["gates"])
    g.replay()
    torch.cuda.synchronize()
    _check(out["y"], dict(p, x=x, experts=experts, gates=gates), torch.bfloat16, "graph")


@pytest.mark.parametrize("T", [1, 8, 512])
def test_side_stream_fork_join_in_a_cuda_graph(T):
    """The backend's split form: the kernels on the side stream while a large matmul runs on the
    current one, captured in a CUDA graph and replayed with new tokens; the deltas are read only
    after the join. Also: the side stream really is another stream."""
    p = _problem(T, "qkv", torch.bfloat16)
    x, experts, gates = p["x"], p["experts"], p["gates"]
    w = torch.randn(4 * HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out = {}

    def step():
        deltas = torch.ops.adafuse.gather_lora_start(x, p["lora_A"], p["lora_B"], experts, gates,
                                                     p["scaling"], "triton")
        y = x @ w.t()  # the backbone's linear, concurrent with the adapter kernels
        torch.ops.adafuse.gather_lora_join(deltas, [x, experts, gates, y])
        out["y"], out["deltas"] = y, [d * 1 for d in deltas]  # read after the join

    assert gl.side_stream(x.device) != torch.cuda.current_stream()
    step()
    torch.cuda.synchronize()
    _check(out["deltas"], p, torch.bfloat16, "eager fork/join")
    g = _captured(step)
    for seed in range(3):
        q = make_gather_problem(T, HIDDEN, GROUPS["qkv"], n_experts=N_EXPERTS, rank=RANK, k=TOP_K,
                                dtype=torch.bfloat16, device="cuda",
                                generator=torch.Generator().manual_seed(100 + seed))
        x.copy_(q["x"])
        experts.copy_(q["experts"])
        gates.copy_(q["gates"])
        g.replay()
        torch.cuda.synchronize()
        _check(out["deltas"], dict(p, x=x, experts=experts, gates=gates), torch.bfloat16, f"graph replay {seed}")
        torch.testing.assert_close(out["y"], x @ w.t())


@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("T", [1, 8])
def test_side_stream_inputs_freed_by_the_caller_are_not_reused_early(T, hold, monkeypatch):
    """The start returns before the side stream has read its inputs, and a caller may drop them at
    once (Inductor did, for a layer-wise router's gates: the 7B layer-wise decode came out wrong on
    an H100). The start holds them until the join. Here the side stream is held back by a sleep
    while the caller frees the inputs and the main stream fills same-sized tensors with junk: no
    junk lands on the inputs' memory and the deltas are those of the original inputs. The control
    (hold=False: the start's hold patched out) shows that the memory is reused otherwise, so the
    test detects the hazard. (Written after the session's last GPU call: not yet run on a GPU.)"""
    if not hold:
        monkeypatch.setattr(gl, "_pending_inputs", lambda: {})
    p = _problem(T, "qkv", torch.bfloat16)
    x, experts, gates = p["x"].clone(), p["experts"].clone(), p["gates"].clone()
    gather_lora(**p, impl="triton")  # the plan and the kernels exist: nothing below compiles
    torch.cuda.synchronize()
    with torch.cuda.stream(gl.side_stream(x.device)):
        torch.cuda._sleep(200_000_000)  # ~0.1 s at ~2 GHz: the start's kernels queue behind it
    deltas = torch.ops.adafuse.gather_lora_start(x, p["lora_A"], p["lora_B"], experts, gates, p["scaling"], "triton")
    shapes = [(t.shape, t.dtype) for t in (x, experts, gates)]
    addresses = {t.data_ptr() for t in (x, experts, gates)}
    del x, experts, gates
    junk = [torch.full(shape, 7 if dtype == torch.int64 else 1e4, dtype=dtype, device="cuda")
            for _ in range(64) for shape, dtype in shapes]
    reused = addresses & {t.data_ptr() for t in junk}
    torch.ops.adafuse.gather_lora_join(deltas, [])
    torch.cuda.synchronize()
    del junk
    if not hold:
        assert reused, "control: the freed inputs' memory was not reused, so the test shows nothing"
        return
    assert not reused
    _check(deltas, p, torch.bfloat16, "inputs freed right after the start")


def test_side_stream_is_one_per_thread():
    """Two threads (two models, each perhaps capturing a graph) never share a side stream; one
    thread always gets the same one. (Written after the last GPU run of its session.)"""
    import threading

    dev = torch.device("cuda")
    mine = gl.side_stream(dev)
    assert gl.side_stream(dev) == mine
    other = []
    t = threading.Thread(target=lambda: other.append(gl.side_stream(dev)))
    t.start()
    t.join()
    assert other[0] != mine


def test_join_after_an_in_line_start_captures_in_a_cuda_graph():
    """impl="reference" runs the start in line (nothing on the side stream), yet the start still
    records the fork, so the join's wait is part of the capture (written after a review; not yet
    run on a GPU at the time of writing)."""
    p = _problem(8, "qkv", torch.bfloat16)
    out = {}

    def step():
        deltas = torch.ops.adafuse.gather_lora_start(p["x"], p["lora_A"], p["lora_B"], p["experts"],
                                                     p["gates"], p["scaling"], "reference")
        torch.ops.adafuse.gather_lora_join(deltas, [p["x"]])
        out["deltas"] = [d * 1 for d in deltas]

    g = _captured(step)
    g.replay()
    torch.cuda.synchronize()
    _check(out["deltas"], p, torch.bfloat16, "reference start + join, replayed")


@pytest.mark.parametrize("T", [8, 512])
def test_no_host_sync_once_warm(T):
    p = _problem(T, "gate_up", torch.bfloat16)
    gather_lora(**p, impl="triton")  # warm-up: builds the plan (one host-to-device copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gather_lora(**p, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_timing_print():
    """Not an assertion: median ms per call (CUDA events, eager), for the log."""
    rows = []
    for group in GROUPS:
        for T in (1, 8, 32, 512):
            p = _problem(T, group, torch.bfloat16)
            for impl in ("reference", "triton"):
                fn = lambda: gather_lora(**p, impl=impl)  # noqa: E731
                for _ in range(3):
                    fn()
                times = []
                for _ in range(20):
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                rows.append((group, T, impl, statistics.median(times)))
    print()
    for group, T, impl, ms in rows:
        print(f"gather_lora {group:8s} T={T:4d} {impl:9s} {ms:8.3f} ms")
    gl.clear_plan_cache()
