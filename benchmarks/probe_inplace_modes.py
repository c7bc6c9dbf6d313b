"""All seven in place, one switch at a time: does the gather form's two speeds (about 11 and 17 ms
on an H100, session 26) come per launch or per stretch of launches, and which does a decode see?

Each switch is timed alone with CUDA events (eager calls, alternating tokens [1, 6] and [3, 4], each
unmerging the other's experts), for each form (gather variants 23 and 25, the pack form's variant 1)
in four contexts:
- back_to_back: switch after switch, as the probes' CUDA graphs replay them;
- decode_like: after each switch a batch-1 product with every adapted weight (x @ W^T, all 224
  weights: what a decode reads between two switches);
- flushed: after each switch 1 GiB written (no weight left in L2);
- idle: after each switch the GPU sleeps about 5 ms (power and clocks recover).
Rounds run every (form, context) pair in a new random order. The JSON keeps every launch's ms.

Usage: python benchmarks/probe_inplace_modes.py --out probe_inplace_modes.json [--tokens 60 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_sgmm import TOP_K, make_inputs, shapes_for, switch_bytes  # noqa: E402


def per_launch_ms(switch, between, tokens: int) -> list[float]:
    """ms of each of `tokens` switches (CUDA events around the switch only), `between()` after each."""
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(tokens)]
    switch(0)  # warm, and the first timed switch unmerges a real previous token
    between()
    torch.cuda.synchronize()
    for t, (a, b) in enumerate(marks):
        a.record()
        switch((t + 1) % 2)
        b.record()
        between()
    torch.cuda.synchronize()
    return [round(a.elapsed_time(b), 4) for a, b in marks]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_inplace_modes.json")
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forms", default="gather_v23:23,gather_v25:25,pack_v1:1")
    args = ap.parse_args()
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan

    shapes = shapes_for("all7")
    weights, lora_A, lora_B, experts, gates, _, _, _ = make_inputs(shapes, False)
    dev = experts.device
    tokens = [(experts, gates), (torch.tensor([3, 4], device=dev), torch.tensor([0.55, 0.45], device=dev))]
    plans = {}
    for item in args.forms.split(","):
        name, variant = item.split(":")
        plans[name] = CutlassPlan(weights, lora_A, lora_B, TOP_K, None, variant=int(variant), raster=1,
                                  swizzle=1, gather=False, timing_probe=True)

    def switch_of(plan):
        # token t's switch unmerges the other token's experts (in place, as decoding does)
        return lambda t: plan.run(*tokens[t], *tokens[1 - t], 0.5)

    xs = {i: torch.randn(1, i, device=dev, dtype=weights[0].dtype) for _, i in shapes}
    flush = torch.empty(1 << 29, device=dev, dtype=torch.bfloat16)
    cycles = 10_000_000  # about 5 ms at 1.98 GHz

    contexts = {
        "back_to_back": lambda: None,
        "decode_like": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights],
        "flushed": lambda: flush.zero_(),
        "idle": lambda: torch.cuda._sleep(cycles),
    }
    rng = random.Random(0)
    runs = []
    for rnd in range(args.rounds):
        pairs = [(f, c) for f in plans for c in contexts]
        rng.shuffle(pairs)
        for form, ctx in pairs:
            ms = per_launch_ms(switch_of(plans[form]), contexts[ctx], args.tokens)
            runs.append(dict(round=rnd, form=form, variant=plans[form].variant, context=ctx, ms=ms))
            print(f"round {rnd} {form:10s} {ctx:13s} median {statistics.median(ms):7.3f}  min {min(ms):7.3f}"
                  f"  max {max(ms):7.3f}  under 13.5 ms: {sum(m < 13.5 for m in ms)}/{len(ms)}", flush=True)
    nbytes = switch_bytes(shapes, "inplace")
    summary = {}
    for form in plans:
        for ctx in contexts:
            ms = [m for r in runs if r["form"] == form and r["context"] == ctx for m in r["ms"]]
            med = statistics.median(ms)
            summary[f"{form}/{ctx}"] = dict(median_ms=med, min_ms=min(ms), max_ms=max(ms),
                                            tb_s_at_median=round(nbytes / med / 1e9, 3))
    out = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, bytes_per_switch=nbytes,
               tokens=args.tokens, rounds=args.rounds, summary=summary, runs=runs,
               setup="bf16, Llama-2-7B all seven linears x 32 layers, N=8, r=64, top-2, in place; "
                     "CUDA events around each eager switch")
    Path(args.out).write_text(json.dumps(out, indent=1))
    for k, v in summary.items():
        print(k, v)


if __name__ == "__main__":
    main()
