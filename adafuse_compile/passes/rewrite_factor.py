"""rewrite_factor: a one-token decode step keeps W untouched and reads its experts from fixed slots.

    before:  y_l = linear(x_l, W_l) + branch_l(x_l, A_l, B_l, gates)                      (each l)
    after:   adafuse.write_factor_slots(A[*], B[*], experts, gates, s, a_slots[*], b_slots[*])
             y_l = linear(x_l, W_l) + linear(linear(x_l, a_slot_l), b_slot_l)               (each l)

Exact by construction (the backbone weights are never written, so there is nothing to restore),
and the slots are static buffers, so the step replays under CUDA graphs. With path="factor", or
with path="auto" when the cost model estimates it faster than merge (passes/path_policy.py).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..cutlass_kernels import factor_slots
from ..settings import BackendSettings
from .manager import clean_up, note, warn
from .path_policy import decide_path
from .regions import TRAINING_NOTE, add_static_inputs, graph_inputs, regions_of, trains


def slots_for(channel, lora_a: list, lora_b: list, top_k: int) -> tuple[list, list]:
    """The model's slot buffers for these factors (made once; they live as long as its channel)."""
    # dtype, device and shape too: model.to(dtype) keeps the Parameters (same ids) and converts them
    key = tuple((id(a), a.dtype, a.device, tuple(a.shape)) for a in lora_a + lora_b)
    slots = channel.factor_slots
    if slots is None or slots[0] != key:
        slots = (key, *factor_slots.make_slots(lora_a, lora_b, top_k))
        channel.factor_slots = slots
    return slots[1], slots[2]


def rewrite_factor(gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
    if "adafuse_switch" in gm.meta:
        return gm
    if "adafuse_layerwise" in gm.meta:
        if settings.path == "factor":  # the slots are written once per step, from one router's gates
            warn(gm, "path='factor' needs one router for the step (pre-gated), and this model routes in every adapted "
                     "linear (layer-wise): its steps take the gather path instead")
        return gm
    if trains(gm):
        if settings.path == "factor":
            note(gm, f"rewrite_factor: {TRAINING_NOTE}: no factor slots; left to rewrite_gather's dense form")
        return gm
    if settings.path == "auto":
        if decide_path(gm, settings).path != "factor":
            return gm
    elif settings.path != "factor":
        return gm
    regions = regions_of(gm)
    if any(r.tokens != 1 for r in regions):
        note(gm, "rewrite_factor: not a one-token step; left to rewrite_gather")
        return gm
    scalings = {r.factors["scaling"] for r in regions}
    if len(scalings) != 1:
        note(gm, f"rewrite_factor: regions have different scalings {sorted(scalings)}; left to rewrite_gather")
        return gm
    inputs = graph_inputs(gm)
    top_k = regions[0].factors["top_k"]
    lora_a = [inputs[r.factors["lora_A"]] for r in regions]
    lora_b = [inputs[r.factors["lora_B"]] for r in regions]
    a_slots, b_slots = slots_for(regions[0].factors["channel"], lora_a, lora_b, top_k)
    try:  # the kernel plan now: one that cannot be built is a compile-time fallback, not a failed step
        factor_slots.prepare_plan(lora_a, lora_b, top_k, a_slots, b_slots)
    except (RuntimeError, ValueError, OSError) as exc:
        note(gm, f"rewrite_factor: the slot-writing kernel cannot be planned ({type(exc).__name__}: {exc}); "
                 "left to rewrite_gather")
        return gm

    graph = gm.graph
    placeholders = add_static_inputs(gm, [f"adafuse_a_slot_{i}" for i in range(len(regions))]
                                     + [f"adafuse_b_slot_{i}" for i in range(len(regions))])
    a_ph, b_ph = placeholders[:len(regions)], placeholders[len(regions):]
    routing = gm.meta["adafuse_routing"]
    with graph.inserting_after(routing["last"]):
        experts = graph.call_method("reshape", (routing["experts"], -1))
    with graph.inserting_after(experts):
        gates = graph.call_method("reshape", (routing["weights"], -1))
    with graph.inserting_after(gates):
        write = graph.call_function(torch.ops.adafuse.write_factor_slots.default, (
            [r.factors["lora_A"] for r in regions], [r.factors["lora_B"] for r in regions],
            experts, gates, float(scalings.pop()), a_ph, b_ph))
    for r, a_slot, b_slot in zip(regions, a_ph, b_ph):
        with graph.inserting_before(r.add):
            h = graph.call_function(F.linear, (r.x, a_slot))
            delta = graph.call_function(F.linear, (h, b_slot))
            summed = graph.call_function(operator.add, (r.linear, delta))
        r.add.replace_all_uses_with(summed)
        gm.meta["adafuse_replaced"][r.add.name] = summed.name
    gm.meta["adafuse_factor"] = write
    gm.meta["adafuse_extra_inputs"] = a_slots + b_slots
    names = list(inputs)
    a_pos = [names.index(r.factors["lora_A"]) for r in regions]
    b_pos = [names.index(r.factors["lora_B"]) for r in regions]

    def rebind(channel, args):
        """Another instance of the model runs this graph: its own slots, and their slot-writing plan
        built now (not while CUDA-graph trees record the graph for its addresses)."""
        lora_a, lora_b = [args[i] for i in a_pos], [args[i] for i in b_pos]
        a, b = slots_for(channel, lora_a, lora_b, top_k)
        factor_slots.prepare_plan(lora_a, lora_b, top_k, a, b)
        return None, a + b
    gm.meta["adafuse_rebind"] = rebind
    note(gm, f"rewrite_factor: {len(regions)} adapter branches -> 1 slot-writing call + 2 slot products per "
             f"linear; backbone weights untouched")
    return clean_up(gm)
