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
from torch._dynamo.exc import RestartAnalysis

from .passes.detect_adapters import detect_adapters
from .passes.hoist_routing import hoist_routing
from .passes.manager import PassManager
from .passes.prove_pregating import prove_pregating
from .passes.rewrite_factor import rewrite_factor
from .passes.rewrite_gather import rewrite_gather
from .passes.rewrite_switch import rewrite_switch
from .runtime.switch_state import REPLACED_WEIGHTS, ReplacedWeightsError
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


def _codegen(gm: fx.GraphModule, example_inputs: list, settings: BackendSettings, extra: list = ()):
    """Compile `gm`, whose inputs are Dynamo's example inputs followed by our own static buffers."""
    if settings.codegen == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is not None and extra:
        # Our buffers have no Dynamo source: faked with symbolic sizes in a dynamic-shape compile,
        # any guard on those sizes (e.g. a linear reading a merged buffer) could not be expressed.
        # Their shapes are fixed for the life of the compiled graph: fake them static.
        with fake_mode:
            extra = [fake_mode.from_tensor(t, static_shapes=True) for t in extra]
    example_inputs = list(example_inputs) + list(extra)

    patches = {}
    if settings.cudagraphs and any(getattr(t, "is_cuda", False) for t in example_inputs):
        patches["triton.cudagraphs"] = True
    # compile_fx mutates the graph it is given: hand it a copy, keep ours for inspection.
    return compile_fx(copy_graph_module(gm), example_inputs, config_patches=patches)


def _adapter_channels(example_inputs: list) -> list:
    """Gate channels of the models whose adapters or adapted weights this graph reads: expert
    factors first (a model's own), then weights (a backbone shared by two models carries the tag
    of the one injected last)."""
    channels = []
    for role in ("lora_A", "weight"):
        for t in example_inputs:
            tag = getattr(t, "_adafuse_tag", None)
            if tag is not None and tag.role == role and not any(c is tag.channel for c in channels):
                channels.append(tag.channel)
    return channels


def adafuse_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    settings = BackendSettings.from_compile_args(options, mode)  # bad options raise here, clearly
    original = gm
    manager, record = PassManager(PASSES), None
    try:
        work = copy_graph_module(gm)
        placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
        work.meta["adafuse_inputs"] = dict(zip(placeholders, example_inputs))
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
        for message in analysis.get("adafuse_warnings", []):
            warnings.warn(f"adafuse: {message}", stacklevel=2)
        reason = analysis.get("adafuse_stop")
        if reason and not analysis.get("adafuse_stop_expected"):
            warnings.warn(f"adafuse: graph not rewritten: {reason}", stacklevel=2)
        elif reason:
            log.info("adafuse: %s", reason)
        if "adafuse_factor" in analysis:
            extra = analysis["adafuse_extra_inputs"]
            return _guarded(_codegen(work, example_inputs, settings, extra), extra, example_inputs, None,
                            rebind=analysis["adafuse_rebind"])
        if "adafuse_gather_groups" in analysis:
            extra = analysis.get("adafuse_extra_inputs", [])  # the dense prefill's packed factors, if any
            if extra:
                log.info("adafuse: the dense prefill reads packed copies of the expert factors: %.1f MiB of device "
                         "memory, shared by every prefill graph of this model (options={'prefill_packed': False} "
                         "saves it)", analysis["adafuse_dense_pack_bytes"] / 2**20)
            return _guarded(_codegen(work, example_inputs, settings, extra), extra, example_inputs, None,
                            rebind=analysis.get("adafuse_rebind"), prepare=analysis.get("adafuse_prepare"),
                            refresh=analysis.get("adafuse_refresh"))
        if "adafuse_switch" not in analysis:
            return _guarded(_codegen(original, example_inputs, settings), [], example_inputs, None)
        extra = analysis["adafuse_extra_inputs"]
        state = analysis["adafuse_state"]
        if state.exact:
            log.info("adafuse: exact mode switches into separate buffers (the model's weights are never written): "
                     "%.1f MiB of device memory", state.buffer_bytes / 2**20)
        else:
            log.info("adafuse: in-place switching, exact resync from host memory every %d switches",
                     state.resync_every)
        compiled = _codegen(work, example_inputs, settings, extra)
        return _guarded(compiled, extra, example_inputs, state, rebind=analysis["adafuse_rebind"],
                        weights_at=analysis["adafuse_weight_positions"])
    except RestartAnalysis:
        raise  # Dynamo's own signal to trace again (e.g. dynamic=True's scalar analysis), not a failure
    except Exception as exc:  # a compile failure must never break the user's model
        failed = f"compilation failed ({type(exc).__name__}: {exc}); running the original graph unchanged"
        warnings.warn(f"adafuse: {failed}", stacklevel=2)
        # The record says so (`adafuse diff` shows its notes): a pass's exception leaves no record yet,
        # a codegen failure leaves one that describes a rewrite which does not run.
        if record is None:
            record = {"records": manager.records, "notes": [], "regions": [], "hoisted": [], "path_decision": None,
                      "graph": original}
            last_compilations.append(record)
        record.update(rewritten=False, path=None, failed=failed, notes=[*record["notes"], failed])
        # Still guarded: another graph of this model may have merged experts into the weights.
        return _guarded(original.forward, [], example_inputs, None)


class UntaggedInputsError(RuntimeError):
    """A compiled step was given expert factors that carry no AdaFuse tag."""


def _channel_of(t) -> object | None:
    tag = getattr(t, "_adafuse_tag", None)
    return tag.channel if tag is not None else None


def _guarded(compiled, extra: list, example_inputs: list, state, rebind=None, prepare=None, refresh=None,
             weights_at: list[int] = ()):
    """Wrap a compiled graph: merge graphs mark their model merged; others restore it first.

    Dynamo reuses a graph for another instance of the same model class (its parameters are graph
    inputs), but our extra inputs (switch state, merged buffers, factor slots) belong to the model
    the graph was compiled for. So each call finds its model from the expert factors it is given;
    for a model seen for the first time `rebind(channel, args)` makes its (state, extra), and
    `prepare(args)` builds its kernel plans here, before Inductor's CUDA-graph trees record the
    graph for the new addresses (no plan may be built during capture). What a model gets is kept
    on its own channel, keyed by this graph, so it lives and dies with the model. `refresh(channel,
    args)`, if given, runs before every call (the dense prefill re-packs factors that changed).
    """
    # Where the first model's expert factors sit among the inputs: they name the model of a call.
    positions = [i for i, t in enumerate(example_inputs)
                 if getattr(getattr(t, "_adafuse_tag", None), "role", None) == "lora_A"]
    channels = _adapter_channels(example_inputs)
    key = object()  # this graph, in the per-channel dict `adafuse_bound`

    def channel_of_call(args):
        channel = _channel_of(args[positions[0]])
        if channel is None:
            raise UntaggedInputsError(
                "adafuse: a compiled step was given expert factors without their AdaFuse tag (parameters "
                "replaced after inject, e.g. load_state_dict(assign=True)); call torch._dynamo.reset() and "
                "compile the model again")
        return channel

    if state is not None or rebind is not None:
        channels[0].bound_graphs[key] = (state, extra)

        def run_merged(*args):
            channel = channel_of_call(args)
            entry = channel.bound_graphs.get(key)
            if entry is None:
                entry = rebind(channel, args)
                channel.bound_graphs[key] = entry
            step_state, step_extra = entry
            if step_state is not None and weights_at and not step_state.exact and \
                    not step_state.holds([args[weights_at[0]], args[weights_at[-1]]]):
                # in place, the state restores the Parameters it snapshotted, not these (exact mode
                # reads W from the arguments every step: right either way)
                raise ReplacedWeightsError(f"adafuse: {REPLACED_WEIGHTS}, or compile with options={{'exact': True}}")
            if step_state is not None:
                step_state.before_merge_step()  # thread/sharing checks, periodic resync, marks the model merged
            else:  # the factor and gather paths write no weight: only another model's in-place merge to undo
                channel.restore()
            if refresh is not None:
                refresh(channel, args)
            try:
                return compiled(*args, *step_extra)
            except Exception:
                # A step that failed after its switch's first launch (a kernel launch error) may have
                # published experts it never merged, or merged some: restore W (in place) and forget
                # the previous experts, so a caller that retries switches from the pristine weights.
                if step_state is not None:
                    try:
                        step_state.restore()
                    except Exception as also:  # e.g. a lost CUDA context: the caller must know the state
                        warnings.warn(f"adafuse: restoring the weights after the failed step failed too "
                                      f"({type(also).__name__}: {also}); call adafuse_compile.restore(model) "
                                      "before using the model again", stacklevel=2)
                raise
        return run_merged
    if not channels and not extra:
        return compiled
    if positions:
        channels[0].bound_graphs[key] = channels

    def run_unmerged(*args):
        # Per call: whichever model merged into these weights last (this one, or one sharing them).
        to_restore = channels
        if positions:
            channel = channel_of_call(args)
            to_restore = channel.bound_graphs.get(key)
            if to_restore is None:  # another instance of the model: its channels, its plans
                to_restore = _adapter_channels(args)
                if prepare is not None:
                    prepare(args)
                channel.bound_graphs[key] = to_restore
        for channel in to_restore:
            channel.restore()
        return compiled(*args, *extra)
    return run_unmerged
