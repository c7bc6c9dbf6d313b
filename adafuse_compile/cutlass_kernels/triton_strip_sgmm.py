"""Triton SGMM that holds each row strip's left factor on chip (one launch, gather in the kernel).

Why: the CUTLASS GEMM (and `triton_sgmm`) reloads both operand tiles from L2 for every tile of W.
At the issue's K = 256 (in place, top-2, r = 64) that is 128 KB of factors per 128 x 128 tile, for
64 KB of W read and written; summed with W's own traffic the L2 then moves about 3x what HBM does,
and the in-place GEMM's time follows the L2's throughput rather than HBM's (docs/kernels.md, "An
operand held on chip"). Here a program takes a unit = (weight g, strip of BM rows, CHUNK tiles along
the row) and

- gathers the strip's L [BM, K] once: for each K column, the slot's expert's B_g[e] column, scaled
  by the slot's coefficient (previous experts negated, in place) and rounded to W's dtype, the
  values the pack form writes; the gather and the coefficients cost once per strip, not per tile;
- then for each tile of the unit loads only R [K, BN] (the slots' A_g[e] rows, gathered by pointer)
  and the C tile (W, or W0 in pristine mode), and stores W = C + L R (fp32 accumulation).

Factor traffic per W tile falls from (BM + BN) K to BN K + BM K / CHUNK. No pack launch, no
workspace. The last program publishes this token's experts as the previous ones (grid counter, as
`triton_sgmm`), so CUDA-graph replays unmerge the right experts.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

_DESC_COLS = 6  # W, C (W itself or W0), A, B, out, in


@triton.jit
def _strip_sgmm_kernel(
    units_ptr,  # int32 [U, 3]: weight, strip, first tile column
    desc_ptr,  # int64 [G, 6]
    dtype_ref,
    experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, counter_ptr,
    num_units, scaling,
    K_SEL: tl.constexpr, INPLACE: tl.constexpr, R: tl.constexpr, K_P2: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, SLOTS_P2: tl.constexpr,
    EVEN: tl.constexpr, IEEE: tl.constexpr,
):
    elem = dtype_ref.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    SLOTS: tl.constexpr = 2 * K_SEL if INPLACE else K_SEL
    slot = tl.arange(0, SLOTS_P2)
    if INPLACE:  # slots [prev_0..prev_{k-1}, cur_0..cur_{k-1}], coefficients [-s pg, s g]
        is_prev = slot < K_SEL
        is_cur = (slot >= K_SEL) & (slot < SLOTS)
        cur_i = tl.where(is_cur, slot - K_SEL, 0)
        slot_e = tl.where(is_prev, tl.load(prev_experts_ptr + slot, mask=is_prev, other=0),
                          tl.load(experts_ptr + cur_i, mask=is_cur, other=0))
        slot_c = tl.where(is_prev, -tl.load(prev_gates_ptr + slot, mask=is_prev, other=0.0),
                          tl.load(gates_ptr + cur_i, mask=is_cur, other=0.0)) * scaling
    else:
        valid = slot < SLOTS
        slot_e = tl.load(experts_ptr + slot, mask=valid, other=0)
        slot_c = tl.load(gates_ptr + slot, mask=valid, other=0.0) * scaling
    slot_e = slot_e.to(tl.int64)
    # Per K column: its slot's expert and coefficient, and its row within the expert's rank
    kk = tl.arange(0, K_P2)
    k_valid = kk < SLOTS * R
    k_slot = kk // R
    k_row = (kk % R).to(tl.int64)
    hit = k_slot[:, None] == slot[None, :]
    k_expert = tl.sum(tl.where(hit, slot_e[None, :], 0), axis=1)
    k_coef = tl.sum(tl.where(hit, slot_c[None, :], 0.0), axis=1)

    for u in range(pid, num_units, nprog):
        g = tl.load(units_ptr + u * 3).to(tl.int64)
        strip = tl.load(units_ptr + u * 3 + 1).to(tl.int64)
        first_col = tl.load(units_ptr + u * 3 + 2).to(tl.int64)
        d = desc_ptr + g * _DESC_COLS
        w_ptr = tl.multiple_of(tl.load(d).to(tl.pointer_type(elem)), 16)
        c_ptr = tl.multiple_of(tl.load(d + 1).to(tl.pointer_type(elem)), 16)
        a_ptr = tl.multiple_of(tl.load(d + 2).to(tl.pointer_type(elem)), 16)
        b_ptr = tl.multiple_of(tl.load(d + 3).to(tl.pointer_type(elem)), 16)
        n_out = tl.load(d + 4)
        n_in = tl.load(d + 5)
        offs_m = strip * BM + tl.arange(0, BM)
        mask_m = offs_m < n_out
        # L [BM, K]: B_g[e][m, row] * coef, B_g stacked [E, out, r]
        l_ptrs = b_ptr + k_expert[None, :] * n_out * R + offs_m[:, None] * R + k_row[None, :]
        if EVEN:
            lhs = tl.load(l_ptrs, mask=k_valid[None, :], other=0.0)
        else:
            lhs = tl.load(l_ptrs, mask=mask_m[:, None] & k_valid[None, :], other=0.0)
        lhs = (lhs.to(tl.float32) * k_coef[None, :]).to(elem)
        # R rows: A_g[e][row, :], A_g stacked [E, r, in]
        r_rows = a_ptr + k_expert[:, None] * R * n_in + k_row[:, None] * n_in
        for j in range(CHUNK):
            offs_n = (first_col + j) * BN + tl.arange(0, BN)
            w_offs = offs_m[:, None] * n_in + offs_n[None, :]
            if EVEN:
                rhs = tl.load(r_rows + offs_n[None, :], mask=k_valid[:, None], other=0.0)
            else:
                rhs = tl.load(r_rows + offs_n[None, :], mask=k_valid[:, None] & (offs_n < n_in)[None, :],
                              other=0.0)
            if IEEE:
                acc = tl.dot(lhs, rhs, input_precision="ieee")
            else:
                acc = tl.dot(lhs, rhs)
            if EVEN:
                base = tl.load(c_ptr + w_offs).to(tl.float32)
                tl.store(w_ptr + w_offs, (base + acc).to(elem))
            else:
                mask = mask_m[:, None] & (offs_n < n_in)[None, :]
                base = tl.load(c_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(w_ptr + w_offs, (base + acc).to(elem), mask=mask)

    # Publish this token's experts once every program has read the previous ones (at its start).
    done = tl.atomic_add(counter_ptr, 1)
    if done == nprog - 1:
        for j in tl.static_range(K_SEL):
            tl.store(prev_experts_ptr + j, tl.load(experts_ptr + j))
            tl.store(prev_gates_ptr + j, tl.load(gates_ptr + j))
        tl.store(counter_ptr, 0)


# Untuned: the probe (benchmarks/probe_stationary.py --switch) times the candidates on a GPU.
DEFAULT_CONFIG = dict(BM=128, BN=128, CHUNK=8, num_warps=8, num_stages=2, programs_per_sm=1)
MAX_STRIP_ELEMENTS = 128 * 256  # L held per program: 64 KB of bf16 (the K = 256 at BM = 128)


class StripPlan:
    """Device tables for one weight set; `run` is one kernel launch (same call as `TritonPlan.run`)."""

    def __init__(self, weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], k: int,
                 pristine: list[Tensor] | None, config: dict | None = None, programs: int | None = None):
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        self.bm, self.bn, self.chunk = cfg["BM"], cfg["BN"], cfg["CHUNK"]
        self.num_warps, self.num_stages = cfg["num_warps"], cfg["num_stages"]
        dev = weights[0].device
        self.k, self.inplace = k, pristine is None
        self.r = int(lora_A[0].shape[1])
        slots = 2 * k if self.inplace else k
        self.k_p2 = max(16, triton.next_power_of_2(slots * self.r))
        if self.bm * self.k_p2 > MAX_STRIP_ELEMENTS:
            raise ValueError(
                f"StripPlan: a {self.bm}-row strip of K = {slots * self.r} (padded {self.k_p2}) does not fit "
                f"the {MAX_STRIP_ELEMENTS}-element budget held per program; use TritonPlan (triton_sgmm) or a "
                f"smaller BM")
        rows, units = [], []
        even = True
        for g, w in enumerate(weights):
            out, inn = w.shape
            c = w if pristine is None else pristine[g]
            ptrs = (w.data_ptr(), c.data_ptr(), lora_A[g].data_ptr(), lora_B[g].data_ptr())
            if any(p % 16 for p in ptrs) or inn % 8 or self.r % 8:
                raise ValueError("StripPlan: weights and factors must be 16-byte aligned with in % 8 == 0 "
                                 "and r % 8 == 0; use TritonPlan (triton_sgmm)")
            rows.append([*ptrs, out, inn])
            tiles_n = triton.cdiv(inn, self.bn)
            even &= out % self.bm == 0 and tiles_n % self.chunk == 0 and inn % self.bn == 0
            for strip in range(triton.cdiv(out, self.bm)):
                for first in range(0, tiles_n, self.chunk):
                    units.append((g, strip, first))
        self.desc = torch.tensor(rows, dtype=torch.int64).to(dev)
        self.units = torch.tensor(units, dtype=torch.int32).to(dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.num_units, self.even = len(units), even
        self.ieee = weights[0].dtype == torch.float32
        self.dtype_ref = torch.empty(1, dtype=weights[0].dtype, device=dev)
        if programs is None:
            programs = (cfg["programs_per_sm"] * torch.cuda.get_device_properties(dev).multi_processor_count
                        if dev.type == "cuda" else 4)
        self.programs = max(1, min(programs, self.num_units))

    def run(self, experts: Tensor, gates: Tensor, prev_experts: Tensor, prev_gates: Tensor,
            scaling: float) -> None:
        slots = 2 * self.k if self.inplace else self.k
        _strip_sgmm_kernel[(self.programs,)](
            self.units, self.desc, self.dtype_ref, experts, gates, prev_experts, prev_gates,
            self.counter, self.num_units, float(scaling),
            K_SEL=self.k, INPLACE=self.inplace, R=self.r, K_P2=self.k_p2,
            BM=self.bm, BN=self.bn, CHUNK=self.chunk, SLOTS_P2=max(2, triton.next_power_of_2(slots)),
            EVEN=self.even, IEEE=self.ieee, num_warps=self.num_warps, num_stages=self.num_stages,
        )
