"""The `adafuse` torch.compile backend: settings -> passes -> Inductor (or eager).

Found by name through the `torch_dynamo_backends` entry point (pyproject.toml), so
`torch.compile(model, backend="adafuse")` needs no import; `adafuse_backend` can also be passed
directly. Nothing registers at import time, so the name is never registered twice.
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.fx as fx

from .passes.detect_adapters import detect_adapters
from .passes.hoist_routing import hoist_routing
from .passes.manager import PassManager
from .passes.prove_pregating import prove_pregating
from .passes.rewrite_factor import rewrite_factor
from .passes.rewrite_gather import rewrite_gather
from .passes.rewrite_switch import rewrite_switch
from .settings import BackendSettings

log = logging.getLogger("adafuse_compile")

# The pass order, in one place.
PASSES = [
    ("detect_adapters", detect_adapters),
    ("prove_pregating", prove_pregating),
    ("hoist_routing", hoist_routing),
    ("rewrite_switch", rewrite_switch),  # one-token decode steps, path="merge" or auto's choice: merge
    ("rewrite_factor", rewrite_factor),  # one-token decode steps, path="factor" or auto's choice: slots
    ("rewrite_gather", rewrite_gather),  # everything else: fused per-token gather, unmerged
]

# Every compiled graph's pass records, newest last: `adafuse diff` and the tests read them.
last_compilations: list[dict] = []


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy that keeps what Dynamo attached for AOTAutograd.

    `copy.deepcopy` drops the GraphModule's `_param_name_to_source` and each placeholder's
    `_dynamo_source`; without them AOTAutograd sees no static inputs, and Inductor's CUDA graphs
    then refuse a graph that mutates inputs (KV cache, switched weights). Measured on the H200:
    decode fell back to no CUDA graphs before this copy kept them.
    """
    new = copy.deepcopy(gm)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    old_ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new_ph = [n for n in new.graph.nodes if n.op == "placeholder"]
    for old, node in zip(old_ph, new_ph):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new


def _codegen(gm: fx.GraphModule, example_inputs: list, settings: BackendSettings):
    if settings.codegen == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if settings.cudagraphs and any(getattr(t, "is_cuda", False) for t in example_inputs):
        patches["triton.cudagraphs"] = True
    # compile_fx mutates the graph it is given: hand it a copy, keep ours for inspection.
    return compile_fx(copy_graph_module(gm), example_inputs, config_patches=patches)


def _adapter_channels(example_inputs: list) -> list:
    """Gate channels of the models whose adapted weights this graph reads."""
    channels = []
    for t in example_inputs:
        tag = getattr(t, "_adafuse_tag", None)
        if tag is not None and tag.role == "weight" and not any(c is tag.channel for c in channels):
            channels.append(tag.channel)
    return channels


def adafuse_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    settings = BackendSettings.from_compile_args(options, mode)  # bad options raise here, clearly
    original = gm
    try:
        work = copy_graph_module(gm)
        placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
        work.meta["adafuse_inputs"] = dict(zip(placeholders, example_inputs))
        manager = PassManager(PASSES)
        work = manager(work, settings)
        # The passes' analysis (nodes, real tensors) stays out of the graph handed to codegen.
        analysis = {k: work.meta.pop(k) for k in list(work.meta) if k.startswith("adafuse")}
        record = {"records": manager.records, "notes": analysis.get("adafuse_notes", []),
                  "regions": [r.describe() for r in analysis.get("adafuse_regions", [])],
                  "hoisted": analysis.get("adafuse_routing", {}).get("hoisted", []),
                  "rewritten": "adafuse_switch" in analysis,  # one switching call, no adapter branch
                  "path": ("merge" if "adafuse_switch" in analysis else "factor" if "adafuse_factor" in analysis
                           else "gather" if "adafuse_gather_groups" in analysis else None),
                  # path="auto": the chosen path, the cost model's estimates and their costs' source
                  "path_decision": (analysis["adafuse_path_decision"].describe()
                                    if "adafuse_path_decision" in analysis else None),
                  "graph": work}
        last_compilations.append(record)
        reason = analysis.get("adafuse_stop")
        if reason and not analysis.get("adafuse_stop_expected"):
            warnings.warn(f"adafuse: graph not rewritten: {reason}", stacklevel=2)
        elif reason:
            log.info("adafuse: %s", reason)
        if "adafuse_factor" in analysis:
            extra = analysis["adafuse_extra_inputs"]
            return _guarded(_codegen(work, list(example_inputs) + extra, settings), extra, example_inputs, None)
        if "adafuse_gather_groups" in analysis:
            return _guarded(_codegen(work, example_inputs, settings), [], example_inputs, None)
        if "adafuse_switch" not in analysis:
            return _guarded(_codegen(original, example_inputs, settings), [], example_inputs, None)
        extra = analysis["adafuse_extra_inputs"]
        state = analysis["adafuse_state"]
        if state.exact:
            log.info("adafuse: exact mode keeps a pristine copy of the adapted weights: %.1f MiB of device memory",
                     state.pristine_bytes / 2**20)
        else:
            log.info("adafuse: in-place switching, exact resync from host memory every %d switches",
                     state.resync_every)
        compiled = _codegen(work, list(example_inputs) + extra, settings)
        return _guarded(compiled, extra, example_inputs, state)
    except Exception as exc:  # a compile failure must never break the user's model
        warnings.warn(f"adafuse: compilation failed ({type(exc).__name__}: {exc}); running the original graph "
                      f"unchanged", stacklevel=2)
        # Still guarded: another graph of this model may have merged experts into the weights.
        return _guarded(original.forward, [], example_inputs, None)


def _guarded(compiled, extra: list, example_inputs: list, state):
    """Wrap a compiled graph: merge graphs mark their model merged; others restore it first."""
    if state is not None:
        def run_merged(*args):
            state.before_merge_step()  # thread/sharing checks, periodic resync, marks the model merged
            return compiled(*args, *extra)
        return run_merged
    channels = _adapter_channels(example_inputs)
    if not channels and not extra:
        return compiled

    def run_unmerged(*args):
        # Per call: whichever model merged into these weights last (this one, or one sharing them).
        for channel in channels:
            channel.restore()
        return compiled(*args, *extra)
    return run_unmerged
