"""Save and load AdaFuse adapters (router + experts + config) as safetensors, without the backbone."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import AdaFuseConfig, AdaFuseConfigError
from .inject import adafuse_config, adapter_state_dict, inject, is_injected

FORMAT = "adafuse-adapters-v1"


class AdapterCheckpointError(ValueError):
    """The checkpoint does not fit the model; the message names the tensor."""


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the model's adapters (router, experts) and AdaFuseConfig to one safetensors file."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": FORMAT, "adafuse_config": adafuse_config(model).to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter_config(path: str | Path) -> AdaFuseConfig:
    if not Path(path).is_file():
        raise AdapterCheckpointError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' own error type (e.g. "header too large" for another format)
        raise AdapterCheckpointError(f"{path} is not a safetensors file ({exc}); adapters are saved with "
                                     "save_adapters") from None
    if meta.get("format") != FORMAT:
        raise AdapterCheckpointError(f"{path} is not an AdaFuse adapter file (metadata format={meta.get('format')!r})")
    return AdaFuseConfig.from_json(meta["adafuse_config"])


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters onto `model`: injects them first on a fresh backbone, then copies every tensor.

    Fails before changing anything if a tensor is missing, unexpected or of the wrong shape.
    """
    path = Path(path)
    config = read_adapter_config(path)
    if is_injected(model) and adafuse_config(model) != config:
        raise AdapterCheckpointError(
            f"model already has adapters with a different config: {adafuse_config(model)} vs file {config}"
        )
    with safe_open(str(path), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    if not is_injected(model):
        # The router where the saving model had it (found by its forward then, or named by the user):
        # not found again, which could differ (e.g. a model loaded on the meta device cannot be probed).
        routers = [k.removesuffix(".router.weight") for k in saved if k.endswith(".router.weight")]
        router_at = routers[0] if config.router_placement == "first_adapted" and len(routers) == 1 else None
        try:
            inject(model, config, router_at=router_at)
        except AdaFuseConfigError as exc:
            raise AdapterCheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from None
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing:
        raise AdapterCheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise AdapterCheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} not in the model ({len(unexpected)} in all)")
    for key, param in expected.items():
        if saved[key].shape != param.shape:
            raise AdapterCheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(saved[key].shape)}, the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(saved[key])
    return model
