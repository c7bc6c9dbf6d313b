"""The pass manager: one visible pass order, a record of what each pass did, and graph snapshots."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from ..settings import BackendSettings

Pass = Callable[[fx.GraphModule, BackendSettings], fx.GraphModule]


def is_mutation(node: fx.Node) -> bool:
    """In-place tensor methods/functions (`index_copy_`, `add_`) and mutating ops with a schema."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.startswith("__")) or "out" in node.kwargs


def clean_up(gm: fx.GraphModule) -> fx.GraphModule:
    """After a pass changes the graph: dead-code elimination, lint, recompile.

    Dynamo graphs call in-place methods such as the KV cache's `index_copy_` whose results are
    unused; fx's default DCE would drop them, so mutations count as impure here.
    """
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_mutation(n))
    gm.graph.lint()
    gm.recompile()
    return gm


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            key = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            counts[key] = counts.get(key, 0) + 1
    return counts


_MODULE_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def node_module(node: fx.Node) -> str:
    """The module a node was traced in ('layers.0.self_attn.q_proj'), from Dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = _MODULE_INDEX.sub(lambda m: "." + m.group(1), path)
        path = re.sub(r"^L\.self\.?|^self\.?", "", path).replace("._modules.", ".").lstrip(".")
        return re.sub(r"^_modules\.", "", path)
    if node.op == "placeholder":
        from .regions import module_path

        return module_path(node)
    return ""


def snapshot(gm: fx.GraphModule) -> list[dict]:
    """A light, picklable copy of the graph for the diff tools: one dict per node, in order."""
    out = []
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        out.append({"name": node.name, "op": node.op, "target": target,
                    "inputs": [i.name for i in node.all_input_nodes], "module": node_module(node)})
    return out


@dataclass
class PassRecord:
    """What one pass did: timing, node counts, its notes, and the graph before and after it."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: list[str] = field(default_factory=list)
    graph_before: list[dict] | None = None  # snapshot(), see above
    graph_after: list[dict] | None = None
    replaced: dict[str, str] = field(default_factory=dict)  # removed node -> the node now used in its place


@dataclass
class PassManager:
    passes: list[tuple[str, Pass]]
    snapshot: bool = True  # keep each pass's graph text before and after (feeds `adafuse diff`)
    records: list[PassRecord] = field(default_factory=list)

    def __call__(self, gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
        for name, run in self.passes:
            before = len(gm.graph.nodes)
            graph_before = snapshot(gm) if self.snapshot else None
            notes = gm.meta.setdefault("adafuse_notes", [])
            first_note = len(notes)
            gm.meta["adafuse_replaced"] = {}
            t0 = time.perf_counter()
            gm = run(gm, settings)
            self.records.append(PassRecord(
                name, time.perf_counter() - t0, before, len(gm.graph.nodes), notes[first_note:],
                graph_before, snapshot(gm) if self.snapshot else None, gm.meta.pop("adafuse_replaced", {}),
            ))
            if gm.meta.get("adafuse_stop"):
                break  # a pass decided the graph stays as it is (the reason is in its notes)
        return gm


def note(gm: fx.GraphModule, message: str) -> None:
    """A pass explains what it did or why it did not."""
    gm.meta.setdefault("adafuse_notes", []).append(message)


def warn(gm: fx.GraphModule, message: str) -> None:
    """A pass's note that the user should see even though the graph was rewritten (the backend
    turns it into a warning): an outcome slower than what the user probably wanted."""
    note(gm, message)
    gm.meta.setdefault("adafuse_warnings", []).append(message)


def stop(gm: fx.GraphModule, reason: str, *, expected: bool = False) -> fx.GraphModule:
    """End the pipeline here: the graph passes through unchanged, with `reason` reported once.

    `expected` marks a designed outcome (a prefill step takes the unmerged path), logged at info
    level; anything else is a graph the passes could not prove safe, and the user gets a warning.
    """
    note(gm, reason)
    gm.meta["adafuse_stop"] = reason
    gm.meta["adafuse_stop_expected"] = expected
    return gm
