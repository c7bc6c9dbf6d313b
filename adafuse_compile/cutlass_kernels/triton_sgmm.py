"""Triton SGMM: one persistent launch over every (weight, tile) pair.

Kernel: each program walks tiles t = pid, pid + P, ...; a tile is (weight g, rows, cols) of
W_g. For each expert slot j (previous experts negated, then current ones, or current only in
pristine mode) it loads the expert index from the device, points at B_g[e_j] and A_g[e_j]
(the gather is a pointer computation per K block, nothing is packed), scales the B tile
by the slot's coefficient and accumulates dot(B tile, A tile) in fp32; then it reads the W (or W0)
tile once, adds, and stores W. The last program to finish (a grid-wide counter) copies the
current experts/gates into the previous-expert buffers and resets the counter, so a
CUDA-graph replay unmerges the right experts.

Launcher: `TritonPlan` builds the descriptor and tile tables once (device tensors; keyed by
the caller on the tensors' data_ptrs), picks the tile shape, and launches.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

# Descriptor columns (int64 per weight): W, C (W itself or W0), A, B, out, in.
_DESC_COLS = 6


@triton.jit
def switch_slots(experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, scaling,
                 K_SEL: tl.constexpr, INPLACE: tl.constexpr, SLOTS_P2: tl.constexpr):
    """(slot, expert int64, coefficient) of every expert slot, read once per program: inplace ->
    [prev_0..prev_{k-1}, cur_0..cur_{k-1}] with coefficients [-s*pg, s*g]; pristine -> cur only.
    Slots past 2k (k) hold expert 0 with coefficient 0."""
    SLOTS: tl.constexpr = 2 * K_SEL if INPLACE else K_SEL
    slot = tl.arange(0, SLOTS_P2)
    if INPLACE:
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
    return slot, slot_e.to(tl.int64), slot_c


@triton.jit
def publish_experts(experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, counter_ptr, nprog,
                    K_SEL: tl.constexpr):
    """The last program to get here copies this token's experts and gates into the previous-expert
    buffers and resets the grid counter: every program read the old ones at its start (the
    atomic is acq_rel), and a CUDA-graph replay then unmerges the right experts."""
    done = tl.atomic_add(counter_ptr, 1)
    if done == nprog - 1:
        for j in tl.static_range(K_SEL):
            tl.store(prev_experts_ptr + j, tl.load(experts_ptr + j))
            tl.store(prev_gates_ptr + j, tl.load(gates_ptr + j))
        tl.store(counter_ptr, 0)


@triton.jit
def _sgmm_kernel(
    tiles_ptr,  # int32 [T, 3]: weight index, tile row, tile col
    desc_ptr,  # int64 [G, 6]
    dtype_ref,  # any tensor of the weight dtype (gives the element type for table pointers)
    experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, counter_ptr,
    num_tiles, scaling,
    K_SEL: tl.constexpr, INPLACE: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SLOTS_P2: tl.constexpr, EVEN_MN: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
):
    elem = dtype_ref.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # Expert slots, read once per program and kept in registers.
    SLOTS: tl.constexpr = 2 * K_SEL if INPLACE else K_SEL
    KB_PER_SLOT: tl.constexpr = (R + BLOCK_K - 1) // BLOCK_K
    slot, slot_e, slot_c = switch_slots(experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, scaling,
                                        K_SEL, INPLACE, SLOTS_P2)

    offs_k = tl.arange(0, BLOCK_K)
    for t in range(pid, num_tiles, nprog):
        g = tl.load(tiles_ptr + t * 3).to(tl.int64)
        tm = tl.load(tiles_ptr + t * 3 + 1)
        tn = tl.load(tiles_ptr + t * 3 + 2)
        d = desc_ptr + g * 6
        w_ptr = tl.load(d).to(tl.pointer_type(elem))
        c_ptr = tl.load(d + 1).to(tl.pointer_type(elem))
        a_ptr = tl.load(d + 2).to(tl.pointer_type(elem))
        b_ptr = tl.load(d + 3).to(tl.pointer_type(elem))
        n_out = tl.load(d + 4)
        n_in = tl.load(d + 5)
        if ALIGNED:
            # Without these hints Triton cannot vectorise through table-loaded pointers:
            # 24% -> 50% of copy bandwidth on H200 (DESIGN.md section 5).
            w_ptr = tl.multiple_of(w_ptr, 16)
            c_ptr = tl.multiple_of(c_ptr, 16)
            a_ptr = tl.multiple_of(a_ptr, 16)
            b_ptr = tl.multiple_of(b_ptr, 16)
            n_in = tl.multiple_of(n_in, 8)
        offs_m = tm.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < n_out
        mask_n = offs_n < n_in

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # One K block per iteration: a dynamic loop, so Triton software-pipelines the loads
        # (an unrolled loop over slots x blocks needed > 228 KB of shared memory on H200).
        for kb in range(0, SLOTS * KB_PER_SLOT):
            j = kb // KB_PER_SLOT
            q = (kb % KB_PER_SLOT) * BLOCK_K
            e = tl.sum(tl.where(slot == j, slot_e, 0))
            coef = tl.sum(tl.where(slot == j, slot_c, 0.0))
            kk = q + offs_k
            b_ptrs = b_ptr + e * n_out * R + offs_m[:, None] * R + kk[None, :]  # B_g[e]
            a_ptrs = a_ptr + e * R * n_in + kk[:, None] * n_in + offs_n[None, :]  # A_g[e]
            if EVEN_MN and R % BLOCK_K == 0:
                b_tile = tl.load(b_ptrs)
                a_tile = tl.load(a_ptrs)
            else:
                b_tile = tl.load(b_ptrs, mask=mask_m[:, None] & (kk[None, :] < R), other=0.0)
                a_tile = tl.load(a_ptrs, mask=(kk[:, None] < R) & mask_n[None, :], other=0.0)
            b_tile = (b_tile.to(tl.float32) * coef).to(elem)  # gate-scaled factor, as CUTLASS
            if IEEE:
                acc = tl.dot(b_tile, a_tile, acc, input_precision="ieee")
            else:
                acc = tl.dot(b_tile, a_tile, acc)

        w_offs = offs_m[:, None] * n_in + offs_n[None, :]
        if EVEN_MN:
            base = tl.load(c_ptr + w_offs).to(tl.float32)
            tl.store(w_ptr + w_offs, (base + acc).to(elem))
        else:
            mask = mask_m[:, None] & mask_n[None, :]
            base = tl.load(c_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(w_ptr + w_offs, (base + acc).to(elem), mask=mask)

    publish_experts(experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, counter_ptr, nprog, K_SEL)


# Tile shape measured on H200 (benchmarks/results/sgmm_h200_run2.json, bf16, Llama-2-7B q,v):
# 64x128, 4 warps, 4 stages, 4 programs per SM: 2.26 ms pristine / 2.87 ms inplace, against
# 2.72 / 3.69 for 128x128 with 8 warps, 2 per SM, and 3.12 / 3.99 with one program per tile.
# (128x256, 8 warps, 3 stages, 1 per SM was faster, 2.05 / 2.52, but its pristine results were
# WRONG on Triton 3.6, H200 and H100: more stages than K iterations, see MAX_TILE_ELEMS.)
DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, programs_per_sm=4)
# Above this many elements a tile must not have more pipeline stages than its K loop has
# iterations (slots x K blocks per slot): 128x256 with 8 warps and 3 stages, pristine with k = 2
# and r = 64 (2 iterations), came out wrong on an H100 with Triton 3.6, relative error of the
# update 0.09 (bf16) and 0.38-0.42 (fp16) against 0.004-0.006 / 0.0006 for every other config;
# the same tile in place (4 iterations), with 2 or 1 stages, with 4 warps, and 256x128 with 3
# stages were right (benchmarks/results/probe_triton_tiles_h100_s28.json). Triton's interpreter
# gets it right on the CPU, so it is the GPU compilation, not the kernel's arithmetic. The cause
# is not known, so the check is broader than the one failing tile: it also refuses 256x128 with 3
# stages over 2 iterations, which was right. 128x128 with 3 stages over 2 iterations was right
# too: tiles up to 128x128 keep their measured configs.
MAX_TILE_ELEMS = 128 * 128


class TritonPlan:
    """Device tables for one set of weights; `run` is one kernel launch."""

    def __init__(
        self, weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], k: int,
        pristine: list[Tensor] | None, config: dict | None = None,
        programs: int | None = None,
    ):
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        self.block_m, self.block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
        self.num_warps, self.num_stages = cfg["num_warps"], cfg["num_stages"]
        dev = weights[0].device
        self.k = k
        self.inplace = pristine is None
        self.r = int(lora_A[0].shape[1])
        self.block_k = max(16, min(64, triton.next_power_of_2(self.r)))
        k_iterations = (2 * k if self.inplace else k) * triton.cdiv(self.r, self.block_k)
        if self.block_m * self.block_n > MAX_TILE_ELEMS and self.num_stages > k_iterations:
            raise ValueError(
                f"TritonPlan: a {self.block_m}x{self.block_n} tile with {self.num_stages} pipeline stages over a "
                f"K loop of {k_iterations} iterations (k={k}, rank {self.r}, "
                f"{'in place' if self.inplace else 'pristine'}) gave wrong results on the GPU (Triton 3.6); "
                f"use num_stages <= {k_iterations} or a tile of at most {MAX_TILE_ELEMS} elements "
                f"(the default is {DEFAULT_CONFIG['BLOCK_M']}x{DEFAULT_CONFIG['BLOCK_N']})")
        self.ieee = weights[0].dtype == torch.float32
        rows, tiles = [], []
        even, aligned = True, True
        for g, w in enumerate(weights):
            out, inn = w.shape
            c = w if pristine is None else pristine[g]
            ptrs = (w.data_ptr(), c.data_ptr(), lora_A[g].data_ptr(), lora_B[g].data_ptr())
            rows.append([*ptrs, out, inn])
            aligned &= all(p % 16 == 0 for p in ptrs) and inn % 8 == 0 and self.r % 8 == 0
            even &= out % self.block_m == 0 and inn % self.block_n == 0
            for tm in range(triton.cdiv(out, self.block_m)):
                for tn in range(triton.cdiv(inn, self.block_n)):
                    tiles.append((g, tm, tn))
        # Built once per weight set: the only host-to-device copies this plan ever makes.
        self.desc = torch.tensor(rows, dtype=torch.int64).to(dev)
        self.tiles = torch.tensor(tiles, dtype=torch.int32).to(dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.num_tiles = len(tiles)
        self.even, self.aligned = even, aligned
        self.dtype_ref = torch.empty(1, dtype=weights[0].dtype, device=dev)
        if programs is None:
            if dev.type == "cuda":
                sms = torch.cuda.get_device_properties(dev).multi_processor_count
                programs = cfg["programs_per_sm"] * sms
            else:
                programs = 4  # interpreter: few programs still exercise the persistent loop
        self.programs = max(1, min(programs, self.num_tiles))

    def run(self, experts: Tensor, gates: Tensor, prev_experts: Tensor, prev_gates: Tensor,
            scaling: float) -> None:
        _sgmm_kernel[(self.programs,)](
            self.tiles, self.desc, self.dtype_ref, experts, gates, prev_experts, prev_gates,
            self.counter, self.num_tiles, float(scaling),
            K_SEL=self.k, INPLACE=self.inplace, R=self.r,
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            SLOTS_P2=max(2, triton.next_power_of_2(2 * self.k if self.inplace else self.k)),
            EVEN_MN=self.even, ALIGNED=self.aligned, IEEE=self.ieee,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )
