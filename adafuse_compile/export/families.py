"""What the exporters read from a Llama-family model: one table of per-family differences.

The exported decode step is ONE functional Llama-family step (`step.py`) for every family; what
differs between families is data, kept in `FAMILIES`, and `describe(model)` turns a model into a
`DecoderSpec` (shapes, eps, attention scale, rope tables, which tensors are where). Rope tables
are taken from the model itself (TinyLlama's buffers, Hugging Face's rotary module evaluated at
every cache position), so rope theta and any rope scaling are exactly the model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class ExportError(ValueError):
    """The model (or a requested option) cannot be exported exactly; the message says why and what to do."""


@dataclass(frozen=True)
class Family:
    prefix: str  # where the decoder sits in the state dict ("" for TinyLlama, "model." for Hugging Face)
    rope: str  # "buffers": model.rope_cos / rope_sin tables; "rotary_emb": HF rotary module at `prefix`
    qkv_bias: bool  # the family's q/k/v projections carry a bias (checked against the model)
    norm_cast_first: bool  # RMSNorm: cast to the input dtype before the weight multiply (HF) or after (TinyLlama)
    sliding_window: str | None  # config attribute naming the sliding-window length, if the family has one
    config: str  # attribute holding the config ("config" on both)


FAMILIES: dict[str, Family] = {
    "TinyLlama": Family(prefix="", rope="buffers", qkv_bias=False, norm_cast_first=False, sliding_window=None,
                        config="config"),
    "LlamaForCausalLM": Family(prefix="model.", rope="rotary_emb", qkv_bias=False, norm_cast_first=True,
                               sliding_window=None, config="config"),
    "MistralForCausalLM": Family(prefix="model.", rope="rotary_emb", qkv_bias=False, norm_cast_first=True,
                                 sliding_window="sliding_window", config="config"),
    "Qwen2ForCausalLM": Family(prefix="model.", rope="rotary_emb", qkv_bias=True, norm_cast_first=True,
                               sliding_window="sliding_window", config="config"),
}

# Linears of a block, relative to `layers.{i}.`; every family names them like Hugging Face's Llama.
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    attn_scale: float
    max_positions: int
    dtype: torch.dtype
    norm_cast_first: bool

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def family_of(model: nn.Module) -> tuple[str, Family]:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ExportError(
            f"cannot export {name}: the exporters know the Llama-family models {sorted(FAMILIES)}; add a row to "
            f"adafuse_compile.export.families.FAMILIES if {name} is a Llama-architecture decoder"
        )
    return name, FAMILIES[name]


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def describe(model: nn.Module) -> DecoderSpec:
    """The shapes and constants of `model`'s decoder, checked against its family's row."""
    name, fam = family_of(model)
    cfg = getattr(model, fam.config)
    heads = cfg.num_attention_heads
    kv_heads = _cfg_get(cfg, "num_key_value_heads", default=heads)
    head_dim = _cfg_get(cfg, "head_dim", default=cfg.hidden_size // heads)
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"cannot export {name} with hidden_act={act!r}: the exported MLP is SwiGLU (silu)")
    params = dict(model.named_parameters(remove_duplicate=False))
    attn0 = model.get_submodule(f"{fam.prefix}layers.0.self_attn")
    has_qkv_bias = getattr(attn0.q_proj, "bias", None) is not None
    if fam.qkv_bias and not has_qkv_bias:
        raise ExportError(f"{name}: the family table says q/k/v carry a bias but layers.0 q_proj has none")
    scale = float(getattr(attn0, "scaling", head_dim ** -0.5))
    eps = float(_cfg_get(cfg, "rms_norm_eps", default=1e-6))
    max_pos = int(_cfg_get(cfg, "max_seq_len", "max_position_embeddings"))
    return DecoderSpec(
        family=name, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=cfg.vocab_size, eps=eps, attn_scale=scale,
        max_positions=max_pos, dtype=params[f"{fam.prefix}embed_tokens.weight"].dtype,
        norm_cast_first=fam.norm_cast_first,
    )


def sliding_window(model: nn.Module) -> int | None:
    """The attention window some layer uses, or None when every layer attends to the whole cache."""
    _, fam = family_of(model)
    if fam.sliding_window is None:
        return None
    cfg = getattr(model, fam.config)
    window = getattr(cfg, fam.sliding_window, None)
    if window is None:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and len(set(layer_types)) > 1:
        # The exported step applies one attention mask to every layer: windowing the full-attention
        # layers too would change the model's results (Qwen2's max_window_layers makes such models).
        kinds = {k: layer_types.count(k) for k in dict.fromkeys(layer_types)}
        raise ExportError(f"layers of different attention kinds ({kinds}): the exported decode step uses one "
                          "attention window for every layer; models mixing sliding and full attention are not "
                          "supported")
    return int(window)


@torch.no_grad()
def rope_tables(model: nn.Module, capacity: int) -> tuple[Tensor, Tensor]:
    """cos, sin [capacity, head_dim] in fp32, exactly as the model applies them at positions 0..capacity-1."""
    _, fam = family_of(model)
    if fam.rope == "buffers":
        return model.rope_cos[:capacity].float().clone(), model.rope_sin[:capacity].float().clone()
    rotary = model.get_submodule(f"{fam.prefix}rotary_emb")
    ref = next(model.parameters())
    x = torch.zeros(1, capacity, 1, dtype=torch.float32, device=ref.device)
    cos, sin = rotary(x, torch.arange(capacity, device=ref.device)[None])
    return cos[0].float().clone(), sin[0].float().clone()


def backbone_tensors(model: nn.Module, spec: DecoderSpec) -> dict[str, Tensor]:
    """Every backbone tensor the decode step reads, by canonical name (the family prefix removed).

    The values are the model's own Parameters (no copies).
    """
    _, fam = family_of(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    for i in range(spec.num_layers):
        names += [f"layers.{i}.{n}.weight" for n in BLOCK_NORMS]
        for lin in BLOCK_LINEARS:
            names.append(f"layers.{i}.{lin}.weight")
            if f"{fam.prefix}layers.{i}.{lin}.bias" in params:
                names.append(f"layers.{i}.{lin}.bias")
    out = {}
    for n in names:
        full = n if n == "lm_head.weight" else fam.prefix + n
        if full not in params:
            raise ExportError(f"{spec.family}: expected a parameter {full!r} (Llama-family layout); not found")
        out[n] = params[full]
    return out


def canonical_name(model: nn.Module, module_name: str) -> str:
    """`model.layers.0.self_attn.q_proj` -> `layers.0.self_attn.q_proj` (the names the exported graphs use)."""
    _, fam = family_of(model)
    if fam.prefix and module_name.startswith(fam.prefix):
        return module_name[len(fam.prefix):]
    return module_name
