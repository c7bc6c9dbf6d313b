"""Triton factor-slot write: every adapted linear's slots in one launch.

For one decode token, experts e [k], gates g [k], and every linear m (factor_slots.py):

    a_slots[m][j*r:(j+1)*r, :] = A_m[e_j]                    part j       (0 <= j < k)
    b_slots[m][:, j*r:(j+1)*r] = scaling * g_j * B_m[e_j]    part k + j

Work is a flat list of tiles, one program each; a tile is (linear m, part, tile index):
  A part: A_m[e_j] and its slot rows are both one contiguous run of r*in elements, so the
      tile is BLOCK contiguous elements of that run (a plain copy, converted to the slot dtype).
  B part: B_m[e_j] is [out, r] contiguous; its slot columns are rows of r elements with row
      stride k*r. The tile is BLOCK // R_P2 rows by R_P2 columns (R_P2 = the largest rank
      rounded up to a power of two, columns past the linear's own rank masked); values are
      scaled in fp32 (coefficient fp32(g_j) * fp32(scaling), as the reference rounds it) and
      stored in the slot dtype.
The expert id and gate of the tile's slot are loaded on the device; an id outside [0, N)
cannot be checked without a sync, so it writes zero slots (no adapter term) instead of
reading out of bounds. The reference raises on it.

Launcher: `SlotPlan` builds the descriptor table (int64 [M, 8]: A, B, a_slot, b_slot
addresses, N, r, in, out) and the tile table (int32 [T, 3]) once per set of factors and slot
buffers; the caller caches it on their data_ptrs. A call is then one launch with no host
sync and no host-to-device copy, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

# Descriptor columns (int64 per linear): A, B, a_slot, b_slot, N, r, in, out.
DESC_COLS = 8
_DESC_COLS = tl.constexpr(DESC_COLS)


@triton.jit
def _copy_a_tile(d, tile, j, e, ok, r, src_ty, dst_ty, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """a_slot[j*r:(j+1)*r, :] = A[e], a run of r*in contiguous elements both sides; BLOCK of them."""
    a_ptr = tl.load(d).to(tl.pointer_type(src_ty))
    s_ptr = tl.load(d + 2).to(tl.pointer_type(dst_ty))
    chunk = r * tl.load(d + 6)  # r * in
    if ALIGNED:
        # Table-loaded pointers carry no alignment: without the hints Triton does not
        # vectorise (SGMM on H200: 24% -> 50% of copy bandwidth, DESIGN.md section 5).
        a_ptr = tl.multiple_of(a_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        chunk = tl.multiple_of(chunk, 8)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(a_ptr + e * chunk + offs, mask=offs < tl.where(ok, chunk, 0), other=0.0)
    tl.store(s_ptr + j * chunk + offs, v.to(dst_ty), mask=offs < chunk)


@triton.jit
def _copy_b_tile(d, tile, j, e, ok, r, coef, src_ty, dst_ty, K_SEL: tl.constexpr,
                 R_P2: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """b_slot[rows, j*r:(j+1)*r] = coef * B[e][rows, :] for BLOCK // R_P2 rows, in fp32."""
    BLOCK_O: tl.constexpr = BLOCK // R_P2
    b_ptr = tl.load(d + 1).to(tl.pointer_type(src_ty))
    s_ptr = tl.load(d + 3).to(tl.pointer_type(dst_ty))
    n_out = tl.load(d + 7)
    if ALIGNED:
        b_ptr = tl.multiple_of(b_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    rows = tile * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.arange(0, R_P2)
    mask_c = (cols < r)[None, :]
    src = b_ptr + (e * n_out + rows[:, None]) * r + cols[None, :]  # B[e][rows, :]
    v = tl.load(src, mask=(rows < tl.where(ok, n_out, 0))[:, None] & mask_c, other=0.0)
    dst = s_ptr + rows[:, None] * (K_SEL * r) + j * r + cols[None, :]
    tl.store(dst, (v.to(tl.float32) * coef).to(dst_ty), mask=(rows < n_out)[:, None] & mask_c)


@triton.jit
def _write_slots_kernel(
    tiles_ptr,  # int32 [T, 3]: linear m, part (j: A slot j; K_SEL + j: B slot j), tile index
    desc_ptr,  # int64 [M, 8]
    src_ref, dst_ref,  # tensors of the factor / slot dtype (element types for table pointers)
    experts_ptr, gates_ptr, e_stride, g_stride, scaling,
    K_SEL: tl.constexpr, R_P2: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    src_ty = src_ref.dtype.element_ty
    dst_ty = dst_ref.dtype.element_ty
    t = tl.program_id(0)
    m = tl.load(tiles_ptr + t * 3).to(tl.int64)
    part = tl.load(tiles_ptr + t * 3 + 1)
    tile = tl.load(tiles_ptr + t * 3 + 2).to(tl.int64)
    d = desc_ptr + m * _DESC_COLS
    j = part % K_SEL
    e = tl.load(experts_ptr + j * e_stride).to(tl.int64)
    ok = (e >= 0) & (e < tl.load(d + 4))  # an id outside [0, N) writes zeros
    e = tl.where(ok, e, 0)
    r = tl.load(d + 5)
    if ALIGNED:
        r = tl.multiple_of(r, 8)
    if part < K_SEL:
        _copy_a_tile(d, tile, j, e, ok, r, src_ty, dst_ty, BLOCK, ALIGNED)
    else:
        coef = tl.load(gates_ptr + j * g_stride).to(tl.float32) * scaling
        _copy_b_tile(d, tile, j, e, ok, r, coef, src_ty, dst_ty, K_SEL, R_P2, BLOCK, ALIGNED)


# Configuration. NOT MEASURED YET (no GPU time in the session that wrote this): 4096 elements
# per tile (8 KiB of bf16: 32 elements, four 16-byte vectors, per thread at 4 warps), one
# program per tile so that many tiles are in flight per SM. benchmarks/bench_factor_slots.py
# --sweep times the alternatives on the H200; the chosen values belong here with their reason.
DEFAULT_CONFIG = dict(BLOCK=4096, num_warps=4)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor, gates: Tensor,
                       a_slots: list[Tensor], b_slots: list[Tensor]) -> str | None:
    """Why the kernel cannot take these tensors (None: it can). Metadata only."""
    src_dtype, dst_dtype, dev = lora_A[0].dtype, a_slots[0].dtype, lora_A[0].device
    if src_dtype not in _DTYPES or dst_dtype not in _DTYPES:
        return f"dtypes {src_dtype} -> {dst_dtype}; the kernel takes {_DTYPES}"
    for name, t in (("experts", experts), ("gates", gates)):
        if t.device != dev:
            return f"{name} is on {t.device}, lora_A[0] on {dev}"
    for i, group in enumerate(zip(lora_A, lora_B, a_slots, b_slots)):
        for name, t in zip(("lora_A", "lora_B", "a_slots", "b_slots"), group):
            want = src_dtype if name.startswith("lora") else dst_dtype
            if t.dtype != want:
                return f"{name}[{i}] is {t.dtype}, expected {want} (one dtype per list)"
            if t.device != dev:
                return f"{name}[{i}] is on {t.device}, lora_A[0] on {dev}"
            if not t.is_contiguous():
                return f"{name}[{i}] {tuple(t.shape)} is not contiguous"
    return None


class SlotPlan:
    """Device tables for one set of factors and slot buffers; `run` is one kernel launch."""

    def __init__(self, lora_A: list[Tensor], lora_B: list[Tensor], a_slots: list[Tensor],
                 b_slots: list[Tensor], k: int, config: dict | None = None):
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        dev = lora_A[0].device
        self.k = k
        self.r_p2 = max(8, triton.next_power_of_2(max(int(a.shape[1]) for a in lora_A)))
        self.block = max(cfg["BLOCK"], self.r_p2)  # at least one B row per tile
        self.num_warps = cfg["num_warps"]
        rows_per_tile = self.block // self.r_p2
        desc, tiles = [], []
        aligned = True
        for m, (a, b, sa, sb) in enumerate(zip(lora_A, lora_B, a_slots, b_slots)):
            n, r, n_in = (int(s) for s in a.shape)
            n_out = int(b.shape[1])
            ptrs = (a.data_ptr(), b.data_ptr(), sa.data_ptr(), sb.data_ptr())
            desc.append([*ptrs, n, r, n_in, n_out])
            aligned &= all(p % 16 == 0 for p in ptrs) and r % 8 == 0
            a_tiles = triton.cdiv(r * n_in, self.block)
            b_tiles = triton.cdiv(n_out, rows_per_tile)
            for j in range(k):
                tiles += [(m, j, t) for t in range(a_tiles)]
                tiles += [(m, k + j, t) for t in range(b_tiles)]
        # Built once per set of buffers: the only host-to-device copies this plan makes.
        self.desc = torch.tensor(desc, dtype=torch.int64).reshape(-1, DESC_COLS).to(dev)
        self.tiles = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(dev)
        self.num_tiles = len(tiles)
        self.aligned = aligned
        self.src_ref = torch.empty(1, dtype=lora_A[0].dtype, device=dev)
        self.dst_ref = torch.empty(1, dtype=a_slots[0].dtype, device=dev)

    def run(self, experts: Tensor, gates: Tensor, scaling: float) -> None:
        """experts, gates: 1-D [k] (any strides) on the plan's device."""
        if self.num_tiles == 0:
            return
        _write_slots_kernel[(self.num_tiles,)](
            self.tiles, self.desc, self.src_ref, self.dst_ref, experts, gates,
            experts.stride(0), gates.stride(0), float(scaling),
            K_SEL=self.k, R_P2=self.r_p2, BLOCK=self.block, ALIGNED=self.aligned,
            num_warps=self.num_warps,
        )
