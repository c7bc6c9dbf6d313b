"""`adafuse diff`: compile one decode step with the adafuse backend and show what the passes did.

    adafuse diff                                   # the embedded demo model, text to stdout
    adafuse diff --format html --out diff.html     # the self-contained page
    adafuse diff --module my_pkg.models:build --options '{"exact": false}' --format json

`--module pkg.mod:function` imports `pkg.mod` and calls `function()`, which returns a model (a one-token
step of tokens [[1]] is run, at input_pos [0] where the forward takes input_pos, after
`model.setup_cache(1)` where the model has it; a Hugging Face model gets input_ids alone) or a tuple
`(model, example_args)`.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

import torch

FORMATS = ("text", "json", "html")


def add_diff_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `diff` subcommand to an argparse subparsers object; it runs `run_diff(args)`."""
    p = subparsers.add_parser(
        "diff", help="show what the adafuse passes found and changed in one compiled decode step",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", metavar="PKG.MOD:FUNCTION", default=None,
                   help="build the model with FUNCTION() from module PKG.MOD (default: the embedded demo model)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from the --out suffix .json/.html, else text)")
    p.add_argument("--out", metavar="PATH", default=None, help="write here instead of stdout")
    p.add_argument("--options", metavar="JSON", default=None, type=_json_object,
                   help='torch.compile options for the backend, e.g. \'{"exact": false}\' (codegen defaults to eager)')
    p.set_defaults(func=run_diff)
    return p


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--options must be a JSON object, got {type(value).__name__}")
    from ..settings import AdaFuseOptionsError, BackendSettings

    try:  # checked here, so a bad option is argparse's one line, not a compile failure
        BackendSettings.from_compile_args(value)
    except AdaFuseOptionsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def load_target(spec: str | None) -> tuple[torch.nn.Module, tuple, str]:
    """(model, example_args, name) for `--module`, or the demo model when spec is None."""
    if spec is None:
        from ..cli import build_demo_model  # imported here: cli.py imports this module

        return _decode_step(build_demo_model()) + ("demo",)
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"--module expects 'pkg.mod:function', got {spec!r}")
    module = importlib.import_module(mod_name)
    try:
        fn = getattr(module, fn_name)
    except AttributeError:
        raise ValueError(f"module {mod_name!r} has no attribute {fn_name!r}") from None
    built = fn()
    if isinstance(built, tuple):
        if len(built) != 2 or not isinstance(built[0], torch.nn.Module):
            raise ValueError(f"{spec}() must return a model or (model, example_args); got a tuple of {len(built)}")
        model, args = built
        return model, tuple(args), spec
    if not isinstance(built, torch.nn.Module):
        raise ValueError(f"{spec}() must return a torch.nn.Module or (model, example_args), got {type(built).__name__}")
    return _decode_step(built) + (spec,)


def _decode_step(model: torch.nn.Module) -> tuple[torch.nn.Module, tuple]:
    """A one-token step on the model's device: tokens [[1]], and input_pos [0] for a forward that
    takes it (the project's TinyLlama); a Hugging Face model gets input_ids alone (its second
    positional argument is the attention mask)."""
    if hasattr(model, "setup_cache"):
        model.setup_cache(1)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    tokens = torch.tensor([[1]], device=device)
    try:
        takes_pos = "input_pos" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: the project's convention
        takes_pos = True
    return model, ((tokens, torch.tensor([0], device=device)) if takes_pos else (tokens,))


def run_diff(args: argparse.Namespace) -> int:
    from .diff import capture_step, diff_report, render_json, render_text
    from .html import render_html

    fmt = args.format
    if fmt is None:
        suffix = Path(args.out).suffix.lower() if args.out else ""
        fmt = {".json": "json", ".html": "html", ".htm": "html"}.get(suffix, "text")
    if args.out and (Path(args.out).is_dir() or not Path(args.out).resolve().parent.is_dir()):
        print(f"adafuse diff: --out {args.out}: not a file in an existing directory", file=sys.stderr)
        return 2
    try:
        model, example_args, name = load_target(args.module)
    except (ImportError, ValueError) as exc:
        print(f"adafuse diff: {exc}", file=sys.stderr)
        return 2
    model.eval()
    report = diff_report(capture_step(model, example_args, args.options, name=name))
    text = {"text": render_text, "json": render_json, "html": render_html}[fmt](report)
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"adafuse diff: --out {args.out}: {exc}", file=sys.stderr)
            return 2
        print(f"adafuse diff: wrote {fmt} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
