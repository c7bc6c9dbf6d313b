"""An adapted linear with its dense adapter term in one GEMM (the gather path's fused prefill).

    linear_lora(x, weight, bias, h, gate_matrix, scaling, b_packed, impl="auto") -> y

For T tokens of one module: x [T, in], weight [out, in], bias [out] or None, h [T, N r] every
expert's A x (the group's shrink output, a column slice of it is fine), gate_matrix [T, N] fp32
(dense_gates: zero outside each token's top-k), b_packed [out, N r] (B laid out by
runtime/dense_packs.py):

    y = x W^T + bias + round(h * scaling * G[:, n(j)]) @ b_packed^T        [T, out], x's dtype

which is what the dense prefill (gather_lora.dense_lora_packed, then the add) computes, with the
two products in one fp32 accumulator, rounded once instead of twice.

Implementations: `triton` (triton_linear_lora.py: one GEMM over K = in + N r, CUDA), `reference`
(torch ops: the backbone linear plus the dense form's delta, the CPU path), `auto` = triton on
CUDA, reference elsewhere. Importable without Triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adafuse_compile.cutlass_kernels.plan_cache import resolve_triton_or_reference

__all__ = ["linear_lora", "reference_linear_lora", "oracle_linear_lora", "make_linear_lora_problem", "validate",
           "IMPLS"]

IMPLS = ("auto", "reference", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def validate(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, gate_matrix: Tensor, b_packed: Tensor,
             impl: str) -> None:
    """Shapes, dtypes, devices and layouts, with the expected form in every message."""
    if impl not in IMPLS:
        raise ValueError(f"linear_lora: impl={impl!r} is not one of {IMPLS}")
    if x.dim() != 2 or weight.dim() != 2 or h.dim() != 2 or gate_matrix.dim() != 2 or b_packed.dim() != 2:
        raise ValueError(f"linear_lora: x [T, in], weight [out, in], h [T, N r], gate_matrix [T, N] and b_packed "
                         f"[out, N r] must be 2-D, got {_shape(x)}, {_shape(weight)}, {_shape(h)}, "
                         f"{_shape(gate_matrix)}, {_shape(b_packed)}")
    t, n_in = x.shape
    out, nr = b_packed.shape
    n = gate_matrix.shape[1]
    if weight.shape != (out, n_in) or h.shape != (t, nr) or gate_matrix.shape[0] != t or n == 0 or nr % n:
        raise ValueError(f"linear_lora: for x {_shape(x)} and b_packed {_shape(b_packed)} expected weight "
                         f"[{out}, {n_in}], h [{t}, {nr}] and gate_matrix [{t}, N] with N dividing {nr}; got "
                         f"{_shape(weight)}, {_shape(h)}, {_shape(gate_matrix)}")
    if bias is not None and (bias.shape != (out,) or bias.dtype != x.dtype):
        raise ValueError(f"linear_lora: bias must be [{out}] in {x.dtype}, got {bias.dtype} {_shape(bias)}")
    if x.dtype not in _DTYPES or {weight.dtype, h.dtype, b_packed.dtype} != {x.dtype}:
        raise ValueError(f"linear_lora: x, weight, h and b_packed must share one dtype of {_DTYPES}, got "
                         f"{x.dtype}, {weight.dtype}, {h.dtype}, {b_packed.dtype}")
    if gate_matrix.dtype != torch.float32:
        raise ValueError(f"linear_lora: gate_matrix must be float32 (dense_gates), got {gate_matrix.dtype}")
    tensors = (x, weight, h, gate_matrix, b_packed) + ((bias,) if bias is not None else ())
    if len({u.device for u in tensors}) != 1:
        raise ValueError(f"linear_lora: every tensor must be on one device, got {[str(u.device) for u in tensors]}")
    strided = [name for name, u in (("x", x), ("weight", weight), ("h", h), ("gate_matrix", gate_matrix),
                                    ("b_packed", b_packed)) if u.shape[-1] > 1 and u.stride(-1) != 1]
    if strided:
        raise ValueError(f"linear_lora: {strided} must have a unit stride along the last dimension "
                         "(call .contiguous())")


def _gated_h(h: Tensor, gate_matrix: Tensor, scaling: float) -> Tensor:
    """h * s G[t, expert of the column], rounded to h's dtype (the dense form's numerics)."""
    t, nr = h.shape
    n = gate_matrix.shape[1]
    return (h.view(t, n, nr // n).float() * (gate_matrix * scaling)[:, :, None]).to(h.dtype).view(t, nr)


def reference_linear_lora(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, gate_matrix: Tensor,
                          scaling: float, b_packed: Tensor) -> Tensor:
    """The backbone linear plus the dense prefill's delta, as the unfused graph computes them."""
    return F.linear(x, weight, bias) + torch.matmul(_gated_h(h, gate_matrix, scaling), b_packed.t()).to(x.dtype)


def oracle_linear_lora(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, gate_matrix: Tensor,
                       scaling: float, b_packed: Tensor) -> Tensor:
    """The test oracle: the same sum in float64, with h's gated copy rounded as both implementations
    round it."""
    y = x.double() @ weight.double().t() + _gated_h(h, gate_matrix, scaling).double() @ b_packed.double().t()
    return y + bias.double() if bias is not None else y


def make_linear_lora_problem(t: int, n_in: int, out: int, n: int, r: int, dtype: torch.dtype, bias: bool = False,
                             seed: int = 0, device: str = "cpu") -> dict:
    """Random linear_lora arguments (without scaling) at unit-scale outputs, top-2 gates; h is the
    second module's column slice of a two-module shrink output (row stride 2 N r), as in the backend."""
    from adafuse_compile.cutlass_kernels.gather_lora import dense_gates

    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)
    x = rnd(t, n_in)
    w = rnd(out, n_in, std=n_in ** -0.5)
    b = rnd(out, std=0.1) if bias else None
    h_all = rnd(t, 2 * n * r, std=4.0)
    experts = torch.rand(t, n, generator=g, device=device).topk(2, dim=1).indices
    gates = torch.softmax(torch.randn(t, 2, generator=g, device=device), 1)
    return dict(x=x, weight=w, bias=b, h=h_all[:, n * r:], gate_matrix=dense_gates(experts, gates, n),
                b_packed=rnd(out, n * r, std=(n * r) ** -0.5))


def _resolve_impl(impl: str, x: Tensor) -> str:
    return resolve_triton_or_reference(impl, x.device, "linear_lora")


@torch.library.custom_op("adafuse::linear_lora", mutates_args=())
def linear_lora_op(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, gate_matrix: Tensor, scaling: float,
                   b_packed: Tensor, impl: str) -> Tensor:
    validate(x, weight, bias, h, gate_matrix, b_packed, impl)
    if _resolve_impl(impl, x) == "reference":
        return reference_linear_lora(x, weight, bias, h, gate_matrix, scaling, b_packed)
    from adafuse_compile.cutlass_kernels.triton_linear_lora import linear_lora_triton

    return linear_lora_triton(x, weight, bias, h, gate_matrix, scaling, b_packed)


@linear_lora_op.register_fake
def _linear_lora_fake(x, weight, bias, h, gate_matrix, scaling, b_packed, impl) -> Tensor:
    validate(x, weight, bias, h, gate_matrix, b_packed, impl)
    return x.new_empty(x.shape[0], weight.shape[0])


def linear_lora(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, gate_matrix: Tensor, scaling: float,
                b_packed: Tensor, impl: str = "auto") -> Tensor:
    """y = x W^T + bias + round(h * s G) @ b_packed^T for one adapted linear (module doc). x may be
    [..., in] like a linear's input (T = its leading elements, in order); y is then [..., out]."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[-1] > 1 and x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = torch.ops.adafuse.linear_lora(x2d, weight, bias, h, gate_matrix, float(scaling), b_packed, impl)
    return y.view(*x.shape[:-1], weight.shape[0])
