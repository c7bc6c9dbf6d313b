"""Model side: pre-gated LoRA-MoE layers, injection into causal LMs, adapter checkpoints."""
from .checkpoint import AdapterCheckpointError, load_adapters, save_adapters
from .generate_stop import deferred_stop_check
from .inject import (adafuse_config, adapted_linears, adapter_state_dict, defer_stop_check, gate_channel, inject,
                     is_injected, reuse_static_cache)
from .layers import AdaFuseLinear, GateChannel, Router, RouterPlacementError, Routing, load_balancing_loss
from .tiny_llama import TinyLlama, TinyLlamaConfig, greedy_decode

__all__ = [
    "AdaFuseLinear", "AdapterCheckpointError", "GateChannel", "Router", "RouterPlacementError", "Routing",
    "TinyLlama", "TinyLlamaConfig", "adafuse_config", "adapted_linears", "adapter_state_dict", "defer_stop_check",
    "deferred_stop_check", "gate_channel",
    "greedy_decode", "inject", "is_injected", "load_adapters", "load_balancing_loss", "reuse_static_cache",
    "save_adapters",
]
