"""`adafuse bench`: the command line over adafuse_compile.bench (add_bench_parser wires it in)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bench import HF_CACHES, HF_STOP_CHECKS, LOOPS, METHODS, PREFILLS, PRESETS, RUN_ORDER, TARGETS, BenchConfig, default_output, run_bench, \
    write_outputs


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="decode latency and memory of LoRA-MoE variants (paper protocol): JSON, Markdown table, plot",
        description="P prompts served one by one, N new tokens each, greedy, batch 1; decode ms/token (prefill "
                    "excluded), prefill ms, peak GPU memory, parameter and FLOP overhead, per method, through "
                    "Hugging Face generate() and/or the package's own decode loop. Random weights, no download.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model shape: llama2-7b / mistral-7b (CUDA, bf16) or tiny (CPU, fp32); default tiny")
    p.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json to use instead of the preset's "
                   "shape (llama, mistral or qwen2; random weights); prompts, tokens, adapters, device and dtype "
                   "still come from --preset (e.g. --preset llama2-7b for a GPU run)")
    p.add_argument("--targets", choices=sorted(TARGETS), default="qv", help="adapted linears: qv or all seven")
    p.add_argument("--loop", choices=(*LOOPS, "both"), default="both",
                   help="hf: Hugging Face generate(); own: the package's decode loop; default both")
    p.add_argument("--prompts", type=int, help="number of prompts (default: the preset's; 50 for the 7B presets)")
    p.add_argument("--new-tokens", type=int, help="new tokens per prompt (default: the preset's; 200 for 7B)")
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(m.name for m in METHODS)}; run in "
                   f"the order given (default: all, in the order {', '.join(RUN_ORDER)}); tables keep paper order")
    p.add_argument("--device", help="override the preset's device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the preset's dtype")
    p.add_argument("--codegen", choices=("inductor", "eager"),
                   help="code generator of every compiled method (default: inductor; the tiny preset: eager)")
    p.add_argument("--prefill", choices=PREFILLS, default="compiled",
                   help="compiled: prompts run through the compiled model too (default); eager: only the decode "
                        "step is compiled (one graph per method instead of three: much shorter compiles)")
    p.add_argument("--hf-cache", choices=HF_CACHES, default="reused",
                   help="generate()'s KV cache: reused (default): one StaticCache per method, reset between prompts, "
                        "so CUDA graphs record the decode step once; per-call: a new cache per generate() call, "
                        "transformers' default, which makes CUDA graphs record the step again for each prompt")
    p.add_argument("--hf-stop-check", choices=HF_STOP_CHECKS, default="deferred",
                   help="generate()'s stop check: deferred (default): read one step late, so the host prepares the "
                        "next step while the GPU runs this one (transformers 5.18+, turned on for CUDA by adafuse; "
                        "same tokens); per-step: transformers' default on CUDA, a host sync after every step")
    p.add_argument("--method-budget-s", type=float, metavar="S",
                   help="a method stops serving prompts once its measured prompts have taken S seconds (at least "
                        "one prompt, after its warm-up); the outputs record prompts served vs asked")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="no method starts after S seconds of the run; the rest are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: 1 on the CPU, for steadier timings; torch's own on a GPU run)")
    p.add_argument("--out", metavar="PATH.json", help="JSON output; the .md table and .png plot go next to it "
                   "(default bench_<preset>_<targets>_<device>.json); JSON and table are rewritten after each "
                   "method, so a killed run keeps what finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=bench_command)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.methods is not None and not any(m.strip() for m in args.methods.split(",")):
        raise ValueError("--methods names no method; leave it out for every method")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    return BenchConfig(preset=args.preset, hf_config=args.hf_config, targets=args.targets, loop=args.loop,
                       prompts=args.prompts, new_tokens=args.new_tokens, methods=methods, device=args.device,
                       dtype=args.dtype, codegen=args.codegen, seed=args.seed, threads=args.threads,
                       progress=not args.no_progress, prefill=args.prefill, method_budget_s=args.method_budget_s,
                       budget_s=args.budget_s, hf_cache=args.hf_cache,
                       hf_stop_check=args.hf_stop_check)


def bench_command(args: argparse.Namespace) -> int:
    """`adafuse bench`: a bad value or an output it cannot write is one line and exit status 2."""
    try:
        return _bench(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"adafuse bench: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else default_output(cfg)
    if out.suffix != ".json":  # the table (.md) and the plot (.png) are written beside it
        raise ValueError(f"--out {out}: give a .json path (the .md table and .png plot take its name)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a .json file path")

    def checkpoint(partial: dict) -> None:
        write_outputs(partial, out, png=False)
        if args.no_progress and partial["results"]:  # a line per method for logs, instead of the bars
            console.print(method_line(partial["results"][-1]), markup=False, highlight=False, soft_wrap=True)

    result = run_bench(cfg, checkpoint=checkpoint)
    paths = write_outputs(result, out)
    console.print(paths["md"].read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {result['wall_s']:.1f} s")
    failed = [f"{e['loop']}:{e['method']}" for e in result["results"] if e["status"] == "failed"]
    if failed:
        console.print(f"[red]failed[/]: {', '.join(failed)} (errors in the JSON)")
    skipped = [f"{e['loop']}:{e['method']}" for e in result["results"] if e["status"] == "skipped"]
    if skipped:
        console.print(f"[yellow]skipped by --budget-s[/]: {', '.join(skipped)}")
    cut = [f"{e['loop']}:{e['method']} {e['prompts_served']}/{e['prompts_asked']}" for e in result["results"]
           if e["truncated_by_budget"]]
    if cut:
        console.print(f"[yellow]stopped early by --method-budget-s (prompts served/asked)[/]: {', '.join(cut)}")
    ok = any(e["method"] == "backbone" and e["status"] == "ok" for e in result["results"])
    return 0 if ok or not any(e["method"] == "backbone" for e in result["results"]) else 1


def method_line(e: dict) -> str:
    """One line on a finished method: status, median ms/token, prompts served, seconds taken."""
    line = f"{e['loop']}:{e['method']} {e['status']}"
    if e["status"] == "ok":
        line += (f" {e['summary']['decode_ms_median']:.3f} ms/token, {e['prompts_served']}/{e['prompts_asked']} prompts"
                 f"{' (budget)' if e['truncated_by_budget'] else ''}")
    elif e["reason"]:
        line += f": {e['reason'].splitlines()[0][:160]}"
    if e["method_s"] is not None:
        done = e["start_s"] + e["method_s"]
        line += f"; {e['method_s']:.0f} s (warm-up {e['warmup_s'] or 0:.0f} s), done at {done:.0f} s into the run"
    return line
