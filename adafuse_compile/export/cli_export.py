"""`adafuse export onnx|tensorrt`: export a model with AdaFuse adapters for deployment.

    adafuse export onnx --out exported/                       # the embedded demo model
    adafuse export onnx --module my_pkg.models:build --out exported/ --capacity 512
    adafuse export tensorrt --out exported/                   # ONNX export, then TensorRT engines

`--module pkg.mod:function` imports `pkg.mod` and calls `function()`, which returns the model (with
AdaFuse adapters). `tensorrt` needs the `tensorrt` package (an NVIDIA GPU and CUDA); without it the
command says how to install it and exits with status 3, after writing the ONNX export.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

TARGETS = ("onnx", "tensorrt")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to an argparse subparsers object; it runs `run_export(args)`."""
    p = subparsers.add_parser(
        "export", help="export the static per-token decode step to ONNX or TensorRT",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGETS, help="onnx, or tensorrt (ONNX export + engines)")
    p.add_argument("--module", metavar="PKG.MOD:FUNCTION", default=None,
                   help="build the model with FUNCTION() from module PKG.MOD (default: the embedded demo model)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--capacity", type=int, default=None, help="KV-cache length of the exported step (default: the model's maximum)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 17..20 (default 18)")
    p.add_argument("--external-data", action="store_true", default=None,
                   help="store weights in <graph>.onnx.data (default: only above 1.5 GiB, under protobuf's 2 GiB limit)")
    p.add_argument("--fp16", action="store_true", help="tensorrt: allow FP16 kernels")
    p.set_defaults(func=run_export)
    return p


def load_model(spec: str | None) -> torch.nn.Module:
    if spec is None:
        from ..cli import build_demo_model  # imported here: cli.py imports this module

        return build_demo_model()
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"--module expects 'pkg.mod:function', got {spec!r}")
    module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"module {mod_name!r} has no attribute {fn_name!r}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec}() must return a torch.nn.Module, got {type(model).__name__}")
    return model


def run_export(args: argparse.Namespace) -> int:
    from .families import ExportError
    from .onnx import OPSET, to_onnx

    try:
        model = load_model(args.module).eval()
        result = to_onnx(model, args.out, capacity=args.capacity, opset=args.opset or OPSET,
                         external_data=args.external_data)
    except (ImportError, ValueError, OSError) as exc:  # ExportError is a ValueError; OSError: --out not writable
        print(f"adafuse export: {exc}", file=sys.stderr)
        return 2
    total = sum(result.bytes.values())
    print(f"adafuse export: wrote {', '.join(sorted(result.bytes))} to {result.out_dir} "
          f"({total / 1e6:.1f} MB, {result.seconds:.1f} s); {len(result.manifest['switched'])} switched weights "
          f"are step inputs")
    if args.target == "onnx":
        return 0
    from .tensorrt import TensorRTUnavailableError, check_tensorrt_facts, to_tensorrt

    facts = check_tensorrt_facts(args.out)
    if not facts.ok:
        print("adafuse export: not TensorRT-ready:\n  " + "\n  ".join(facts.problems), file=sys.stderr)
        return 2
    try:
        engines = to_tensorrt(args.out, fp16=args.fp16)
    except TensorRTUnavailableError as exc:
        print(f"adafuse export: {exc}", file=sys.stderr)
        return 3
    except ExportError as exc:
        print(f"adafuse export: {exc}", file=sys.stderr)
        return 2
    print(f"adafuse export: TensorRT engines {', '.join(str(p) for p in engines.values())}")
    return 0
