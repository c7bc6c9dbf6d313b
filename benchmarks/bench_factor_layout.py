"""Factor-path weight layouts: does an extended matrix beat the plain three-op form? (batch-1 decode)

The `factor` path computes, per adapted linear with W [out, in] and slots a [k*r, in], b [out, k*r],
y = W x + b (a x). The issue proposes one extended product over a buffer laid out once; this script
times the candidates for a whole model's adapted linears, back to back in ONE CUDA graph:

    backbone         y = W x                                                   (the floor)
    backbone_cols_view  y = W x with W the view W_ext[:, :in] of ext_cols (what the layout costs
                     every product that reads W, e.g. the merge path's backbone)
    three_op         y = W x + b (a x)                                          (what rewrite_factor emits)
    ext_cols         W_ext = [W | b] [out, in + k*r]; h = a x; y = W_ext [x; h]  (the issue's layout)
    ext_rows         W_ext = [W ; a] [out + k*r, in]; z = W_ext x; y = z[:out] + b z[out:]
    shared_a         linears reading one x (q,k,v; gate,up) stack their a: h = [a_q; a_k; a_v] x once,
                     y_m = W_m x + b_m h[slice_m]
    ext_rows_shared  the group's first W carries all the group's a: z = [W_q; a_q; a_k; a_v] x,
                     y_q = z[:out] + b_q z[a_q rows], y_k = W_k x + b_k z[a_k rows], ...

Per variant also the per-token slot write (write_factor_slots_, Triton, one launch) into the slots
that layout reads: the a slots of ext_rows / shared_a / ext_rows_shared are contiguous row views of
their stacked buffers, so the existing kernel writes them in place. ext_cols' b slot is the strided
view W_ext[:, in:], which the kernel does not take (contiguous slots only): its write is the plain
write plus one copy per linear into that region (a strided-slot kernel would cost the plain write).
Total factor overhead per token = slot write + (variant - backbone). Before each variant is built
the slots hold the previous token's experts, so its exactness also checks that its write reaches
every slot it reads.

Shapes: Llama-2-7B (bench_sgmm's constants), N = 8 experts, r = 64, top-2 (k*r = 128), bf16, x [1, in].
Sets: qv (64 linears) and all (q,k,v,o, gate,up, down: 224). Factors A std 0.02, B std 0.2 (not the
0.002 of the other benchmarks: with it the adapter term is under 1% of W x, below bf16 rounding, and
the exactness check could not see it missing; GEMM time does not depend on the values).

Timing (GPU): each variant captured in a CUDA graph (bench_sgmm.time_graph: warm-up on a side stream,
replays timed with CUDA events, median of `--reps`), for `--rounds` rounds that interleave the
variants (so clock drift hits all alike); ms = median over rounds. CPU (`--device cpu`, smoke test):
eager, perf_counter, fp32. Exactness: every variant's outputs vs an fp32 reference computed from the
expert factors themselves (not the slots), max over linears of max|y - ref| / max|ref|.

    python benchmarks/bench_factor_layout.py --out benchmarks/results/factor_layout_h200.json
    python benchmarks/bench_factor_layout.py --device cpu --sets qv --layers 2 --hidden 256 --out /tmp/f.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sgmm import FFN, HIDDEN, LAYERS, N_EXPERTS, RANK, TOP_K, run_header, time_graph  # noqa: E402

from adafuse_compile import gpu_lock  # noqa: E402
from adafuse_compile.cutlass_kernels import factor_slots as fs  # noqa: E402

SCALING = 0.5
A_STD, B_STD, W_STD = 0.02, 0.2, 0.02
EXPERTS, GATES = [1, 6], [0.62, 0.38]  # as bench_sgmm / bench_factor_slots (top-2)
PREV_EXPERTS, PREV_GATES = [3, 1], [0.55, 0.45]  # the previous token's: stale slot contents
SETS = ("qv", "all")
# Pass threshold of max_rel_err: bf16 output and intermediate rounding (2^-9 relative each) stays
# well under 1e-2 of max|y|; on the CPU in fp32 only summation order differs.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def per_layer(name: str, hidden: int, ffn: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Input groups of one layer: (group, [(out, in) of each linear reading that input])."""
    if name == "qv":
        return [("attn", [(hidden, hidden)] * 2)]
    return [("attn", [(hidden, hidden)] * 3), ("o", [(hidden, hidden)]),
            ("mlp", [(ffn, hidden)] * 2), ("down", [(hidden, ffn)])]


@dataclass
class Linear:
    w: Tensor  # [out, in]
    lora_A: Tensor  # [N, r, in]
    lora_B: Tensor  # [N, out, r]
    a_slot: Tensor  # [k*r, in], the plain slots three_op reads
    b_slot: Tensor  # [out, k*r]
    w_cols: Tensor | None = None  # ext_cols' [W | b], built on first use (two variants read it)


@dataclass
class Group:
    """Linears that read the same input x [1, in]."""
    x: Tensor
    linears: list[Linear]


def make_groups(name, layers, hidden, ffn, experts_n, rank, top_k, device, dtype) -> list[Group]:
    groups = []
    for _ in range(layers):
        for _, shapes in per_layer(name, hidden, ffn):
            n_in = shapes[0][1]
            linears = []
            for out, i in shapes:
                a = torch.randn(experts_n, rank, i, device=device, dtype=dtype) * A_STD
                b = torch.randn(experts_n, out, rank, device=device, dtype=dtype) * B_STD
                (sa,), (sb,) = fs.make_slots([a], [b], top_k)
                linears.append(Linear(torch.randn(out, i, device=device, dtype=dtype) * W_STD, a, b, sa, sb))
            groups.append(Group(torch.randn(1, n_in, device=device, dtype=dtype), linears))
    return groups


def reference(groups: list[Group], experts: Tensor, gates: Tensor) -> list[Tensor]:
    """fp32 W x + sum_j scaling g_j B[e_j] (A[e_j] x), from the expert factors (checks the slot write too)."""
    out = []
    coeff = gates.float() * SCALING
    for g in groups:
        x = g.x.float()
        for m in g.linears:
            y = x @ m.w.float().T
            for e, c in zip(experts.tolist(), coeff.tolist()):
                y += c * ((x @ m.lora_A[e].float().T) @ m.lora_B[e].float().T)
            out.append(y)
    return out


def max_rel_err(ys: list[Tensor], refs: list[Tensor]) -> float:
    return max(float((y.float() - r).abs().max() / r.abs().max()) for y, r in zip(ys, refs))


# Variants: (groups, make_write) -> (step, write). step() returns every linear's y, group-major;
# write() is the per-token slot write into the slots this layout reads (None: the backbone ones).
MakeWrite = Callable[[list[Tensor], list[Tensor]], Callable[[], None]]


def _linears(groups):
    return [m for g in groups for m in g.linears]


def backbone(groups, make_write):
    pairs = [(g.x, m.w) for g in groups for m in g.linears]
    return (lambda: [F.linear(x, w) for x, w in pairs]), None


def _cols(m: Linear) -> Tensor:
    if m.w_cols is None:
        m.w_cols = torch.cat([m.w, m.b_slot], 1)
    return m.w_cols


def backbone_cols_view(groups, make_write):
    pairs = [(g.x, _cols(m)[:, :m.w.shape[1]]) for g in groups for m in g.linears]
    return (lambda: [F.linear(x, w) for x, w in pairs]), None


def three_op(groups, make_write):
    ms = [(g.x, m.w, m.a_slot, m.b_slot) for g in groups for m in g.linears]
    lin = _linears(groups)
    return ((lambda: [F.linear(x, w) + F.linear(F.linear(x, a), b) for x, w, a, b in ms]),
            make_write([m.a_slot for m in lin], [m.b_slot for m in lin]))


def ext_cols(groups, make_write):
    ms = [(g.x, m.a_slot, _cols(m)) for g in groups for m in g.linears]
    lin = _linears(groups)
    plain = make_write([m.a_slot for m in lin], [m.b_slot for m in lin])
    # The b region W_ext[:, in:] is strided (row stride in + k*r) and the Triton kernel takes contiguous
    # slots only: write the plain slots, then copy each b into place (one more launch per linear).
    b_regions = [(_cols(m)[:, m.w.shape[1]:], m.b_slot) for m in lin]

    def write():
        plain()
        for region, b in b_regions:
            region.copy_(b)
    return (lambda: [F.linear(torch.cat([x, F.linear(x, a)], -1), w) for x, a, w in ms]), write


def ext_rows(groups, make_write):
    lin = _linears(groups)
    ms = [(g.x, torch.cat([m.w, m.a_slot]), m.w.shape[0], m.b_slot) for g in groups for m in g.linears]

    def step():
        ys = []
        for x, w, out, b in ms:
            z = F.linear(x, w)
            ys.append(z[..., :out] + F.linear(z[..., out:], b))
        return ys
    return step, make_write([w[out:] for _, w, out, _ in ms], [m.b_slot for m in lin])


def _a_row_bounds(stacked: Tensor, start: int, linears: list[Linear]) -> list[tuple[int, int]]:
    bounds, lo = [], start
    for m in linears:
        bounds.append((lo, lo + m.a_slot.shape[0]))
        lo += m.a_slot.shape[0]
    assert lo == stacked.shape[0]
    return bounds


def shared_a(groups, make_write):
    plan, a_views = [], []
    for g in groups:
        a_all = torch.cat([m.a_slot for m in g.linears])
        bounds = _a_row_bounds(a_all, 0, g.linears)
        a_views += [a_all[lo:hi] for lo, hi in bounds]
        plan.append((g.x, a_all, [(m.w, m.b_slot, lo, hi) for m, (lo, hi) in zip(g.linears, bounds)]))

    def step():
        ys = []
        for x, a_all, members in plan:
            h = F.linear(x, a_all)
            ys += [F.linear(x, w) + F.linear(h[..., lo:hi], b) for w, b, lo, hi in members]
        return ys
    return step, make_write(a_views, [m.b_slot for m in _linears(groups)])


def ext_rows_shared(groups, make_write):
    plan, a_views = [], []
    for g in groups:
        first = g.linears[0]
        out0 = first.w.shape[0]
        w_ext = torch.cat([first.w] + [m.a_slot for m in g.linears])
        bounds = _a_row_bounds(w_ext, out0, g.linears)
        a_views += [w_ext[lo:hi] for lo, hi in bounds]
        rest = [(m.w, m.b_slot, lo, hi) for m, (lo, hi) in zip(g.linears[1:], bounds[1:])]
        plan.append((g.x, w_ext, out0, first.b_slot, bounds[0], rest))

    def step():
        ys = []
        for x, w_ext, out0, b0, (lo0, hi0), rest in plan:
            z = F.linear(x, w_ext)
            ys.append(z[..., :out0] + F.linear(z[..., lo0:hi0], b0))
            ys += [F.linear(x, w) + F.linear(z[..., lo:hi], b) for w, b, lo, hi in rest]
        return ys
    return step, make_write(a_views, [m.b_slot for m in _linears(groups)])


VARIANTS = {"backbone": backbone, "backbone_cols_view": backbone_cols_view, "three_op": three_op,
            "ext_cols": ext_cols, "ext_rows": ext_rows, "shared_a": shared_a, "ext_rows_shared": ext_rows_shared}
WRITE_NOTE = {"ext_cols": "plain write + one copy per linear into the strided b region W_ext[:, in:] (the Triton "
                          "kernel takes contiguous slots only); a strided-slot kernel would cost three_op's write"}


def timer(device: str, reps: int) -> Callable[[Callable], float]:
    if device == "cuda":
        return lambda fn: time_graph(fn, reps)["median_ms"]

    def eager_ms(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return eager_ms


def bench_set(name: str, a) -> dict:
    dev, dt = a.device, a.dtype
    groups = make_groups(name, a.layers, a.hidden, a.ffn, a.experts, a.rank, a.top_k, dev, dt)
    lin = _linears(groups)
    lora_A, lora_B = [m.lora_A for m in lin], [m.lora_B for m in lin]
    experts = torch.tensor(EXPERTS[:a.top_k], device=dev)
    gates = torch.tensor(GATES[:a.top_k], device=dev)

    def writer(experts, gates) -> MakeWrite:
        def make_write(a_slots, b_slots):
            def write():
                fs.write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl=a.impl)
            return write
        return make_write

    make_write = writer(experts, gates)
    # Before each variant is built (its buffers copy the plain slots), the plain slots hold the previous
    # token's experts: the variant is exact only if its own write reaches every slot it reads.
    stale = writer(torch.tensor(PREV_EXPERTS[:a.top_k], device=dev), torch.tensor(PREV_GATES[:a.top_k], device=dev))(
        [m.a_slot for m in lin], [m.b_slot for m in lin])
    refs = reference(groups, experts, gates)
    res = {"linears": len(lin), "weight_bytes": sum(m.w.numel() * m.w.element_size() for m in lin),
           "variants": {}}
    items = {}  # timed name -> fn
    for vname, build in VARIANTS.items():
        e = res["variants"][vname] = {}
        try:
            stale()
            step, write = build(groups, make_write)
            if write is not None:
                write()  # fills this layout's slots and builds its Triton plan before any capture
            if dev == "cuda":
                torch.cuda.synchronize()
            e["max_rel_err"] = max_rel_err(step(), refs)
            # backbone omits the adapter term: its "error" is the adapter's size, which shows the check can see it
            e["exact_ok"] = None if vname.startswith("backbone") else e["max_rel_err"] <= TOLERANCE[dt]
            items[vname] = step
            if write is not None:
                items[vname + ":write"] = write
        except Exception as exc:  # one failing variant must not lose the run
            e["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{name} {vname} failed: {e['error']}", flush=True)
    measure = timer(dev, a.reps)
    rounds: dict[str, list[float]] = {k: [] for k in items}
    for _ in range(a.rounds):
        for k, fn in list(items.items()):
            try:
                rounds[k].append(measure(fn))
            except Exception as exc:
                items.pop(k)
                vname, is_write = k.split(":")[0], ":" in k
                res["variants"][vname]["write_error" if is_write else "error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"{name} {k} failed to time: {exc}", flush=True)
    ms = {k: statistics.median(v) for k, v in rounds.items() if v}
    base = ms.get("backbone")
    for vname, e in res["variants"].items():
        if vname not in ms:
            continue
        e.update(ms=ms[vname], ms_rounds=rounds[vname])
        if base is not None:
            e.update(overhead_ms=ms[vname] - base, ratio=ms[vname] / base)
        if vname.startswith("backbone"):
            continue
        e["slot_write_ms"] = ms.get(vname + ":write")
        if vname in WRITE_NOTE:
            e["slot_write_note"] = WRITE_NOTE[vname]
        if base is not None and e["slot_write_ms"] is not None:
            e["total_overhead_ms"] = e["slot_write_ms"] + e["overhead_ms"]
    res["slot_write_ms"] = {k.split(":")[0]: v for k, v in ms.items() if k.endswith(":write")}
    steps = {k: e["ms"] for k, e in res["variants"].items() if "ms" in e and not k.startswith("backbone")}
    totals = {k: e["total_overhead_ms"] for k, e in res["variants"].items() if "total_overhead_ms" in e}
    res["fastest_step"] = min(steps, key=steps.get) if steps else None
    res["fastest_total"] = min(totals, key=totals.get) if totals else None
    fs.clear_plan_cache()
    return res


def header(a) -> dict:
    if a.device == "cuda":
        h = run_header()
    else:
        h = {"gpu": None, "torch": torch.__version__, "cuda": None, "triton": None}
    h["shape"] = {"layers": a.layers, "hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "rank": a.rank,
                  "top_k": a.top_k, "dtype": str(a.dtype).removeprefix("torch.")}
    return h


def print_table(results: dict) -> None:
    print(f"\n{'set':4} {'variant':19} {'ms':>8} {'over ms':>8} {'ratio':>6} {'write ms':>8} {'total':>8} "
          f"{'rel err':>8}")
    for name, s in results["sets"].items():
        for vname, e in s["variants"].items():
            if "ms" not in e:
                print(f"{name:4} {vname:19} ERROR {e.get('error', '')[:70]}")
                continue
            w = e.get("slot_write_ms")
            tot = e.get("total_overhead_ms")
            wtxt = "" if w is None else f"{w:.4f}"
            print(f"{name:4} {vname:19} {e['ms']:8.4f} {e.get('overhead_ms', 0):8.4f} {e.get('ratio', 0):6.3f} "
                  f"{wtxt:>8} {'' if tot is None else f'{tot:.4f}':>8} {e['max_rel_err']:8.1e}")
        print(f"{name:4} fastest step: {s['fastest_step']}; fastest step + write: {s['fastest_total']}")
    print("ms: the whole set per token; over: - backbone; total: write + over; rel err: vs fp32 reference")
    print("ext_cols' write: plain write + a copy per linear into its strided b region (see slot_write_note)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--sets", default="qv,all")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--ffn", type=int, default=None, help="default: hidden * 11008 / 4096")
    ap.add_argument("--experts", type=int, default=N_EXPERTS)
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--top-k", type=int, default=TOP_K, choices=(1, 2))
    ap.add_argument("--reps", type=int, default=30, help="graph replays (eager calls on cpu) per timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants; median over them")
    ap.add_argument("--impl", default=None, help="slot write impl; default triton on cuda, reference on cpu")
    # 1 on the CPU: on the shared 2-core development machine 2 threads made the slot write 300x slower
    # whenever another process held a core (64 ms instead of 0.2 ms), as bench.py saw for whole methods.
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads; default 1 on cpu")
    a = ap.parse_args(argv)
    a.ffn = a.ffn or a.hidden * FFN // HIDDEN
    a.dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    a.impl = a.impl or ("triton" if a.device == "cuda" else "reference")
    for s in a.sets.split(","):
        if s not in SETS:
            raise SystemExit(f"--sets: {s!r} is not one of {SETS}")
    old_threads = torch.get_num_threads()
    if a.device == "cpu" or a.threads:
        torch.set_num_threads(a.threads or 1)
    try:
        return run(a)
    finally:
        torch.set_num_threads(old_threads)  # main() is also called in-process by the tests


def run(a) -> dict:
    torch.manual_seed(0)
    t0 = time.time()
    results = {**header(a), "device": a.device, "impl": a.impl, "reps": a.reps, "rounds": a.rounds,
               "factor_std": {"W": W_STD, "A": A_STD, "B": B_STD}, "scaling": SCALING,
               "tolerance": TOLERANCE[a.dtype],
               "timing_note": ("cuda: each variant's whole set in one CUDA graph, median of replay times "
                               "(CUDA events), median over interleaved rounds; cpu: eager perf_counter"),
               "sets": {}}
    for s in a.sets.split(","):
        results["sets"][s] = bench_set(s, a)
        if a.device == "cuda":
            torch.cuda.empty_cache()  # the set's buffers (all: about 50 GB) died with bench_set
        results["wall_s"] = time.time() - t0
        with open(a.out, "w") as f:  # after each set: a timeout keeps what was done
            json.dump(results, f, indent=1)
    print_table(results)
    return results


if __name__ == "__main__":
    with gpu_lock.held_except_compiles():  # alone on the GPU when other benchmarks share it
        main()
