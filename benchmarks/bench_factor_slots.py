"""Factor-slot write benchmark on Llama-2-7B shapes (the `factor` path's per-token write, issue 6).

Adapted sets: q,v (64 linears, 4096 x 4096) and all seven (224 linears: q,k,v,o 4096 x 4096,
gate,up 11008 x 4096, down 4096 x 11008, [out, in]); N = 8 experts, r = 64, top-2, bf16.
One call writes every linear's slots: a_slots [k*r, in] and b_slots [out, k*r].

Timing: median over replays (CUDA events) of the call captured in a CUDA graph (`graph_ms`,
what a compiled decode step pays), and of the eager call (`eager_ms`: the reference's 2 x M
and more small launches are host-bound there). Bytes (the minimum a call moves): read the k
experts' A and B, write the slots: sum over linears of 2 * k * r * (in + out) * 2 bytes.
`frac_copy_bw` = (bytes / graph time) / the device-to-device copy bandwidth measured in the
same run (bench_sgmm.copy_bandwidth). `bitwise_equal_to_reference`: the slots written by the
variant equal the reference's.

    python benchmarks/bench_factor_slots.py --out benchmarks/results/factor_slots_h200.json
    python benchmarks/bench_factor_slots.py --out /tmp/sweep.json --sweep   # tile configs too
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sgmm import (  # noqa: E402
    FFN, HIDDEN, LAYERS, N_EXPERTS, RANK, TOP_K, copy_bandwidth, time_eager, time_graph, run_header)

from adafuse_compile.cutlass_kernels import factor_slots as fs  # noqa: E402

SCALING = 0.5
SETS = {  # per layer, (out, in)
    "qv": [(HIDDEN, HIDDEN)] * 2,
    "all7": [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN)] * 2 + [(HIDDEN, FFN)],
}
# --sweep: SlotPlan configs tried besides the default (triton_factor_slots.DEFAULT_CONFIG).
SWEEP = [dict(BLOCK=b, num_warps=w) for b in (1024, 2048, 4096, 8192, 16384) for w in (4, 8)]


def make_inputs(name: str):
    shapes = SETS[name] * LAYERS
    dev, dt = "cuda", torch.bfloat16
    lora_A = [torch.randn(N_EXPERTS, RANK, i, device=dev, dtype=dt) * 0.02 for _, i in shapes]
    lora_B = [torch.randn(N_EXPERTS, o, RANK, device=dev, dtype=dt) * 0.002 for o, _ in shapes]
    experts = torch.tensor([1, 6], device=dev)
    gates = torch.tensor([0.62, 0.38], device=dev)
    return lora_A, lora_B, experts, gates


def bench(name: str, reps: int, sweep: bool, copy_gbps: float) -> list[dict]:
    lora_A, lora_B, experts, gates = make_inputs(name)
    ref_a, ref_b = fs.make_slots(lora_A, lora_B, TOP_K)
    fs.reference_write_factor_slots(lora_A, lora_B, experts, gates, SCALING, ref_a, ref_b)
    a_slots, b_slots = fs.make_slots(lora_A, lora_B, TOP_K)
    nbytes = sum(2 * TOP_K * RANK * (a.shape[2] + b.shape[1]) * 2 for a, b in zip(lora_A, lora_B))
    base = {"set": name, "linears": len(lora_A), "bytes": nbytes}
    variants = [("reference", None), ("triton", None)]
    if sweep:
        variants += [("triton", c) for c in SWEEP]
    from adafuse_compile.cutlass_kernels.triton_factor_slots import DEFAULT_CONFIG, SlotPlan

    entries = []
    for impl, cfg in variants:
        e = dict(base, impl=impl, config=dict(DEFAULT_CONFIG, **cfg) if cfg else
                 (DEFAULT_CONFIG if impl == "triton" else None))
        try:
            if cfg is None:
                def call(impl=impl):
                    torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, SCALING,
                                                         a_slots, b_slots, impl)
            else:
                plan = SlotPlan(lora_A, lora_B, a_slots, b_slots, TOP_K, cfg)
                e["tiles"] = plan.num_tiles

                def call(plan=plan):
                    plan.run(experts, gates, SCALING)
            for s in a_slots + b_slots:
                s.fill_(float("nan"))
            call()
            torch.cuda.synchronize()
            e["bitwise_equal_to_reference"] = all(
                torch.equal(x, y) for x, y in zip(a_slots + b_slots, ref_a + ref_b))
            e["eager_ms"] = time_eager(call, reps)
            t = time_graph(call, reps)
            e.update(graph_ms=t["median_ms"], graph_min_ms=t["min_ms"], graph_max_ms=t["max_ms"],
                     reps=reps)
            e["GBps"] = nbytes / (e["graph_ms"] * 1e-3) / 1e9
            e["frac_copy_bw"] = e["GBps"] / copy_gbps
        except Exception as exc:  # one failing variant must not lose the run
            e["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        entries.append(e)
        print(json.dumps(e), flush=True)
    fs.clear_plan_cache()
    return entries


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sets", default="qv,all7")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP tile configs")
    a = ap.parse_args(argv)
    results = {
        **run_header(),
        "bytes_note": "read the k experts' A and B + write the slots, per linear "
                      "2 * k * r * (in + out) * 2 bytes",
        "timing_note": "graph_ms: one call captured in a CUDA graph, median of replays; "
                       "eager_ms: the eager call; CUDA events",
        "entries": [],
    }
    t0 = time.time()
    results["copy"] = copy_bandwidth(a.reps)
    print("copy", results["copy"], flush=True)
    for name in a.sets.split(","):
        results["entries"] += bench(name, a.reps, a.sweep, results["copy"]["GBps"])
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        torch.cuda.empty_cache()
    results["wall_s"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'set':5} {'impl':9} {'config':28} {'graph ms':>9} {'eager ms':>9} {'GB/s':>7} "
          f"{'%copy':>6} {'bitwise':>7}")
    for e in results["entries"]:
        cfg = json.dumps(e["config"], sort_keys=True) if e["config"] else "-"
        if "graph_ms" in e:
            print(f"{e['set']:5} {e['impl']:9} {cfg:28} {e['graph_ms']:9.4f} {e['eager_ms']:9.4f} "
                  f"{e['GBps']:7.0f} {100 * e['frac_copy_bw']:6.1f} {str(e['bitwise_equal_to_reference']):>7}")
        else:
            print(f"{e['set']:5} {e['impl']:9} {cfg:28} ERROR {e['error'][:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
