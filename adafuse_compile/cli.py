"""`adafuse` command line: demo (and, as their issues land, diff, bench, export)."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import AdaFuseConfig
from .modeling import TinyLlama, TinyLlamaConfig, adapted_linears, greedy_decode, inject

# The embedded default: a small Llama-architecture model, random weights, no download.
DEMO_MODEL = TinyLlamaConfig(
    vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_seq_len=256,
)
DEMO_ADAPTERS = AdaFuseConfig(num_experts=8, rank=16, top_k=2, target_modules=("q_proj", "v_proj"), init_lora_b="normal")


def build_demo_model(seed: int = 0) -> TinyLlama:
    """The demo's model with AdaFuse adapters; random but seeded, so every run is the same."""
    torch.manual_seed(seed)
    model = TinyLlama(DEMO_MODEL).init_weights(seed=seed)
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

        tokens, _ = greedy_decode(model, prompt, new_tokens, progress=tick)
    # ms/token over decode steps only: the first stamp follows prefill.
    ms = (stamps[-1] - stamps[0]) * 1000 / max(1, len(stamps) - 1)
    return tokens, ms


def demo(args: argparse.Namespace) -> int:
    console = Console()
    torch.set_num_threads(max(1, torch.get_num_threads()))
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
    router = next(iter(adapted_linears(model).values())).router
    router_calls = []
    hook = router.register_forward_hook(lambda *_: router_calls.append(1))
    with torch.no_grad():
        tokens, ms = _timed_decode(model, prompt, args.tokens, "eager decode (adapters)", console)
        routed = len(router_calls)
        hook.remove()
        with _adapters_off(model):
            _, ms_backbone = _timed_decode(model, prompt, args.tokens, "eager decode (backbone only)", console)
    table = Table(title="Eager decode, batch 1, CPU" if not torch.cuda.is_available() else "Eager decode, batch 1")
    for col in ("model", "ms/token", "x backbone"):
        table.add_column(col)
    table.add_row("backbone", f"{ms_backbone:.2f}", "1.00")
    table.add_row("pre-gated LoRA-MoE (eager)", f"{ms:.2f}", f"{ms / ms_backbone:.2f}")
    console.print(table)
    console.print(f"Generated {tokens.shape[1]} tokens: {tokens[0, :16].tolist()} ...")
    console.print(f"Router ran {routed} times for {tokens.shape[1]} steps (once per step, shared by all {n_adapted} adapted linears).")
    console.print("[dim]The compiled path (torch.compile backend='adafuse') arrives with the compiler issue.[/]")
    return 0


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
    p_demo = sub.add_parser("demo", help="build a small Llama with adapters, decode, report speed")
    p_demo.add_argument("--tokens", type=int, default=48, help="new tokens to decode (default 48)")
    p_demo.add_argument("--prompt-len", type=int, default=16)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
