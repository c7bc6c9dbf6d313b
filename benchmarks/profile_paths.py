"""Where a decode or prefill step's time goes, per kernel, for the backbone and each adafuse path.

bench_decode.py says how much slower a path is than the backbone; this says why. It builds the
Llama-2-7B layer shape with only --layers layers (default 4: every layer is the same, so the
per-layer cost is the same as in the 32-layer model, and each compile takes seconds, not
minutes), compiles the backbone and each path, and for each step shape (b1 = one-token decode at
batch 1, b8 / b32 = batch decode, p512 = a 512-token prefill):

- kernels: the torch profiler over --steps steps of the graph compiled *without* CUDA graphs
  (each kernel's own device time; graph replay would hide nothing but the launch gaps), summed
  per kernel name and per category (backbone GEMM, attention, gather shrink / expand, SGMM,
  factor slots, Inductor's other kernels, sort, copies), per step and per layer;
- wall: ms per step with CUDA graphs (what the decode loop pays, launch gaps included).

The extra time of a path over the backbone, per layer, split by category, is what to optimize.

    python benchmarks/profile_paths.py --targets qv --out profile_qv.json
    python benchmarks/profile_paths.py --device cpu --preset tiny --out /tmp/p.json   # CPU smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import defaultdict

import torch

import adafuse_compile as af
import bench_decode  # the same model shapes, build and adapter sets as the end-to-end benchmark
from adafuse_compile import backend, gpu_lock
from bench_decode import PRESETS, TARGETS, sync

# Kernel name -> category: first match wins (lower-case substrings).
CATEGORIES = [
    ("gather_shrink", ("_shrink_kernel",)),
    ("gather_expand", ("_expand_kernel", "_expand_sets_kernel", "_expand_experts_kernel")),
    ("factor_slots", ("slot",)),
    ("sgmm", ("sgmm", "cutlass", "grouped")),
    ("sort", ("sort", "radix", "searchsorted", "scan", "bincount")),
    ("attention", ("flash", "attention", "sdpa", "fmha", "softmax")),
    ("gemm", ("gemm", "nvjet", "xmma", "cublas", "sm90_", "mm_", "_mm", "matmul", "gemv", "splitk")),
    ("copy", ("memcpy", "memset", "copy", "fill")),
    ("inductor_other", ("triton_",)),
]


PATH_OPTIONS = {
    "gather": {"path": "gather"},  # side stream on (the CUDA default)
    "gather-inline": {"path": "gather", "side_stream": False},  # adapter kernels in line, as before
    "gather-slots": {"path": "gather", "prefill_expand": "slots"},  # prefill: the per-slot expand by expert
    "gather-sets": {"path": "gather", "prefill_expand": "sets"},  # prefill: the expand by sets (gather: dense there)
    "factor": {"path": "factor"},
    "merge": {"path": "merge"},
}


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def step_inputs(shape: str, dev: str, cache_len: int):
    if shape.startswith("p"):
        n = int(shape[1:])
        return torch.randint(0, 1000, (1, n), device=dev), torch.arange(n, device=dev), 1
    b = int(shape[1:])
    # The position does not change the cost: attention reads the whole static cache, masked.
    return torch.randint(0, 1000, (b, 1), device=dev), torch.tensor([cache_len // 2], device=dev), b


def kernel_profile(step, tokens, pos, steps: int, dev: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step(tokens, pos)
    sync()
    acts = [ProfilerActivity.CUDA] if dev == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(tokens, pos)
        sync()
    per_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if dev == "cuda" and e.device_type.name != "CUDA":
            continue
        if dev != "cuda" and not e.name.startswith(("aten::", "triton", "adafuse")):
            continue
        t = e.device_time if dev == "cuda" else e.cpu_time
        per_name[e.name][0] += t / steps
        per_name[e.name][1] += 1 / steps
    by_cat = defaultdict(float)
    for name, (us, _) in per_name.items():
        by_cat[category(name)] += us
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:30]
    return {"us_per_step": round(sum(v[0] for v in per_name.values()), 1),
            "kernels_per_step": round(sum(v[1] for v in per_name.values()), 1),
            "us_per_step_by_category": {k: round(v, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "category": category(n), "us_per_step": round(us, 2),
                             "calls_per_step": round(c, 2)} for n, (us, c) in top]}


def wall_ms(step, tokens, pos, steps: int, dev: str) -> float:
    for _ in range(3):
        step(tokens, pos)
    sync()
    times = []
    with gpu_lock.timing():
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(steps):
                step(tokens, pos)
            sync()
            times.append((time.perf_counter() - t) * 1000 / steps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--targets", default="qv", choices=sorted(TARGETS))
    ap.add_argument("--paths", default="gather,factor,merge", help=f"adafuse paths, of {list(PATH_OPTIONS)} (the "
                    "gather ones run every shape, factor and merge one-token shapes only)")
    ap.add_argument("--shapes", default="b1,b8,b32,p512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = args.device
    bench_decode.DEV = dev
    cfg = dataclasses.replace(PRESETS[args.preset], num_hidden_layers=args.layers)
    shapes = args.shapes.split(",")
    if any(s.startswith("p") and int(s[1:]) > cfg.max_seq_len for s in shapes):
        ap.error(f"a prefill shape exceeds the preset's KV cache ({cfg.max_seq_len})")
    torch._dynamo.config.automatic_dynamic_shapes = False
    res = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else dev, "torch": torch.__version__,
           "preset": args.preset, "layers": args.layers, "targets": args.targets, "experts": 8, "rank": 64,
           "top_k": 2, "steps": args.steps, "gpu_shared_with_lock": gpu_lock.shared(), "runs": {}}

    def save() -> None:
        res["gpu_lock_waited_s"] = round(gpu_lock.waited_s, 1)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def measure(model, shape: str, options: dict) -> dict:
        """Kernel profile without CUDA graphs, then wall time with them; one compile each."""
        tokens, pos, b = step_inputs(shape, dev, cfg.max_seq_len)
        model.setup_cache(b)
        entry = {}
        try:
            for cudagraphs in (False, True):
                torch._dynamo.reset()
                backend.last_compilations.clear()
                step = torch.compile(model, backend="adafuse",
                                     options={**options, "cudagraphs": cudagraphs and dev == "cuda"})
                if cudagraphs:
                    entry["wall_ms"] = round(wall_ms(step, tokens, pos, args.steps, dev), 4)
                else:
                    entry["kernels"] = kernel_profile(step, tokens, pos, args.steps, dev)
                if options:
                    entry["paths_compiled"] = [r.get("path") for r in backend.last_compilations]
                    af.restore(model)
        except Exception as exc:  # one failure must not lose the others
            entry["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        return entry

    with gpu_lock.held_except_compiles(), torch.no_grad():
        model = bench_decode.build(cfg)
        for s in shapes:  # the backbone first, before injection (same weights, no adapters)
            res["runs"][f"backbone_{s}"] = measure(model, s, {})
            save()
        af.inject(model, af.AdaFuseConfig(num_experts=8, rank=64, top_k=2, target_modules=TARGETS[args.targets]))
        for lin in af.adapted_linears(model).values():
            lin.lora_B.normal_(std=0.002)
        for path in args.paths.split(","):
            for s in shapes:
                if not path.startswith("gather") and s != "b1":
                    continue  # merge and factor serve one-token steps only
                entry = measure(model, s, PATH_OPTIONS[path])
                base = res["runs"].get(f"backbone_{s}", {})
                if "wall_ms" in entry and "wall_ms" in base:
                    entry["extra_wall_ms_per_layer"] = round((entry["wall_ms"] - base["wall_ms"]) / args.layers, 4)
                if "kernels" in entry and "kernels" in base:
                    mine, ref = entry["kernels"]["us_per_step_by_category"], base["kernels"]["us_per_step_by_category"]
                    entry["extra_kernel_us_per_layer_by_category"] = {
                        c: round((mine.get(c, 0.0) - ref.get(c, 0.0)) / args.layers, 2) for c in sorted(set(mine) | set(ref))}
                    entry["extra_kernels_per_layer"] = round(
                        (entry["kernels"]["kernels_per_step"] - base["kernels"]["kernels_per_step"]) / args.layers, 2)
                res["runs"][f"{path}_{s}"] = entry
                print(f"{path}_{s}", {k: v for k, v in entry.items() if k.startswith(("extra", "wall", "error"))},
                      flush=True)
                save()
    save()

if __name__ == "__main__":
    main()
