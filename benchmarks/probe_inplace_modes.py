"""All seven in place, one switch at a time: does the gather form's two speeds (about 11 and 17 ms
on an H100, session 26) come per launch or per stretch of launches, and which does a decode see?

Each switch is timed alone with CUDA events (eager calls), for each form (gather variants 23 and 25,
the pack form's variant 1), in two patterns: `alternating` tokens [1, 6] and [3, 4], each unmerging
the other's experts (the previous experts are the buffers the op publishes into, as in a model), and
`repeated`, token [1, 6] again and again (unmerge and merge cancel: W is written back nearly
unchanged); in five contexts:
- back_to_back: switch after switch, as the probes' CUDA graphs replay them;
- decode_like: after each switch a batch-1 product with every adapted weight (x @ W^T, all 224
  weights: what a decode reads between two switches);
- flushed: after each switch 1 GiB written (no weight left in L2);
- idle: after each switch the GPU sleeps about 5 ms (power and clocks recover);
- graph: CUDA graphs of two switches replayed back to back (ms per switch), as probe-gemm times.
Rounds run every (form, pattern, context) in a new random order. The JSON keeps every launch's ms,
and nvidia-smi's samples (SM and memory clocks, GPU and memory temperature, power, clock-event
reasons) taken every 50 ms over the whole probe, with each run's start and end on the same clock.

What it found (H100, probe_inplace_modes_h100_s27.json): alternating tokens, gather v23 took 10.8 ms
back to back, in graphs and after a flush (SM clock 1380-1470 MHz, at the power cap) and 16.4 ms
after a decode's reads or an idle gap (1965-1980 MHz); the same token again 10.6-12.4 everywhere;
the pack form 14.8-15.0 everywhere. probe_switch_contexts.py goes on from here.

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
from benchmarks.bench_sgmm import TOP_K, decode_reads, make_inputs, shapes_for, switch_bytes, switch_tokens  # noqa: E402


def per_launch_ms(switch, between, tokens: int) -> list[float]:
    """ms of each of `tokens` switches (CUDA events around the switch only), `between()` after each."""
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(tokens)]
    switch(0)  # warm, and the first timed switch unmerges a real previous token
    between()
    torch.cuda.synchronize()
    for t, (a, b) in enumerate(marks):
        a.record()
        switch(t + 1)
        b.record()
        between()
    torch.cuda.synchronize()
    return [round(a.elapsed_time(b), 4) for a, b in marks]


def graph_ms(switch, tokens: int) -> list[float]:
    """ms per switch of a CUDA graph of two switches (tokens t and t + 1), replayed tokens / 2 times."""
    switch(0), switch(1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        switch(0)
        switch(1)
    graph.replay()
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(tokens // 2)]
    for a, b in marks:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    return [round(a.elapsed_time(b) / 2, 4) for a, b in marks]


class SmiLog:
    """nvidia-smi sampling every 50 ms into a file for the whole probe (fields it knows)."""
    FIELDS = ("timestamp", "clocks.sm", "clocks.mem", "temperature.gpu", "temperature.memory",
              "power.draw.instant", "clocks_event_reasons.active")

    def __enter__(self):
        import subprocess
        import tempfile
        ok = [f for f in self.FIELDS if subprocess.run(["nvidia-smi", f"--query-gpu={f}", "--format=csv"],
                                                       capture_output=True).returncode == 0]
        self.fields = ok
        self.file = tempfile.NamedTemporaryFile("r", suffix=".csv")
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(ok)}", "--format=csv,noheader,nounits",
                                      "-lms=50", "-f", self.file.name])
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.lines = self.file.read().splitlines()
        self.file.close()


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
    tokens = switch_tokens(experts, gates)
    plans = {}
    for item in args.forms.split(","):
        name, variant = item.split(":")
        plans[name] = CutlassPlan(weights, lora_A, lora_B, TOP_K, None, variant=int(variant), raster=1,
                                  swizzle=1, gather=False, timing_probe=True)

    # the previous experts: buffers each call publishes its experts into, as a model's are
    prev = (tokens[1][0].clone(), tokens[1][1].clone())

    def switch_of(plan, pattern):
        if pattern == "alternating":  # token t unmerges token t - 1's experts
            return lambda t: plan.run(*tokens[t % 2], *prev, 0.5)
        return lambda t: plan.run(*tokens[0], *prev, 0.5)  # repeated: unmerges its own experts

    flush = torch.empty(1 << 29, device=dev, dtype=torch.bfloat16)
    cycles = 10_000_000  # about 5 ms at 1.98 GHz

    contexts = {
        "back_to_back": lambda: None,
        "decode_like": decode_reads(weights),
        "flushed": lambda: flush.zero_(),
        "idle": lambda: torch.cuda._sleep(cycles),
        "graph": None,
    }
    import datetime
    rng = random.Random(0)
    runs = []
    with SmiLog() as smi:
        for rnd in range(args.rounds):
            combos = [(f, p, c) for f in plans for p in ("alternating", "repeated") for c in contexts]
            rng.shuffle(combos)
            for form, pattern, ctx in combos:
                start = datetime.datetime.now().isoformat()
                sw = switch_of(plans[form], pattern)
                ms = graph_ms(sw, args.tokens) if ctx == "graph" else per_launch_ms(sw, contexts[ctx], args.tokens)
                runs.append(dict(round=rnd, form=form, variant=plans[form].variant, pattern=pattern, context=ctx,
                                 start=start, end=datetime.datetime.now().isoformat(), ms=ms))
                print(f"round {rnd} {form:10s} {pattern:11s} {ctx:13s} median {statistics.median(ms):7.3f}  "
                      f"min {min(ms):7.3f}  max {max(ms):7.3f}  over 14 ms: {sum(m > 14 for m in ms)}/{len(ms)}",
                      flush=True)
    nbytes = switch_bytes(shapes, "inplace")
    summary = {}
    for form in plans:
        for pattern in ("alternating", "repeated"):
            for ctx in contexts:
                ms = [m for r in runs if (r["form"], r["pattern"], r["context"]) == (form, pattern, ctx)
                      for m in r["ms"]]
                med = statistics.median(ms)
                summary[f"{form}/{pattern}/{ctx}"] = dict(
                    median_ms=med, min_ms=min(ms), max_ms=max(ms), over_14_ms=sum(m > 14 for m in ms),
                    launches=len(ms), tb_s_at_median=round(nbytes / med / 1e9, 3))
    out = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, bytes_per_switch=nbytes,
               tokens=args.tokens, rounds=args.rounds, summary=summary, runs=runs,
               smi_fields=smi.fields, smi_samples=smi.lines,
               setup="bf16, Llama-2-7B all seven linears x 32 layers, N=8, r=64, top-2, in place; "
                     "CUDA events around each eager switch")
    Path(args.out).write_text(json.dumps(out, indent=1))
    for k, v in summary.items():
        print(k, v)


if __name__ == "__main__":
    main()
