"""The SGMM switch timed where a decode runs it: between the backbone's weight reads, not back to back.

Why: probe_inplace_modes.py (session 27, H100, probe_inplace_modes_h100_s27.json) found that the
all-seven in-place gather switch runs at about 10.8 ms back to back, where the GPU sits at its power
cap (SM clock 1380-1500 MHz), and at about 16.4 ms when each switch follows a decode's weight reads
or an idle gap, where the SM clock is at its top (1950-1980 MHz); the pack form's 14.9 ms did not
move. Every probe-gemm figure replays switches back to back, so it times the first case only.

Here each switch is timed alone (CUDA events, eager), tokens [1, 6] and [3, 4] in turn (each unmerges
the other's experts, previous experts in the buffers the op publishes into, as in a model), for each
weight set, mode and form (chosen variants of the gather and pack forms and the switch op's own plan,
`plan_fastest_form`; --sm-counts: each also on fewer persistent CTAs), in three contexts:
- back_to_back: switch after switch (what probe-gemm's CUDA graphs time);
- decode_like: after each switch a batch-1 product with every adapted weight (x @ W^T: what a decode
  reads between two switches; attention and the other layers are left out);
- idle: after each switch the GPU sleeps about 5 ms.
Rounds run every case in a new random order; nvidia-smi samples the SM clock and power every 50 ms,
and each case's median SM clock over its run is kept beside its times.

--simple-merge adds the simple merge as eager calls: on q,v its small launches are bound by the
host (8.4-10.0 ms against 4.1-4.6 in probe-gemm's graphs), so speed-ups use probe-gemm's figure.
probe_switch_contexts_orders_h100_s27.json came from commit 99cf671's version (an --orders option
and the package's grouping of problems by shape, both reverted).

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
from benchmarks.bench_sgmm import TOP_K, decode_reads, make_inputs, shapes_for, switch_bytes, switch_tokens  # noqa: E402
from benchmarks.probe_inplace_modes import SmiLog, per_launch_ms  # noqa: E402
from benchmarks.probe_sgmm_gemm import copy_bandwidth  # noqa: E402

FORMS = {"inplace": "23,25,1,14", "pristine": "24,17,14"}  # the forms' fastest variants in earlier probes
# all seven's weights by shape, 32 layers each: which shapes the in-place switch loses its speed on
SUBSETS = {"all7_attn": [(4096, 4096)] * 4 * 32, "all7_gate_up": [(11008, 4096)] * 2 * 32,
           "all7_down": [(4096, 11008)] * 32}
# all seven's 224 weights grouped by shape instead of layer by layer (the GEMM's group order)
SUBSETS["all7_by_shape"] = SUBSETS["all7_attn"] + SUBSETS["all7_gate_up"] + SUBSETS["all7_down"]


class SimpleMerge:
    """The 3x target's base (one addmm per weight), behind a plan's run()."""
    variant = None

    def __init__(self, weights, lora_A, lora_B, pristine):
        self.args = (weights, lora_A, lora_B, pristine)

    def run(self, experts, gates, prev_experts, prev_gates, scaling):
        from adafuse_compile.cutlass_kernels.reference import simple_merge_switch_
        w, a, b, pr = self.args
        simple_merge_switch_(w, a, b, experts, gates, prev_experts, prev_gates, scaling, pristine=pr)


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
    ap.add_argument("--inplace-variants", default=FORMS["inplace"])
    ap.add_argument("--pristine-variants", default=FORMS["pristine"])
    ap.add_argument("--contexts", default="back_to_back,decode_like,idle")
    ap.add_argument("--no-op", action="store_true", help="leave out the switch op's own plan")
    ap.add_argument("--simple-merge", action="store_true", help="also the simple merge (the 3x base)")
    ap.add_argument("--triton", action="store_true", help="also the Triton switch")
    ap.add_argument("--graphs", action="store_true",
                    help="each switch a CUDA graph replay (one graph per token), not eager calls: the "
                         "simple merge's and Triton's host work left out, as a model's CUDA-graph decode does")
    ap.add_argument("--sm-counts", default="0",
                    help="persistent CTAs of each CUTLASS plan (0: every SM), e.g. 0,112,96: each variant "
                         "once per count, tagged @smN (fewer CTAs: fewer memory requests in flight)")
    args = ap.parse_args()
    from adafuse_compile.cutlass_kernels.build import GATHER_VARIANTS
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan, plan_fastest_form

    contexts = tuple(args.contexts.split(","))
    variants = {"inplace": [int(v) for v in args.inplace_variants.split(",") if v],
                "pristine": [int(v) for v in args.pristine_variants.split(",") if v]}
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=args.tokens,
               rounds=args.rounds, sets={}, setup="bf16, Llama-2-7B shapes x 32 layers, N=8, r=64, top-2; "
               "CUDA events around each switch (" + ("a CUDA graph replay per token" if args.graphs
                                                     else "eager calls") + "); ms per switch")
    copies = [copy_bandwidth()]
    for adapted in args.sets.split(","):
        shapes = SUBSETS.get(adapted) or shapes_for(adapted)
        weights, lora_A, lora_B, experts, gates, _, _, pristine = make_inputs(shapes, "pristine" in args.modes)
        tokens = switch_tokens(experts, gates)
        between = {"back_to_back": lambda: None, "decode_like": decode_reads(weights),
                   "idle": lambda: torch.cuda._sleep(10_000_000)}
        plans, meta = {}, {}
        for mode in args.modes.split(","):
            pr = pristine if mode == "pristine" else None
            for variant in variants[mode]:
                for sm in (int(c) for c in args.sm_counts.split(",")):
                    name = f"{'gather' if variant in GATHER_VARIANTS else 'pack'}_v{variant}" + (f"@sm{sm}" if sm else "")
                    plans[(mode, name)] = CutlassPlan(weights, lora_A, lora_B, TOP_K, pr, variant=variant,
                                                      raster=1, swizzle=1, sm_count=sm, gather=False,
                                                      timing_probe=True)
            if args.simple_merge:
                plans[(mode, "simple_merge")] = SimpleMerge(weights, lora_A, lora_B, pr)
            if args.triton:
                from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan
                plans[(mode, "triton")] = TritonPlan(weights, lora_A, lora_B, TOP_K, pr)
                plans[(mode, "triton")].variant = None
            meta[mode] = dict(bytes=switch_bytes(shapes, mode))
            if not args.no_op:
                op = plan_fastest_form(weights, lora_A, lora_B, TOP_K, pr)
                plans[(mode, "op")] = op
                meta[mode]["op_choice"] = op.choice
                print(adapted, mode, "op:", op.choice, flush=True)
        prev = (tokens[1][0].clone(), tokens[1][1].clone())  # published into by every call

        def switch_of(plan):
            eager = [lambda t=t: plan.run(*tokens[t], *prev, 0.5) for t in (0, 1)]
            if not args.graphs:
                return lambda t: eager[t % 2]()
            eager[0](), eager[1]()  # built and compiled before capture
            torch.cuda.synchronize()
            graphs = []
            for t in (0, 1):  # each publishes its experts into `prev`: replays alternate correctly
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    eager[t]()
                graphs.append(graph)
            return lambda t: graphs[t % 2].replay()

        switches = {key: switch_of(plan) for key, plan in plans.items()}

        rng = random.Random(0)
        runs = []
        with SmiLog() as smi:
            for rnd in range(args.rounds):
                combos = [(key, ctx) for key in plans for ctx in contexts]
                rng.shuffle(combos)
                for (mode, form), ctx in combos:
                    start = datetime.datetime.now()
                    ms = per_launch_ms(switches[(mode, form)], between[ctx], args.tokens)
                    runs.append(dict(round=rnd, mode=mode, form=form, variant=plans[(mode, form)].variant,
                                     context=ctx, start=start.isoformat(),
                                     end=datetime.datetime.now().isoformat(), ms=ms))
                    print(f"  round {rnd} {adapted} {mode} {form} {ctx}: median {statistics.median(ms):.3f} ms",
                          flush=True)
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
        for key, row in summary.items():  # against the simple merge in the same mode and context
            mode, _, ctx = key.split("/")
            base = summary.get(f"{mode}/simple_merge/{ctx}")
            row["x_simple_merge"] = round(base["median_ms"] / row["median_ms"], 3) if base else None
            print(f"{adapted:5s} {key:40s} {row['median_ms']:8.3f} ms  {row['tb_s']:6.3f} TB/s  "
                  f"x simple merge {row['x_simple_merge']}", flush=True)
        out["sets"][adapted] = dict(meta=meta, summary=summary, runs=runs, smi_fields=smi.fields,
                                    smi_samples=smi.lines)
        copies.append(copy_bandwidth())
        del plans, weights, lora_A, lora_B, pristine, between
        torch.cuda.empty_cache()
        write_out(out, copies, args.out)  # after each set: a run cut by its timeout keeps the sets done


def write_out(out: dict, copies: list[float], path: str) -> None:
    """The JSON so far, each row's share of the best copy bandwidth measured up to now."""
    out["copy_tb_s_rounds"] = copies
    out["copy_tb_s"] = max(copies)
    for entry in out["sets"].values():
        for row in entry["summary"].values():
            row["copy_fraction"] = round(row["tb_s"] / out["copy_tb_s"], 4)
    Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
