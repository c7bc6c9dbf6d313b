"""Triton linear with the dense adapter expand in its K loop (prefill, `prefill_expand="fused"`).

    y[t, o] = sum_i x[t, i] W[o, i]  +  sum_j hg[t, j] Bp[o, j]  (+ bias[o])
    hg[t, j] = round(h[t, j] * s * G[t, j // r])      (rounded to h's dtype, as the dense form does)

x [T, in], W [out, in] (the backbone's own weight, read where it lies), h [T, N r] every expert's
A x for this module (a column slice of the group's shrink output), G [T, N] fp32 the step's gate
matrix (zero outside each token's top-k), Bp [out, N r] the packed B (runtime/dense_packs.py).

One GEMM over K = in + N r: the main loop runs over (x, W) and then over (hg, Bp), into one fp32
accumulator, rounded once. The dense prefill in separate kernels writes the delta [T, out] and
reads it back where it is added (Inductor fuses the add into RoPE, the KV-cache copy or SiLU-mul,
but the bytes stay): 87 MB per layer for the seven linears of a 7B layer at 512 tokens, while the
backbone's compute-bound GEMMs leave HBM mostly idle (docs/paths.md, "Prefill forms"). Here the
factors' bytes stream in under the GEMM's compute and no delta exists.

fp32 operands multiply in IEEE fp32 (input_precision="ieee"), as torch's matmul does by default,
not in TF32, Triton's default on CUDA. Tiles: (BLOCK_T x BLOCK_O) per program, grouped along T (GROUP_T) so that neighbouring programs
share W tiles in L2, as in the Triton matmul tutorial. Loads wrap their row indices (t % T,
o % OUT) instead of masking them and only the K tail is masked, when in or N r is not a multiple
of BLOCK_K; the store is masked.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

import triton
import triton.language as tl

from adafuse_compile.cutlass_kernels.plan_cache import triton_interpreted


@triton.jit
def _tile(T, OUT, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_T: tl.constexpr):
    """This program's (token block, out block), grouped along T so that neighbours share W tiles."""
    pid = tl.program_id(0)
    n_o = tl.cdiv(OUT, BLOCK_O)
    per_group = GROUP_T * n_o
    first_t = (pid // per_group) * GROUP_T
    group_t = min(tl.cdiv(T, BLOCK_T) - first_t, GROUP_T)
    return first_t + (pid % per_group) % group_t, (pid % per_group) // group_t


@triton.jit
def _k_tiles(a_ptrs, b_ptrs, offs_k, k0, K, EVEN: tl.constexpr):
    """The K tile at k0 of a [rows, K] operand and of a [K, cols] one, zero past K unless EVEN."""
    if EVEN:
        return tl.load(a_ptrs), tl.load(b_ptrs)
    k_ok = offs_k + k0 < K
    return tl.load(a_ptrs, mask=k_ok[None, :], other=0.0), tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)


@triton.jit
def _gated(ht, g_ptr, rows_t, stride_gt, offs_k, k0, NR, scaling, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h's tile times s G[t, expert of the column], rounded to h's dtype (the dense form's numerics)."""
    if R % BLOCK_K == 0:  # the tile lies in one expert: one gate per token
        gate = tl.load(g_ptr + rows_t * stride_gt + k0 // R) * scaling
        return (ht.to(tl.float32) * gate[:, None]).to(ht.dtype)
    expert = tl.minimum(offs_k + k0, NR - 1) // R  # the tile spans experts: a gate per (token, column)
    gate = tl.load(g_ptr + rows_t[:, None] * stride_gt + expert[None, :]) * scaling
    return (ht.to(tl.float32) * gate).to(ht.dtype)


@triton.jit
def _linear_lora_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, g_ptr, b_ptr, y_ptr,
    T, OUT, IN, NR, scaling,
    stride_xt, stride_wo, stride_ht, stride_gt, stride_bo, stride_yt,
    T_BUCKET,  # autotuning key only: the token count rounded up to a power of two
    R: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_IN: tl.constexpr, EVEN_NR: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
):
    pid_t, pid_o = _tile(T, OUT, BLOCK_T, BLOCK_O, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rows_t = (offs_t % T).to(tl.int64)  # wrapped: every load in bounds, the store is masked
    rows_o = (offs_o % OUT).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)

    # The backbone: x @ W^T.
    x_ptrs = x_ptr + rows_t[:, None] * stride_xt + offs_k[None, :]
    w_ptrs = w_ptr + rows_o[None, :] * stride_wo + offs_k[:, None]
    for k0 in range(0, IN, BLOCK_K):
        xt, wt = _k_tiles(x_ptrs, w_ptrs, offs_k, k0, IN, EVEN_IN)
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # The adapters: every expert's gate-scaled A x against the packed B, same accumulator.
    h_ptrs = h_ptr + rows_t[:, None] * stride_ht + offs_k[None, :]
    b_ptrs = b_ptr + rows_o[None, :] * stride_bo + offs_k[:, None]
    for k0 in range(0, NR, BLOCK_K):
        ht, bt = _k_tiles(h_ptrs, b_ptrs, offs_k, k0, NR, EVEN_NR)
        hg = _gated(ht, g_ptr, rows_t, stride_gt, offs_k, k0, NR, scaling, R, BLOCK_K)
        acc = tl.dot(hg, bt, acc, input_precision="ieee")
        h_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_o).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_o[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & (offs_o[None, :] < OUT))


@triton.jit
def _linear_lora_tma_kernel(
    x_desc, w_desc, bias_ptr, h_desc, g_ptr, b_desc, y_ptr,
    T, OUT, IN, NR, scaling,
    stride_gt, stride_yt,
    T_BUCKET,
    R: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
):
    """_linear_lora_kernel with the four operands loaded by TMA (host tensor descriptors): tiles past
    T, OUT or a K tail arrive zero-filled, so no load is masked or wrapped."""
    pid_t, pid_o = _tile(T, OUT, BLOCK_T, BLOCK_O, GROUP_T)
    off_t = pid_t * BLOCK_T
    off_o = pid_o * BLOCK_O
    offs_t = off_t + tl.arange(0, BLOCK_T)
    rows_t = (offs_t % T).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        acc = tl.dot(x_desc.load([off_t, k0]), w_desc.load([off_o, k0]).T, acc, input_precision="ieee")
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, NR, BLOCK_K):
        hg = _gated(h_desc.load([off_t, k0]), g_ptr, rows_t, stride_gt, offs_k, k0, NR, scaling, R, BLOCK_K)
        acc = tl.dot(hg, b_desc.load([off_o, k0]).T, acc, input_precision="ieee")
    offs_o = off_o + tl.arange(0, BLOCK_O)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o % OUT).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_o[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & (offs_o[None, :] < OUT))


# Hopper-sized tiles (the Triton matmul tutorial's and a few around them); timed once per
# (out, in, N r, token bucket) on the first call of that shape. Not tuned on the H200 yet.
_TILES = [(128, 256, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (64, 256, 4, 4), (128, 64, 4, 4), (64, 128, 4, 4)]


def _set_block_shapes(nargs):
    """TMA descriptors carry their box: set it to the config's tiles before each launch."""
    bt, bo, bk = nargs["BLOCK_T"], nargs["BLOCK_O"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bt, bk]
    nargs["w_desc"].block_shape = [bo, bk]
    nargs["h_desc"].block_shape = [bt, bk]
    nargs["b_desc"].block_shape = [bo, bk]


def _configs(pre_hook=None):
    return [triton.Config({"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_K": 64, "GROUP_T": 8}, num_warps=w, num_stages=s,
                          pre_hook=pre_hook) for bt, bo, w, s in _TILES]


_KEY = ["OUT", "IN", "NR", "T_BUCKET"]
_autotuned = triton.autotune(configs=_configs(), key=_KEY)(_linear_lora_kernel)
_autotuned_tma = triton.autotune(configs=_configs(_set_block_shapes), key=_KEY)(_linear_lora_tma_kernel)
# Under the interpreter (CPU tests) one small fixed tile, and no timing.
INTERPRETED_CONFIG = {"BLOCK_T": 16, "BLOCK_O": 32, "BLOCK_K": 16, "GROUP_T": 2}
# "auto" and "pointer": the pointer-load kernel. "tma": the TMA kernel where it applies (16-bit dtypes,
# 16-byte aligned rows and bases; Hopper or newer, or the interpreter), for benchmarks only: on an H200
# with Triton 3.6 three of its six tiles returned wrong rows at the 7B prefill shapes, one only in a few
# rows of 2048 (2026-12-05, benchmarks/probe_linear_lora.py, docs/paths.md "Fused prefill"), while the
# pointer kernel was right with every tile.
KERNEL = os.environ.get("ADAFUSE_LINEAR_LORA_KERNEL", "auto")
TMA_WARNING = ("linear_lora: the TMA kernel gave wrong results on an H200 (Triton 3.6) at some shapes "
               "(docs/paths.md, 'Fused prefill'); use it to benchmark only, kernel='auto' is the pointer kernel")


def tma_applies(*tensors: Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides; our tiles are sized for 16-bit types."""
    if any(t.dtype not in (torch.float16, torch.bfloat16) for t in tensors):
        return False
    if any(t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 for t in tensors):
        return False
    device = tensors[0].device
    return triton_interpreted() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def linear_lora_triton(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, gate_matrix: Tensor,
                       scaling: float, b_packed: Tensor, config: dict | None = None,
                       kernel: str | None = None) -> Tensor:
    """y = x W^T + bias + round(h * s G) @ Bp^T in one kernel (module doc); arguments checked by
    linear_lora.validate. `config`: a fixed tile (tests); default the autotuned one (the
    interpreter's small tile when TRITON_INTERPRET is set). `kernel`: "auto" or "pointer" (the
    pointer-load kernel), or "tma" (benchmarks only, see KERNEL; default: the module's KERNEL)."""
    t, n_in = x.shape
    out = weight.shape[0]
    nr = b_packed.shape[1]
    r = nr // gate_matrix.shape[1] if nr else 1
    y = torch.empty(t, out, dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    if config is None and triton_interpreted():
        config = INTERPRETED_CONFIG
    kernel = kernel or KERNEL
    if kernel not in ("auto", "pointer", "tma"):
        raise ValueError(f"linear_lora: kernel={kernel!r}; use 'auto' (the pointer kernel), 'pointer' or 'tma'")
    use_tma = kernel == "tma"
    if use_tma:
        if not tma_applies(x, weight, *((h, b_packed) if nr else ())):
            raise ValueError("linear_lora: kernel='tma' needs fp16/bf16 operands with 16-byte aligned bases and "
                             "row strides on a Hopper GPU; use kernel='auto'")
        if not triton_interpreted():
            warnings.warn(TMA_WARNING, RuntimeWarning, stacklevel=2)

    def grid(meta):
        return (triton.cdiv(t, meta["BLOCK_T"]) * triton.cdiv(out, meta["BLOCK_O"]),)
    common = dict(R=r, HAS_BIAS=bias is not None, **(config or {}))
    bias_arg = bias if bias is not None else y
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        bt, bo, bk = (config["BLOCK_T"], config["BLOCK_O"], config["BLOCK_K"]) if config else (1, 1, 1)
        if not nr:  # no adapter term: descriptors over x and W that the (empty) loop never reads
            h, b_packed = x, weight
        descs = (TensorDescriptor.from_tensor(x, [bt, bk]), TensorDescriptor.from_tensor(weight, [bo, bk]),
                 TensorDescriptor.from_tensor(h, [bt, bk]), TensorDescriptor.from_tensor(b_packed, [bo, bk]))
        launch = _linear_lora_tma_kernel if config else _autotuned_tma
        launch[grid](descs[0], descs[1], bias_arg, descs[2], gate_matrix, descs[3], y,
                     t, out, n_in, nr, float(scaling), gate_matrix.stride(0), y.stride(0),
                     triton.next_power_of_2(t), **common)
        return y
    block_k = config["BLOCK_K"] if config else 64  # every autotuned config has BLOCK_K 64
    launch = _linear_lora_kernel if config else _autotuned
    launch[grid](
        x, weight, bias_arg, h, gate_matrix, b_packed, y,
        t, out, n_in, nr, float(scaling),
        x.stride(0), weight.stride(0), h.stride(0), gate_matrix.stride(0), b_packed.stride(0), y.stride(0),
        triton.next_power_of_2(t),
        EVEN_IN=n_in % block_k == 0, EVEN_NR=nr % block_k == 0, **common,
    )
    return y
