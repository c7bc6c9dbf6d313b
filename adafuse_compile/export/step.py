"""The exported graphs as small functional modules: routing prologue and per-token decode step.

Both read the model's own backbone Parameters (attached to a module tree under their canonical
names, no copies), so the ONNX initializers carry the names of the model's state_dict. The
decode step takes the switched weights as forward arguments: they become graph inputs, and the
step is the plain backbone (no adapter term): after the switch, W = W0 + delta_t already holds
this token's experts.

    prologue(tokens [1, 1])                    -> experts [k] int64, gates [k] float32
    step(tokens [1, 1], input_pos [1],
         past_key.i, past_value.i  [1, kv, C, hd] for every layer i,
         <switched weights> [out, in])         -> logits [1, V], present_key.i, present_value.i
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families import DecoderSpec


def _attach(root: nn.Module, name: str, tensor: Tensor, *, buffer: bool = False) -> None:
    """Register `tensor` at dotted `name` under `root`, creating plain holder modules on the way."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if buffer:
        module.register_buffer(leaf, tensor, persistent=True)
    else:
        param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        module.register_parameter(leaf, param)


def rms_norm(x: Tensor, weight: Tensor, eps: float, cast_first: bool) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_first:  # Hugging Face: weight * hidden.to(input_dtype)
        return weight * xf.to(x.dtype)
    return (xf * weight.float()).to(x.dtype)  # TinyLlama: F.rms_norm in fp32, then cast


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class _Backbone(nn.Module):
    def __init__(self, spec: DecoderSpec, tensors: dict[str, Tensor]):
        super().__init__()
        self.spec = spec
        self._names = tuple(tensors)
        for name, t in tensors.items():
            _attach(self, name, t)

    def w(self, name: str, switched: dict[str, Tensor]) -> Tensor | None:
        if name in switched:
            return switched[name]
        if name not in self._names:
            return None
        return self.get_parameter(name)


class RoutingPrologue(_Backbone):
    """Embedding, layer 0's input norm, the router, top-k and softmax, for one token."""

    def __init__(self, spec: DecoderSpec, tensors: dict[str, Tensor], router_weight: Tensor, top_k: int):
        super().__init__(spec, tensors)
        _attach(self, "router.weight", router_weight)
        self.top_k = top_k

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        s = self.spec
        x = F.embedding(tokens, self.get_parameter("embed_tokens.weight"))  # [1, 1, D]
        h = rms_norm(x, self.get_parameter("layers.0.input_layernorm.weight"), s.eps, s.norm_cast_first)
        router = self.get_parameter("router.weight")
        logits = F.linear(h.reshape(1, s.hidden_size).to(router.dtype), router)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        top, experts = torch.topk(logits, self.top_k, dim=-1)
        return experts.reshape(self.top_k), torch.softmax(top, dim=-1).reshape(self.top_k)


class DecodeStep(_Backbone):
    """One token through the plain backbone, static KV cache of `capacity` positions as explicit I/O."""

    def __init__(self, spec: DecoderSpec, tensors: dict[str, Tensor], switched: list[str], rope: tuple[Tensor, Tensor],
                 capacity: int, window: int | None = None):
        super().__init__(spec, tensors)
        self.switched = tuple(switched)
        self.capacity = capacity
        self.window = window
        cos, sin = rope
        _attach(self, "rope_cos", cos, buffer=True)
        _attach(self, "rope_sin", sin, buffer=True)
        self.register_buffer("positions", torch.arange(capacity), persistent=True)

    def forward(self, tokens: Tensor, input_pos: Tensor, *rest: Tensor):
        s = self.spec
        n_cache = 2 * s.num_layers
        caches, weights = rest[:n_cache], rest[n_cache:]
        sw = dict(zip(self.switched, weights))
        cast_first = s.norm_cast_first
        cos = self.rope_cos[input_pos]  # [1, hd]
        sin = self.rope_sin[input_pos]
        # One-hot write of this position into the cache, and the causal (optionally windowed) mask.
        here = (self.positions == input_pos).reshape(1, 1, self.capacity, 1)
        valid = self.positions <= input_pos
        if self.window is not None:
            valid = valid & (self.positions > input_pos - self.window)
        valid = valid.reshape(1, 1, 1, self.capacity)
        # Activations stay 2-D [1, D]: each linear then exports as one Gemm(x, W, transB=1), with no
        # Transpose node on the switched weight inputs (TensorRT and ONNX Runtime read W as bound).
        x = F.embedding(tokens, self.get_parameter("embed_tokens.weight")).reshape(1, s.hidden_size)
        presents = []
        for i in range(s.num_layers):
            p = f"layers.{i}."

            def lin(name, inp, p=p):
                return F.linear(inp, self.w(p + name + ".weight", sw), self.w(p + name + ".bias", sw))

            h = rms_norm(x, self.w(p + "input_layernorm.weight", sw), s.eps, cast_first)
            q = lin("self_attn.q_proj", h).reshape(1, s.num_heads, 1, s.head_dim)
            k = lin("self_attn.k_proj", h).reshape(1, s.num_kv_heads, 1, s.head_dim)
            v = lin("self_attn.v_proj", h).reshape(1, s.num_kv_heads, 1, s.head_dim)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k_cache = torch.where(here, k, caches[2 * i])
            v_cache = torch.where(here, v, caches[2 * i + 1])
            presents += [k_cache, v_cache]
            # GQA without repeating the cache: query heads grouped per kv head (head h uses kv head h // group).
            qg = q.reshape(1, s.num_kv_heads, s.group, s.head_dim)
            scores = torch.matmul(qg.float(), k_cache.float().transpose(-1, -2)) * s.attn_scale  # [1, kv, g, C]
            scores = torch.where(valid, scores, torch.finfo(torch.float32).min)
            probs = torch.softmax(scores, dim=-1)
            attn = torch.matmul(probs, v_cache.float()).to(x.dtype).reshape(1, s.num_heads * s.head_dim)
            x = x + lin("self_attn.o_proj", attn)
            h = rms_norm(x, self.w(p + "post_attention_layernorm.weight", sw), s.eps, cast_first)
            x = x + lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))
        x = rms_norm(x, self.get_parameter("norm.weight"), s.eps, cast_first)
        logits = F.linear(x, self.get_parameter("lm_head.weight"))
        return (logits, *presents)
