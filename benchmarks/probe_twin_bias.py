"""Probe: does the in-place gather form's speed depend on which experts a switch reads?

Why: on an H100 (session 26) the switch op's timing twin timed the gather form in place at 16.7 ms
on all seven linears, where probe_sgmm_gemm.py's real switch took 11.3 ms, so the op kept the pack
form (15.6 ms). The twin reads 2k distinct experts with gates 1; the probe's real switch, one call
replayed, read k (from its second replay on, the previous experts were the current ones).

Times on the Llama-2-7B shapes, in place, rounds in a fixed order (CUDA events, median): the gather
form (variant 23) and the pack form (variant 1) after previous experts giving 2, 3 or 4 distinct
experts (eager calls), the twin as the op times it (`time_switch`), on its first step only, with
shared factors, the real factors under the twin's experts, and CUDA graphs of two switches that
alternate between two tokens (ms per switch). What it found (probe_twin_bias_h100_s26_b.json): no
steady dependence on the experts: the all-seven gather switch runs at about 17 ms or at about
11.5 ms, and a case changes from one to the other between rounds (e.g. 17.5, 17.2, 17.5, 17.4,
16.2, 11.6, 11.4 ms); the pack form stays at 16.2-16.8 ms; q,v shows no such modes (gather
1.80-1.85, pack 2.03-2.06). --power (probe_twin_power_h100_s26.json): the fast speed (12.1-12.2 ms)
came at a lower median SM clock (1575-1635 MHz) than the slow one (16.4 ms at 1800), so not the
clock. (Session 27, probe_inplace_modes.py, read it the other way round: the slow speed is the top
clock's; back to back the switches hold the GPU at its power cap, at a lower clock, and run fast.) --form-choice (probe_twin_form_choice_h100_s26.json): the op's alternating trials and each twin
timed alone agree.
Usage: python benchmarks/probe_twin_bias.py --sets qv,all7 --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adafuse_compile.cutlass_kernels import cancelling  # noqa: E402
from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan, time_switch  # noqa: E402
from adafuse_compile.runtime.cost_model import cuda_elapsed_s  # noqa: E402
from benchmarks.bench_sgmm import TOP_K, make_inputs, shapes_for  # noqa: E402


def events_ms(fn, reps=5):
    """ms per call of `fn`, `reps` calls back to back after one warm call (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    return cuda_elapsed_s(fn, reps) * 1e3


def power_modes():
    """Is the all-seven in-place gather switch's slow speed a clock (power) limit? Three patterns,
    each about 3 s back to back under nvidia-smi sampling (probe_sgmm_gemm._sampled): one call
    replayed (its previous experts become its current ones: fast in probe_twin_bias_b), two tokens
    alternating ([1, 6] <-> [3, 4]: slow there), and the pack form on the alternating tokens."""
    from benchmarks.probe_sgmm_gemm import _sampled

    dev = "cuda"
    weights, lora_A, lora_B, experts, gates, pe, pg, _ = make_inputs(shapes_for("all7"), False)
    gather = CutlassPlan(weights, lora_A, lora_B, TOP_K, None, variant=23, gather=True)
    pack = CutlassPlan(weights, lora_A, lora_B, TOP_K, None, variant=1)
    other = (torch.tensor([3, 4], device=dev), torch.tensor([0.55, 0.45], device=dev))
    flip = [0]

    def alternate(plan):
        def fn():
            e, g = (experts, gates) if flip[0] == 0 else other
            flip[0] ^= 1
            plan.run(e, g, pe, pg, 0.5)
        return fn

    rows = []
    for name, fn in (("gather_one_call_replayed", lambda: gather.run(experts, gates, pe, pg, 0.5)),
                     ("gather_two_tokens", alternate(gather)), ("pack_two_tokens", alternate(pack)),
                     ("gather_one_call_replayed_again", lambda: gather.run(experts, gates, pe, pg, 0.5))):
        row = dict(case=name, **_sampled(fn, 3.0))
        rows.append(row)
        print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
    return rows


def form_choice(sets, repeats):
    """The switch op's form timing (plan_fastest_form: both twins, alternating trials) against each
    form's twin timed alone right after (time_switch, five calls, median)."""
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    rows = []
    for adapted in sets:
        weights, lora_A, lora_B, experts, gates, pe, pg, pristine = make_inputs(shapes_for(adapted), True)
        for mode in ("inplace", "pristine"):
            pr = None if mode == "inplace" else pristine
            for i in range(repeats):
                cutlass_sgmm._form_chosen.clear()
                cutlass_sgmm._chosen.clear()
                plan = cutlass_sgmm.plan_fastest_form(weights, lora_A, lora_B, TOP_K, pr)
                row = dict(set=adapted, mode=mode, repeat=i, op_form_ms=plan.choice.get("form_ms"),
                           op_form=plan.choice.get("form"))
                del plan
                for form in ("pack", "gather"):
                    twin = CutlassPlan.for_timing(weights, 64, TOP_K, pr, gather=form == "gather")
                    row[f"alone_{form}_ms"] = round(statistics.median(time_switch(twin) for _ in range(5)), 4)
                    del twin
                rows.append(row)
                print(row, flush=True)
        del weights, lora_A, lora_B, pristine
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="qv,all7")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variant", type=int, default=23)
    ap.add_argument("--pack-variant", type=int, default=1)
    ap.add_argument("--form-choice", type=int, default=0,
                    help="only: call plan_fastest_form this many times per set and mode (caches cleared), "
                         "each followed by time_switch of a lone twin of each form, and report their times")
    ap.add_argument("--power", action="store_true",
                    help="only: all seven in place, the gather form's switch under three step patterns, "
                         "each launched back to back for 3 s while nvidia-smi samples clock and power")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, variant=args.variant, sets={})
    dev = "cuda"
    if args.power:
        out["power"] = power_modes()
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        return
    if args.form_choice:
        out["form_choice"] = form_choice(args.sets.split(","), args.form_choice)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        return
    for adapted in args.sets.split(","):
        shapes = shapes_for(adapted)
        weights, lora_A, lora_B, experts, gates, pe, pg, _ = make_inputs(shapes, False)
        real = CutlassPlan(weights, lora_A, lora_B, TOP_K, None, variant=args.variant, gather=True)
        twin = CutlassPlan.for_timing(weights, 64, TOP_K, None, gather=True, variant=args.variant)
        shared = cancelling.factors(weights, TOP_K, 64, True, distinct_bytes=0)
        twin_shared = CutlassPlan(weights, shared[0], shared[1], TOP_K, None, gather=True, variant=args.variant,
                                  _timing_steps=cancelling.steps(TOP_K, True, dev))
        step0 = cancelling.steps(TOP_K, True, dev)[0]
        twin_e = (torch.arange(TOP_K, device=dev), torch.ones(TOP_K, device=dev),
                  torch.arange(TOP_K, 2 * TOP_K, device=dev), torch.ones(TOP_K, device=dev))
        twin_e_prev = twin_e[2].clone()

        def real_twin_experts():  # real factors, the twin's experts and gates: adds a real delta
            twin_e[2].copy_(twin_e_prev)
            real.run(*twin_e, 0.5)

        pack = CutlassPlan(weights, lora_A, lora_B, TOP_K, None, variant=args.pack_variant)

        def with_prev(plan, prev):  # this token [1, 6] (gates .62, .38) after `prev` (gates .55, .45)
            def fn():
                pe.copy_(torch.tensor(prev, device=dev))
                plan.run(experts, gates, pe, pg, 0.5)
            return fn

        cases = {
            "real": lambda: real.run(experts, gates, pe, pg, 0.5),
            "gather_after_3_1 (3 distinct)": with_prev(real, [3, 1]),
            "gather_after_3_4 (4 distinct)": with_prev(real, [3, 4]),
            "gather_after_6_1 (2 distinct)": with_prev(real, [6, 1]),
            "pack_after_3_1 (3 distinct)": with_prev(pack, [3, 1]),
            "pack_after_3_4 (4 distinct)": with_prev(pack, [3, 4]),
            "real_factors_twin_experts_gates1": real_twin_experts,
            "twin_as_timed (time_switch)": None,
            "twin_first_step_only": lambda: twin.run(*step0, 1.0),
            "twin_shared_factors (time_switch)": None,
        }

        def alternating(plan, a, b):  # a CUDA graph of two switches: to a, then to b (each unmerges the other)
            ta = (torch.tensor(a, device=dev), torch.tensor([0.62, 0.38], device=dev))
            tb = (torch.tensor(b, device=dev), torch.tensor([0.55, 0.45], device=dev))
            graph = torch.cuda.CUDAGraph()
            plan.run(*ta, pe, pg, 0.5), plan.run(*tb, pe, pg, 0.5)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                plan.run(*ta, pe, pg, 0.5)
                plan.run(*tb, pe, pg, 0.5)
            return lambda: graph.replay()

        for label, plan in (("gather", real), ("pack", pack)):
            cases[f"graph2_{label} [1,6]<->[3,4] (4 distinct)"] = alternating(plan, [1, 6], [3, 4])
            cases[f"graph2_{label} [0,1]<->[2,3] (4 distinct)"] = alternating(plan, [0, 1], [2, 3])
            cases[f"graph2_{label} [1,6]<->[1,6] (2 distinct)"] = alternating(plan, [1, 6], [1, 6])
        times = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                if name == "twin_as_timed (time_switch)":
                    times[name].append(time_switch(twin, reps=5))
                elif name == "twin_shared_factors (time_switch)":
                    times[name].append(time_switch(twin_shared, reps=5))
                else:
                    times[name].append(events_ms(fn))
        res = {k: dict(median_ms=round(statistics.median(v) / (2 if k.startswith("graph2") else 1), 4),
                       rounds=[round(x, 4) for x in v])
               for k, v in times.items()}
        out["sets"][adapted] = res
        for k, v in res.items():
            print(adapted, f"{k:40s}", v["median_ms"], flush=True)
        del real, pack, twin, twin_shared, shared, weights, lora_A, lora_B
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
