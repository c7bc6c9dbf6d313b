"""Which linear_lora tiles are wrong, where: every fixed tile of the autotuner's list, both kernels
(TMA, pointer loads), Llama-2-7B prefill shapes at T = 128, 512, 2048, bf16, against a float64
oracle. Made to find why the TMA kernel returned garbage at T = 2048 in bench_prefill_forms
(2026-12-05, H200, Triton 3.6) while its autotuned runs at 128 and 512 were right.

    python benchmarks/probe_linear_lora.py --out probe_linear_lora.json
"""
from __future__ import annotations

import argparse
import json
import traceback

import torch

from adafuse_compile import gpu_lock
from adafuse_compile.cutlass_kernels import triton_linear_lora as tll
from adafuse_compile.cutlass_kernels.linear_lora import make_linear_lora_problem, oracle_linear_lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,512,2048")
    ap.add_argument("--out", default="probe_linear_lora.json")
    args = ap.parse_args()
    rows = []
    with gpu_lock.held_except_compiles():
        for t in map(int, args.tokens.split(",")):
            for n_in, out in ((4096, 4096), (4096, 11008), (11008, 4096)):
                p = make_linear_lora_problem(t, n_in, out, 8, 64, torch.bfloat16, device="cuda")
                want = oracle_linear_lora(**p, scaling=0.5)
                configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in tll._configs()]
                for kernel in ("tma", "pointer"):
                    for cfg in [None] + configs:
                        row = dict(tokens=t, n_in=n_in, out=out, kernel=kernel, config=cfg or "autotuned")
                        try:
                            y = tll.linear_lora_triton(**p, scaling=0.5, config=cfg, kernel=kernel)
                            torch.cuda.synchronize()
                            err = ((y.double() - want).norm(dim=1) / want.norm(dim=1))
                            row.update(max_rel_err=err.max().item(), bad_rows=int((err > 1e-2).sum()),
                                       first_bad_row=int((err > 1e-2).nonzero()[0, 0]) if (err > 1e-2).any() else None)
                        except Exception as e:  # a config that does not compile or launch: note it, go on
                            row.update(error=f"{type(e).__name__}: {e}"[:400], trace=traceback.format_exc()[-800:])
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=__import__("triton").__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
