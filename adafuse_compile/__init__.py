"""adafuse_compile: pre-gated LoRA-MoE adapters, and a torch.compile backend that runs them at backbone speed."""
from .config import ALL_LINEAR, LLAMA_LINEARS, AdaFuseConfig, AdaFuseConfigError
from .modeling import (
    AdapterCheckpointError,
    TinyLlama,
    TinyLlamaConfig,
    adapted_linears,
    defer_stop_check,
    deferred_stop_check,
    gate_channel,
    greedy_decode,
    inject,
    load_adapters,
    reuse_static_cache,
    save_adapters,
)
from .runtime.switch_state import ConcurrentUseError, decoding, restore

__version__ = "0.1.0"
__all__ = [
    "ALL_LINEAR", "LLAMA_LINEARS", "AdaFuseConfig", "AdaFuseConfigError", "AdapterCheckpointError", "ConcurrentUseError", "TinyLlama",
    "TinyLlamaConfig", "adapted_linears", "decoding", "defer_stop_check", "deferred_stop_check", "gate_channel", "greedy_decode", "inject", "load_adapters", "restore",
    "reuse_static_cache", "save_adapters",
]
