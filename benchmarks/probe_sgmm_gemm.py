"""The CUTLASS SGMM switch on the H200, measured so that a slow drift of the GPU's speed cannot
bias one configuration (issue #4). Llama-2-7B shapes, bf16.

- default: the whole switch (pack + grouped GEMM) on the q,v and all-seven weight sets through
  CutlassPlan: its timed choice of GEMM (`cutlass_default`), each candidate and the old fixed
  defaults by hand, the pack alone, the Triton switch and the simple merge (one addmm per
  weight: the 3x target's base). Every case is a CUDA graph of one call; each round times every
  case (15 replays, median) in a new random order and the copy bandwidth once; the result is the
  median over rounds, against the best round's copy bandwidth.
- --gemm: the grouped GEMM alone (no pack) on the q,v byte volume (64 x 4096 x 4096), epilogue
  variants x the tile scheduler's raster order, interleaved the same way.
- --sweeps: the first probe's sequential sweeps (run 1): the same rows of W as 64, 16, 4 or 1
  groups (each group change costs a CTA a tensormap update), and K = 64 ... 256.

Usage: python benchmarks/probe_sgmm_gemm.py --out results.json [--gemm] [--sweeps] [--variants 1,3,14,17]
       python benchmarks/probe_sgmm_gemm.py --power 14.256.inplace,14.128.pristine  (clock and power,
           random against zero operands)
       python benchmarks/probe_sgmm_gemm.py --ncu-one VARIANT,K,MODE,GROUPS   (eager calls for ncu)
       python benchmarks/probe_sgmm_gemm.py --ncu-switch SET,MODE,VARIANT      (the whole switch, for ncu)
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adafuse_compile.cutlass_kernels import build, cancelling  # noqa: E402
from benchmarks.bench_sgmm import TOP_K, make_inputs, shapes_for, switch_bytes, switch_tokens, time_eager  # noqa: E402

ROWS, COLS = 64 * 4096, 4096  # q,v: 64 weights of 4096 x 4096
DTYPE = torch.bfloat16


class Buffers:
    """One W, one W0 (pristine C) and one L / R pool, carved into groups as views."""

    def __init__(self, k_max: int):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.w = torch.randn(ROWS, COLS, device="cuda", dtype=DTYPE, generator=g)
        self.w0 = self.w.clone()
        self.lhs = torch.randn(ROWS, k_max, device="cuda", dtype=DTYPE, generator=g) * 1e-3
        self.rhs = torch.randn(64, k_max, COLS, device="cuda", dtype=DTYPE, generator=g) * 1e-3
        self._keep = []

    def moved_bytes(self, k: int, groups: int) -> int:
        """Read W (or W0) + write W + L [ROWS, k] + each group's R [k, COLS]."""
        return 2 * self.w.numel() * self.w.element_size() + (ROWS * k + groups * k * COLS) * 2

    def plan(self, ext, variant: int, k: int, mode: str, groups: int, raster=0, swizzle=1):
        m = ROWS // groups
        lhs = self.lhs[:, :k].contiguous() if k != self.lhs.shape[1] else self.lhs
        self._keep.append(lhs)  # plans outlive this call: their L must stay allocated
        mnk, ptrs = [], [[], [], [], []]
        esz = self.w.element_size()
        for i in range(groups):
            d = self.w.data_ptr() + i * m * COLS * esz
            c = d if mode == "inplace" else self.w0.data_ptr() + i * m * COLS * esz
            ptrs[0].append(lhs.data_ptr() + i * m * k * esz)
            ptrs[1].append(self.rhs[i % 64].data_ptr())
            ptrs[2].append(c)
            ptrs[3].append(d)
            mnk.append([m, COLS, k])
        return ext.create_plan(build.DTYPE_CODES["bf16"], variant,
                               torch.tensor(mnk, dtype=torch.int32),
                               torch.tensor(ptrs, dtype=torch.int64), 0, raster, swizzle)


def captured(fn) -> torch.cuda.CUDAGraph:
    """`fn` once eagerly (plans built, kernels loaded), then captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(fn, reps: int = 25) -> float:
    """Median ms of `fn` replayed in a CUDA graph (after one untimed replay)."""
    graph = captured(fn)
    graph.replay()
    return time_eager(graph.replay, reps, warmup=0)


def copy_bandwidth() -> float:
    src = torch.empty(ROWS * COLS, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ms = time_eager(lambda: dst.copy_(src), 10, warmup=0)
    return 2 * src.numel() * src.element_size() / ms / 1e9  # TB/s


def interleaved(cases: dict, rounds: int, reps: int, seed: int = 0) -> dict:
    """Time every case once per round, in a new random order each round, plus the copy
    bandwidth once per round: a slow drift of the GPU's speed (seen in the first probe: the same
    configuration measured 1.24 ms first and 1.44 ms thirty measurements later) then spreads
    over every case instead of biasing the ones measured late."""
    import random

    graphs = {name: captured(fn) for name, fn in cases.items()}
    rng = random.Random(seed)
    per_case = {name: [] for name in cases}
    copy_rounds = []
    for _ in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            graphs[name].replay()
            per_case[name].append(time_eager(graphs[name].replay, reps, warmup=0))
        copy_rounds.append(copy_bandwidth())
    return dict(per_case=per_case, copy_tb_s_rounds=copy_rounds)


def real_switch_cases(adapted: str, variants: dict, gather_default: bool = True) -> tuple[dict, dict]:
    """The whole switch (pack + GEMM) on the Llama-2-7B shapes through CutlassPlan, per mode and
    (variant, raster, swizzle); the pack alone; and the simple merge (the 3x target's base).
    `gather_default`: also the plan's timed choice among the gathering GEMMs (builds them), and
    the switch op's plan (`plan_fastest_form`: the form and GEMM it times and keeps, what a model
    gets), tagged `cutlass_op`."""
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan, plan_fastest_form
    from adafuse_compile.cutlass_kernels.reference import simple_merge_switch_
    from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan

    shapes = shapes_for(adapted)
    weights, lora_A, lora_B, experts, gates, pe, pg, pristine = make_inputs(shapes, True)
    # Every case is two switches, to experts [1, 6] and then to [3, 4] and so on in turn: in place each
    # unmerges the other token's experts, so the GEMM reads 2k distinct experts, as decoding does when
    # consecutive tokens pick different experts. (Until session 26 a case was one call, which left the
    # previous experts equal to the current ones from the second replay on. probe_twin_bias.py found
    # no steady cost of the distinct experts on an H100, but the in-place gather form switching
    # between two speeds, about 11.5 and 17 ms on all seven, whatever the experts.)
    tokens = switch_tokens(experts, gates)

    def two_switches(call):
        return lambda: [call(e, g) for e, g in tokens]

    cases, meta = {}, {}
    for mode in ("pristine", "inplace"):
        pr = pristine if mode == "pristine" else None
        nbytes = switch_bytes(shapes, mode)
        name = f"{adapted}/{mode}/simple_merge"
        cases[name] = two_switches(lambda e, g, p=pr: simple_merge_switch_(weights, lora_A, lora_B, e, g, pe, pg,
                                                                            0.5, pristine=p))
        meta[name] = dict(set=adapted, mode=mode, impl="simple_merge", bytes=nbytes)
        # None: the plan's timed choice, packing (the default) or gathering in the GEMM
        configs = ([(None, 0, 1, False)] + [(None, 0, 1, True)] * gather_default
                   + [c + (False,) for c in variants.get(mode, [])])
        for (variant, raster, swizzle, gather) in configs:
            plan = CutlassPlan(weights, lora_A, lora_B, TOP_K, pr, variant=variant, raster=raster,
                               swizzle=swizzle, gather=gather, timing_probe=True)
            tag = (f"{adapted}/{mode}/cutlass_default" + ("_gather" if gather else "")
                   if variant is None else f"{adapted}/{mode}/cutlass_v{variant}_r{raster}_s{swizzle}")
            cases[tag] = two_switches(lambda e, g, p=plan: p.run(e, g, pe, pg, 0.5))
            meta[tag] = dict(set=adapted, mode=mode, impl="cutlass", variant=plan.variant,
                             raster=plan.raster, swizzle=swizzle, bytes=nbytes, gathers=plan.gathers,
                             choice=plan.choice if variant is None else None)
            cases[tag + "/pack"] = two_switches(lambda e, g, p=plan: p.pack(e, g, pe, pg, 0.5))
            meta[tag + "/pack"] = dict(set=adapted, mode=mode, variant=plan.variant,
                                       impl="slots_only" if plan.gathers else "pack_only")
            if variant is None:
                print(tag, plan.choice, flush=True)
        if gather_default:
            plan = plan_fastest_form(weights, lora_A, lora_B, TOP_K, pr)
            tag = f"{adapted}/{mode}/cutlass_op"
            cases[tag] = two_switches(lambda e, g, p=plan: p.run(e, g, pe, pg, 0.5))
            meta[tag] = dict(set=adapted, mode=mode, impl="cutlass", variant=plan.variant,
                             raster=plan.raster, swizzle=1, bytes=nbytes, gathers=plan.gathers,
                             choice=plan.choice)
            print(tag, plan.choice, flush=True)
        tplan = TritonPlan(weights, lora_A, lora_B, TOP_K, pr)
        tag = f"{adapted}/{mode}/triton_default"
        cases[tag] = two_switches(lambda e, g, p=tplan: p.run(e, g, pe, pg, 0.5))
        meta[tag] = dict(set=adapted, mode=mode, impl="triton", bytes=nbytes)
    return cases, meta


def parse_configs(text: str) -> dict:
    """'pristine:14.1,17.1;inplace:1.0' -> {"pristine": [(14, 1, 1), (17, 1, 1)], "inplace": [(1, 0, 1)]}
    (variant, raster, swizzle 1)."""
    out = {}
    for part in filter(None, text.split(";")):
        mode, items = part.split(":")
        out[mode] = [(int(v), int(r), 1) for v, r in (item.split(".") for item in items.split(","))]
    return out


def sequential_sweeps(ext) -> list[dict]:
    """Run 1's sweeps, one configuration after the other: groups (same bytes) and K."""
    bufs = Buffers(256)
    bw = copy_bandwidth()
    rows = []
    for exp, variant, k, mode, groups in (
            [("groups", v, k, m, g) for g in (64, 16, 4, 1)
             for v, k, m in ((3, 128, "pristine"), (1, 256, "inplace"))]
            + [("k", 3, k, "pristine", 64) for k in (64, 128, 192, 256)]):
        plan = bufs.plan(ext, variant, k, mode, groups)
        ms = time_graph(plan.run)
        moved = bufs.moved_bytes(k, groups)
        rows.append(dict(exp=exp, variant=variant, k=k, mode=mode, groups=groups, ms=round(ms, 4),
                         copy_fraction=round(moved / (ms * 1e-3) / 1e12 / bw, 4)))
        print(rows[-1], flush=True)
    return rows


@functools.lru_cache(maxsize=None)  # asked once per process, not per sampled row
def _smi_fields() -> tuple[str, ...]:
    """nvidia-smi query fields: timestamp, SM clock, instant power (`power.draw` is a 1 s average
    on recent GPUs) and the active clock-event (throttle) reasons, each under the name this
    driver knows."""
    import subprocess

    def known(field):
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv"],
                              capture_output=True).returncode == 0

    power = "power.draw.instant" if known("power.draw.instant") else "power.draw"
    reasons = "clocks_event_reasons.active" if known("clocks_event_reasons.active") else "clocks_throttle_reasons.active"
    return ("timestamp", "clocks.sm", power, reasons)


def _sampled(fn, seconds: float = 3.0, settle_s: float = 0.5, interval_ms: int = 20) -> dict:
    """`fn` launched back to back (no sync between) for about `seconds`, timed with CUDA events,
    while nvidia-smi samples the SM clock, the instant power and the clock-event reasons; only the
    samples taken under load after its first `settle_s` count (nvidia-smi timestamps them)."""
    import datetime
    import os
    import subprocess
    import tempfile

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    end.synchronize()
    launches = max(20, int(seconds * 1e3 / (start.elapsed_time(end) / 20)))
    fields = _smi_fields()
    gpu = [] if os.environ.get("CUDA_VISIBLE_DEVICES") else ["-i", str(torch.cuda.current_device())]
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as log:
        smi = subprocess.Popen(["nvidia-smi", *gpu, f"--query-gpu={','.join(fields)}",
                                "--format=csv,noheader,nounits", f"-lms={interval_ms}", "-f", log.name])
        time.sleep(0.3)  # nvidia-smi's first samples, before the load
        t_load = datetime.datetime.now()
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        t_done = datetime.datetime.now()
        smi.terminate()
        smi.wait()
        lines = log.read().splitlines()
    samples = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
            clock, power = float(parts[1]), float(parts[2])
        except ValueError:  # "[N/A]" or a partial line
            continue
        if t_load + datetime.timedelta(seconds=settle_s) <= ts <= t_done:
            samples.append((clock, power, parts[3]))
    return dict(ms_per_launch=round(start.elapsed_time(end) / launches, 4), launches=launches,
                load_s=round((t_done - t_load).total_seconds(), 3),
                sm_mhz_median=statistics.median(c for c, _, _ in samples) if samples else None,
                sm_mhz_min=min((c for c, _, _ in samples), default=None),
                power_w_median=statistics.median(w for _, w, _ in samples) if samples else None,
                power_w_max=max((w for _, w, _ in samples), default=None),
                clock_event_reasons=sorted({t for _, _, t in samples}), samples=len(samples),
                smi_fields=list(fields))


def cancelling_operands(lhs: torch.Tensor, rhs: torch.Tensor, k: int, seed: int = 0) -> None:
    """Fill L[:, :k] = [X, X] and R[:, :k] = [Y; -Y] in place with `cancelling.exact_values`
    (random signs, |x| in [1, 2) on a 2^-b grid small enough that every partial sum of k products
    is exact in fp32, in any order), so L R = 0 exactly: the GEMM runs on operands whose bits
    toggle like real ones and still adds exactly 0 to W."""
    if k % 2 or k > lhs.shape[1] or k > rhs.shape[1]:
        raise ValueError(f"cancelling_operands: k = {k} must be even and fit the buffers ({lhs.shape[1]})")
    g = torch.Generator().manual_seed(seed)
    bits, half = cancelling.mantissa_bits(k), k // 2
    x = cancelling.exact_values((lhs.shape[0], half), bits, lhs.dtype, lhs.device, g)
    y = cancelling.exact_values((rhs.shape[0], half, rhs.shape[2]), bits, rhs.dtype, rhs.device, g)
    lhs[:, :half], lhs[:, half:k] = x, x
    rhs[:, :half], rhs[:, half:k] = y, -y


def power_probe(ext, configs: list[tuple[int, int, str]], seconds: float) -> list[dict]:
    """Whether the GEMM's speed depends on its operands' values: each (variant, K, mode) on the
    q,v byte volume with cancelling L / R (random bits, L R = 0 exactly: `cancelling_operands`),
    random L / R, L = R = 0 (same bytes moved, W + 0), and random again, each launched back to
    back while nvidia-smi samples the clock and power. (The plan's timed choice runs on a
    zeroed workspace: its all-seven in-place GEMM measured 7.9 ms there and about 9.8 ms inside
    the real switch, probe run 11.)"""
    # The copy first, under the same sampling: its bandwidth is what copy_fraction compares with
    # (a constant here once gave an H100 run the H200's 4.23 TB/s, s21's raw JSON).
    copy_src = torch.empty(ROWS * COLS, dtype=DTYPE, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_src.normal_()  # random bits, like the GEMM's W
    row = dict(variant=None, k=0, mode="copy", data="random", **_sampled(lambda: copy_dst.copy_(copy_src), seconds))
    copy_tb_s = 2 * copy_src.numel() * copy_src.element_size() / (row["ms_per_launch"] * 1e-3) / 1e12
    row["copy_tb_s"] = round(copy_tb_s, 3)
    rows = [row]
    print(row, flush=True)
    del copy_src, copy_dst
    bufs = Buffers(256)
    keep = (bufs.lhs.clone(), bufs.rhs.clone())
    for variant, k, mode in configs:
        plan = bufs.plan(ext, variant, k, mode, 64, raster=1)
        for data in ("cancel", "random", "zero", "random"):
            if data == "zero":
                bufs.lhs.zero_(), bufs.rhs.zero_()
            elif data == "cancel":
                cancelling_operands(bufs.lhs, bufs.rhs, k)
                bufs.w.copy_(bufs.w0)
            else:
                bufs.lhs.copy_(keep[0]), bufs.rhs.copy_(keep[1])
            for lhs in bufs._keep:  # the plans' own contiguous L copies (K < 256)
                if lhs.data_ptr() != bufs.lhs.data_ptr():
                    lhs.copy_(bufs.lhs[:, :lhs.shape[1]])
            row = dict(variant=variant, k=k, mode=mode, data=data, **_sampled(plan.run, seconds))
            if data == "cancel":  # W + 0 (in place) or W0 + 0 (pristine): W must equal W0 bit for bit
                row["w_unchanged"] = bool(torch.equal(bufs.w, bufs.w0))
            row["copy_fraction"] = round(bufs.moved_bytes(k, 64) / (row["ms_per_launch"] * 1e-3) / 1e12
                                         / copy_tb_s, 4)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_sgmm_gemm.json")
    ap.add_argument("--variants", default="1,3,14,17,23,24,25,30,31,32")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sets", default="qv,all7", help="real-shape switch sets; '' for none")
    ap.add_argument("--gemm", action="store_true", help="also the GEMM-alone experiments")
    ap.add_argument("--gemm-configs", default="pristine:3.0,3.1,14.0,14.1,16.1,17.1,30.1,31.1,32.1;"
                    "inplace:1.0,1.1,14.1,16.1,17.1,18.1,8.1,2.1,30.1,31.1,32.1",
                    help="mode:variant.raster,...;mode:... for --gemm")
    ap.add_argument("--switch-configs",
                    default="pristine:14.1,17.1,23.1,24.1,30.1,31.1,32.1;inplace:14.1,1.1,23.1,25.1,30.1,31.1,32.1",
                    help="the whole switch's hand-picked GEMMs besides the plan's own choices "
                         "(gathering and packing); 23-25 gather (23 = 14, 24 = 17, 25 = 1); 30-32 "
                         "pingpong with a whole 128x128 tile per warp group (not yet measured)")
    ap.add_argument("--sweeps", action="store_true", help="also run 1's groups and K sweeps")
    ap.add_argument("--power", default=None,
                    help="VARIANT.K.MODE,...: each GEMM alone with random then zero operands, "
                         "launched back to back while nvidia-smi samples clock and power")
    ap.add_argument("--power-seconds", type=float, default=3.0, help="load time per --power row")
    ap.add_argument("--ncu-one", default=None)
    ap.add_argument("--ncu-switch", default=None,
                    help="SET,MODE,VARIANT: three calls of CutlassPlan's whole switch on the real shapes "
                         "(a gather variant gathers, others pack), for ncu; e.g. qv,pristine,23")
    args = ap.parse_args()
    variants = [int(v) for v in args.variants.split(",")]
    t0 = time.time()
    ext = build.load_extension(tuple(variants))
    build_s = time.time() - t0

    if args.ncu_one:
        bufs = Buffers(256)
        v, k, mode, groups = args.ncu_one.split(",")
        plan = bufs.plan(ext, int(v), int(k), mode, int(groups))
        for _ in range(3):
            plan.run()
        torch.cuda.synchronize()
        return

    if args.ncu_switch:
        from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan

        sname, mode, v = args.ncu_switch.split(",")
        weights, lora_A, lora_B, experts, gates, pe, pg, pristine = make_inputs(shapes_for(sname), True)
        plan = CutlassPlan(weights, lora_A, lora_B, TOP_K, pristine if mode == "pristine" else None,
                           variant=int(v), raster=1)
        for _ in range(3):
            plan.run(experts, gates, pe, pg, 0.5)
        torch.cuda.synchronize()
        return

    if args.power:
        cfgs = [(int(v), int(k), m) for v, k, m in (c.split(".") for c in args.power.split(","))]
        rows = power_probe(ext, cfgs, args.power_seconds)
        Path(args.out).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, power=rows,
            setup="q,v byte volume (64 x 4096 x 4096), bf16, 64 groups, raster along N; each row "
                  f"about {args.power_seconds} s of launches back to back after 40 untimed; nvidia-smi "
                  "every 20 ms, the samples from 0.5 s into the load to its end; copy_fraction "
                  "against the copy row's bandwidth (first row, same sampling)"),
            indent=1))
        return

    # GEMM alone, q,v byte volume, 64 groups: epilogue variants x raster order (--gemm).
    gemm_cfgs = parse_configs(args.gemm_configs) if args.gemm else {}
    cases, meta, plans = {}, {}, []
    bufs = Buffers(256) if args.gemm else None
    for mode, cfgs in gemm_cfgs.items():
        k = 128 if mode == "pristine" else 256
        for (v, raster, swizzle) in cfgs:
            if v not in variants or (mode == "pristine" and v in build.REDUCE_VARIANTS):
                continue  # not built, or a reduce-add variant (in place only)
            plan = bufs.plan(ext, v, k, mode, 64, raster, swizzle)
            plans.append(plan)
            tag = f"gemm/{mode}/v{v}_r{raster}_s{swizzle}"
            cases[tag] = plan.run
            meta[tag] = dict(set="qv_bytes", mode=mode, impl="gemm_only", variant=v, raster=raster,
                             swizzle=swizzle, bytes=bufs.moved_bytes(k, 64))
    sweeps = sequential_sweeps(ext) if args.sweeps else None
    result = interleaved(cases, args.rounds, 15) if cases else dict(per_case={}, copy_tb_s_rounds=[])
    del bufs, plans
    torch.cuda.empty_cache()
    report = {}
    real = {m: [c for c in cs if c[0] in variants and not (m == "pristine" and c[0] in build.REDUCE_VARIANTS)]
            for m, cs in parse_configs(args.switch_configs).items()}
    for sname in [x for x in args.sets.split(",") if x]:
        rcases, rmeta = real_switch_cases(sname, real, any(v in build.GATHER_VARIANTS for v in variants))
        report[sname] = interleaved(rcases, args.rounds, 15, seed=1)
        for name in rcases:  # a case is two switches (real_switch_cases): ms per switch
            report[sname]["per_case"][name] = [ms / 2 for ms in report[sname]["per_case"][name]]
        meta.update(rmeta)
        del rcases
        torch.cuda.empty_cache()

    rows = []
    copy_all = result["copy_tb_s_rounds"] + sum((r["copy_tb_s_rounds"] for r in report.values()), [])
    copy_best = max(copy_all)
    for res in [result, *report.values()]:
        for name, ms_rounds in res["per_case"].items():
            m = meta[name]
            ms = statistics.median(ms_rounds)
            row = dict(name=name, **m, ms_median_of_rounds=round(ms, 4),
                       ms_rounds=[round(x, 4) for x in ms_rounds])
            if "bytes" in m:
                row["copy_fraction"] = round(m["bytes"] / (ms * 1e-3) / 1e12 / copy_best, 4)
            rows.append(row)
    simple = {(r["set"], r["mode"]): r["ms_median_of_rounds"] for r in rows if r["impl"] == "simple_merge"}
    for r in rows:
        if r["impl"] == "cutlass" and (r["set"], r["mode"]) in simple:
            r["speedup_vs_simple_merge"] = round(simple[(r["set"], r["mode"])] / r["ms_median_of_rounds"], 3)
    for r in rows:
        print(f"{r['name']:42s} {r['ms_median_of_rounds']:7.3f} ms  "
              f"{100 * r.get('copy_fraction', 0):5.1f}%  x{r.get('speedup_vs_simple_merge', 0):.2f}  "
              f"rounds {r['ms_rounds']}", flush=True)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               copy_tb_s=round(copy_best, 3), copy_tb_s_rounds=[round(x, 3) for x in copy_all],
               build_s=round(build_s, 1), rounds=args.rounds, rows=rows, sweeps=sweeps,
               setup="bf16; each case a CUDA graph of one call, 15 replays per round (median), "
                     f"{args.rounds} rounds in a new random order each, median over rounds; copy "
                     "bandwidth: eager copy_ of 2 GiB once per round, the best round is the base")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("copy TB/s per round", out["copy_tb_s_rounds"], "wrote", args.out)


if __name__ == "__main__":
    main()
