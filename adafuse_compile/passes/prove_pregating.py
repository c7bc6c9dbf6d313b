"""prove_pregating: merge only if every region's gate comes from ONE router computed before them.

Traces each region's gate back to its top-k. Pre-gated means: one top-k node feeds every region,
it lies outside every adapter branch, and it does not depend on any region's output (so it can
run before all adapted linears). Otherwise the graph stays exact and unmerged, with the reason.

One exception goes on: layer-wise routing (MoLA style) in AdaFuseLinear layers
(router_placement="every_adapted", tagged `routes_alone` on their parameters), where every region
has a router of its own. Nothing can be merged ahead of such a model, but each region's experts
can be gathered where its router computed them: gm.meta["adafuse_layerwise"] lists the routers,
and only rewrite_gather acts on the graph. Decided by the tag, not by counting routers: a block
compiled on its own holds one region and its router, which must not be merged either (the same
graph serves every block, and a merge's state would carry one block's experts into the next).
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from ..settings import BackendSettings
from .manager import note, stop
from .regions import regions_of, to_networkx


def prove_pregating(gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
    regions = regions_of(gm)
    if not regions:
        return stop(gm, "no LoRA-MoE adapters in this graph: compiled as plain Inductor would", expected=True)
    sources = {s for r in regions for s in r.gate_sources}
    own = sum(1 for r in regions if len(r.gate_sources) == 1 and
              sum(s in other.gate_sources for other in regions for s in r.gate_sources) == 1)
    alone = [r.name for r in regions if r.factors.get("routes_alone")]
    if alone:
        if len(alone) == len(regions) and own == len(regions):
            gm.meta["adafuse_layerwise"] = sorted(sources, key=lambda n: n.name)
            note(gm, f"prove_pregating: layer-wise routing (MoLA style): {len(sources)} router(s), one per region; "
                     "nothing can be merged ahead, each region's experts will be gathered after its own router")
            return gm
        return stop(gm, f"layer-wise regions ({alone[0]}, ...: router_placement='every_adapted') are mixed with "
                        f"regions of another routing in this graph ({len(regions)} regions, {len(sources)} routers); "
                        "compiled unchanged (exact, unmerged): compile each model on its own")
    if len(sources) != 1:
        shared_by = {s: sum(s in r.gate_sources for r in regions) for s in sources}
        if own == len(regions):
            unknown = [r.name for r in regions if not r.factors]
            kind = " (layer-wise routing, MoLA style: each region routes on its own input" + (
                f"; the expert factor layout of {unknown[0]} is not known (not an AdaFuseLinear), so the gather "
                "kernels cannot take it either)" if unknown else ")")
        elif all(len(r.gate_sources) == 1 for r in regions) and min(shared_by.values()) > 1:
            kind = (f" (each router gates several regions, {sorted(shared_by.values(), reverse=True)}: like "
                    f"{len(sources)} pre-gated models in one graph, where adafuse rewrites one router's regions per "
                    "graph; compile each model on its own)")
        else:
            kind = ""
        return stop(gm, (
            f"not pre-gated: the {len(regions)} regions' gates come from {len(sources)} different routers{kind}, "
            f"e.g. {regions[0].name} from top-k node '{regions[0].gate_sources[0].name}'; the graph is compiled "
            f"unchanged (exact, unmerged)"
        ))
    (gate,) = sources
    g = to_networkx(gm.graph)
    upstream = nx.ancestors(g, gate)
    late = [r.name for r in regions if r.add in upstream]
    if late:
        return stop(gm, f"not pre-gated: the router reads the output of adapted linear(s) {late}; it cannot be hoisted")
    gm.meta["adafuse_gate"] = gate
    note(gm, f"prove_pregating: all {len(regions)} regions share one gate, top-k node '{gate.name}'")
    return gm
