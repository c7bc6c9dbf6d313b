"""Does the plan's own timing rank its candidates as a decode would? Back to back against after an idle gap.

Why: the switch op keeps the candidate its twin plan times fastest (`choose_gemm`: the gather
GEMM on all SMs or on 7/8 of them; `plan_fastest_form`: the gather or the pack form). Timed back
to back, the q,v in-place twin kept 7/8 of the SMs, which then ran 1.756 ms between a decode's
weight reads against 1.658 ms on all SMs (probe_decode_h100_s28.json). The package now times each
launch alone after an idle gap (`cutlass_sgmm.IDLE_CYCLES`); this probe builds fresh twins
`--repeats` times under each setting (0: no gap, launches one after another as the old timing
ran them, though each is still timed alone and the median taken) and records what each
kept and the medians it saw. Which candidate is really faster where a decode runs it is
probe_switch_contexts.py's decode_like figure (run_h200.sh probe-decode, with --sm-counts 0,116).

Usage: python benchmarks/probe_timing_context.py --out probe_timing_context.json [--sets qv,all7]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_sgmm import RANK, TOP_K, make_inputs, shapes_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_timing_context.json")
    ap.add_argument("--sets", default="qv,all7")
    ap.add_argument("--modes", default="inplace,pristine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-cycles", default="0,10000000", help="IDLE_CYCLES settings, each in turn per repeat")
    args = ap.parse_args()
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    settings = [int(c) for c in args.idle_cycles.split(",")]
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, repeats=args.repeats,
               setup="bf16, Llama-2-7B shapes x 32 layers, N=8, r=64, top-2; fresh twins per repeat "
                     "(CutlassPlan.for_timing on the weights), each IDLE_CYCLES setting in turn",
               runs=[])
    for adapted in args.sets.split(","):
        weights, *_, pristine = make_inputs(shapes_for(adapted), "pristine" in args.modes)
        for mode in args.modes.split(","):
            pr = pristine if mode == "pristine" else None
            for rep in range(args.repeats):
                for idle in settings:
                    cutlass_sgmm.IDLE_CYCLES = idle
                    cutlass_sgmm._chosen.clear()
                    row = dict(set=adapted, mode=mode, repeat=rep, idle_cycles=idle)
                    twins = {}
                    for form in ("gather", "pack"):
                        twins[form] = cutlass_sgmm.CutlassPlan.for_timing(weights, RANK, TOP_K, pr,
                                                                          gather=form == "gather")
                        row[f"{form}_gemm"] = twins[form].choice
                    _, medians, _ = cutlass_sgmm.fastest(twins, cutlass_sgmm.time_switch)
                    row["form_ms"] = {form: round(ms, 4) for form, ms in medians.items()}
                    del twins
                    torch.cuda.empty_cache()
                    out["runs"].append(row)
                    g = row["gather_gemm"]
                    print(f"{adapted:5s} {mode:9s} rep {rep} idle {idle:>9d}: gather kept v{g['variant']} share "
                          f"{g['grid_share']} {g.get('median_ms')}; pack kept v{row['pack_gemm']['variant']} "
                          f"{row['pack_gemm'].get('median_ms')}; whole switch {row['form_ms']}", flush=True)
                    Path(args.out).write_text(json.dumps(out, indent=1))
        del weights, pristine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
