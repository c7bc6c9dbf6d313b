"""`adafuse bench`: the command line over adafuse_compile.bench (add_bench_parser wires it in)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .bench import LOOPS, METHODS, PRESETS, TARGETS, BenchConfig, default_output, run_bench, write_outputs


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
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(m.name for m in METHODS)}")
    p.add_argument("--device", help="override the preset's device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the preset's dtype")
    p.add_argument("--codegen", choices=("inductor", "eager"),
                   help="code generator of every compiled method (default: inductor; the tiny preset: eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's); 1 gives steadier CPU timings")
    p.add_argument("--out", metavar="PATH.json", help="JSON output; the .md table and .png plot go next to it "
                   "(default bench_<preset>_<targets>_<device>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=bench_command)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    return BenchConfig(preset=args.preset, hf_config=args.hf_config, targets=args.targets, loop=args.loop,
                       prompts=args.prompts, new_tokens=args.new_tokens, methods=methods, device=args.device,
                       dtype=args.dtype, codegen=args.codegen, seed=args.seed, threads=args.threads,
                       progress=not args.no_progress)


def bench_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    cfg = config_from_args(args)
    result = run_bench(cfg)
    paths = write_outputs(result, Path(args.out) if args.out else default_output(cfg))
    console.print(paths["md"].read_text(), markup=False, highlight=False)
    console.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {result['wall_s']:.1f} s")
    failed = [f"{e['loop']}:{e['method']}" for e in result["results"] if e["status"] == "failed"]
    if failed:
        console.print(f"[red]failed[/]: {', '.join(failed)} (errors in the JSON)")
    ok = any(e["method"] == "backbone" and e["status"] == "ok" for e in result["results"])
    return 0 if ok or not any(e["method"] == "backbone" for e in result["results"]) else 1
