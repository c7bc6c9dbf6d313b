"""Pre-gated LoRA-MoE layers: one top-k router, and linears that share its gates.

The router sits in the first adapted linear (in execution order). It computes the token's
routing once, from that linear's input x^1, and hands it to every other adapted linear through
the model's `GateChannel`. The channel lives for one forward call: the model-level hooks that
`inject` installs open it before the forward and close it after, so a gate never outlives the
step that computed it. Under torch.compile the write and the reads happen inside one traced
frame, so Dynamo records plain data flow: ONE router node whose outputs feed every adapter
branch, with no graph break (tests/test_model.py asserts both).

Why a channel rather than an extra forward argument: in Hugging Face models the call
`self.q_proj(hidden_states)` sits inside the library's attention and MLP code, which forwards
no extra argument to its linears; threading the gate through as an argument would mean
re-implementing those modules for every model family and version.

Layer-wise routing (router_placement="every_adapted", MoLA style) is the other layout: every
adapted linear has a router of its own, routes on its own input and publishes nothing on the
channel (`routes_alone`, also on its parameters' tags, so that the compiler never merges it).
The channel then only collects the routers' load-balancing terms of a training forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdaFuseConfig
from ..runtime.switch_state import any_merged_in_place


@dataclass
class Routing:
    """One step's routing decision, per token: gates over the selected top-k experts."""

    weights: Tensor  # [tokens, k] softmax over the top-k logits (sums to 1 per token)
    experts: Tensor  # [tokens, k] int64 expert indices
    logits: Tensor  # [tokens, N] router logits (for the load-balancing loss)

    def dense(self) -> Tensor:
        """Gates as [tokens, N]: the top-k weights in place, zero elsewhere."""
        dense = torch.zeros_like(self.logits, dtype=self.weights.dtype)
        return dense.scatter(1, self.experts, self.weights)


@dataclass(frozen=True)
class AdapterTag:
    """What a Parameter is to AdaFuse: the compiler maps graph inputs back through this tag."""

    role: str  # "weight" (backbone), "lora_A" [N, r, in] or "lora_B" [N, out, r]
    scaling: float
    top_k: int
    channel: "GateChannel"
    # the layer routes on its own input (router_placement="every_adapted"): never merged, even
    # where a graph holds only this layer's region and router (a block compiled on its own)
    routes_alone: bool = False


class RouterPlacementError(RuntimeError):
    """An adapted linear ran before the router computed this step's gates."""


class GateChannel:
    """Carries the step's Routing from the router to every adapted linear, for one forward call."""

    def __init__(self) -> None:
        self.routing: Routing | None = None
        # load-balancing loss of the last training forward (layer-wise routing: the mean of every
        # router's, taken when the forward ends from aux_terms, the forward's terms so far)
        self.aux_loss: Tensor | None = None
        self.aux_terms: list[Tensor] = []
        # Optional callback(routing) -> bool run right after routing; True means it merged this token's
        # experts into the backbone weights, so adapted linears skip their adapter term (simple merge).
        self.on_route = None
        self.merged = False
        self.adapted_weights: list[Tensor] = []  # backbone weights of every adapted linear, registration order
        self.router_at: str | None = None  # the name of the adapted linear holding the router (pre-gated)
        self.switch_state = None  # the compiler's runtime state for this model (adafuse_compile.runtime)
        self.switch_states: list = []  # every one made for this model (one per `exact` it was compiled with)
        # What each compiled graph that ran this model bound for it (adafuse_compile.backend._guarded).
        self.bound_graphs: dict = {}
        self.factor_slots = None  # the factor path's slot buffers (adafuse_compile.passes.rewrite_factor)
        self.dense_packs: dict = {}  # the dense prefill's packed factors (adafuse_compile.runtime.dense_packs)

    def __getstate__(self) -> dict:
        # Pickling the model (torch.save(model), deepcopy) keeps the adapters, not the compiled
        # runtime: the copy starts unmerged and uncompiled. An in-place merge is undone first
        # (torch.save writes the tensors' bytes after pickling, so it saves the backbone weights);
        # exact mode never wrote them, so nothing is touched (and no other thread is disturbed).
        self.restore_in_place()
        state = dict(self.__dict__)
        state.update(routing=None, aux_loss=None, aux_terms=[], on_route=None, merged=False, switch_state=None, switch_states=[],
                     factor_slots=None, dense_packs={}, bound_graphs={})
        return state

    def open(self) -> None:
        self.routing = None
        self.aux_terms = []
        # An eager call after compiled decoding must see the backbone weights, not merged ones.
        # Checked first so that Dynamo, tracing this hook, folds the branch away without guards.
        if not torch.compiler.is_compiling():
            self.restore()

    def restore(self) -> None:
        """End this model's compiled decode (in place: backbone weights back), and undo another
        model's in-place merge into weights this model shares. Another model's exact-mode decode
        never wrote them and is left alone (it may be running on another thread)."""
        for state in self.switch_states:
            if state.merged:
                state.restore()
        self.restore_in_place()  # this model's own states are no longer merged: only others' remain

    def restore_in_place(self) -> None:
        """Undo in-place merges into this model's adapted weights (its own or a sharing model's)."""
        if not any_merged_in_place():  # no model has merged in place: nothing to find (the usual case)
            return
        seen = []
        for w in self.adapted_weights:
            ref = getattr(w, "_adafuse_owner", None)
            owner = ref() if ref is not None else None
            if owner is not None and owner.merged and not owner.exact and all(o is not owner for o in seen):
                seen.append(owner)
                owner.restore()

    def close(self) -> None:
        self.routing = None
        if self.aux_terms:  # layer-wise: the forward's loss is the mean of its routers' (one stack, at the end)
            self.aux_loss = torch.stack(self.aux_terms).mean()
        self.aux_terms = []


class Router(nn.Module):
    """Top-k router G^1: a bias-free linear to N logits, top-k, softmax over the top-k logits."""

    def __init__(self, in_features: int, num_experts: int, top_k: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Routing:
        tokens = x.reshape(-1, x.shape[-1])
        logits = F.linear(tokens.to(self.weight.dtype), self.weight)
        # Top-k and softmax in at least fp32: in bf16, near-tied logits would flip experts.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        return Routing(weights=torch.softmax(top_logits, dim=-1), experts=experts, logits=logits)


def load_balancing_loss(routing: Routing) -> Tensor:
    """Switch-Transformer auxiliary loss: N * sum_i (fraction routed to i) * (mean router prob of i)."""
    num_experts = routing.logits.shape[-1]
    probs = torch.softmax(routing.logits, dim=-1)
    routed = torch.zeros_like(probs).scatter(1, routing.experts, 1.0)
    return num_experts * (routed.mean(0) / routing.experts.shape[-1] * probs.mean(0)).sum()


class AdaFuseLinear(nn.Linear):
    """A backbone linear plus N stacked LoRA experts, gated by the shared pre-gated routing.

    The backbone `weight` and `bias` are the original module's Parameters (not copies), so the
    backbone's state_dict keys and values are unchanged. Experts are stacked for kernels:
    lora_A [N, r, in], lora_B [N, out, r].

    Routing: with `router_placement="first_adapted"` the model's first adapted linear routes and
    publishes its gates on the channel for the others; with "every_adapted" each linear routes on
    its own input and keeps its gates to itself (layer-wise, MoLA style: `routes_alone`).
    """

    def __init__(self, base: nn.Linear, config: AdaFuseConfig, channel: GateChannel, *, is_router: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dtype = config.torch_dtype or base.weight.dtype
        device = base.weight.device
        n, r = config.num_experts, config.rank
        self.num_experts, self.rank, self.top_k = n, r, config.top_k
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r, dtype=dtype, device=device))
        for i in range(n):  # LoRA's init: A like a linear, B zero (or small normal on request)
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        if config.init_lora_b == "normal":
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.routes_alone = config.router_placement == "every_adapted"
        self.router = (Router(self.in_features, n, config.top_k, dtype=dtype).to(device)
                       if is_router or self.routes_alone else None)
        # A plain attribute (not a submodule): the channel is shared by every adapted linear.
        object.__setattr__(self, "_channel", channel)
        # Tags on the Parameters themselves: the compiler sees them as graph inputs and reads the
        # factor layout and scaling from here instead of guessing it from shapes.
        channel.adapted_weights.append(self.weight)
        for role, p in (("weight", self.weight), ("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            p._adafuse_tag = AdapterTag(role, self.scaling, config.top_k, channel, self.routes_alone)

    def __getstate__(self) -> dict:
        # Copying or pickling a part of the model (deepcopy(model.layers)) reaches this module's
        # weight before the channel: undo an in-place merge here too.
        self._channel.restore_in_place()
        return super().__getstate__()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("routes_alone", False)  # pickled before layer-wise routing existed
        # copy.deepcopy copies Parameters without their Python attributes: tag the copies again.
        channel = self.__dict__.get("_channel")
        for role in ("weight", "lora_A", "lora_B"):
            p = getattr(self, role, None)
            if channel is not None and p is not None and getattr(p, "_adafuse_tag", None) is None:
                p._adafuse_tag = AdapterTag(role, self.scaling, self.top_k, channel, self.routes_alone)

    def forward(self, x: Tensor) -> Tensor:
        channel: GateChannel = self._channel
        if self.routes_alone:  # layer-wise: this linear's gates are its own, nothing is merged
            routing = self.router(x)
            if self.training:
                # computed in a checkpointed layer's recompute too (the recompute must run the forward's
                # ops), but kept only in the forward: that loss is already taken
                aux = load_balancing_loss(routing)
                if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
                    channel.aux_terms.append(aux)
            return F.linear(x, self.weight, self.bias) + self.adapter_delta(x, routing)
        if self.router is not None:
            routing = self.router(x)
            channel.routing = routing
            if self.training:
                channel.aux_loss = load_balancing_loss(routing)
            channel.merged = bool(channel.on_route(routing)) if channel.on_route is not None else False
        else:
            routing = channel.routing
            if routing is None:
                name = getattr(self, "_adafuse_name", "an adapted linear")
                router_at = getattr(channel, "router_at", None)
                if torch._C._current_graph_task_id() != -1:  # inside a backward: a checkpointed layer's recompute
                    raise RouterPlacementError(
                        f"{name} is recomputed during backward (gradient checkpointing), after the forward that "
                        "computed its gates ended: a pre-gated model's gates live for one forward of the whole "
                        "model, so a recomputed layer cannot read them. Train without gradient checkpointing "
                        "(model.gradient_checkpointing_disable()), or use router_placement='every_adapted', whose "
                        "linears route on their own inputs")
                raise RouterPlacementError(
                    f"{name} ran before the router{f' (at {router_at})' if router_at else ''} computed this step's "
                    "gates: the router must sit at the first adapted linear in execution order. Called through "
                    "the model's forward, this means it calls the linears in another order than inject() assumed: "
                    f"inject with router_at='{name}' (or leave '{name.rsplit('.', 1)[-1]}' out of target_modules, or "
                    "use router_placement='every_adapted'). Called on its own: call the model instead"
                )
        y = F.linear(x, self.weight, self.bias)
        if channel.merged:
            return y  # this token's experts are already merged into self.weight
        return y + self.adapter_delta(x, routing)

    def adapter_delta(self, x: Tensor, routing: Routing) -> Tensor:
        """sum_i g_i * scaling * B_i A_i x over each token's top-k experts (paper eq. 2, the adapter term)."""
        tokens = self.lora_dropout(x.reshape(-1, self.in_features)).to(self.lora_A.dtype)
        gates = routing.weights.to(tokens.dtype) * self.scaling
        if tokens.shape[0] * self.top_k <= self.num_experts:
            # Decode: gather only the selected experts' factors (k * r * (in + out) elements per token).
            a = self.lora_A[routing.experts]  # [T, k, r, in]
            b = self.lora_B[routing.experts]  # [T, k, out, r]
            h = torch.einsum("ti,tkri->tkr", tokens, a) * gates[..., None]
            delta = torch.einsum("tkr,tkor->to", h, b)
        else:
            # Many tokens (prefill, training): all experts in two dense products, gates zero outside
            # the top-k; avoids materialising per-token copies of the expert factors.
            dense = torch.zeros(tokens.shape[0], self.num_experts, dtype=tokens.dtype, device=tokens.device)
            dense = dense.scatter(1, routing.experts, gates)
            h = torch.einsum("ti,nri->tnr", tokens, self.lora_A) * dense[..., None]
            delta = torch.einsum("tnr,nor->to", h, self.lora_B)
        return delta.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"top_k={self.top_k}, router={'own (layer-wise)' if self.routes_alone else self.router is not None}"
        )
