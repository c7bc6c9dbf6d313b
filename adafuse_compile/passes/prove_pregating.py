"""prove_pregating: merge only if every region's gate comes from ONE router computed before them.

Traces each region's gate back to its top-k. Pre-gated means: one top-k node feeds every region,
it lies outside every adapter branch, and it does not depend on any region's output (so it can
run before all adapted linears). Otherwise the graph stays exact and unmerged, with the reason.
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
    if len(sources) != 1:
        own = sum(1 for r in regions if len(r.gate_sources) == 1 and
                  sum(s in other.gate_sources for other in regions for s in r.gate_sources) == 1)
        shared_by = {s: sum(s in r.gate_sources for r in regions) for s in sources}
        if own == len(regions):
            kind = " (layer-wise routing, MoLA style: each region routes on its own input)"
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
