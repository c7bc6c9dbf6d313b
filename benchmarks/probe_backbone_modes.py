"""Why the compiled backbone's batch-1 decode differs between processes: a probe.

Every decode run on the H200 has shown the same compiled Llama-2-7B-shaped backbone at two speeds,
depending on the process: 4.71 or 4.99 ms/step at batch 1, 5.16 or 5.44 ms at batch 8, with repeats
within a process agreeing to 0.01 ms (docs/paths.md, fifth run). The auto path's ratio to the
backbone moves with it. This script, run in several processes at once (`run_h200.sh backbone-modes`),
records in each process what could differ between them:

- decode ms/step at batch 1 (and --batch) with CUDA graphs, for the backbone compiled with
  Inductor (`mode="reduce-overhead"`, as bench_decode.py) and, with --targets, for adafuse auto;
- each kernel's device time per step, by name, from the torch profiler on the same graphs compiled
  without CUDA graphs (the profiler does not see kernels inside a graph replay);
- the Triton configs Inductor picked by benchmarking at run time (its `*.best_config` files written
  while this process ran; in a shared cache directory another process may have written some of them);
- the GPU's clocks and power right after timing (nvidia-smi);
- with --cpu-burn N, the same graphs timed again while N processes keep the host's cores busy
  (what compiles running beside a benchmark do).

Comparing a fast and a slow process's kernel tables shows which kernels carry the difference.

    python benchmarks/probe_backbone_modes.py --label p0 --out probe_p0.json
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import torch

import adafuse_compile as af
import bench_decode  # the same model shape, build and timing as the decode benchmark
from adafuse_compile import backend, gpu_lock


def gpu_state() -> dict | None:
    if bench_decode.DEV != "cuda":
        return None
    query = "clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        out = f"nvidia-smi failed: {exc}"
    return {"query": query, "value": out}


def kernel_table(step, batch: int, start: int, steps: int = 10) -> dict | None:
    """Device time per decode step of each kernel name, from the profiler (no CUDA graphs here)."""
    from torch.profiler import ProfilerActivity, profile

    dev = bench_decode.DEV
    if dev != "cuda":
        return None  # a CPU smoke run: no device kernels to list
    tok = torch.full((batch, 1), 5, device=dev)
    for i in range(3):
        step(tok, torch.tensor([start + i], device=dev))
    torch.cuda.synchronize()
    with gpu_lock.timing(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(tok, torch.tensor([start + 3 + i], device=dev))
        torch.cuda.synchronize()
    per_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.time_range.elapsed_us()
    rows = sorted(((n, c / steps, us / steps) for n, (c, us) in per_name.items()), key=lambda r: -r[2])
    return {"device_us_per_step": round(sum(r[2] for r in rows), 1),
            "kernels_per_step": round(sum(r[1] for r in rows), 1),
            "by_name": [{"name": n[:160], "calls": round(c, 2), "us": round(us, 2)} for n, c, us in rows]}


@contextlib.contextmanager
def cpu_burners(n: int):
    """n processes that spin on the CPU (no GPU): the host as loaded as by compiles running beside."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def best_configs(since: float) -> dict:
    """Inductor's run-time autotuning choices written to its cache directory since `since` (a time.time()).

    The directory may be shared with other processes (the default one is): their files are there too,
    and only the time of writing tells this process's apart, so each entry keeps its mtime."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    found = {}
    for path in glob.glob(os.path.join(cache_dir(), "**", "*.best_config"), recursive=True):
        mtime = os.path.getmtime(path)
        if mtime >= since:
            with open(path) as f:
                found[os.path.basename(path)] = {"mtime": round(mtime - since, 1), "config": json.load(f)}
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--targets", default="all", choices=["none", "qv", "all"], help="none: backbone only")
    ap.add_argument("--batch", type=int, default=8, help="a second batch size timed for the backbone (0: none)")
    ap.add_argument("--cpu-burn", type=int, default=0,
                    help="also time each compiled step while this many processes spin on the CPU")
    ap.add_argument("--auto-batch", type=int, default=0, help="a second batch size timed for auto (0: none)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--preset", default="llama2-7b", choices=sorted(bench_decode.PRESETS))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (tiny preset)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    bench_decode.DEV = args.device
    torch._dynamo.config.automatic_dynamic_shapes = False
    cfg = bench_decode.PRESETS[args.preset]
    prompt_len = cfg.max_seq_len - args.steps
    res = {"label": args.label, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
           "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default, shared by the processes)"),
           "pid": os.getpid(), "steps": args.steps, "prompt_len": prompt_len, "kv_cache_len": cfg.max_seq_len}
    t0 = time.time()

    def save() -> None:
        res["wall_s"] = round(time.time() - t0, 1)
        res["gpu_lock_waited_s"] = round(gpu_lock.waited_s, 1)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def timed(key: str, make_step, batch: int) -> None:
        torch._dynamo.reset()
        model.setup_cache(batch)
        t = time.time()
        step = make_step(True)
        ms = bench_decode.decode_ms(step, prompt_len, args.steps, prefill=model, batch=batch)
        res[key] = {"ms": round(ms, 4), "repeats": [round(x, 4) for x in ms.repeats], "gpu_after": gpu_state(),
                    "paths": [r["path"] for r in backend.last_compilations]}
        if args.cpu_burn:  # the same graphs again, every core of the host kept busy by other processes
            with cpu_burners(args.cpu_burn):
                busy = bench_decode.decode_ms(step, prompt_len, args.steps, prefill=model, batch=batch)
            res[key]["cpu_busy"] = {"processes": args.cpu_burn, "ms": round(busy, 4),
                                    "repeats": [round(x, 4) for x in busy.repeats]}
        del step
        torch._dynamo.reset()
        model.setup_cache(batch)
        res[key]["kernels_no_graphs"] = kernel_table(make_step(False), batch, start=prompt_len - 16)
        res[key]["phase_s"] = round(time.time() - t, 1)
        if af.adapted_linears(model):
            af.restore(model)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(args.label, key, res[key]["ms"], res[key]["repeats"],
              (res[key]["kernels_no_graphs"] or {}).get("device_us_per_step"), flush=True)
        save()

    def inductor(graphs: bool):
        return torch.compile(model, mode="reduce-overhead" if graphs else None)

    def auto(graphs: bool):
        backend.last_compilations.clear()
        return torch.compile(model, backend="adafuse", options={"path": "auto", "cudagraphs": graphs})

    with gpu_lock.held_except_compiles(), torch.no_grad():
        model = bench_decode.build(cfg)
        res["weight_addresses_mod_2MiB"] = sorted({p.data_ptr() % (2 << 20) for p in model.parameters()})[:16]
        timed("backbone_b1", inductor, 1)
        if args.batch:
            timed(f"backbone_b{args.batch}", inductor, args.batch)
        if args.targets != "none":
            af.inject(model, af.AdaFuseConfig(num_experts=8, rank=64, top_k=2,
                                              target_modules=bench_decode.TARGETS[args.targets]))
            for lin in af.adapted_linears(model).values():
                lin.lora_B.normal_(std=0.002)
            timed(f"auto_{args.targets}_b1", auto, 1)
            if args.auto_batch:
                timed(f"auto_{args.targets}_b{args.auto_batch}", auto, args.auto_batch)
        res["best_configs"] = best_configs(since=t0)  # mtime: seconds after this process started
    save()


if __name__ == "__main__":
    main()
