"""The pass manager: one visible pass order, a record of what each pass did, and graph snapshots."""
from __future__ import annotations

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


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: list[str] = field(default_factory=list)
    snapshot_before: str | None = None
    snapshot_after: str | None = None


@dataclass
class PassManager:
    passes: list[tuple[str, Pass]]
    snapshot: bool = True  # keep each pass's graph text before and after (feeds `adafuse diff`)
    records: list[PassRecord] = field(default_factory=list)

    def __call__(self, gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
        for name, run in self.passes:
            before = len(gm.graph.nodes)
            text_before = str(gm.graph) if self.snapshot else None
            notes = gm.meta.setdefault("adafuse_notes", [])
            first_note = len(notes)
            t0 = time.perf_counter()
            gm = run(gm, settings)
            self.records.append(PassRecord(
                name, time.perf_counter() - t0, before, len(gm.graph.nodes), notes[first_note:],
                text_before, str(gm.graph) if self.snapshot else None,
            ))
            if gm.meta.get("adafuse_stop"):
                break  # a pass decided the graph stays as it is (the reason is in its notes)
        return gm


def note(gm: fx.GraphModule, message: str) -> None:
    """A pass explains what it did or why it did not."""
    gm.meta.setdefault("adafuse_notes", []).append(message)


def stop(gm: fx.GraphModule, reason: str) -> fx.GraphModule:
    """End the pipeline here: the graph passes through unchanged, with `reason` reported once."""
    note(gm, reason)
    gm.meta["adafuse_stop"] = reason
    return gm
