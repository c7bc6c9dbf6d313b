"""Gather-LoRA benchmark on Llama-2-7B shapes (the `gather` path's kernels, DESIGN.md sec. 7).

Module groups sharing one input, the four of a Llama layer: q,k,v (in 4096, outs 4096 x 3),
o (in 4096, out 4096), gate,up (in 4096, outs 11008 x 2) and down (in 11008, out 4096); N = 8 experts, r = 64, top-2, bf16, factors A std 0.02, B std 0.002, x std 1.
Tokens T in 1, 8, 32, 128, 512, each with its own uniformly drawn experts (fixed seed).

Timing: 32 layers, each with its own adapter tensors (as in the model: 32 x the factors is
far beyond L2, so no layer finds its factors cached), are captured as 32 calls in one CUDA
graph; the median over replays (CUDA events) divided by 32 is the `ms_per_call`.

Bytes (the minimum a call must move): read x, read the A and B rows of the distinct experts
the T tokens use (per module: U * r * (in + out) * 2), write every delta (T * out * 2). The
fp32 intermediate h (written and read once: M * T * k * r * 8 bytes) is reported apart as
`h_bytes`. `frac_copy_bw` = (bytes / time) / the device-to-device copy bandwidth measured in
the same run (bench_sgmm.copy_bandwidth).

    python benchmarks/bench_gather.py --out benchmarks/results/gather_h200.json
    python benchmarks/bench_gather.py --out /tmp/sweep.json --sweep   # Triton configs too

Each entry also carries `max_rel_err_vs_reference`: the worst per-token relative difference
from the fp32 reference on layer 0 (bf16 rounding: about 1e-2 or below).
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
    FFN, HIDDEN, LAYERS, N_EXPERTS, RANK, TOP_K, copy_bandwidth, time_graph, run_header)

from adafuse_compile import gpu_lock  # noqa: E402
from adafuse_compile.cutlass_kernels import gather_lora as gl  # noqa: E402

# group -> (in, outs)
GROUPS = {"qkv": (HIDDEN, [HIDDEN] * 3), "o": (HIDDEN, [HIDDEN]), "gate_up": (HIDDEN, [FFN] * 2),
          "down": (FFN, [HIDDEN])}
TOKENS = (1, 8, 32, 128, 512)
# --sweep: Triton config overrides tried on top of the shape-picked default (plan.config).
SWEEP = [
    {},
    {"BLOCK_K": 128},
    {"BLOCK_K": 32},
    {"SPLIT_K": 1},
    {"SPLIT_K": 2},
    {"SPLIT_K": 4},
    {"SPLIT_K": 16},  # beyond MAX_SPLIT_K: the expand sums more partials
    {"SPLIT_K": 32},
    {"BLOCK_K": 32, "SPLIT_K": 16},
    {"EXPAND_UNROLL": True},  # the expand's experts unrolled, loads unconditional (batch decode)
    {"BLOCK_O": 128},
    {"BLOCK_O": 32},
    {"BLOCK_T": 16},
    {"SORTED": True, "BLOCK_M": 16},
    {"SORTED": True, "BLOCK_M": 128},
]


def make_layers(n_in: int, outs: list[int], dtype=torch.bfloat16) -> list[tuple[list, list]]:
    layers = []
    for _ in range(LAYERS):
        a = [torch.randn(N_EXPERTS, RANK, n_in, device="cuda", dtype=dtype) * 0.02
             for _ in outs]
        b = [torch.randn(N_EXPERTS, o, RANK, device="cuda", dtype=dtype) * 0.002 for o in outs]
        layers.append((a, b))
    return layers


def make_tokens(T: int, n_in: int, gen: torch.Generator):
    x = torch.randn(T, n_in, generator=gen).to("cuda", torch.bfloat16)
    scores = torch.rand(T, N_EXPERTS, generator=gen)
    experts = scores.topk(TOP_K, dim=1).indices.to("cuda")
    gates = torch.softmax(torch.randn(T, TOP_K, generator=gen), 1).to("cuda")
    return x, experts, gates


def min_bytes(T: int, n_in: int, outs: list[int], experts: torch.Tensor) -> tuple[int, int]:
    distinct = int(torch.unique(experts).numel())
    factors = sum(distinct * RANK * (n_in + o) * 2 for o in outs)
    total = T * n_in * 2 + factors + sum(T * o * 2 for o in outs)
    h_bytes = len(outs) * T * TOP_K * RANK * 8
    return total, h_bytes


def max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for y, r in zip(got, ref):
        err = (y.float() - r.float()).norm(dim=1) / r.float().norm(dim=1).clamp_min(1e-30)
        worst = max(worst, float(err.max()))
    return worst


def bench(group: str, T: int, layers, reps: int, sweep: bool | list, copy_gbps: float,
          gen: torch.Generator) -> list[dict]:
    """`sweep`: True for SWEEP, or a list of config overrides of one's own."""
    n_in, outs = GROUPS[group]
    x, experts, gates = make_tokens(T, n_in, gen)
    nbytes, h_bytes = min_bytes(T, n_in, outs, experts)
    a0, b0 = layers[0]
    ref0 = gl.reference_gather_lora(x, a0, b0, experts, gates, 0.5)
    base = {"group": group, "tokens": T, "modules": len(outs), "in": n_in, "outs": outs,
            "distinct_experts": int(torch.unique(experts).numel()), "bytes": nbytes,
            "h_bytes": h_bytes}
    variants = [("reference", None, None), ("triton", "default", None)]
    if sweep:
        configs = SWEEP[1:] if sweep is True else [c for c in sweep if c]
        variants += [("triton", json.dumps(c, sort_keys=True), c) for c in configs]
    # As in the backend: a prefill step's expert order and sets are computed once for every call
    # (and every layer), so they are not part of a call's time.
    step = {}
    if T * TOP_K >= gl.SORTED_MIN_ROWS:
        step["rows"], step["segments"] = gl.expert_segments(experts, N_EXPERTS)
        if gl.tuple_keys(N_EXPERTS, TOP_K) <= gl.MAX_TUPLE_KEYS:
            step["set_order"], step["set_work"] = gl.tuple_blocks(experts, N_EXPERTS)
    entries = []
    for impl, name, cfg in variants:
        e = dict(base, impl=impl, variant=name)
        try:
            if impl == "reference":
                def call(a, b):
                    return gl.gather_lora(x, a, b, experts, gates, 0.5, impl="reference")
            elif cfg is None:
                def call(a, b):
                    return gl.gather_lora(x, a, b, experts, gates, 0.5, impl="triton", **step)
            else:
                plans = {id(a): gl._get_triton_plan(a, b) for a, b in layers}
                if cfg.get("SETS_BLOCK_T", gl.TUPLE_BLOCK_T) != gl.TUPLE_BLOCK_T and "set_work" in step:
                    own = dict(step)  # that block size's sets, also computed once
                    own["set_order"], own["set_work"] = gl.tuple_blocks(experts, N_EXPERTS, cfg["SETS_BLOCK_T"])
                else:
                    own = step

                def call(a, b, cfg=cfg, own=own):
                    return plans[id(a)].run(x, experts, gates, 0.5, config=cfg, **own)
            e["max_rel_err_vs_reference"] = max_rel_err(call(a0, b0), ref0)
            if impl == "triton":
                e["config"] = gl._get_triton_plan(a0, b0).config(T, TOP_K, cfg)
            t = time_graph(lambda: [call(a, b) for a, b in layers], reps)
            e.update({k: v / LAYERS for k, v in t.items() if k.endswith("_ms")}, reps=reps)
            e["ms_per_call"] = e.pop("median_ms")
            e["GBps"] = nbytes / (e["ms_per_call"] * 1e-3) / 1e9
            e["frac_copy_bw"] = e["GBps"] / copy_gbps
        except Exception as exc:  # one failing variant must not lose the run
            e["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        entries.append(e)
        print(json.dumps(e), flush=True)
    return entries


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--groups", default="qkv,o,gate_up,down")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep", action="store_true", help="also time the Triton SWEEP configs")
    ap.add_argument("--variants", help="a JSON list of Triton config overrides to time instead of SWEEP")
    a = ap.parse_args(argv)
    sweep = json.loads(a.variants) if a.variants else a.sweep
    results = {
        **run_header(),
        "bytes_note": "read x + read A,B rows of the distinct experts used + write deltas; "
                      "h (fp32 intermediate) apart in h_bytes",
        "timing_note": "32 layers (own factors each) in one CUDA graph; per-call = total / 32",
        "entries": [],
    }
    t0 = time.time()
    results["copy"] = copy_bandwidth(a.reps)
    print("copy", results["copy"], flush=True)
    gen = torch.Generator().manual_seed(0)
    for group in a.groups.split(","):
        layers = make_layers(*GROUPS[group])
        for T in (int(t) for t in a.tokens.split(",")):
            results["entries"] += bench(group, T, layers, a.reps, sweep,
                                        results["copy"]["GBps"], gen)
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
        del layers
        gl.clear_plan_cache()
        torch.cuda.empty_cache()
    results["wall_s"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'group':8} {'T':>4} {'impl':9} {'variant':28} {'ms/call':>8} "
          f"{'%copy':>6} {'err':>8}")
    for e in results["entries"]:
        if "ms_per_call" in e:
            print(f"{e['group']:8} {e['tokens']:4d} {e['impl']:9} {str(e['variant']):28} "
                  f"{e['ms_per_call']:8.4f} {100 * e['frac_copy_bw']:6.1f} "
                  f"{e['max_rel_err_vs_reference']:8.1e}")
        else:
            print(f"{e['group']:8} {e['tokens']:4d} {e['impl']:9} {str(e['variant']):28} ERROR")
    return 0


if __name__ == "__main__":
    with gpu_lock.held_except_compiles():  # alone on the GPU when other benchmarks share it
        sys.exit(main())
