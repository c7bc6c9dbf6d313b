"""The `auto` policy for one graph: which path its adapter regions take, decided once and shared.

rewrite_switch and rewrite_factor both ask `decide_path`; the first call builds the step's shape
from the regions (tokens, linears' out x in, rank, top-k, experts, dtype), gets the cost
parameters (runtime/cost_model.py: calibrated on the graph's CUDA device once per process, the
documented defaults elsewhere, `auto_costs` on top), notes the choice and every estimate (so
`adafuse diff` and `backend.last_compilations` show why), and keeps the Decision in gm.meta.
Not a pass: it changes no node. Only for path="auto"; an explicit path never asks it.
"""
from __future__ import annotations

import torch.fx as fx

from ..runtime.cost_model import DEFAULT_COSTS, Costs, Decision, StepShape, calibrate, choose_path
from ..settings import BackendSettings
from .manager import note
from .regions import graph_inputs, regions_of


def step_shape(gm: fx.GraphModule, settings: BackendSettings) -> StepShape:
    regions = regions_of(gm)
    inputs = graph_inputs(gm)
    weights = [inputs[r.weight] for r in regions]
    groups: dict[fx.Node, int] = {}
    for r in regions:
        groups[r.x] = groups.get(r.x, 0) + 1
    tokens = {r.tokens for r in regions}
    first = regions[0].factors
    return StepShape(
        tokens=tokens.pop() if len(tokens) == 1 else None,
        linears=tuple((int(w.shape[0]), int(w.shape[1])) for w in weights),
        groups=tuple(groups.values()),
        rank=first["rank"], top_k=first["top_k"], num_experts=first["num_experts"],
        dtype_bytes=weights[0].element_size(),
        exact=settings.exact is not False,  # None resolves to exact unless memory is short: assume exact
    )


def step_costs(gm: fx.GraphModule, settings: BackendSettings) -> Costs:
    overrides = dict(settings.auto_costs or ())
    if set(overrides) >= {"copy_bytes_per_s", "launch_s", "sgmm_fraction"}:
        return DEFAULT_COSTS.with_overrides(overrides)  # nothing left to measure
    device = graph_inputs(gm)[regions_of(gm)[0].weight].device
    return calibrate(device, settings.calibrate).with_overrides(overrides)


def decide_path(gm: fx.GraphModule, settings: BackendSettings) -> Decision:
    decision = gm.meta.get("adafuse_path_decision")
    if decision is None and not regions_of(gm):
        return Decision("gather", reason="no adapter region: nothing to choose")
    if decision is None:
        decision = choose_path(step_shape(gm, settings), step_costs(gm, settings))
        gm.meta["adafuse_path_decision"] = decision
        estimates = ", ".join(f"{p} {'n/a' if s is None else f'+{s * 1e3:.3f} ms'}"
                              for p, s in decision.estimates.items())
        note(gm, f"auto policy: {decision.path} ({decision.reason}); estimates: {estimates}")
    return decision
