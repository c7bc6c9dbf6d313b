"""Runtime state of a compiled model's weight switching, shared by all its compiled graphs.

The merge path rewrites adapted backbone weights in place every decode step. Every other graph
of the same model (prefill, batch > 1) computes the unmerged adapter term and so must see the
backbone weights: it restores them first. In exact mode the switch writes W = W0 + delta_t from
a pristine copy (no drift); otherwise it adds delta_t - delta_{t-1} in place (the paper's mode).
The previous step's experts and gates live in static device buffers so the unmerge stays right
under CUDA-graph replay.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cutlass_kernels.ops import sgmm_switch_


class SwitchState:
    def __init__(self, weights: list[Tensor], top_k: int, exact: bool):
        device = weights[0].device
        self.weights = weights
        self.exact = exact
        self.prev_experts = torch.zeros(top_k, dtype=torch.int64, device=device)
        self.prev_gates = torch.zeros(top_k, dtype=torch.float32, device=device)
        # Exact mode keeps W0; taken now, while the weights are pristine.
        self.pristine = {id(w): w.detach().clone() for w in weights} if exact else {}
        self.merged = False
        # What the merge graphs last switched with, for an in-place restore.
        self.factors: tuple[list[Tensor], list[Tensor], list[Tensor], float, str] | None = None

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pristine.values())

    def pristine_of(self, weights: list[Tensor]) -> list[Tensor]:
        return [self.pristine[id(w)] for w in weights]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the backbone weights back (before an unmerged graph runs, or when leaving decode)."""
        if not self.merged:
            return
        if self.exact:
            for w in self.weights:
                w.copy_(self.pristine[id(w)])
            self.prev_gates.zero_()
        elif self.factors is not None:
            weights, lora_a, lora_b, scaling, impl = self.factors
            zero = torch.zeros_like(self.prev_gates)
            sgmm_switch_(weights, lora_a, lora_b, self.prev_experts, zero, self.prev_experts, self.prev_gates,
                         scaling, None, impl)
        self.merged = False


def switch_state_for(channel, top_k: int, exact: bool) -> SwitchState:
    if channel.switch_state is None:
        channel.switch_state = SwitchState(list(channel.adapted_weights), top_k, exact)
    state = channel.switch_state
    if state.exact != exact:
        raise ValueError(
            f"this model is already compiled with exact={state.exact}; compile it again with the same `exact` option"
        )
    return state


def restore(model) -> None:
    """Put a compiled model's adapted weights back to the backbone's (no-op if nothing is merged).

    Graphs of the model that compute the adapter term unmerged (prefill, batch > 1) do this
    themselves before they run; call it before using the weights outside the compiled model.
    """
    from ..modeling.inject import gate_channel

    state = gate_channel(model).switch_state
    if state is not None:
        state.restore()
