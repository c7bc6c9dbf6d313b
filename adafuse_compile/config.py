"""AdaFuseConfig: what a user chooses when adding pre-gated LoRA-MoE adapters to a model."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# The seven linears of a Llama-family decoder block, in execution order.
LLAMA_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
# "first_adapted": ONE router at the first adapted linear, its gates shared by every adapted linear
# (pre-gated, the paper's model). "every_adapted": a router in every adapted linear, each deciding
# from its own input (layer-wise routing, MoLA style); the backend can only gather such a model.
ROUTER_PLACEMENTS = ("first_adapted", "every_adapted")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class AdaFuseConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class AdaFuseConfig:
    """Pre-gated LoRA-MoE adapters: N LoRA experts of rank r per adapted linear, one top-k router.

    The router sits at the first adapted linear in execution order (paper: "the first expanded
    linear layer"); its gates, computed once per token from that linear's input x^1, are used by
    every adapted linear of every layer: y = W x + sum_i g_i * scaling * B_i A_i x (paper eq. 2).
    `router_placement="every_adapted"` gives every adapted linear a router of its own instead
    (layer-wise routing, MoLA style): nothing can be merged ahead of such a layer, and the backend
    computes its experts unmerged with the gather kernels.
    """

    num_experts: int = 8
    rank: int = 16
    alpha: float | None = None  # scaling = alpha / rank; None means alpha = rank (scaling 1)
    top_k: int = 2
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    router_placement: str = "first_adapted"  # or "every_adapted" (layer-wise): see ROUTER_PLACEMENTS
    dropout: float = 0.0
    dtype: str | torch.dtype | None = None  # adapter parameter dtype ("bfloat16" or torch.bfloat16, kept by
    # name); None follows the backbone weight, which the fused paths need (the backend leaves mixed dtypes alone)
    init_lora_b: str = "zeros"  # "zeros" (the adapted model starts equal to the backbone) or "normal"

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = LLAMA_LINEARS if targets == ALL_LINEAR else (targets,)
        targets = tuple(targets)
        object.__setattr__(self, "target_modules", targets)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise AdaFuseConfigError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise AdaFuseConfigError(f"rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise AdaFuseConfigError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            raise AdaFuseConfigError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot select more experts "
                f"than exist; lower top_k or raise num_experts"
            )
        if self.alpha is not None and not self.alpha > 0:
            raise AdaFuseConfigError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if not targets:
            raise AdaFuseConfigError(
                f"target_modules is empty: name at least one linear, e.g. ('q_proj', 'v_proj'), or '{ALL_LINEAR}'"
            )
        bad = [t for t in targets if not isinstance(t, str) or not t]
        if bad:
            raise AdaFuseConfigError(f"target_modules must be module names, got {bad!r}")
        if len(set(targets)) != len(targets):
            raise AdaFuseConfigError(f"target_modules has duplicates: {targets!r}")
        if self.router_placement not in ROUTER_PLACEMENTS:
            raise AdaFuseConfigError(
                f"router_placement={self.router_placement!r} is not supported; valid: {ROUTER_PLACEMENTS}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise AdaFuseConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.dtype, torch.dtype):  # torch.bfloat16 as well as "bfloat16"; stored by name (JSON)
            names = {v: k for k, v in _DTYPES.items()}
            if self.dtype not in names:
                raise AdaFuseConfigError(f"dtype={self.dtype} is not one of {sorted(_DTYPES)} (or None)")
            object.__setattr__(self, "dtype", names[self.dtype])
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise AdaFuseConfigError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)} (or None)")
        if self.init_lora_b not in ("zeros", "normal"):
            raise AdaFuseConfigError(f"init_lora_b must be 'zeros' or 'normal', got {self.init_lora_b!r}")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "AdaFuseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdaFuseConfigError(f"unknown AdaFuseConfig fields {unknown}; valid: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "AdaFuseConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "AdaFuseConfig":
        return cls.from_json(Path(path).read_text())
