"""What a detected LoRA-MoE region is, and the graph helpers the passes share."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR_TARGETS = (F.linear, torch._C._nn.linear)
ADD_TARGETS = (operator.add, torch.add, operator.iadd)
TOPK_TARGETS = (torch.topk,)


@dataclass
class Region:
    """A backbone linear plus a gated sum of expert low-rank branches added to its output."""

    name: str  # module path, e.g. "layers.0.self_attn.q_proj"
    linear: fx.Node  # y = linear(x, W, b)
    add: fx.Node  # y + delta
    x: fx.Node
    weight: fx.Node  # placeholder of W
    expert_params: list[fx.Node]  # placeholders the adapter branch reads (besides x and the gate)
    local_nodes: set[fx.Node]  # the adapter branch: ancestors of delta that are not ancestors of x
    gate_sources: list[fx.Node]  # top-k nodes the branch's gate derives from
    tokens: int | None = None  # tokens per step, from the traced shapes
    factors: dict = field(default_factory=dict)  # "lora_A", "lora_B", "scaling", "top_k" when known

    def describe(self) -> dict:
        return {
            "module": self.name,
            "experts": self.factors.get("num_experts"),
            "rank": self.factors.get("rank"),
            "top_k": self.factors.get("top_k"),
            "gate_source": [n.name for n in self.gate_sources],
            "tokens_per_step": self.tokens,
        }


def _mutated(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place call (`out.index_add_(...)`, `x.add_(...)`) writes, if any."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.args[0] if name.endswith("_") and not name.startswith("__") else None


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow graph of an fx graph, with in-place writes as edges too.

    Dynamo keeps `out.index_add_(...)` as a call whose result is unused while later nodes read
    `out`; an edge from the write to every later reader of `out` keeps that flow visible.
    """
    g = nx.DiGraph()
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
        target = _mutated(node)
        if target is not None:
            for reader in target.users:
                if order[reader] > order[node]:
                    g.add_edge(node, reader)
    return g


def is_call(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


_MODULE_PATH = re.compile(r"^l_+(self|args_\d+)_+")


def module_path(placeholder: fx.Node) -> str:
    """'l_self_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_' -> 'layers.0.self_attn.q_proj'."""
    name = _MODULE_PATH.sub("", placeholder.name)
    name = re.sub(r"_parameters_[a-z0-9_]*_?$", "", name)
    parts = [p for p in re.split(r"_?modules_", name) if p]
    return ".".join(parts) or placeholder.name


def graph_inputs(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    """Placeholder -> the real tensor Dynamo passed for it (set by the backend before the passes)."""
    return gm.meta.get("adafuse_inputs", {})


def add_static_inputs(gm: fx.GraphModule, names: list[str]) -> list[fx.Node]:
    """Placeholders after the last one, in order, for buffers of ours that the backend passes after
    Dynamo's inputs (switch state, merged weights, factor slots, packed factors). Marked static:
    AOT and CUDA graphs must not copy them per call (a replay reads what the previous one wrote, or
    what the runtime re-packed into them), and they have no source in the user's code."""
    graph = gm.graph
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        placeholders = [graph.placeholder(n) for n in reversed(names)][::-1]
    for p in placeholders:
        p._dynamo_source = None
        p.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return placeholders


def trains(gm: fx.GraphModule) -> bool:
    """A training step: grad mode is on and a graph input (the adapters, the router, the backbone)
    requires grad. Our kernels (switch, factor slots, gather) have no autograd formula, so such a
    step may only take the dense form, whose plain matmuls carry every gradient. (Dynamo guards on
    grad mode: a no_grad call of the same model compiles a graph of its own.)"""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in graph_inputs(gm).values())


_DROPOUTS = (torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default,
             torch.ops.aten.native_dropout.default)


def active_dropout(gm: fx.GraphModule) -> list[str]:
    """Regions whose adapter branch applies dropout (a module in training mode, p > 0): every
    rewrite replaces the whole branch, which would leave the dropout out."""
    names = []
    for r in regions_of(gm):
        for n in r.local_nodes:
            if not is_call(n, _DROPOUTS):
                continue
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            training = n.kwargs.get("training", n.kwargs.get("train", n.args[2] if len(n.args) > 2 else True))
            if training is not False and p != 0:  # a symbolic p or flag counts as active
                names.append(r.name)
                break
    return names


TRAINING_NOTE = "gradients are enabled and inputs require grad (a training step): adafuse's kernels have no autograd formula"


def regions_of(gm: fx.GraphModule) -> list[Region]:
    return gm.meta.setdefault("adafuse_regions", [])
