"""detect_adapters: find every LoRA-MoE region structurally, however its branch is written.

A region is `add(linear(x, W, b), delta)` where the branch computing `delta` (the nodes between
x and the add) reads x, parameters other than W, and a gate derived from a top-k. This matches
the project's AdaFuseLinear, hand-written einsum/bmm layers over gathered top-k experts, and
Mixtral-style loops over experts with masks, because it looks at data flow, not at op spelling.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from ..settings import BackendSettings
from .manager import note, stop
from .regions import ADD_TARGETS, LINEAR_TARGETS, TOPK_TARGETS, Region, example_value, graph_inputs, is_call, module_path, regions_of, to_networkx


def _branch(g: nx.DiGraph, delta: fx.Node, x: fx.Node) -> set[fx.Node]:
    return (nx.ancestors(g, delta) | {delta}) - nx.ancestors(g, x) - {x}


def _full_size(inputs: dict, weight: fx.Node, params: list[fx.Node], topk: fx.Node) -> str | None:
    """Why an untagged gated term is an MoE layer's full-size experts rather than low-rank adapters,
    or None: its parameters hold at least the linear's own size per expert (a LoRA expert of rank r
    holds r (in + out), below in x out for r < in out / (in + out)). Unknown sizes count as adapters."""
    w = inputs.get(weight)
    scores = example_value(topk.args[0]) if topk.args and isinstance(topk.args[0], fx.Node) else None
    n_experts = getattr(scores, "shape", (None,))[-1] if getattr(scores, "shape", ()) else None
    if w is None or w.dim() != 2 or not isinstance(n_experts, int) or n_experts < 1:
        return None
    sizes = [inputs[p].numel() for p in params if isinstance(inputs.get(p), torch.Tensor)]
    if len(sizes) != len(params):
        return None
    per_expert = sum(sizes) / n_experts
    if per_expert < w.numel():
        return None
    return f"{per_expert:.0f} parameters per expert of {n_experts}, the linear has {w.numel()}"


def _mixed_dtypes(regions: list[Region], inputs: dict) -> str | None:
    """The first region whose expert factors are of another dtype than its backbone weight, described:
    AdaFuseConfig(dtype=...) unlike the model's. The eager layer casts x to the factors' dtype and the
    delta back; the fused ops take one dtype. (Under autocast the inputs' dtypes vary by op while
    weights and factors agree: not this case.)"""
    for r in regions:
        a = r.factors.get("lora_A")
        if a is None or a not in inputs or r.weight not in inputs:
            continue
        if inputs[a].dtype != inputs[r.weight].dtype:
            return f"{r.name}: factors {str(inputs[a].dtype).removeprefix('torch.')}, " \
                   f"weight {str(inputs[r.weight].dtype).removeprefix('torch.')}"
    return None


def detect_adapters(gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
    g = to_networkx(gm.graph)
    inputs = graph_inputs(gm)
    regions = regions_of(gm)
    full_size: list[str] = []
    for linear in gm.graph.nodes:
        if not is_call(linear, LINEAR_TARGETS) or len(linear.args) < 2:
            continue
        x, weight = linear.args[0], linear.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "placeholder"):
            continue
        for add in list(linear.users):
            if not is_call(add, ADD_TARGETS) or len(add.args) != 2 or linear not in add.args:
                continue
            delta = add.args[1] if add.args[0] is linear else add.args[0]
            if not isinstance(delta, fx.Node):
                continue
            branch = _branch(g, delta, x)
            if x not in nx.ancestors(g, delta):
                continue  # the added term does not read the linear's input: not an adapter
            params = sorted({p for n in branch for p in n.all_input_nodes
                             if p.op == "placeholder" and p is not weight and p is not x}, key=lambda n: n.name)
            # The gate: top-k nodes that reach delta other than through x (what reaches x only is upstream
            # model state, e.g. an earlier layer's routing in a layer-wise model).
            around_x = nx.restricted_view(g, [x], [])
            gate_sources = sorted((t for t in nx.ancestors(around_x, delta) if is_call(t, TOPK_TARGETS)),
                                  key=lambda n: n.name)
            if not params or not gate_sources:
                continue  # a residual or bias add, not a gated expert sum
            tagged = {getattr(inputs.get(p), "_adafuse_tag", None): p for p in params}
            size = None if any(t is not None for t in tagged) else _full_size(inputs, weight, params, gate_sources[0])
            if size is not None:
                full_size.append(f"{module_path(weight)} ({size})")
                continue
            region = Region(module_path(weight), linear, add, x, weight, params, branch, gate_sources)
            xv = example_value(x)
            if xv is not None and hasattr(xv, "shape"):
                tokens = xv.numel() // xv.shape[-1]
                # A symbolic count (dynamic shapes) stays None: never specialise the user's graph here.
                region.tokens = tokens if isinstance(tokens, int) else None
            roles = {t.role: (t, p) for t, p in tagged.items() if t is not None}
            if {"lora_A", "lora_B"} <= set(roles):
                tag, a = roles["lora_A"]
                n_exp, rank, in_features = inputs[a].shape
                region.factors = dict(lora_A=a, lora_B=roles["lora_B"][1], scaling=tag.scaling, top_k=tag.top_k,
                                      num_experts=int(n_exp), rank=int(rank), in_features=int(in_features),
                                      channel=tag.channel, routes_alone=tag.routes_alone)
            regions.append(region)
    mixed = _mixed_dtypes(regions, inputs)
    if mixed:
        return stop(gm, f"detect_adapters: the adapter factors and the backbone differ in dtype ({mixed}): the fused "
                        "kernels take one dtype for the input and the factors, so the graph is left to Inductor as "
                        "it is (exact, not faster). Fix: inject with AdaFuseConfig(dtype=None) (the backbone's "
                        "dtype) or cast the model to one dtype (model.to(torch.bfloat16))")
    if full_size:
        note(gm, f"detect_adapters: top-k gated expert terms with full-size experts on {', '.join(full_size)}: an MoE "
                 "layer, not low-rank adapters; left to Inductor (exact)")
    if regions:
        note(gm, f"detect_adapters: {len(regions)} LoRA-MoE region(s): " + ", ".join(r.name for r in regions))
    else:
        note(gm, "detect_adapters: no LoRA-MoE region in this graph")
    return gm
