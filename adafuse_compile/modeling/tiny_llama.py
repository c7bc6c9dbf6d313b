"""The package's own small Llama-architecture model (gpt-fast style): static KV cache, static shapes.

Module names follow Hugging Face's Llama (embed_tokens, layers.i.self_attn.q_proj, mlp.gate_proj,
norm, lm_head) so AdaFuseConfig.target_modules means the same thing on both. A decode step is one
call `model(tokens [B, 1], input_pos [1])` whose shapes never change, which is what the compiler
and the exporters want.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(cfg: TinyLlamaConfig) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, heads, max_seq_len, head_dim)
        self.k = nn.Buffer(torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.v = nn.Buffer(torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Llama decoder. With a KV cache set up, `forward(tokens, input_pos)` is one cached step;
    without, it is a plain causal forward over the whole sequence (training)."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.rope_cos = nn.Buffer(cos, persistent=False)
        self.rope_sin = nn.Buffer(sin, persistent=False)
        causal = torch.tril(torch.ones(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool))
        self.causal_mask = nn.Buffer(causal, persistent=False)
        self.cache_batch = 0

    def init_weights(self, std: float = 0.02, seed: int | None = 0) -> "TinyLlama":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                continue
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        w = self.embed_tokens.weight
        dtype = dtype or w.dtype
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(
                batch, self.config.num_key_value_heads, self.config.max_seq_len, self.config.head_dim, dtype, w.device
            )
        self.cache_batch = batch

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        b, t = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(t, device=tokens.device)
        cos = self.rope_cos[input_pos]
        sin = self.rope_sin[input_pos]
        if self.cache_batch:
            mask = self.causal_mask[input_pos][None, None]  # [1, 1, t, max_seq_len]
        else:
            mask = self.causal_mask[input_pos][:, input_pos][None, None]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: Tensor, max_new_tokens: int, progress=None) -> tuple[Tensor, Tensor]:
    """Prefill `prompt` [B, T], then decode greedily one token per step through the static KV cache.

    Returns (tokens [B, max_new_tokens], last logits of each step [B, max_new_tokens, vocab]).
    `model` is a TinyLlama or anything with its call signature (a compiled TinyLlama).
    """
    from .inject import gate_channel, is_injected

    b, t = prompt.shape
    pos = torch.arange(t, device=prompt.device)
    out, all_logits = [], []
    try:
        logits = model(prompt, pos)[:, -1]
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            all_logits.append(logits)
            if progress is not None:
                progress(i)
            if i + 1 == max_new_tokens:
                break
            logits = model(nxt, torch.tensor([t + i], device=prompt.device))[:, -1]
    finally:  # leaving decode, however: the backbone weights come back (compiled models merge them)
        inner = getattr(model, "_orig_mod", model)
        if is_injected(inner):
            gate_channel(inner).restore()
    return torch.cat(out, 1), torch.stack(all_logits, 1)
