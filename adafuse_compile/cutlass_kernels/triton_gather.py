"""Triton gather-LoRA: one shrink launch and one expand launch for M modules sharing x.

Rows: the T*k (token, slot) pairs, row = t*k + j, expert experts[t, j], gate gates[t, j].

Shrink (grid: row block, expert e, module m x K split):
    h[m, row, :] = s * g[row] * A_m[e] @ x[row // k]      for the rows whose expert is e
The rows of one program all use expert e, so A_m[e] is one tl.dot operand and each of its
tiles is read once per row block (SGMV). Two ways to find the rows, picked by the launcher:
  masked (T*k <= MASKED_MAX_ROWS, decode): one row block holds every row; the program keeps
      those with experts == e and skips the K loop when there are none (no A bytes read for
      unused experts). No metadata launches.
  sorted (prefill): the launcher sorts the rows by expert and finds each expert's segment
      (torch.sort + torch.searchsorted: device ops, no host sync); programs past the end of
      their expert's segment do nothing.
With SPLIT_K > 1 (decode: few active programs) each program covers a slice of `in` and stores
its partial result in its own slice of h ([SPLIT_K, M, rows, r] fp32); the expand sums the
slices when it loads h. Every (slice, row) a later read uses is written by exactly one program on
every call, so h needs no zeroing: no memset launch, no atomics, and a deterministic sum. (The
first version added the partials with fp32 atomics into a zeroed h: one more launch per call,
a third of a decode step's gather launches.)

Expand (grid: token block, group of O_ITERS out blocks, module m):
    y_m[t, :] = sum_j B_m[e_tj] @ h[m, t*k + j, :]
The program loads its tokens' expert ids and h rows once, then for each expert e used in
the block forms H_e[t] = sum_j [e_tj == e] h[m, t*k+j] and accumulates H_e @ B_m[e]^T in
fp32 (a tl.dot per expert present; absent experts cost a compare). The sum over the k slots
stays in registers, so y_m is written once, in x's dtype, with no atomics. The cost is
compute: a dense block runs one dot per expert present (up to N) instead of k; decode is
bandwidth-bound so it is free there, prefill pays (docs/gather.md).

Tables (int64 [M, 3]: A_m and B_m as element offsets from the plan's reference tensor, and out_m)
are built once per adapter set by the launcher (`GatherPlan`), cached by the caller on data_ptrs,
and read in the kernels. The outputs are new tensors on every call, so their offsets from the same
reference are passed as scalar arguments (up to MAX_MODULES_PER_LAUNCH per expand launch; more
modules take more launches). Offsets from a kernel argument, not raw addresses: see
_module_pointers.
"""
from __future__ import annotations

import json
import math
import os

import torch
from torch import Tensor

import triton
import triton.language as tl

from adafuse_compile.cutlass_kernels.gather_lora import (
    MAX_TUPLE_KEYS, SORTED_MIN_ROWS, TUPLE_BLOCK_T, expert_segments, tuple_blocks, tuple_keys,
)

MAX_MODULES_PER_LAUNCH = 8
# Added to the outputs' offsets (y0..y7) and taken off in the kernels: Triton compiles a kernel per
# integer argument type, i32 or i64 by the value, so offsets on both sides of 2^31 elements (4 GiB of
# bf16 away from the reference) would compile the expands again in the middle of a run, per
# combination. Biased, every offset on a real GPU is an i64; 2^40 keeps the multiples of 16.
OFFSET_BIAS = tl.constexpr(1 << 40)
# Rows (T*k) up to which the shrink uses the masked form (one row block, no sort).
MASKED_MAX_ROWS = SORTED_MIN_ROWS - 1


@triton.jit
def _shrink_kernel(
    x_ptr, desc_ptr, ref_ptr, experts_ptr, gates_ptr, rows_ptr, seg_ptr, h_ptr,
    n_rows, n_in, x_stride, n_modules, scaling,
    K_SEL: tl.constexpr, R: tl.constexpr, R_P2: tl.constexpr, SPLIT_K: tl.constexpr,
    SORTED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
):
    rb = tl.program_id(0)
    e = tl.program_id(1)
    pid_z = tl.program_id(2)
    m = pid_z // SPLIT_K
    sk = pid_z % SPLIT_K

    if SORTED:
        start = tl.load(seg_ptr + e)
        end = tl.load(seg_ptr + e + 1)
        pos = start + rb * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < end
        rows = tl.load(rows_ptr + pos, mask=valid, other=0).to(tl.int64)
        n_valid = end - start - rb * BLOCK_M
    else:
        rows = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        ids = tl.load(experts_ptr + rows, mask=rows < n_rows, other=-1)
        valid = ids == e
        n_valid = tl.sum(valid.to(tl.int32))

    if n_valid > 0:
        a_off = tl.load(desc_ptr + m * 3)
        if ALIGNED:
            # Table-loaded offsets carry no alignment: without the hint Triton does not
            # vectorise (SGMM on H200: 24% -> 50% of copy bandwidth, DESIGN.md section 5).
            a_off = tl.multiple_of(a_off, 128 // ref_ptr.dtype.element_ty.primitive_bitwidth)  # 16 bytes
            n_in = tl.multiple_of(n_in, 8)
            x_stride = tl.multiple_of(x_stride, 8)
        a_ptr = ref_ptr + a_off + e.to(tl.int64) * R * n_in  # A_m[e]: [R, in]
        tok = rows // K_SEL
        offs_r = tl.arange(0, R_P2)
        mask_r = offs_r < R
        offs_k = tl.arange(0, BLOCK_K)
        k_blocks = tl.cdiv(n_in, BLOCK_K)
        per_split = tl.cdiv(k_blocks, SPLIT_K) * BLOCK_K
        k_lo = sk * per_split
        k_hi = tl.minimum(k_lo + per_split, n_in)
        acc = tl.zeros((BLOCK_M, R_P2), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_hi
            xt = tl.load(x_ptr + tok[:, None] * x_stride + kk[None, :],
                         mask=valid[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptr + offs_r[None, :] * n_in + kk[:, None],
                         mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, R]
            if IEEE:
                acc = tl.dot(xt, at, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, at, acc)
        g = tl.load(gates_ptr + rows, mask=valid, other=0.0)
        acc = acc * (g * scaling)[:, None]
        # This split's own slice of h: a plain store (see the module docstring).
        h_ptrs = h_ptr + ((sk * n_modules + m) * n_rows + rows)[:, None] * R + offs_r[None, :]
        tl.store(h_ptrs, acc, mask=valid[:, None] & mask_r[None, :])


@triton.jit
def _add_expert(acc, sel, h3, b_ptr, e, n_out, offs_o, offs_r, b_mask, R: tl.constexpr, elem: tl.constexpr,
                IEEE: tl.constexpr):
    """acc += H_e @ B_m[e]^T, H_e[t] = sum_j [e_tj = e] h[t, j]: one expert's share of an expand block."""
    he = tl.sum(tl.where(sel[:, :, None], h3, 0.0), axis=1)  # [BLOCK_T, R]
    # n_out is int64 (from the table), so the expert offset cannot overflow.
    bt = tl.load(b_ptr + (e * n_out + offs_o[:, None]) * R + offs_r[None, :], mask=b_mask, other=0.0)  # [BLOCK_O, R]
    if IEEE:
        return tl.dot(he, tl.trans(bt), acc, input_precision="ieee")
    # h rounded to x's dtype for the tensor cores (vLLM's expand does the same); products and the
    # sum stay fp32.
    return tl.dot(he.to(elem), tl.trans(bt), acc)


@triton.jit
def _module_pointers(ref_ptr, desc_ptr, m, ml, y0, y1, y2, y3, y4, y5, y6, y7, ALIGNED: tl.constexpr):
    """Module m's B_m and its output (this launch's ml-th one), as the reference tensor's pointer
    plus element offsets (the table's, and y0..y7). This helper used to return pointers made from
    addresses (int_to_ptr), which the caller hinted 16-byte aligned: Triton 3.6 (the H200's) drops
    a hint on a helper's result, and its expand kernels loaded B and stored y 2 bytes at a time
    (Triton 3.9 kept the hint). Offsets hinted here, added to a kernel argument that the JIT
    specializes as aligned, vectorize in both (test_kernels_compile_for_sm90 checks the layouts)."""
    b_off = tl.load(desc_ptr + m * 3 + 1)
    y_off = tl.where(ml == 0, y0, tl.where(ml == 1, y1, tl.where(ml == 2, y2, tl.where(
        ml == 3, y3, tl.where(ml == 4, y4, tl.where(ml == 5, y5, tl.where(
            ml == 6, y6, y7))))))) - OFFSET_BIAS
    if ALIGNED:  # 16 bytes: 8 elements of 16 bits, 4 of fp32
        b_off = tl.multiple_of(b_off, 128 // ref_ptr.dtype.element_ty.primitive_bitwidth)
        y_off = tl.multiple_of(y_off, 128 // ref_ptr.dtype.element_ty.primitive_bitwidth)
    return ref_ptr + b_off, ref_ptr + y_off


@triton.jit
def _load_h(h_ptr, experts_ptr, toks, mask_t, m, n_rows, n_modules, K_SEL: tl.constexpr,
            K_P2: tl.constexpr, R: tl.constexpr, R_P2: tl.constexpr, SPLIT_K: tl.constexpr):
    """The tokens' expert ids [BLOCK_T, K_P2] and their h rows of module m [BLOCK_T, K_P2, R_P2],
    summed over the shrink's K-split slices (unrolled, so the loads overlap)."""
    offs_j = tl.arange(0, K_P2)
    offs_r = tl.arange(0, R_P2)
    rows = toks.to(tl.int64)[:, None] * K_SEL + offs_j[None, :]
    mask_tj = mask_t[:, None] & (offs_j < K_SEL)[None, :]
    ids = tl.load(experts_ptr + rows, mask=mask_tj, other=-1)
    h_offs = (m * n_rows + rows)[:, :, None] * R + offs_r[None, None, :]
    h_mask = mask_tj[:, :, None] & (offs_r < R)[None, None, :]
    h3 = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0)
    for sk in tl.static_range(1, SPLIT_K):
        h3 += tl.load(h_ptr + sk * n_modules * n_rows * R + h_offs, mask=h_mask, other=0.0)
    return ids, h3


@triton.jit
def _expand_kernel(
    h_ptr, desc_ptr, experts_ptr, dtype_ref,
    y0, y1, y2, y3, y4, y5, y6, y7,  # this launch's outputs, element offsets from dtype_ref (0 unused)
    n_tokens, n_rows, n_experts, n_modules, m_first,
    K_SEL: tl.constexpr, K_P2: tl.constexpr, R: tl.constexpr, R_P2: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
    N_EXP: tl.constexpr, UNROLL: tl.constexpr, O_ITERS: tl.constexpr,
):
    elem = dtype_ref.dtype.element_ty
    tb = tl.program_id(0)
    ob0 = tl.program_id(1) * O_ITERS  # this program's first out block of O_ITERS
    ml = tl.program_id(2)  # module within this launch
    m = m_first + ml
    n_out = tl.load(desc_ptr + m * 3 + 2)
    if ob0 * BLOCK_O < n_out:
        b_ptr, y_ptr = _module_pointers(dtype_ref, desc_ptr, m, ml, y0, y1, y2, y3, y4, y5, y6, y7, ALIGNED)
        if ALIGNED:
            n_out = tl.multiple_of(n_out, 8)
        toks = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = toks < n_tokens
        # h (every K-split slice) is read once per program and used for its O_ITERS out blocks:
        # with one block per program, re-reading h was most of a batch-32 expand's traffic.
        ids, h3 = _load_h(h_ptr, experts_ptr, toks, mask_t, m, n_rows, n_modules, K_SEL, K_P2, R, R_P2, SPLIT_K)
        offs_r = tl.arange(0, R_P2)
        mask_r = offs_r < R
        for oi in range(O_ITERS):
            offs_o = (ob0 + oi) * BLOCK_O + tl.arange(0, BLOCK_O)
            mask_o = offs_o < n_out
            acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
            b_mask = mask_o[:, None] & mask_r[None, :]
            if UNROLL:
                # Every expert, unrolled, loads unconditional: the N B-tile loads can all be in
                # flight at once, where the loop below waits for each in turn. For blocks that use
                # (nearly) all experts (batch decode); an absent expert costs its B tile's bytes.
                for e in tl.static_range(N_EXP):
                    acc = _add_expert(acc, ids == e, h3, b_ptr, e, n_out, offs_o, offs_r, b_mask, R, elem, IEEE)
            else:
                for e in range(0, n_experts):
                    sel = ids == e
                    if tl.sum(sel.to(tl.int32)) > 0:
                        acc = _add_expert(acc, sel, h3, b_ptr, e, n_out, offs_o, offs_r, b_mask, R, elem, IEEE)
            y_ptrs = y_ptr + toks.to(tl.int64)[:, None] * n_out + offs_o[None, :]
            tl.store(y_ptrs, acc.to(elem), mask=mask_t[:, None] & mask_o[None, :])


@triton.jit
def _expand_sets_kernel(
    h_ptr, desc_ptr, experts_ptr, order_ptr, work_ptr, dtype_ref,
    y0, y1, y2, y3, y4, y5, y6, y7,  # this launch's outputs, element offsets from dtype_ref (0 unused)
    n_rows, n_work, n_experts, n_modules, m_first,
    K_SEL: tl.constexpr, K_P2: tl.constexpr, R: tl.constexpr, R_P2: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
    O_ITERS: tl.constexpr,
):
    """The prefill expand: one program per (block of tokens that share a set of experts, O_ITERS
    out blocks, module), from tuple_blocks' work list; exactly one dot per expert of the set."""
    elem = dtype_ref.dtype.element_ty
    w = tl.program_id(0)
    ob0 = tl.program_id(1) * O_ITERS
    ml = tl.program_id(2)
    m = m_first + ml
    n_out = tl.load(desc_ptr + m * 3 + 2)
    key = tl.load(work_ptr + w)
    start = tl.load(work_ptr + n_work + w)
    end = tl.load(work_ptr + 2 * n_work + w)
    if (ob0 * BLOCK_O < n_out) & (end > start):
        b_ptr, y_ptr = _module_pointers(dtype_ref, desc_ptr, m, ml, y0, y1, y2, y3, y4, y5, y6, y7, ALIGNED)
        if ALIGNED:
            n_out = tl.multiple_of(n_out, 8)
        offs_r = tl.arange(0, R_P2)
        mask_r = offs_r < R
        # A work item holds at most BLOCK_T tokens when its list was built for this block size
        # (one pass); a list built with larger blocks still computes right, in several passes.
        for t0 in range(start, end, BLOCK_T):
            pos = t0 + tl.arange(0, BLOCK_T)
            mask_t = pos < end
            toks = tl.load(order_ptr + pos, mask=mask_t, other=0).to(tl.int64)
            # Read once, used for the program's O_ITERS out blocks (see _expand_kernel).
            ids, h3 = _load_h(h_ptr, experts_ptr, toks, mask_t, m, n_rows, n_modules, K_SEL, K_P2, R, R_P2, SPLIT_K)
            for oi in range(O_ITERS):
                offs_o = (ob0 + oi) * BLOCK_O + tl.arange(0, BLOCK_O)
                mask_o = offs_o < n_out
                b_mask = mask_o[:, None] & mask_r[None, :]
                acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
                # The key's digits are the set's sorted ids, base N + 1, read from the last; a
                # repeated expert (adjacent once sorted) is one dot (its where-sum takes every slot
                # that names it); digit N is an out-of-range id and contributes nothing.
                rest = key
                prev = -1
                for _ in tl.static_range(K_SEL):
                    e = rest % (n_experts + 1)
                    rest = rest // (n_experts + 1)
                    if (e < n_experts) & (e != prev):
                        acc = _add_expert(acc, ids == e, h3, b_ptr, e, n_out, offs_o, offs_r, b_mask, R, elem, IEEE)
                    prev = e
                y_ptrs = y_ptr + toks[:, None] * n_out + offs_o[None, :]
                tl.store(y_ptrs, acc.to(elem), mask=mask_t[:, None] & mask_o[None, :])


@triton.jit
def _expand_experts_kernel(
    h_ptr, desc_ptr, rows_ptr, seg_ptr, dtype_ref,
    y0, y1, y2, y3, y4, y5, y6, y7,  # this launch's [T, k, out] outputs, element offsets from dtype_ref
    n_rows, n_experts, m_first, n_modules, n_out_groups,
    R: tl.constexpr, R_P2: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr, O_ITERS: tl.constexpr,
):
    """The per-slot prefill expand: the rows sorted by expert (the shrink's segments); program
    (row block, expert e, module x group of O_ITERS out blocks) computes y[row] = B_m[e] @ h[m, row]
    for its rows, one dot per out block, h read once, and stores it at row = t*k + j of the
    [T, k, out] output, so each slot's term lands apart and the caller sums the k slots (in the add
    it already has). B_m[e] is read once per row block of its expert, not once per block of tokens.
    Programs of e == N store zeros to the rows whose expert id is out of range (outside every
    segment): every row is written."""
    elem = dtype_ref.dtype.element_ty
    rb = tl.program_id(0)
    e = tl.program_id(1)
    ml = tl.program_id(2) // n_out_groups
    ob0 = (tl.program_id(2) % n_out_groups) * O_ITERS
    m = m_first + ml
    n_out = tl.load(desc_ptr + m * 3 + 2)
    if ob0 * BLOCK_O < n_out:
        b_ptr, y_ptr = _module_pointers(dtype_ref, desc_ptr, m, ml, y0, y1, y2, y3, y4, y5, y6, y7, ALIGNED)
        if ALIGNED:
            n_out = tl.multiple_of(n_out, 8)
        offs_r = tl.arange(0, R_P2)
        mask_r = offs_r < R
        if e < n_experts:
            start = tl.load(seg_ptr + e)
            pos = start + rb * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = pos < tl.load(seg_ptr + e + 1)
        else:
            pos = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64, as in the branch above
            valid = ((pos < tl.load(seg_ptr)) | (pos >= tl.load(seg_ptr + n_experts))) & (pos < n_rows)
        if tl.sum(valid.to(tl.int32)) > 0:
            rows = tl.load(rows_ptr + pos, mask=valid, other=0).to(tl.int64)
            if e < n_experts:
                h_offs = (m * n_rows + rows)[:, None] * R + offs_r[None, :]
                h_mask = valid[:, None] & mask_r[None, :]
                h = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0)
                for sk in tl.static_range(1, SPLIT_K):
                    h += tl.load(h_ptr + sk * n_modules * n_rows * R + h_offs, mask=h_mask, other=0.0)
            else:
                h = tl.zeros((BLOCK_M, R_P2), dtype=tl.float32)
            for oi in range(O_ITERS):
                offs_o = (ob0 + oi) * BLOCK_O + tl.arange(0, BLOCK_O)
                mask_o = offs_o < n_out
                acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
                if e < n_experts:
                    bt = tl.load(b_ptr + (e * n_out + offs_o[:, None]) * R + offs_r[None, :],
                                 mask=mask_o[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_O, R]
                    if IEEE:
                        acc = tl.dot(h, tl.trans(bt), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(h.to(elem), tl.trans(bt), acc)
                y_ptrs = y_ptr + rows[:, None] * n_out + offs_o[None, :]
                tl.store(y_ptrs, acc.to(elem), mask=valid[:, None] & mask_o[None, :])


# Configuration. Started from vLLM's shrink/expand defaults; changed where bench_gather.py --sweep
# measured a better value on the H200 (benchmarks/results/gather_h200_sweep.json, 7B groups
# q,k,v / o / gate,up / down, T = 1..512).
# Shrink K block for 16-bit inputs: 128 was faster than 64 at every measured shape and group (by
# 4-20% per call, most for down, in = 11008, at T = 1: 15.2 -> 12.1 us). fp32 (the CPU tests,
# the interpreter) keeps 64, so that small odd `in` still spans several K blocks there.
SHRINK_BLOCK_K = 128
SHRINK_BLOCK_K_FP32 = 64
SORTED_BLOCK_M = 64
EXPAND_BLOCK_O = 64
TARGET_PROGRAMS_PER_SM = 2
# The expand loads every split's partial of h: at most this many. The sweep's split 16 / 32 were
# slower at every T > 1 and within noise at T = 1.
MAX_SPLIT_K = 8
# Decode expand with every expert unrolled (EXPAND_UNROLL) from this many rows per expert, and
# only where the expand has at least UNROLL_MIN_PROGRAMS_PER_SM programs per SM. The first sweep
# (gather_h200_sweep.json, BLOCK_K 64) had it faster at T = 32 in all four groups; measured again
# with BLOCK_K 128 (gather_h200_variants_decode_run2.json) it helped only gate,up, the group with
# the most out blocks (29.9 us unrolled with 2 blocks per program, 36.2 not unrolled), and cost
# q,k,v / o / down 2.4-2.9 us each (64 out blocks per module). At T = 8 within noise, at T = 1
# slower (most experts absent).
UNROLL_MIN_ROWS_PER_EXPERT = 8
UNROLL_MIN_PROGRAMS_PER_SM = 2
# The expand by sets (prefill): out block; work items hold at most TUPLE_BLOCK_T tokens.
SETS_BLOCK_O = 64
# The per-slot expand by expert (prefill, backend setting prefill_expand="slots"): out block. Not
# measured yet.
SLOTS_BLOCK_O = 64
# An expand program covers several out blocks with one read of h (O_ITERS, SETS_O_ITERS): h, fp32
# with every K-split slice, was re-read for every out block. Measured on the H200
# (benchmarks/results/gather_h200_variants_{prefill,decode}_run1.json): the sets expand at T = 512 is
# 1.6-2.3x faster with 4 blocks per program than with 1, and 4 beat 16 (qkv 78 vs 89 us); at
# decode more blocks per program cost parallelism and lost (T = 1, 8: 1.2-4x slower), except
# where h is largest, the unrolled expand at T = 32 (gate,up: 41.7 -> 29.7 us with 2; the other
# groups, with fewer programs, lost). So: at most MAX_O_ITERS, and only while EXPAND_PROGRAMS_PER_SM
# programs per SM remain (the unrolled expand: UNROLLED_PROGRAMS_PER_SM).
MAX_O_ITERS = 4
EXPAND_PROGRAMS_PER_SM = 4
UNROLLED_PROGRAMS_PER_SM = 1


# Tuning knob for benchmarks, not for users: a JSON object of config overrides applied to every
# call (e.g. ADAFUSE_GATHER_CONFIG='{"SPLIT_K": 16}'), so that an end-to-end run (bench_decode.py)
# can try a config that bench_gather.py --sweep found before it becomes the default here.
CONFIG_ENV = "ADAFUSE_GATHER_CONFIG"
CONFIG_KEYS = ("SORTED", "BLOCK_M", "BLOCK_K", "SPLIT_K", "BLOCK_T", "BLOCK_O", "EXPAND_UNROLL", "EXPAND_SETS",
               "SETS_BLOCK_T", "SETS_BLOCK_O", "SETS_WARPS", "SLOTS_BLOCK_O", "O_ITERS", "SETS_O_ITERS",
               "SLOTS_O_ITERS")


def env_overrides() -> dict:
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"${CONFIG_ENV} is not JSON ({exc}): {raw!r}; e.g. '{{\"SPLIT_K\": 16}}'") from None
    unknown = set(cfg) - set(CONFIG_KEYS) if isinstance(cfg, dict) else {"(not an object)"}
    if unknown:
        raise ValueError(f"${CONFIG_ENV} has unknown keys {sorted(unknown)}; allowed: {list(CONFIG_KEYS)}")
    return cfg


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _out_iters(programs: int, out_blocks: int, sms: int, per_sm: int = EXPAND_PROGRAMS_PER_SM) -> int:
    """Out blocks per expand program: the most (a power of two, at most MAX_O_ITERS and the
    blocks there are) that leave `programs` (the count at one block each) `per_sm` programs per SM."""
    iters = 1
    while iters * 2 <= min(MAX_O_ITERS, out_blocks) and programs // (iters * 2) >= per_sm * sms:
        iters *= 2
    return iters


class GatherPlan:
    """Device table for one adapter set (lora_A/lora_B of the M modules): their element offsets
    from `dtype_ref`, and each module's out size."""

    def __init__(self, lora_A: list[Tensor], lora_B: list[Tensor]):
        dev = lora_A[0].device
        self.device = dev
        self.dtype = lora_A[0].dtype
        self.n_experts, self.r, self.n_in = (int(s) for s in lora_A[0].shape)
        self.outs = [int(b.shape[1]) for b in lora_B]
        # The kernels address A_m, B_m and the outputs as element offsets from this tensor's
        # pointer (_module_pointers says why); it is also the kernels' dtype.
        self.dtype_ref = torch.empty(1, dtype=self.dtype, device=dev)
        rows = [[self.offset(a), self.offset(b), o] for a, b, o in zip(lora_A, lora_B, self.outs)]
        # Built once per adapter set: the only host-to-device copy this plan makes.
        self.desc = torch.tensor(rows, dtype=torch.int64).to(dev)
        self.expert_ids = torch.arange(self.n_experts + 1, device=dev)
        self.aligned = (
            self.dtype_ref.data_ptr() % 16 == 0
            and all(t.data_ptr() % 16 == 0 for t in (*lora_A, *lora_B))
            and self.n_in % 8 == 0 and self.r % 8 == 0 and all(o % 8 == 0 for o in self.outs)
        )
        self.ieee = self.dtype == torch.float32
        self.r_p2 = _pow2_at_least(self.r, 16)
        if dev.type == "cuda":
            self.sms = torch.cuda.get_device_properties(dev).multi_processor_count
        else:
            self.sms = 2  # interpreter: a few programs exercise the split-K path

    def offset(self, t: Tensor) -> int:
        """t's address as an element offset from dtype_ref's (both of the plan's dtype)."""
        delta = t.data_ptr() - self.dtype_ref.data_ptr()
        if t.dtype != self.dtype or delta % t.element_size():
            raise ValueError(f"gather_lora: a {t.dtype} tensor at {t.data_ptr():#x} is not addressable in "
                             f"{self.dtype} elements from the plan's reference")
        return delta // t.element_size()

    def new_outputs(self, x: Tensor, k: int | None = None) -> list[Tensor]:
        """[T, out_m] deltas, or with `k` the per-slot terms [T, k, out_m]."""
        slots = () if k is None else (k,)
        return [torch.empty(x.shape[0], *slots, o, dtype=x.dtype, device=x.device) for o in self.outs]

    def config(self, n_tokens: int, k: int, overrides: dict | None = None) -> dict:
        """Block sizes and K split for this call's shape (a pure function of the shape)."""
        n_rows = n_tokens * k
        m = len(self.outs)
        # 128 was measured at r = 64 only; ranks above 128 keep the 64 of the earlier GPU tests.
        block_k = SHRINK_BLOCK_K_FP32 if self.dtype == torch.float32 or self.r_p2 > 128 else SHRINK_BLOCK_K
        if n_rows <= MASKED_MAX_ROWS:
            sorted_, block_m = False, _pow2_at_least(n_rows, 16)
            active = min(self.n_experts, n_rows) * m
        else:
            sorted_, block_m = True, SORTED_BLOCK_M
            active = (triton.cdiv(n_rows, block_m) + self.n_experts) * m
        k_blocks = triton.cdiv(self.n_in, block_k)
        split = 1
        target = TARGET_PROGRAMS_PER_SM * self.sms
        while split * 2 * active <= target and split * 2 <= k_blocks // 2 and split * 2 <= MAX_SPLIT_K:
            split *= 2
        # Expand: token block up to 32 rows of h (h block in registers: 32 x k x r fp32).
        block_t = _pow2_at_least(min(n_tokens, 32), 16)
        # Prefill: the expand by sets of experts (tuple_blocks), where the key space is small.
        sets = sorted_ and tuple_keys(self.n_experts, k) <= MAX_TUPLE_KEYS
        m_launch = min(m, MAX_MODULES_PER_LAUNCH)
        max_out = max(self.outs)

        def programs(groups: int, block_o: int) -> tuple[int, int]:
            """An expand launch's programs at one out block each, and its out blocks per module."""
            out_blocks = triton.cdiv(max_out, block_o)
            return groups * out_blocks * m_launch, out_blocks
        expand_programs, _ = programs(triton.cdiv(n_tokens, block_t), EXPAND_BLOCK_O)
        unroll = (not sorted_ and n_rows >= UNROLL_MIN_ROWS_PER_EXPERT * self.n_experts
                  and expand_programs >= UNROLL_MIN_PROGRAMS_PER_SM * self.sms)
        cfg = dict(SORTED=sorted_, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split,
                   BLOCK_T=block_t, BLOCK_O=EXPAND_BLOCK_O, EXPAND_UNROLL=unroll, EXPAND_SETS=sets,
                   SETS_BLOCK_T=TUPLE_BLOCK_T, SETS_BLOCK_O=SETS_BLOCK_O, SETS_WARPS=4,
                   SLOTS_BLOCK_O=SLOTS_BLOCK_O)
        cfg.update(env_overrides())
        cfg.update(overrides or {})
        # Out blocks per expand program, from the block sizes finally in force: (program groups,
        # out block, programs per SM to keep). The sets expand's work items in use: the token blocks
        # plus at most one partial block per set present (C(N + k - 1, k) multisets of k experts);
        # the slots expand's row blocks: about one per expert more than the rows need.
        groups = {
            "O_ITERS": (triton.cdiv(n_tokens, cfg["BLOCK_T"]), cfg["BLOCK_O"],
                        UNROLLED_PROGRAMS_PER_SM if cfg["EXPAND_UNROLL"] else EXPAND_PROGRAMS_PER_SM),
            "SETS_O_ITERS": (triton.cdiv(n_tokens, cfg["SETS_BLOCK_T"])
                             + min(n_tokens, math.comb(self.n_experts + k - 1, k)), cfg["SETS_BLOCK_O"],
                             EXPAND_PROGRAMS_PER_SM),
            "SLOTS_O_ITERS": (triton.cdiv(n_rows, SORTED_BLOCK_M) + self.n_experts, cfg["SLOTS_BLOCK_O"],
                              EXPAND_PROGRAMS_PER_SM),
        }
        for key, (n_groups, block_o, per_sm) in groups.items():
            if key not in cfg:
                cfg[key] = _out_iters(*programs(n_groups, block_o), self.sms, per_sm)
        return cfg

    def run(self, x: Tensor, experts: Tensor, gates: Tensor, scaling: float,
            config: dict | None = None, rows: Tensor | None = None,
            segments: Tensor | None = None, outs: list[Tensor] | None = None,
            set_order: Tensor | None = None, set_work: Tensor | None = None,
            per_slot: bool = False) -> list[Tensor]:
        """`rows`, `segments`: this step's expert_segments, if the caller computed them once;
        `set_order`, `set_work`: its tuple_blocks, likewise. `per_slot`: return each slot's term
        apart, [T, k, out_m] (the expand by expert, any T).
        `outs`: the outputs, allocated by the caller (on the stream that will read them)."""
        n_tokens, k = experts.shape
        n_rows = n_tokens * k
        m_total = len(self.outs)
        if outs is None:
            outs = self.new_outputs(x, k if per_slot else None)
        if n_tokens == 0:
            return outs
        cfg = self.config(n_tokens, k, config)
        if per_slot and not cfg["SORTED"]:  # the expand by expert reads the shrink's segments
            cfg.update(SORTED=True, BLOCK_M=SORTED_BLOCK_M)
        # Rows may be padded (Inductor pads a buffer's rows to 128 bytes on the GPU, and the ops
        # take x in the layout it has, see gather_lora.py): the shrink reads x by its row stride.
        if x.stride(-1) != 1 or (n_tokens > 1 and x.stride(0) < self.n_in):
            x = x.contiguous()
        x_stride = x.stride(0) if n_tokens > 1 else self.n_in  # one row: any stride reads the same
        ids = experts.contiguous()
        g = gates.to(torch.float32).contiguous()
        # the outputs too: a caller's (outs=) may be views at any offset
        aligned = self.aligned and x_stride % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (x, *outs))
        # Every slice and row the expand reads is stored by the shrink: empty, not zeros (no memset).
        h = torch.empty(cfg["SPLIT_K"], m_total, n_rows, self.r, dtype=torch.float32, device=x.device)

        if not cfg["SORTED"]:
            rows, seg = ids, ids  # unused in the masked form
        elif rows is None:  # not computed once for the step: sort here (2 more launches)
            rows, seg = expert_segments(ids, self.n_experts, self.expert_ids)
        else:
            seg = segments
        row_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
        _shrink_kernel[(row_blocks, self.n_experts, m_total * cfg["SPLIT_K"])](
            x, self.desc, self.dtype_ref, ids, g, rows, seg, h, n_rows, self.n_in, x_stride, m_total, float(scaling),
            K_SEL=k, R=self.r, R_P2=self.r_p2, SPLIT_K=cfg["SPLIT_K"], SORTED=cfg["SORTED"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], ALIGNED=aligned,
            IEEE=self.ieee,
        )
        max_out = max(self.outs)
        sets = cfg["EXPAND_SETS"] and not per_slot
        if sets and set_order is None:  # not computed once for the step
            set_order, set_work = tuple_blocks(ids, self.n_experts, cfg["SETS_BLOCK_T"])
        common = dict(R=self.r, R_P2=self.r_p2, SPLIT_K=cfg["SPLIT_K"], ALIGNED=aligned, IEEE=self.ieee)
        for m0 in range(0, m_total, MAX_MODULES_PER_LAUNCH):  # one expand launch per 8 modules
            chunk = outs[m0:m0 + MAX_MODULES_PER_LAUNCH]
            addrs = [self.offset(y) + OFFSET_BIAS.value for y in chunk] + \
                [OFFSET_BIAS.value] * (MAX_MODULES_PER_LAUNCH - len(chunk))
            if per_slot:
                n_out_groups = triton.cdiv(triton.cdiv(max_out, cfg["SLOTS_BLOCK_O"]), cfg["SLOTS_O_ITERS"])
                _expand_experts_kernel[(row_blocks, self.n_experts + 1, len(chunk) * n_out_groups)](
                    h, self.desc, rows, seg, self.dtype_ref, *addrs, n_rows, self.n_experts, m0, m_total,
                    n_out_groups, BLOCK_M=cfg["BLOCK_M"], BLOCK_O=cfg["SLOTS_BLOCK_O"], O_ITERS=cfg["SLOTS_O_ITERS"],
                    **common,
                )
            elif sets:
                n_work = set_work.shape[1]
                out_groups = triton.cdiv(triton.cdiv(max_out, cfg["SETS_BLOCK_O"]), cfg["SETS_O_ITERS"])
                _expand_sets_kernel[(n_work, out_groups, len(chunk))](
                    h, self.desc, ids, set_order, set_work, self.dtype_ref, *addrs, n_rows, n_work,
                    self.n_experts, m_total, m0, K_SEL=k, K_P2=_pow2_at_least(k, 2),
                    BLOCK_T=cfg["SETS_BLOCK_T"], BLOCK_O=cfg["SETS_BLOCK_O"], O_ITERS=cfg["SETS_O_ITERS"],
                    num_warps=cfg["SETS_WARPS"], **common,
                )
            else:
                out_groups = triton.cdiv(triton.cdiv(max_out, cfg["BLOCK_O"]), cfg["O_ITERS"])
                grid = (triton.cdiv(n_tokens, cfg["BLOCK_T"]), out_groups, len(chunk))
                _expand_kernel[grid](
                    h, self.desc, ids, self.dtype_ref, *addrs, n_tokens, n_rows, self.n_experts, m_total, m0,
                    K_SEL=k, K_P2=_pow2_at_least(k, 2), BLOCK_T=cfg["BLOCK_T"], BLOCK_O=cfg["BLOCK_O"],
                    N_EXP=self.n_experts, UNROLL=bool(cfg["EXPAND_UNROLL"]), O_ITERS=cfg["O_ITERS"], **common,
                )
        return outs
