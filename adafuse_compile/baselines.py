"""Reference peers for benchmarks and detection tests (baselines, not the product).

- `MoLALinear` / `inject_layerwise`: layer-wise routed MoE-LoRA in the style of MoLA: a top-2
  router in EVERY adapted linear, and a loop over experts with masks and index_add (the way
  MoLA and Mixtral write it). Its routing cannot be hoisted: each layer decides from its own input.
- `SimpleMerge`: the paper's "simple merge" (Table 6) on a pre-gated model: once the router has
  decided, unmerge the previous token's experts and merge this token's into every adapted weight,
  layer by layer, with one addmm per weight; then the backbone runs plain.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdaFuseConfig
from .modeling.inject import target_linears, adapted_linears, gate_channel
from .modeling.layers import Routing


class MoLALinear(nn.Linear):
    """A linear with its own top-k router over N LoRA experts (layer-wise routing, MoLA style)."""

    def __init__(self, base: nn.Linear, config: AdaFuseConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dtype, device = config.torch_dtype or base.weight.dtype, base.weight.device
        n, r = config.num_experts, config.rank
        self.num_experts, self.top_k, self.scaling = n, config.top_k, config.scaling
        self.router = nn.Linear(self.in_features, n, bias=False, dtype=dtype, device=device)
        nn.init.normal_(self.router.weight, std=0.02)
        self.lora_A = nn.ModuleList(nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device) for _ in range(n))
        self.lora_B = nn.ModuleList(nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device) for _ in range(n))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in self.lora_B:
            if config.init_lora_b == "normal":
                nn.init.normal_(b.weight, std=0.02)
            else:
                nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        tokens = x.reshape(-1, self.in_features)
        logits = self.router(tokens)
        top, selected = torch.topk(logits.to(torch.promote_types(logits.dtype, torch.float32)), self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1).to(tokens.dtype) * self.scaling
        out = torch.zeros(tokens.shape[0], self.out_features, dtype=tokens.dtype, device=tokens.device)
        expert_mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # [N, k, tokens]
        for e in range(self.num_experts):
            slot, token_idx = torch.where(expert_mask[e])
            h = self.lora_B[e](self.lora_A[e](tokens[token_idx]))
            out.index_add_(0, token_idx, h * weights[token_idx, slot, None])
        return y + out.reshape(*x.shape[:-1], self.out_features).to(y.dtype)


def inject_layerwise(model: nn.Module, config: AdaFuseConfig) -> nn.Module:
    """Wrap the target linears with MoLALinear (a router in each); freezes the backbone."""
    targets = target_linears(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, MoLALinear(linear, config))
    return model


class SimpleMerge:
    """Context manager: decode a pre-gated model by merging experts into weights, one addmm per weight.

    Single-token steps (batch 1 decode) merge; any other step first restores the backbone and
    runs the unmerged adapter path. Leaving the context always restores the backbone weights
    (in place: in low precision the restore carries the usual merge/unmerge rounding drift).
    """

    def __init__(self, model: nn.Module):
        self.linears = list(adapted_linears(model).values())
        if any(lin.routes_alone for lin in self.linears):
            raise ValueError("SimpleMerge merges one router's experts for the whole step: this model routes in every "
                             "adapted linear (router_placement='every_adapted'), so there is nothing to merge ahead")
        self.channel = gate_channel(model)
        self.merged: Routing | None = None

    def __enter__(self) -> "SimpleMerge":
        self.channel.on_route = self._on_route
        return self

    def __exit__(self, *exc) -> None:
        self.channel.on_route = None
        self.channel.merged = False
        self._switch(None)

    @torch.no_grad()
    def _switch(self, routing: Routing | None) -> None:
        for lin in self.linears:
            a_parts, b_parts = [], []
            for r, sign in ((self.merged, -1.0), (routing, 1.0)):
                if r is None:
                    continue
                e, g = r.experts[0], r.weights[0].to(lin.lora_A.dtype) * (sign * lin.scaling)
                a_parts.append(lin.lora_A[e].mul(g[:, None, None]).reshape(-1, lin.in_features))
                b_parts.append(lin.lora_B[e].permute(1, 0, 2).reshape(lin.out_features, -1))
            if a_parts:
                lin.weight.addmm_(torch.cat(b_parts, 1).to(lin.weight.dtype), torch.cat(a_parts, 0).to(lin.weight.dtype))
        self.merged = routing

    def _on_route(self, routing: Routing) -> bool:
        single = routing.experts.shape[0] == 1
        self._switch(routing if single else None)
        return single
