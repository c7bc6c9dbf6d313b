"""to_onnx: export a model with AdaFuse adapters as a routing prologue and a static per-token decode step.

    out_dir/
      prologue.onnx          tokens [1, 1] int64 -> experts [k] int64, gates [k] float32
      step.onnx (+ .data)    tokens, input_pos, past_key.i / past_value.i, switched weights
                             -> logits [1, V], present_key.i / present_value.i
      adapters.safetensors   per switched weight W: "W.lora_A" [N, r, in], "W.lora_B" [N, out, r],
                             "W.pristine" (the backbone W0): what the switch needs between steps
      manifest.json          names, shapes, k, scaling, capacity, opset (read by the runtime)

Per token the deployment runs prologue -> switch (W = W0 + s * sum_j g_j B[e_j] A[e_j], the
project's SGMM kernel) -> step. The step is the plain backbone: the switched weights are graph
inputs, every other weight an initializer (stored as external data above 1.5 GiB, see to_onnx).

Exporter: torch.onnx.export(dynamo=True) (torch.export + onnxscript), opset 18 (inside the
range TensorRT 10 parses, 9..20). The graphs are written by a functional Llama-family step
(`step.py`) over the model's own Parameters; the family differences are a table (`families.py`).
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..modeling.inject import adafuse_config, adapted_linears, is_injected, router_linear
from .families import (
    ExportError, backbone_tensors, canonical_name, describe, family_of, rope_tables, sliding_window,
)
from .step import DecodeStep, RoutingPrologue

OPSET = 18
FORMAT_VERSION = 1
PROLOGUE_FILE, STEP_FILE, ADAPTERS_FILE, MANIFEST_FILE = "prologue.onnx", "step.onnx", "adapters.safetensors", "manifest.json"
_ROUTER_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
PATHS = ("merge",)


@dataclass
class ExportResult:
    out_dir: Path
    prologue: Path
    step: Path
    adapters: Path
    manifest: dict
    seconds: float
    external_data: bool
    bytes: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds: {prologue,step}_{trace,save}, adapters, check


def step_io_names(num_layers: int, switched: list[str]) -> tuple[list[str], list[str]]:
    cache_in = [f"past_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    cache_out = [f"present_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    return ["tokens", "input_pos", *cache_in, *switched], ["logits", *cache_out]


def _check_exportable(model: nn.Module, batch: int, dynamic: bool, path: str) -> None:
    """Refuse, naming the reason, what the exporters cannot write exactly."""
    from ..baselines import MoLALinear  # model side; data flows model -> export

    if path not in PATHS:
        raise ExportError(
            f"path={path!r} cannot be exported: the exported step is the merge path (switched weights as graph "
            f"inputs, batch 1); the gather path needs per-token experts inside the graph (batch > 1, prefill) and "
            f"the factor path is not built yet. Valid: {PATHS}"
        )
    if batch != 1:
        raise ExportError(
            f"batch={batch} cannot be exported: the switched weights hold ONE token's experts, so the exported "
            f"step is batch 1; batch > 1 needs the gather path (per-token experts), which is not exportable"
        )
    if dynamic:
        raise ExportError(
            "dynamic shapes are not supported: the decode step is exported with static shapes (batch 1, one "
            "token, a fixed KV capacity); choose the capacity with `capacity=`"
        )
    layerwise = [n for n, m in model.named_modules()
                 if isinstance(m, MoLALinear) or getattr(m, "routes_alone", False)]  # every_adapted AdaFuseLinear
    if layerwise:
        raise ExportError(
            f"{type(model).__name__} is layer-wise routed (a router in every adapted linear, e.g. {layerwise[0]}): "
            f"its experts depend on each layer's input, so no routing prologue can decide them before the step "
            f"and the weights cannot be switched ahead of it; only pre-gated AdaFuse models are exportable"
        )
    if not is_injected(model) or not adapted_linears(model):
        raise ExportError(
            f"{type(model).__name__} has no AdaFuse adapters: call adafuse_compile.inject(model, AdaFuseConfig(...)) "
            f"first (to export a plain backbone, use torch.onnx.export directly)"
        )
    family_of(model)
    if model.training:
        raise ExportError("the model is in training mode (dropout active): call model.eval() before exporting")


def _router_linear(model: nn.Module):
    try:
        name, first = router_linear(model)
    except (ValueError, StopIteration):
        raise ExportError("the exported decode step merges one router's experts for the step: this model has no "
                          "single router (layer-wise, router_placement='every_adapted', or inconsistent adapters)"
                          ) from None
    canon = canonical_name(model, name)
    if canon not in tuple(f"layers.0.{n}" for n in _ROUTER_INPUTS):
        raise ExportError(
            f"the router sits at {canon}: the exported prologue computes the router input as layer 0's input norm "
            f"of the embedding, which holds only when the first adapted linear is layer 0's q/k/v projection "
            f"(adapt q_proj, k_proj or v_proj)"
        )
    return first


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, opset: int,
            external: bool | None, timings: dict) -> bool:
    """Export and save; returns whether the initializers went to external data (`<file>.data`).

    Adds `<file stem>_trace` (torch.export, translation, onnxscript optimizer: grows with the graph) and
    `<file stem>_save` (serialisation and writing: grows with the weights) seconds to `timings`."""
    t0 = time.perf_counter()
    # The exporter logs one warning per torchvision op it cannot register; irrelevant here, so quiet it.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), optimize=True, verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    t1 = time.perf_counter()
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # a stale file from an earlier export would be misread as ours
    # external=None: torch's rule, external data above 1.5 GiB of initializers (protobuf's hard limit is 2 GiB).
    program.save(str(path), external_data=external)
    # onnxscript's rewrite rules (module globals) keep their last matched node, hence this graph and the
    # initializers over the model's own weights, alive after the export; drop the tensors from the graph
    # so that deleting the model frees its memory (at 7B fp32, 23 GB held through ONNX Runtime's load).
    for value in program.model.graph.initializers.values():
        value.const_value = None
    timings[f"{path.stem}_trace"] = round(t1 - t0, 3)
    timings[f"{path.stem}_save"] = round(time.perf_counter() - t1, 3)
    return data.exists()


def check_exported(path: str | Path) -> None:
    """onnx.checker with full checking (shape inference included) on a saved graph; raises on failure."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def to_onnx(model: nn.Module, out_dir: str | Path, *, capacity: int | None = None, batch: int = 1,
            dynamic: bool = False, path: str = "merge", opset: int = OPSET, external_data: bool | None = None,
            check: bool = True) -> ExportResult:
    """Export `model`'s routing prologue and static decode step to `out_dir` (see the module doc).

    capacity: KV-cache length of the exported step (default: the model's maximum positions).
    external_data: True stores each graph's initializers in `<file>.data`; otherwise that happens only when
      they exceed 1.5 GiB (torch's threshold, under protobuf's 2 GiB limit on one file). The result and the
      manifest record what was written.
    """
    _check_exportable(model, batch, dynamic, path)
    if not 17 <= opset <= 20:
        raise ExportError(f"opset={opset}: choose 17..20 (18 by default; TensorRT 10 parses opsets 9..20)")
    t0 = time.perf_counter()
    from ..runtime.switch_state import restore

    restore(model)  # a compiled model may hold merged weights: export the backbone W0
    spec = describe(model)
    capacity = spec.max_positions if capacity is None else int(capacity)
    if not 1 <= capacity <= spec.max_positions:
        raise ExportError(f"capacity={capacity} must be in 1..{spec.max_positions} (the model's positions)")
    window = sliding_window(model)
    if window is not None and window >= capacity:
        window = None  # the window never bites inside the cache
    config = adafuse_config(model)
    router_lin = _router_linear(model)
    linears = adapted_linears(model)
    switched = [canonical_name(model, n) + ".weight" for n in linears]
    tensors = backbone_tensors(model, spec)
    if any(t.is_meta for t in tensors.values()):
        raise ExportError("the model has meta tensors (not materialised): load its weights before exporting")
    fixed = {n: t for n, t in tensors.items() if n not in switched}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is what makes a directory an export (OnnxDecoder reads it first): removed before
    # anything is written and written last, after the checks, so an export that fails half-way
    # leaves no directory that loads one model's graphs with another's adapters.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    device = tensors["embed_tokens.weight"].device

    # (a) routing prologue
    prologue = RoutingPrologue(
        spec, {"embed_tokens.weight": tensors["embed_tokens.weight"],
               "layers.0.input_layernorm.weight": tensors["layers.0.input_layernorm.weight"]},
        router_lin.router.weight, config.top_k).eval()
    tok = torch.zeros(1, 1, dtype=torch.int64, device=device)
    timings: dict = {}
    prologue_external = _export(prologue, (tok,), out / PROLOGUE_FILE, ["tokens"], ["experts", "gates"], opset,
                                external=external_data, timings=timings)

    # (b) decode step
    step = DecodeStep(spec, fixed, switched, rope_tables(model, capacity), capacity, window).eval()
    cache = [torch.zeros(1, spec.num_kv_heads, capacity, spec.head_dim, dtype=spec.dtype, device=device)
             for _ in range(2 * spec.num_layers)]
    weights = [tensors[n].detach() for n in switched]
    in_names, out_names = step_io_names(spec.num_layers, switched)
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    external = _export(step, (tok, pos, *cache, *weights), out / STEP_FILE, in_names, out_names, opset,
                       external=external_data, timings=timings)

    # What the switch needs at run time: the experts' factors and the pristine backbone weights.
    from safetensors.torch import save_file

    t1 = time.perf_counter()
    blobs = {}
    for name, lin in zip(switched, linears.values()):
        blobs[f"{name}.lora_A"] = lin.lora_A.detach().contiguous().cpu()
        blobs[f"{name}.lora_B"] = lin.lora_B.detach().contiguous().cpu()
        blobs[f"{name}.pristine"] = lin.weight.detach().contiguous().cpu()
    save_file(blobs, str(out / ADAPTERS_FILE))
    del blobs
    timings["adapters_save"] = round(time.perf_counter() - t1, 3)

    spec_d = asdict(spec)
    spec_d["dtype"] = str(spec.dtype).removeprefix("torch.")
    manifest = dict(
        format_version=FORMAT_VERSION, opset=opset, family=spec.family, spec=spec_d, capacity=capacity,
        sliding_window=window, top_k=config.top_k, num_experts=config.num_experts, rank=config.rank,
        scaling=config.scaling, switched=switched, switched_shapes={n: list(tensors[n].shape) for n in switched},
        prologue=dict(file=PROLOGUE_FILE, inputs=["tokens"], outputs=["experts", "gates"],
                      external_data=prologue_external),
        step=dict(file=STEP_FILE, inputs=in_names, outputs=out_names, external_data=external),
        adapters=ADAPTERS_FILE,
    )
    if check:
        t1 = time.perf_counter()
        check_exported(out / PROLOGUE_FILE)
        check_exported(out / STEP_FILE)
        timings["check"] = round(time.perf_counter() - t1, 3)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    return ExportResult(out, out / PROLOGUE_FILE, out / STEP_FILE, out / ADAPTERS_FILE, manifest,
                        time.perf_counter() - t0, external, sizes, timings)


__all__ = ["ExportError", "ExportResult", "OPSET", "check_exported", "step_io_names", "to_onnx"]
