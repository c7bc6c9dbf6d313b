"""SGMM switch benchmark on Llama-2-7B shapes (DESIGN.md section 7 protocol for the kernel).

32 layers; adapted sets q,v (64 x 4096x4096) and all seven linears (q,k,v,o 4096x4096,
gate,up 11008x4096, down 4096x11008, [out, in]); N = 8 experts, r = 64, top-2 switch, bf16,
random weights (std 0.02, expert A std 0.02, B std 0.002). For each implementation and mode:
median time of CUDA-graph replays (CUDA events), achieved bandwidth as a fraction of the
device-to-device copy bandwidth measured in the same run, and speed-up over the simple merge.
Implementations: the simple merge, the fp32 PyTorch reference, Triton configs, each CUTLASS
variant given, and the switch op's own CUTLASS plan (`cutlass_op`: the form and GEMM that
`plan_fastest_form` times and keeps, what `sgmm_switch_(impl="cutlass")` runs).

--context decode_like runs, between two timed replays (untimed, right after the switch in stream
order), a batch-1 product with every adapted weight: what a decode reads between two switches.
On an H100 the all-seven in-place switch on all SMs ran 10.8 ms back to back at the 700 W power
cap and 16.4 ms there at the top SM clock (docs/kernels.md); the default, back_to_back, times the
first case only.

Bytes counted: inplace  = read W + write W + the 2k gathered experts' factors;
               pristine = read W0 + write W + the k gathered experts' factors.

    python benchmarks/bench_sgmm.py --out benchmarks/results/sgmm_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from adafuse_compile import gpu_lock
from adafuse_compile.cutlass_kernels import ops
from adafuse_compile.cutlass_kernels.reference import (
    oracle_switch, reference_switch_, simple_merge_switch_,
)

LAYERS, HIDDEN, FFN = 32, 4096, 11008
N_EXPERTS, RANK, TOP_K = 8, 64, 2

TRITON_CONFIGS = {  # name: (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM)
    "t128x128_w8_s3_p2": (128, 128, 8, 3, 2),
    "t128x128_w4_s4_p2": (128, 128, 4, 4, 2),
    # 2 stages: with 3 (the K loop of a k = 2, r = 64 pristine switch has 2 iterations) the
    # results were wrong on the GPU, and TritonPlan refuses it (probe_triton_tiles_h100_s28.json)
    "t128x256_w8_s2_p1": (128, 256, 8, 2, 1),
    "t64x128_w4_s4_p4": (64, 128, 4, 4, 4),
    "t128x128_w8_s3_all": (128, 128, 8, 3, 0),  # one program per tile (not persistent)
}


def shapes_for(adapted: str) -> list[tuple[int, int]]:
    per_layer = {
        "qv": [(HIDDEN, HIDDEN)] * 2,
        "all7": [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN)] * 2 + [(HIDDEN, FFN)],
    }[adapted]
    return per_layer * LAYERS


def switch_bytes(shapes, mode: str) -> int:
    """Bytes a switch moves (bf16): read W (or W0) + write W + the gathered factors of the 2k
    (inplace) or k (pristine) selected experts."""
    n_sel = TOP_K * (2 if mode == "inplace" else 1)
    return sum(2 * o * i * 2 + n_sel * RANK * (o + i) * 2 for o, i in shapes)


def run_header() -> dict:
    """GPU, versions and the Llama-2-7B adapter shape: the head of every kernel benchmark's JSON."""
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": __import__("triton").__version__,
            "shape": {"layers": LAYERS, "hidden": HIDDEN, "ffn": FFN, "experts": N_EXPERTS,
                      "rank": RANK, "top_k": TOP_K, "dtype": "bfloat16"},
            "gpu_shared_with_lock": gpu_lock.shared()}  # set: other benchmarks compiled meanwhile (never timed at once)


def time_graph(fn, reps: int, warmup: int = 3, between=None, tokens: int = 1) -> dict:
    """Capture fn() in a CUDA graph, replay `reps` times; median/min/max ms (CUDA events).
    `tokens=2`: fn(t) for t = 0, 1 captured in a graph each and replayed in turn (a switch to token
    0's experts, then to token 1's, each unmerging the other's: a real decode's switches).
    `between()`, if given, is launched after each replay, outside the timed events."""
    calls = [(lambda t=t: fn(t)) for t in range(tokens)] if tokens > 1 else [fn]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graphs = []
    for call in calls:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        graphs.append(g)
    times = []
    with gpu_lock.timing():  # alone on the GPU when other benchmark processes share it
        for i in range(warmup):
            graphs[i % len(graphs)].replay()
            if between:
                between()
        for i in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[(warmup + i) % len(graphs)].replay()
            b.record()
            if between:
                between()
            b.synchronize()
            times.append(a.elapsed_time(b))
    del graphs
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "reps": reps}


def time_eager(fn, reps: int, warmup: int = 3) -> float:
    """Median ms of fn() called eagerly, each call bracketed by CUDA events."""
    times = []
    with gpu_lock.timing():
        for _ in range(warmup):
            fn()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> dict:
    """Device-to-device copy of 4 GiB (bytes read + written), after ~1 s of warm-up copies.

    Three ways, the fastest is the reference: copy_ captured in a CUDA graph (a memcpy node:
    2.77 TB/s in the second H200 run, slower than our GEMM, so it is not the ceiling),
    copy_ eager, and an elementwise kernel (mul by 1) eager. CUDA events, median."""
    n = 4 * 1024**3 // 2  # 4 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    with gpu_lock.timing():  # the warm-up copies heat the GPU like the timed ones do
        t_end = time.time() + 1.0
        while time.time() < t_end:
            dst.copy_(src)
            torch.cuda.synchronize()
    nbytes = 2 * src.numel() * src.element_size()

    ways = {
        "copy_graph": time_graph(lambda: dst.copy_(src), reps)["median_ms"],
        "copy_eager": time_eager(lambda: dst.copy_(src), reps, warmup=0),
        "mul_kernel_eager": time_eager(lambda: torch.mul(src, 1, out=dst), reps, warmup=0),
    }
    out = {k: {"median_ms": v, "GBps": nbytes / (v * 1e-3) / 1e9} for k, v in ways.items()}
    best = max(out, key=lambda k: out[k]["GBps"])
    out.update(bytes=nbytes, best=best, GBps=out[best]["GBps"], median_ms=out[best]["median_ms"])
    del src, dst
    torch.cuda.empty_cache()
    return out


def make_inputs(shapes, with_pristine: bool):
    dev, dt = "cuda", torch.bfloat16
    weights = [torch.randn(o, i, device=dev, dtype=dt) * 0.02 for o, i in shapes]
    lora_A = [torch.randn(N_EXPERTS, RANK, i, device=dev, dtype=dt) * 0.02 for _, i in shapes]
    lora_B = [torch.randn(N_EXPERTS, o, RANK, device=dev, dtype=dt) * 0.002 for o, _ in shapes]
    pristine = [w.clone() for w in weights] if with_pristine else None
    experts = torch.tensor([1, 6], device=dev)
    gates = torch.tensor([0.62, 0.38], device=dev)
    prev_experts = torch.tensor([3, 1], device=dev)
    prev_gates = torch.tensor([0.55, 0.45], device=dev)
    return weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates, pristine


def check_against_reference(inputs, run) -> float:
    """Pristine-mode result of `run` against the float64 oracle on the first and last weight, as
    ||W - W64|| / ||bf16(W64) - W64||: the error over that of rounding the exact result to bf16
    once (1.0: as exact as bf16 allows), the worse of the two weights.

    (Until session 28 this was the largest elementwise error in units of (|W| + |delta|) * 2^-7,
    which is ill-posed: where W0 is tiny, rounding the gate-scaled factors to bf16 once (the simple
    merge, Triton) reads as 100+ of those units, and where W0 and the update are both 0 any
    last-bit difference as 10^5-10^6. Normwise those same results are 1.00004 of the rounding's
    error, measured on the CPU at 1024 x 1024.)"""
    weights, lora_A, lora_B, experts, gates, pe, pg, pristine = inputs
    sel = [0, len(weights) - 1]
    run()
    torch.cuda.synchronize()
    expected = oracle_switch([weights[i] for i in sel], [lora_A[i] for i in sel], [lora_B[i] for i in sel],
                             experts, gates, pe.clone(), pg.clone(), 0.5, [pristine[i] for i in sel])
    return max(float((weights[i].double() - exp).norm() / (exp.to(weights[i].dtype).double() - exp).norm())
               for i, exp in zip(sel, expected))


def switch_tokens(experts, gates):
    """Two tokens a benchmark switches between in turn, make_inputs' ([1, 6]) and [3, 4], each
    unmerging the other's experts: the op publishes each call's experts as the previous ones, so
    one call replayed would unmerge the experts it merges (reading each expert's factors twice)."""
    return [(experts, gates), (torch.tensor([3, 4], device=experts.device),
                               torch.tensor([0.55, 0.45], device=gates.device))]


def decode_reads(weights):
    """What a decode reads between two switches: a batch-1 product with every adapted weight
    (attention and the other layers left out)."""
    xs = {i: torch.randn(1, i, device=weights[0].device, dtype=weights[0].dtype) for i in {w.shape[1] for w in weights}}
    return lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights]


def bench_set(adapted: str, reps: int, cutlass_variants: list[int], results: dict, copy_gbps,
              raster: int = 1, context: str = "back_to_back"):
    shapes = shapes_for(adapted)
    inputs = make_inputs(shapes, with_pristine=True)
    weights, lora_A, lora_B, experts, gates, pe, pg, pristine = inputs
    between = decode_reads(weights) if context == "decode_like" else None
    tokens = switch_tokens(experts, gates)
    entries = []
    for mode in ("inplace", "pristine"):
        pr = pristine if mode == "pristine" else None
        nbytes = switch_bytes(shapes, mode)
        pe.copy_(tokens[1][0]), pg.copy_(tokens[1][1])  # the first switch unmerges token 1's experts

        def step(t):
            return (weights, lora_A, lora_B, *tokens[t], pe, pg, 0.5)

        def record(impl, variant, fn, reps_=reps, check=True, extra=None):
            try:
                t = time_graph(fn, reps_, between=between, tokens=2)
                e = {"adapted": adapted, "mode": mode, "impl": impl, "variant": variant, **t}
                if not impl.endswith("_only"):  # the pack / GEMM split rows: time only
                    e.update(bytes=nbytes, GBps=nbytes / (t["median_ms"] * 1e-3) / 1e9)
                    e["frac_copy_bw"] = e["GBps"] / copy_gbps
                if check and mode == "pristine":
                    e["error_over_bf16_rounding"] = check_against_reference(inputs, lambda: fn(0))
                if extra:
                    e.update(extra)
            except Exception as exc:  # keep going: one failing variant must not lose the run
                e = {"adapted": adapted, "mode": mode, "impl": impl, "variant": variant,
                     "error": f"{type(exc).__name__}: {exc}"[:2000]}
            entries.append(e)
            print(json.dumps(e), flush=True)
            return e

        record("simple_merge", "addmm", lambda t: simple_merge_switch_(*step(t), pristine=pr))
        record("reference", "fp32", lambda t: reference_switch_(*step(t), pristine=pr), reps_=5)
        from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan

        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for name, (bm, bn, nw, ns, pps) in TRITON_CONFIGS.items():
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
            try:
                plan = TritonPlan(weights, lora_A, lora_B, TOP_K, pr, config=cfg,
                                  programs=pps * sms if pps else 1 << 30)
            except Exception as exc:
                entries.append({"adapted": adapted, "mode": mode, "impl": "triton",
                                "variant": name, "error": str(exc)[:2000]})
                continue
            record("triton", name, lambda t: plan.run(*step(t)[3:]))
            del plan
        from adafuse_compile.cutlass_kernels import build
        from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan, plan_fastest_form

        try:  # the op's own plan: the form and GEMM it times on this GPU and keeps
            plan = plan_fastest_form(weights, lora_A, lora_B, TOP_K, pr)
            record("cutlass_op", "plan_fastest_form", lambda t: plan.run(*step(t)[3:]),
                   extra={"choice": plan.choice})
            del plan
        except Exception as exc:
            entries.append({"adapted": adapted, "mode": mode, "impl": "cutlass_op",
                            "variant": "plan_fastest_form", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        names = build.load_extension().variant_names()
        for v in cutlass_variants:
            try:
                plan = CutlassPlan(weights, lora_A, lora_B, TOP_K, pr, variant=v, raster=raster)
            except Exception as exc:
                entries.append({"adapted": adapted, "mode": mode, "impl": "cutlass",
                                "variant": names[v], "error": str(exc)[:2000]})
                print("cutlass plan failed", names[v], exc, flush=True)
                continue
            record("cutlass", names[v], lambda t: plan.run(*step(t)[3:]))
            # The split: pack launch alone, grouped GEMM alone.
            record("cutlass_pack_only", names[v],
                   lambda t: plan.pack(*step(t)[3:]), check=False)
            record("cutlass_gemm_only", names[v], lambda t: plan.gemm.run(), check=False)
            del plan
            torch.cuda.empty_cache()
        ops.clear_plan_cache()
    simple = {e["mode"]: e["median_ms"] for e in entries
              if e["impl"] == "simple_merge" and "median_ms" in e}
    for e in entries:
        if "frac_copy_bw" in e and e["mode"] in simple:
            e["speedup_vs_simple_merge"] = simple[e["mode"]] / e["median_ms"]
    results["entries"].extend(entries)
    del inputs, weights, lora_A, lora_B, pristine
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sets", default="qv,all7")
    ap.add_argument("--cutlass-variants", default="all", help="comma list of ids, or 'all'")
    ap.add_argument("--context", default="back_to_back", choices=("back_to_back", "decode_like"),
                    help="decode_like: a batch-1 read of every adapted weight between two timed switches")
    ap.add_argument("--raster", type=int, default=1, choices=(0, 1, 2),
                    help="tile scheduler raster order for every variant: 0 along M (runs 1-4), 1 along N "
                         "(what plans use since 2026-12-04), 2 CUTLASS's heuristic")
    a = ap.parse_args(argv)
    from adafuse_compile.cutlass_kernels import build

    t0 = time.time()
    # 'all': every entry of the registry (ADAFUSE_SGMM_VARIANTS, the unmeasured ones too); only
    # the variants timed are built (plus build.BUILD_VARIANTS).
    requested = None if a.cutlass_variants == "all" \
        else [int(x) for x in a.cutlass_variants.split(",")]
    try:
        with gpu_lock.released():  # minutes of nvcc on the CPU: the GPU is the others' meanwhile
            mod = build.load_extension(tuple(requested or range(build.NUM_VARIANTS)))
        names = mod.variant_names()
        variants = requested or list(range(len(names)))
        build_error = None
    except Exception as exc:
        names, variants, build_error = [], [], str(exc)[-4000:]
    results = {
        **run_header(),
        "build_s": time.time() - t0, "cutlass_build_error": build_error,
        "cutlass_variants": {v: names[v] for v in variants if v < len(names)}, "raster": a.raster,
        "context": a.context,
        "bytes_note": "inplace: read W + write W + 2k gathered factors; pristine: read W0 + "
                      "write W + k gathered factors",
        "entries": [],
    }
    results["copy"] = copy_bandwidth(a.reps)
    print("copy", results["copy"], flush=True)
    for s in a.sets.split(","):
        bench_set(s, a.reps, variants, results, results["copy"]["GBps"], a.raster, a.context)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    results["copy_after"] = copy_bandwidth(a.reps)  # same clocks at the end?
    print("copy after", results["copy_after"], flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'set':5} {'mode':8} {'impl':18} {'variant':22} {'ms':>7} {'%copy':>6} {'xsimple':>7}")
    for e in results["entries"]:
        if "median_ms" in e:
            print(f"{e['adapted']:5} {e['mode']:8} {e['impl']:18} {e['variant']:22} "
                  f"{e['median_ms']:7.3f} {100 * e.get('frac_copy_bw', 0):6.1f} "
                  f"{e.get('speedup_vs_simple_merge', 0):7.2f} {e.get('error_over_bf16_rounding', '')}")
        else:
            print(f"{e['adapted']:5} {e['mode']:8} {e['impl']:18} {e['variant']:22} ERROR")
    return 0


if __name__ == "__main__":
    with gpu_lock.held_except_compiles():  # alone on the GPU (but for the CUTLASS build) when shared
        sys.exit(main())
