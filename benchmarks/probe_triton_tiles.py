"""Which Triton SGMM tiles give right results on this GPU, and how fast each switches.

Why: the 128x256 tile (8 warps, 3 stages, one program per SM) was the fastest Triton config in
bench_sgmm.py (all seven pristine 13.2 ms against 14.8 for the default 64x128) and is wrong on
the GPU: 68-70x the error of rounding the exact result to bf16 (sgmm_*_h100_s28.json), while
Triton's interpreter on the CPU gets it right (fp16, 256 x 512). This probe varies warps, stages and programs per SM around it to find which
setting breaks it, with the default tile as the control: for each config, mode and dtype, the
relative error of the update against the float64 oracle on make_problem inputs (update about
0.3 x |W|, targets poisoned first) and, in bf16 pristine, the ms of a q,v-sized switch.

Usage: python benchmarks/probe_triton_tiles.py --out probe_triton_tiles.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (BLOCK_M, BLOCK_N, warps, stages, programs per SM)
CONFIGS = [(64, 128, 4, 4, 4), (128, 128, 8, 3, 2), (128, 256, 8, 3, 1), (128, 256, 8, 2, 1),
           (128, 256, 8, 1, 1), (128, 256, 4, 3, 1), (128, 256, 8, 3, 2), (256, 128, 8, 3, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_triton_tiles.json")
    args = ap.parse_args()
    from adafuse_compile.cutlass_kernels import triton_sgmm
    from adafuse_compile.cutlass_kernels.reference import delta_error, make_problem, oracle_then_poison
    from adafuse_compile.runtime.cost_model import cuda_elapsed_s

    triton_sgmm.MAX_TILE_ELEMS = 1 << 30  # the guard off: this probe checks what it guards against
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, rows=[])
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    for bm, bn, warps, stages, pps in CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        for dtype in (torch.bfloat16, torch.float16):
            for mode in ("pristine", "inplace"):
                row = dict(config=f"{bm}x{bn}_w{warps}_s{stages}_p{pps}", dtype=str(dtype), mode=mode)
                try:
                    p = make_problem(shapes, k=2, rank=64, dtype=dtype, device="cuda",
                                     pristine=mode == "pristine")
                    before, expected, _, _ = oracle_then_poison(p)
                    plan = triton_sgmm.TritonPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"],
                                                  config=cfg, programs=pps * sms)
                    plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
                    torch.cuda.synchronize()
                    bases = p["pristine"] or before
                    row["rel_error"] = max(delta_error(w, b, e) for w, b, e in zip(p["weights"], bases, expected))
                    row["nan"] = any(bool(torch.isnan(w).any()) for w in p["weights"])
                    if dtype == torch.bfloat16 and mode == "pristine":
                        q = make_problem([(4096, 4096)] * 64, k=2, rank=64, dtype=dtype, device="cuda",
                                         pristine=True)
                        qplan = triton_sgmm.TritonPlan(q["weights"], q["lora_A"], q["lora_B"], 2, q["pristine"],
                                                       config=cfg, programs=pps * sms)
                        run = lambda: qplan.run(q["experts"], q["gates"], q["prev_experts"], q["prev_gates"], 0.5)  # noqa: E731
                        run()
                        row["qv_pristine_ms"] = round(cuda_elapsed_s(run, 10) * 1e3, 4)
                        del q, qplan
                    del p, plan
                except Exception as exc:  # one config failing to compile must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                torch.cuda.empty_cache()
                out["rows"].append(row)
                print(row, flush=True)
                Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
