"""Where generate()'s time per token goes on the host (issue #8: the 6.2 ms/token bar).

The compiled backbone decodes a 7B step in about 4.7 ms in the package's own loop but takes about
7 ms per token through Hugging Face generate() (bench_llama2-7b_all_hf_h200.json): generate()
synchronizes every step (its stopping check), so whatever the host does before the step's CUDA
graph starts is added to the GPU time. This script builds the bench's models the bench's way
(adafuse_compile.bench: static cache, decode step compiled through generate()'s compile_config,
prompt eager), times generate() per token with CUDA events, runs one generate() under the torch
profiler to split a later step into GPU busy and GPU idle time (waiting for the host), and one under
cProfile to list the Python functions that take the host time.

    python benchmarks/profile_generate_host.py --targets all --methods backbone,adafuse_auto \
        --out benchmarks/results/generate_host_profile_h200.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from adafuse_compile import backend, bench


def later_window(intervals: list[tuple[float, float]], from_share: float = 0.5) -> tuple[float, float] | None:
    """The later part of a kernel timeline: from `from_share` of the way between the first kernel's
    start and the last kernel's end (so past the prompt, for a run of many decode steps), to that end."""
    if not intervals:
        return None
    start, end = min(s for s, _ in intervals), max(e for _, e in intervals)
    lo = start + from_share * (end - start)
    return (lo, end) if end > lo else None


def busy_runs(intervals: list[tuple[float, float]], lo: float) -> list[tuple[float, float]]:
    """The kernel intervals from `lo` on, merged where they overlap or touch (the side stream's
    kernels overlap the main stream's): the GPU's busy runs, in time order."""
    runs: list[list[float]] = []
    for s, e in sorted((max(s, lo), e) for s, e in intervals if e > lo):
        if runs and s <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
        else:
            runs.append([s, e])
    return [(s, e) for s, e in runs]


def gpu_busy_share(intervals: list[tuple[float, float]], from_share: float = 0.5) -> float | None:
    """Share of the later window (`later_window`) in which at least one kernel ran on the GPU.
    Overlapping kernels (the side stream) count once. Through generate() each step waits for the
    host, so a step's time is this share busy and the rest idle: what a faster GPU step cannot win back."""
    window = later_window(intervals, from_share)
    if window is None:
        return None
    lo, end = window
    return sum(e - s for s, e in busy_runs(intervals, lo)) / (end - lo)


# Idle gaps by length (microseconds): short ones are the time between kernels inside a CUDA-graph
# replay, long ones the host's turn between steps (generate() waits for each step, then prepares
# the next) or a slow launch.
GAP_BUCKETS_US = ((0, 5), (5, 50), (50, 500), (500, float("inf")))


def idle_by_gap(intervals: list[tuple[float, float]], from_share: float = 0.5) -> dict[str, tuple[float, int]] | None:
    """The later window's idle time split by gap length (GAP_BUCKETS_US): per bucket, total
    microseconds and number of gaps."""
    window = later_window(intervals, from_share)
    if window is None:
        return None
    runs = busy_runs(intervals, window[0])
    out = {f"{lo:g}-{hi:g}us": [0.0, 0] for lo, hi in GAP_BUCKETS_US}
    for (_, prev_end), (start, _) in zip(runs, runs[1:]):
        gap = start - prev_end
        for (lo, hi), key in zip(GAP_BUCKETS_US, out):
            if lo <= gap < hi:
                out[key][0] += gap
                out[key][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def kernel_timeline(model, prompt, new_tokens: int, device) -> dict | None:
    """One generate() under torch.profiler (device activity only, to add little host work): how much
    of a later decode step the GPU was busy, and how many kernels it ran. None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    clock = bench._Clock(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        bench._hf_generate(model, prompt, new_tokens, clock)
        clock.sync()
    step_ms = clock.elapsed_ms(2, len(clock.marks) - 1) / (new_tokens - 2)  # the steps after the first
    intervals = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    entry = {"kernels": len(intervals), "later_step_ms": step_ms, "gpu_busy_share": gpu_busy_share(intervals)}
    window = later_window(intervals)
    if window is None:
        return entry
    lo, end = window
    steps_in_window = (end - lo) / 1e3 / step_ms  # profiler times are in microseconds
    share = entry["gpu_busy_share"]
    gaps = idle_by_gap(intervals)
    return {**entry, "gpu_busy_ms_per_step": share * step_ms, "gpu_idle_ms_per_step": (1 - share) * step_ms,
            "kernels_per_step": sum(s >= lo for s, _ in intervals) / steps_in_window,
            # per step: idle ms and number of gaps, by gap length
            "idle_by_gap_per_step": {k: {"ms": us / 1e3 / steps_in_window, "gaps": n / steps_in_window}
                                     for k, (us, n) in gaps.items()}}


def _stats_lines(prof: cProfile.Profile, key: str, n: int) -> list[str]:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
    return [line for line in s.getvalue().splitlines() if line.strip()][-(n + 1):]


# transformers' own recipe, for comparison: the backbone with generate()'s default compile
# (CompileConfig(): Inductor, mode="reduce-overhead"), what DESIGN.md's 6.2 ms/token anchor ran.
HF_DEFAULT_COMPILE = "backbone_hf_default_compile"


def profile_method(name: str, spec: bench.Spec, prompt_len: int, new_tokens: int, reps: int, hf_cache: str,
                   stop_checks: list[str]) -> list[dict]:
    """One entry per stop check (bench.HF_STOP_CHECKS) of one model, built and warmed up once; the
    timed calls alternate between the stop checks, so that drift in the machine touches them alike."""
    method = bench.METHOD_BY_NAME["backbone" if name == HF_DEFAULT_COMPILE else name]
    entries = {s: {"method": name, "hf_cache": hf_cache, "hf_stop_check": s} for s in stop_checks}
    max_cache_len = prompt_len + new_tokens + 16
    with torch.no_grad():
        model = bench._adapt(bench.build_model(spec, "hf", max_cache_len), method, spec)
        bench._compile(model, method, spec, "hf")
        bench.generate_cache(model, hf_cache, max_cache_len)
        if name == HF_DEFAULT_COMPILE:
            from transformers import CompileConfig

            config = CompileConfig()
            config._compile_all_devices = spec.device.type != "cuda"  # the CPU smoke run
            model.generation_config.compile_config = config
            for e in entries.values():
                e["compile_config"] = config.to_dict()
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, spec.model["vocab_size"], (1, prompt_len), generator=gen).to(spec.device)

        def generate(stop_check: str, clock, tokens: int = new_tokens, ids=prompt):
            bench.generate_stop_check(model, stop_check)
            return bench._hf_generate(model, ids, tokens, clock)

        t0 = time.perf_counter()
        for stop_check in stop_checks:
            for length in (5, 11):
                generate(stop_check, bench._Clock(spec.device), 4, prompt[:, :length])
        bench._Clock(spec.device).sync()
        warmup_s = round(time.perf_counter() - t0, 1)

        timed = {s: {"per_token": [], "wall": [], "first": [], "recorded": [], "tokens": [], "deferred": 0}
                 for s in stop_checks}
        for _ in range(reps):
            for stop_check in stop_checks:
                t = timed[stop_check]
                clock = bench._Clock(spec.device)
                before = bench._cudagraphs_recorded() if spec.on_gpu else None
                deferred_before = bench.generate_stop_decisions()[1]
                t0 = time.perf_counter()
                t["tokens"].append(generate(stop_check, clock))
                t["deferred"] += bench.generate_stop_decisions()[1] - deferred_before
                clock.sync()
                t["wall"].append((time.perf_counter() - t0) * 1e3 / new_tokens)
                t["per_token"].append(clock.elapsed_ms(1, len(clock.marks) - 1) / (new_tokens - 1))
                t["first"].append(clock.elapsed_ms(1, 2))
                # CUDA graphs recorded during this call (a new cache address: the decode step again)
                t["recorded"].append(bench.cudagraphs_recorded_since(before))
        first_tokens = timed[stop_checks[0]]["tokens"][0]
        for stop_check, entry in entries.items():
            t = timed[stop_check]
            entry["warmup_s"] = warmup_s
            entry["hf_stop_check_effective"] = bench.stop_check_mode(spec.device, stop_check == "deferred")
            entry["timed_calls_deferred"] = f"{t['deferred']}/{reps}"  # what transformers did, call by call
            # the stop checks must not change a token (the deferred one undoes its extra step)
            entry["tokens_equal_across_stop_checks"] = all(torch.equal(x, first_tokens) for x in t["tokens"])
            entry["decode_ms_per_token"] = t["per_token"]
            entry["first_decode_step_ms"] = t["first"]
            entry["cudagraphs_recorded_per_call"] = t["recorded"]
            # the steps after the first, where no recording can land
            entry["later_steps_ms_per_token"] = [
                (x * (new_tokens - 1) - f) / (new_tokens - 2) for x, f in zip(t["per_token"], t["first"])]
            entry["decode_ms_per_token_median"] = statistics.median(t["per_token"])
            entry["wall_ms_per_token_incl_prefill"] = statistics.median(t["wall"])

            # Where a later step's time goes on the GPU: kernels running, or waiting for the host.
            bench.generate_stop_check(model, stop_check)
            entry["kernel_timeline"] = kernel_timeline(model, prompt, new_tokens, spec.device)

            prof = cProfile.Profile()
            clock = bench._Clock(spec.device)
            prof.enable()
            generate(stop_check, clock)
            prof.disable()
            clock.sync()
            entry["profiled_decode_ms_per_token"] = clock.elapsed_ms(1, len(clock.marks) - 1) / (new_tokens - 1)
            # Who compiled the decode step: graphs the adafuse backend rewrote (none for transformers' recipe).
            entry["adafuse_graphs"] = len(backend.last_compilations)
            entry["top_tottime"] = _stats_lines(prof, "tottime", 40)
            entry["top_cumulative"] = _stats_lines(prof, "cumulative", 60)
    del model
    bench._cleanup()
    return list(entries.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--targets", default="all")
    p.add_argument("--methods", default="backbone,adafuse_auto",
                   help=f"bench method names, or {HF_DEFAULT_COMPILE} (generate()'s own default compile)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hf-caches", default="reused,per-call",
                   help="generate()'s KV cache, each profiled in turn: reused (one StaticCache, reset per call) "
                        "and/or per-call (transformers' default: a new one per call)")
    p.add_argument("--stop-checks", default="per-step,deferred",
                   help="generate()'s stop check, each timed on the same model, calls alternating: per-step "
                        "(transformers' default on CUDA: a host sync after every step) and/or deferred (read one "
                        "step late; transformers 5.18+, turned on for CUDA by adafuse)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.new_tokens < 3:
        p.error("--new-tokens must be >= 3 (the first decode step is timed apart from the later ones)")
    cfg = bench.BenchConfig(preset=args.preset, targets=args.targets, loop="hf", prefill="eager",
                            new_tokens=args.new_tokens)
    spec = bench.resolve(cfg)
    result = {"env": bench.environment(spec.device), "targets": args.targets, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "entries": []}
    stop_checks = args.stop_checks.split(",")
    unknown = sorted(set(stop_checks) - set(bench.HF_STOP_CHECKS))
    if unknown:
        p.error(f"--stop-checks: unknown {unknown}; valid: {', '.join(bench.HF_STOP_CHECKS)}")
    for name, hf_cache in [(m, c) for m in args.methods.split(",") for c in args.hf_caches.split(",")]:
        try:
            found = profile_method(name, spec, args.prompt_len, args.new_tokens, args.reps, hf_cache, stop_checks)
        except Exception as exc:  # one method's failure must not lose the others
            found = [{"method": name, "hf_cache": hf_cache, "error": f"{type(exc).__name__}: {exc}"[:2000]}]
        for e in found:
            result["entries"].append(e)
            print(json.dumps({k: v for k, v in e.items() if not k.startswith("top_")}), flush=True)
            for line in e.get("top_cumulative", [])[:45]:
                print(line)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
