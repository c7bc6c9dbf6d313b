"""The SGMM switch timed where a decode runs it: between the backbone's weight reads, not back to back.

Why: probe_inplace_modes.py (session 27, H100, probe_inplace_modes_h100_s27.json) found that the
all-seven in-place gather switch runs at about 10.8 ms back to back, where the GPU sits at its power
cap (SM clock 1380-1500 MHz), and at about 16.4 ms when each switch follows a decode's weight reads
or an idle gap, where the SM clock is at its top (1950-1980 MHz); the pack form's 14.9 ms did not
move. Every probe-gemm figure replays switches back to back, so it times the first case only.

Here each switch is timed alone (CUDA events, eager), tokens [1, 6] and [3, 4] in turn (each unmerges
the other's experts, previous experts in the buffers the op publishes into, as in a model), for each
weight set, mode and form (chosen variants of the gather and pack forms and the switch op's own plan,
`plan_fastest_form`), in three contexts:
- back_to_back: switch after switch (what probe-gemm's CUDA graphs time);
- decode_like: after each switch a batch-1 product with every adapted weight (x @ W^T: what a decode
  reads between two switches; attention and the other layers are left out);
- idle: after each switch the GPU sleeps about 5 ms.
Rounds run every case in a new random order; nvidia-smi samples the SM clock and power every 50 ms,
and each case's median SM clock over its run is kept beside its times.

Usage: python benchmarks/probe_switch_contexts.py --out probe_switch_contexts.json [--sets qv,all7]
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_sgmm import TOP_K, make_inputs, shapes_for, switch_bytes  # noqa: E402
from benchmarks.probe_inplace_modes import SmiLog, per_launch_ms  # noqa: E402
from benchmarks.probe_sgmm_gemm import copy_bandwidth  # noqa: E402

FORMS = {  # mode -> [(name, variant)]: the forms' fastest variants in earlier probes
    "inplace": [("gather_v23", 23), ("gather_v25", 25), ("pack_v1", 1), ("pack_v14", 14)],
    "pristine": [("gather_v24", 24), ("pack_v17", 17), ("pack_v14", 14)],
}


def smi_samples(lines: list[str]) -> list[tuple[datetime.datetime, float, float]]:
    """(time, SM MHz, W) of SmiLog's lines (timestamp, clocks.sm, ..., power.draw.instant, ...)."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            out.append((datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f"), float(parts[1]),
                        float(parts[5])))
        except (ValueError, IndexError):
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_switch_contexts.json")
    ap.add_argument("--sets", default="qv,all7")
    ap.add_argument("--modes", default="inplace,pristine")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan, plan_fastest_form

    contexts = ("back_to_back", "decode_like", "idle")
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=args.tokens,
               rounds=args.rounds, sets={}, setup="bf16, Llama-2-7B shapes x 32 layers, N=8, r=64, top-2; "
               "CUDA events around each eager switch; ms per switch")
    copies = [copy_bandwidth()]
    for adapted in args.sets.split(","):
        shapes = shapes_for(adapted)
        weights, lora_A, lora_B, experts, gates, _, _, pristine = make_inputs(shapes, "pristine" in args.modes)
        dev = experts.device
        tokens = [(experts, gates), (torch.tensor([3, 4], device=dev), torch.tensor([0.55, 0.45], device=dev))]
        xs = {i: torch.randn(1, i, device=dev, dtype=weights[0].dtype) for _, i in shapes}
        between = {"back_to_back": lambda: None,
                   "decode_like": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights],
                   "idle": lambda: torch.cuda._sleep(10_000_000)}
        plans, meta = {}, {}
        for mode in args.modes.split(","):
            pr = pristine if mode == "pristine" else None
            for name, variant in FORMS[mode]:
                plans[(mode, name)] = CutlassPlan(weights, lora_A, lora_B, TOP_K, pr, variant=variant, raster=1,
                                                  swizzle=1, gather=False, timing_probe=True)
            op = plan_fastest_form(weights, lora_A, lora_B, TOP_K, pr)
            plans[(mode, "op")] = op
            meta[mode] = dict(op_choice=op.choice, bytes=switch_bytes(shapes, mode))
            print(adapted, mode, "op:", op.choice, flush=True)
        prev = (tokens[1][0].clone(), tokens[1][1].clone())  # published into by every call

        def switch_of(plan):
            return lambda t: plan.run(*tokens[t % 2], *prev, 0.5)

        rng = random.Random(0)
        runs = []
        with SmiLog() as smi:
            for rnd in range(args.rounds):
                combos = [(key, ctx) for key in plans for ctx in contexts]
                rng.shuffle(combos)
                for (mode, form), ctx in combos:
                    start = datetime.datetime.now()
                    ms = per_launch_ms(switch_of(plans[(mode, form)]), between[ctx], args.tokens)
                    runs.append(dict(round=rnd, mode=mode, form=form, variant=plans[(mode, form)].variant,
                                     context=ctx, start=start.isoformat(),
                                     end=datetime.datetime.now().isoformat(), ms=ms))
        samples = smi_samples(smi.lines)
        summary = {}
        for (mode, form) in plans:
            for ctx in contexts:
                rs = [r for r in runs if (r["mode"], r["form"], r["context"]) == (mode, form, ctx)]
                ms = [m for r in rs for m in r["ms"]]
                clocks = [c for r in rs for t, c, _ in samples
                          if datetime.datetime.fromisoformat(r["start"]) <= t <= datetime.datetime.fromisoformat(r["end"])]
                med = statistics.median(ms)
                summary[f"{mode}/{form}/{ctx}"] = dict(
                    variant=rs[0]["variant"], median_ms=round(med, 4), p10_ms=round(sorted(ms)[len(ms) // 10], 4),
                    p90_ms=round(sorted(ms)[9 * len(ms) // 10], 4),
                    tb_s=round(meta[mode]["bytes"] / med / 1e9, 3),
                    sm_mhz_median=statistics.median(clocks) if clocks else None)
                print(f"{adapted:5s} {mode:9s} {form:11s} {ctx:13s} {med:8.3f} ms  p10 {summary[f'{mode}/{form}/{ctx}']['p10_ms']:8.3f}"
                      f"  p90 {summary[f'{mode}/{form}/{ctx}']['p90_ms']:8.3f}  SM {summary[f'{mode}/{form}/{ctx}']['sm_mhz_median']} MHz",
                      flush=True)
        out["sets"][adapted] = dict(meta=meta, summary=summary, runs=runs, smi_fields=smi.fields,
                                    smi_samples=smi.lines)
        copies.append(copy_bandwidth())
        del plans, weights, lora_A, lora_B, pristine, xs
        torch.cuda.empty_cache()
    out["copy_tb_s_rounds"] = copies
    out["copy_tb_s"] = max(copies)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
