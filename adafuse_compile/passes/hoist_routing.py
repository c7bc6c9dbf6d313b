"""hoist_routing: move the routing (embedding, first norm, router, top-k, softmax) to the front.

    before:  placeholders, ..., embed, norm, router, topk, softmax, linear_q, ..., linear_v, ...
    after:   placeholders, embed, norm, router, topk, softmax, <everything else in its order>

Only nodes the gate needs move, and only if none of them mutates state, so the move is exact.
A layer-wise routed graph (prove_pregating's "adafuse_layerwise") moves nothing: each router reads
its own linear's input. Its routers' outputs are recorded for rewrite_gather instead.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from ..settings import BackendSettings
from .manager import clean_up, is_mutation, note, stop
from .regions import is_call, regions_of, to_networkx


def routing_outputs(gate: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(gate weights, expert indices) of a top-k node: softmax(topk.values) and topk.indices."""
    values = [u for u in gate.users if u.args[1:] == (0,)]
    indices = [u for u in gate.users if u.args[1:] == (1,)]
    if len(values) != 1 or len(indices) != 1:
        return None
    softmaxes = [u for u in values[0].users if is_call(u, (torch.softmax, torch.nn.functional.softmax))
                 or (u.op == "call_method" and u.target == "softmax")]
    if len(softmaxes) != 1:
        return None
    return softmaxes[0], indices[0]


def _layerwise(gm: fx.GraphModule, gates: list[fx.Node]) -> fx.GraphModule:
    """Record each router's (gate weights, expert indices) where they are, keyed by its top-k node."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    routings = {}
    for gate in gates:
        outputs = routing_outputs(gate)
        if outputs is None:
            return stop(gm, f"layer-wise gate '{gate.name}': the gates are not a softmax over the top-k values: the "
                            "gather kernels cannot reproduce them; compiled unchanged (exact, unmerged)")
        weights, experts = outputs
        routings[gate] = {"weights": weights, "experts": experts, "last": max(weights, experts, key=order.__getitem__)}
    gm.meta["adafuse_layerwise_routing"] = routings
    note(gm, f"hoist_routing: layer-wise routing: {len(routings)} routers stay where they are (each reads its own "
             "linear's input); nothing moved")
    return gm


def hoist_routing(gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
    if "adafuse_layerwise" in gm.meta:
        return _layerwise(gm, gm.meta["adafuse_layerwise"])
    gate = gm.meta["adafuse_gate"]
    outputs = routing_outputs(gate)
    if outputs is None:
        return stop(gm, f"gate '{gate.name}': the gates are not a softmax over the top-k values (e.g. a softmax "
                        "before top-k, renormalised): the switch cannot reproduce them; compiled unchanged (exact, "
                        "unmerged)")
    weights, experts = outputs
    g = to_networkx(gm.graph)
    needed = (nx.ancestors(g, weights) | nx.ancestors(g, experts) | {weights, experts})
    moving = [n for n in gm.graph.nodes if n in needed and n.op != "placeholder"]
    mutating = [n.name for n in moving if is_mutation(n)]
    if mutating:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        ready = max(weights, experts, key=order.__getitem__)
        first_linear = min((r.linear for r in regions_of(gm)), key=order.__getitem__)
        if order[ready] < order[first_linear]:
            # The routing cannot move past those writes, but it already runs before every adapted
            # linear (adapters on o_proj only: the router reads an input after the KV-cache write).
            gm.meta["adafuse_routing"] = {"weights": weights, "experts": experts, "last": ready, "hoisted": []}
            note(gm, f"hoist_routing: the routing depends on in-place writes {mutating} but already runs before "
                     "every adapted linear; nothing moved")
            return gm
        return stop(gm, f"the routing depends on in-place writes {mutating} (e.g. a KV-cache update) and an adapted "
                        f"linear ({first_linear.name}) runs before it; not hoisted, compiled unchanged (exact, unmerged)")
    anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node in moving:
        anchor.append(node)
        anchor = node
    gm.meta["adafuse_routing"] = {"weights": weights, "experts": experts, "last": anchor,
                                  "hoisted": [n.name for n in moving]}
    note(gm, f"hoist_routing: {len(moving)} routing node(s) moved before every adapted linear")
    return clean_up(gm)
