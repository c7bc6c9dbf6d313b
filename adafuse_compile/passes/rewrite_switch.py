"""rewrite_switch: replace every adapter branch by ONE switching call plus plain backbone linears.

    before:  gates = routing(x1); y_l = linear(x_l, W_l) + branch_l(x_l, A_l, B_l, gates)   (each l)
    after (exact, the default):
             gates = routing(x1); adafuse.sgmm_switch(M[*], A[*], B[*], experts, gates, ..., pristine=W[*])
             y_l = linear(x_l, M_l)                                                         (each l)
    after (in place):
             gates = routing(x1); adafuse.sgmm_switch(W[*], A[*], B[*], experts, gates, prev...)
             y_l = linear(x_l, W_l)                                                         (each l)

Exact mode writes M_l = W_l + delta_t into buffers of its own (runtime/switch_state.py) and
only reads the model's W_l, so the model's weights are never changed.

Only for a decode step of one token: merging one token's experts into W would be wrong for any
other token of the step, so multi-token steps (prefill, batch > 1) are left to rewrite_gather
(or, with path="merge", stay on the eager unmerged adapter path, exact either way). With
path="auto" a one-token step merges only when the cost model estimates merge faster than the
factor path (passes/path_policy.py).
The previous step's experts/gates and the merged buffers enter as extra graph inputs (static
buffers owned by the model's SwitchState), so the unmerge is right under CUDA-graph replay.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..cutlass_kernels import ops  # noqa: F401  (registers torch.ops.adafuse.sgmm_switch)
from ..runtime.switch_state import REPLACED_WEIGHTS, switch_state_for
from ..settings import BackendSettings
from .manager import clean_up, note, stop, warn
from .path_policy import decide_path
from .regions import TRAINING_NOTE, active_dropout, add_static_inputs, graph_inputs, regions_of, trains


def rewrite_switch(gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
    regions = regions_of(gm)
    unknown = [r.name for r in regions if not r.factors]
    if unknown:
        return stop(gm, (
            f"regions {unknown[:3]}{'...' if len(unknown) > 3 else ''} are detected but their expert factor layout "
            f"is not known (hand-written layer, not an AdaFuseLinear); compiled unchanged (exact, unmerged)"
        ))
    dropped = active_dropout(gm)
    if dropped:  # before any path: gather and factor would drop it too
        return stop(gm, f"adapter dropout is active in {dropped[:3]}{'...' if len(dropped) > 3 else ''} (modules in "
                        "training mode): every rewrite would leave it out, so the graph is compiled unchanged "
                        "(exact); call model.eval() for inference")
    if "adafuse_layerwise" in gm.meta:
        if settings.path == "merge":
            return stop(gm, "path='merge' needs one router for the step (pre-gated), and this model routes in every "
                            "adapted linear (layer-wise): nothing can be merged ahead of its linears; compiled "
                            "unchanged (exact, unmerged). Use path='auto' or 'gather' for the gather kernels")
        note(gm, "rewrite_switch: layer-wise routing: no merge; left to rewrite_gather")
        return gm
    if settings.path in ("gather", "factor"):
        note(gm, f"rewrite_switch: path={settings.path!r} asked for: no merge")
        return gm
    if trains(gm):
        if settings.path == "merge":
            return stop(gm, f"{TRAINING_NOTE}; compiled with the exact unmerged adapter path "
                            "(run the model under torch.no_grad() or torch.inference_mode() to merge)")
        note(gm, f"rewrite_switch: {TRAINING_NOTE}: no merge; left to rewrite_gather's dense form")
        return gm
    decision = decide_path(gm, settings) if settings.path == "auto" else None
    multi = [r for r in regions if r.tokens != 1]
    if multi:
        count = multi[0].tokens if multi[0].tokens is not None else "a dynamic number of"
        why = f"this step has {count} tokens (prefill or batch > 1): one token's experts cannot be merged for all"
        if settings.path == "merge":
            return stop(gm, f"{why}; compiled with the exact unmerged adapter path", expected=True)
        note(gm, f"rewrite_switch: {why}; left to rewrite_gather")
        return gm
    if decision is not None and decision.path != "merge":
        note(gm, f"rewrite_switch: the auto policy chose {decision.path}: no merge")
        return gm
    scalings = {r.factors["scaling"] for r in regions}
    if len(scalings) != 1:
        return stop(gm, f"regions have different scalings {sorted(scalings)}; one switching call needs one")
    routing = gm.meta["adafuse_routing"]
    inputs = graph_inputs(gm)
    first = regions[0].factors
    state, mode = switch_state_for(first["channel"], first["top_k"], settings.exact,
                                   settings.pristine_memory_fraction, settings.resync_every)
    weights = [inputs[r.weight] for r in regions]
    if not state.holds(weights):
        return stop(gm, f"{REPLACED_WEIGHTS}; compiled unchanged (exact, unmerged)")
    scaling = float(scalings.pop())
    targets_now, pristine_now = state.switch_operands(weights)
    try:  # the kernel plan now, so that one that cannot be built is a compile-time fallback, not a failed step
        ops.prepare_plan(settings.sgmm_impl, targets_now, [inputs[r.factors["lora_A"]] for r in regions],
                         [inputs[r.factors["lora_B"]] for r in regions], state.prev_experts, state.prev_gates,
                         pristine_now)
    except (RuntimeError, ValueError, OSError) as exc:
        why = f"the switching kernel cannot be planned for these weights ({type(exc).__name__}: {exc})"
        if settings.path == "merge":
            return stop(gm, f"{why}; compiled unchanged (exact, unmerged)")
        # An sgmm_impl the user named and that cannot run here is a warning, as under path="merge";
        # with sgmm_impl="auto" the other paths taking over is the designed outcome.
        (note if settings.sgmm_impl == "auto" else warn)(
            gm, f"rewrite_switch: {why}; left to the other paths (sgmm_impl={settings.sgmm_impl!r} applies to "
                "the merge path only)")
        return gm
    buffers = targets_now if state.exact else []
    extra = [state.prev_experts, state.prev_gates] + buffers

    graph = gm.graph
    # Static buffers owned by the SwitchState: the unmerge reads what the previous replay wrote.
    placeholders = add_static_inputs(gm, ["adafuse_prev_experts", "adafuse_prev_gates"]
                                     + [f"adafuse_merged_{i}" for i in range(len(buffers))])
    with graph.inserting_after(routing["last"]):
        experts = graph.call_method("reshape", (routing["experts"], -1))
    with graph.inserting_after(experts):
        gates = graph.call_method("reshape", (routing["weights"], -1))
    with graph.inserting_after(gates):
        gates32 = graph.call_method("float", (gates,))
    targets = placeholders[2:] if state.exact else [r.weight for r in regions]
    with graph.inserting_after(gates32):
        switch = graph.call_function(torch.ops.adafuse.sgmm_switch.default, (
            targets, [r.factors["lora_A"] for r in regions], [r.factors["lora_B"] for r in regions],
            experts, gates32, placeholders[0], placeholders[1], scaling,
            [r.weight for r in regions] if state.exact else None, settings.sgmm_impl,
        ))
    for r, target in zip(regions, targets):
        r.linear.update_arg(1, target)  # exact: the linear reads the merged buffer, W stays W0
        r.add.replace_all_uses_with(r.linear)
        gm.meta["adafuse_replaced"][r.add.name] = r.linear.name
    gm.meta["adafuse_extra_inputs"] = extra
    gm.meta["adafuse_state"] = state
    names = list(inputs)
    w_pos = [names.index(r.weight) for r in regions]
    a_pos = [names.index(r.factors["lora_A"]) for r in regions]
    b_pos = [names.index(r.factors["lora_B"]) for r in regions]
    top_k, exact, impl = first["top_k"], state.exact, settings.sgmm_impl

    def rebind(channel, args):
        """Another instance of the model runs this graph: its own state and buffers, and its SGMM
        plan built now (not while CUDA-graph trees record the graph for its addresses)."""
        other, why = switch_state_for(channel, top_k, settings.exact, settings.pristine_memory_fraction,
                                      settings.resync_every)
        if other.exact != exact:
            raise RuntimeError(
                f"adafuse: this compiled decode step switches {'exactly' if exact else 'in place'}, but another "
                f"instance of the model running it would switch {why}; compile each with an explicit `exact` "
                "option, or call torch._dynamo.reset() between them")
        targets, pristine = other.switch_operands([args[i] for i in w_pos])
        ops.prepare_plan(impl, targets, [args[i] for i in a_pos], [args[i] for i in b_pos], other.prev_experts,
                         other.prev_gates, pristine)
        return other, [other.prev_experts, other.prev_gates] + (targets if exact else [])
    gm.meta["adafuse_rebind"] = rebind
    gm.meta["adafuse_weight_positions"] = w_pos
    gm.meta["adafuse_switch"] = switch
    formula = "M = W + delta_t" if state.exact else f"W += delta_t - delta_t-1, exact resync every {state.resync_every}"
    note(gm, f"rewrite_switch: {len(regions)} adapter branches -> 1 switching call, {mode} ({formula})")
    return clean_up(gm)
