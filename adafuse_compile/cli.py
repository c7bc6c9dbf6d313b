"""`adafuse` command line: demo (and, as their issues land, diff, bench, export)."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .bench_cli import add_bench_parser
from .config import AdaFuseConfig
from .export.cli_export import add_export_parser
from .inspect.cli_diff import add_diff_parser
from .modeling import TinyLlama, TinyLlamaConfig, adapted_linears, greedy_decode, inject
from .modeling.inject import router_linear

# The embedded default: a small Llama-architecture model, random weights, no download.
DEMO_MODEL = TinyLlamaConfig(
    vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_seq_len=256,
)
DEMO_ADAPTERS = AdaFuseConfig(num_experts=8, rank=16, top_k=2, target_modules=("q_proj", "v_proj"), init_lora_b="normal")


def build_demo_model(seed: int = 0) -> TinyLlama:
    """The demo's model with AdaFuse adapters; random but seeded, so every run is the same."""
    torch.manual_seed(seed)
    model = TinyLlama(DEMO_MODEL).init_weights(std=0.08, seed=seed)  # larger std: less repetitive random text
    inject(model, DEMO_ADAPTERS)
    return model.eval()


def _timed_decode(model, prompt, new_tokens: int, label: str, console: Console):
    model.setup_cache(prompt.shape[0])
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(label, total=new_tokens)
        stamps = []

        def tick(i):
            stamps.append(time.perf_counter())
            bar.update(task, completed=i + 1)

        tokens, logits = greedy_decode(model, prompt, new_tokens, progress=tick)
    # ms/token over decode steps only: the first stamp follows prefill.
    ms = (stamps[-1] - stamps[0]) * 1000 / max(1, len(stamps) - 1)
    return tokens, logits, ms


def demo(args: argparse.Namespace) -> int:
    from . import backend
    from .runtime.switch_state import restore

    capacity = DEMO_MODEL.max_seq_len
    if args.tokens < 2 or args.prompt_len < 1 or args.prompt_len + args.tokens > capacity:
        print(f"adafuse demo: need --tokens >= 2, --prompt-len >= 1 and --prompt-len + --tokens <= {capacity} "
              f"(the demo model's positions), got {args.prompt_len} + {args.tokens}", file=sys.stderr)
        return 2
    console = Console()
    model = build_demo_model(args.seed)
    cfg, acfg = model.config, model.adafuse_config
    backbone = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "router" not in n)
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "router" in n)
    console.print(
        f"[bold]AdaFuse demo[/]: Llama-architecture model, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, {backbone / 1e6:.2f} M backbone parameters"
    )
    n_adapted = len(adapted_linears(model))
    console.print(
        f"Injected pre-gated LoRA-MoE: {acfg.num_experts} experts x rank {acfg.rank}, top-{acfg.top_k}, "
        f"on {', '.join(acfg.target_modules)} ({n_adapted} linears), one router at the first adapted linear; "
        f"{adapter / 1e6:.3f} M adapter parameters (+{100 * adapter / backbone:.1f}%)"
    )
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    router = router_linear(model)[1].router
    router_calls = []
    hook = router.register_forward_hook(lambda *_: router_calls.append(1))
    with torch.no_grad():
        tokens, logits, ms = _timed_decode(model, prompt, args.tokens, "eager decode (adapters)", console)
        routed = len(router_calls)
        hook.remove()
        with _adapters_off(model):
            _, _, ms_backbone = _timed_decode(model, prompt, args.tokens, "eager decode (backbone only)", console)
        rows = [("backbone, eager", ms_backbone), ("pre-gated LoRA-MoE, eager", ms)]
        if not args.eager_only:
            torch._dynamo.reset()
            first = len(backend.last_compilations)
            compiled = torch.compile(model, backend="adafuse", options={"codegen": args.codegen})
            with console.status("compiling with backend='adafuse' (first steps)"):
                _timed_decode(compiled, prompt, 2, "warm-up", Console(quiet=True))
            c_tokens, c_logits, c_ms = _timed_decode(compiled, prompt, args.tokens, "adafuse-compiled decode", console)
            restore(model)  # leave the model's weights as the backbone's
            rows.append((f"adafuse backend ({args.codegen})", c_ms))
    table = Table(title="Decode, batch 1" + (", CPU" if not torch.cuda.is_available() else ""))
    for col in ("model", "ms/token", "x backbone"):
        table.add_column(col)
    for name, value in rows:
        table.add_row(name, f"{value:.2f}", f"{value / ms_backbone:.2f}")
    console.print(table)
    console.print(f"Generated {tokens.shape[1]} tokens: {tokens[0, :16].tolist()} ...")
    console.print(f"Router ran {routed} times for {tokens.shape[1]} steps (once per step, shared by all {n_adapted} adapted linears).")
    if args.eager_only:
        return 0
    same = torch.equal(c_tokens, tokens)
    err = ((c_logits - logits).abs().max() / logits.abs().max()).item()
    console.print(f"Compiled vs eager: tokens {'identical' if same else '[red]DIFFER[/]'}, max relative logit error {err:.1e}")
    for record in backend.last_compilations[first:]:
        kind = {"merge": "one-token decode step: merged, one switching call",
                "gather": "multi-token step: fused per-token gather, unmerged"}.get(record["path"], "not rewritten")
        console.print(f"[bold]graph[/] ({kind}):")
        for line in record["notes"]:
            console.print(f"  - {line}")
    return 0 if same else 1


class _adapters_off:
    """Temporarily run every adapted linear as its bare backbone linear, to time the backbone path."""

    def __init__(self, model):
        self.linears = list(adapted_linears(model).values())

    def __enter__(self):
        self.forwards = []
        for lin in self.linears:
            self.forwards.append(lin.forward)
            lin.forward = lambda x, lin=lin: torch.nn.functional.linear(x, lin.weight, lin.bias)

    def __exit__(self, *exc):
        for lin, fwd in zip(self.linears, self.forwards):
            lin.forward = fwd
            del lin.forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adafuse", description="AdaFuse: pre-gated LoRA-MoE at backbone speed")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="build a small Llama with adapters, decode eagerly and compiled, compare")
    p_demo.add_argument("--tokens", type=int, default=48, help="new tokens to decode (default 48)")
    p_demo.add_argument("--prompt-len", type=int, default=16)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--codegen", choices=("inductor", "eager"), default="inductor",
                        help="code generator after the adafuse passes (default inductor)")
    p_demo.add_argument("--eager-only", action="store_true", help="skip the compiled run")
    p_demo.set_defaults(func=demo)
    add_diff_parser(sub)
    add_export_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
