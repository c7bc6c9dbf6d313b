"""Probe: does keeping one GEMM operand resident make the in-place switch faster?

Why (docs/kernels.md, "An operand held on chip"): the CUTLASS GEMM of the switch reloads both
operand tiles from L2 for every 128 x 128 tile of W. At K = 256 (in place) that is 128 KB of L / R
per 64 KB of W read and written, and ncu put the L2 at 84-87% of its throughput already at K = 128
(pristine, v14: `ncu_sgmm_qv_pristine_v14_pack.txt`). Adding the L2 traffic up (operands + W in
and out) gives about 8.6-8.9 TB/s for both the pristine and the in-place GEMM's measured times,
which would make the in-place GEMM L2-bound, not HBM-bound.

This kernel (Triton, probe only: packed, gate-scaled L as the pack form writes it) walks a strip of
BM rows of W: it loads the strip's L [BM, K] once and then, for each of CHUNK tiles along the row,
only R [K, BN] and the C tile, and stores W. Operand traffic per W tile drops from (BM + BN) K to
BN K (+ BM K / CHUNK). If the in-place GEMM is L2-bound, this should move it towards the pristine
GEMM's time; the probe times it against CUTLASS variant 14 on the same buffers, interleaved.

Outcome on an H100 (session 26, `benchmarks/results/probe_stationary_h100_s26.json`): no. GEMM
alone, in place: the Triton strip kernel 2.71-2.80 ms against variant 14's 2.05; pristine 2.37-2.43
against 1.98. The whole switch with the gather in the kernel (`StripPlan`, below) took 3.3-285 ms
against the switch op's 1.75-15.9. And ncu on the H100 shows no L2 limit to remove: variant 14's
GEMM takes the same time at K = 256 in place as at K = 128 pristine (1.93 / 1.96 ms) with the L2 at
73% in both (`ncu_sgmm_v14_gemm_*_h100_s26.txt`). The H200, where in place is the slower mode and
ncu put the L2 at 84-87% at K = 128, was not lent for this probe.

Usage (GPU):  python benchmarks/probe_stationary.py --out results.json [--rounds 5]
CPU check:    TRITON_INTERPRET=1 python benchmarks/probe_stationary.py --check
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adafuse_compile.cutlass_kernels.triton_sgmm import publish_experts, switch_slots  # noqa: E402


# The whole switch with the gather, holding each strip's L on chip: the kernel the hypothesis above
# would call for. Measured far slower than the CUTLASS plans on an H100 (session 26), so it is not
# part of the package. A program takes a unit = (weight g, strip of BM rows, CHUNK tiles along the
# row) and
#
# - gathers the strip's L [BM, K] once: for each K column, the slot's expert's B_g[e] column, scaled
#   by the slot's coefficient (previous experts negated, in place) and rounded to W's dtype, the
#   values the pack form writes; the gather and the coefficients cost once per strip, not per tile;
# - then for each tile of the unit loads only R [K, BN] (the slots' A_g[e] rows, gathered by pointer)
#   and the C tile (W, or W0 in pristine mode), and stores W = C + L R (fp32 accumulation).
#
# Factor traffic per W tile falls from (BM + BN) K to BN K + BM K / CHUNK. No pack launch, no
# workspace. The last program publishes this token's experts as the previous ones (grid counter, as
# `triton_sgmm`), so CUDA-graph replays unmerge the right experts.
_DESC_COLS = tl.constexpr(6)  # W, C (W itself or W0), A, B, out, in


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
    slot, slot_e, slot_c = switch_slots(experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, scaling,
                                        K_SEL, INPLACE, SLOTS_P2)
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

    publish_experts(experts_ptr, gates_ptr, prev_experts_ptr, prev_gates_ptr, counter_ptr, nprog, K_SEL)


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


@triton.jit
def _stationary_kernel(w_ptr, c_ptr, l_ptr, r_ptr, rows, cols, group_rows, r_group_stride,
                       K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr):
    """W[s] = C[s] + L[s] @ R[group(s)] for each strip s of BM rows, CHUNK tiles of BN at a time.
    W, C [rows, cols]; L [rows, K]; R [groups, >= K, cols] with group = row // group_rows."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    chunks = cols // (BN * CHUNK)
    units = (rows // BM) * chunks
    offs_k = tl.arange(0, K)
    for u in range(pid, units, nprog):
        strip = u // chunks
        n0 = (u % chunks) * (BN * CHUNK)
        offs_m = strip.to(tl.int64) * BM + tl.arange(0, BM)
        g = (strip.to(tl.int64) * BM) // group_rows
        lhs = tl.load(l_ptr + offs_m[:, None] * K + offs_k[None, :])  # held for the whole chunk
        r_base = r_ptr + g * r_group_stride
        for j in range(CHUNK):
            offs_n = n0 + j * BN + tl.arange(0, BN)
            rhs = tl.load(r_base + offs_k[:, None] * cols + offs_n[None, :])
            acc = tl.dot(lhs, rhs)
            w_offs = offs_m[:, None] * cols + offs_n[None, :]
            base = tl.load(c_ptr + w_offs).to(tl.float32)
            tl.store(w_ptr + w_offs, (base + acc).to(w_ptr.dtype.element_ty))


@triton.jit
def _stationary_tma_kernel(w_desc, c_desc, l_desc, r_desc, rows, cols, group_rows, r_group_rows,
                           K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr):
    """The same with TMA descriptors (host-made; R's descriptor is over [groups * r_group_rows, cols])."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    chunks = cols // (BN * CHUNK)
    units = (rows // BM) * chunks
    for u in range(pid, units, nprog):
        strip = u // chunks
        n0 = (u % chunks) * (BN * CHUNK)
        m0 = strip * BM
        g = m0 // group_rows
        lhs = l_desc.load([m0, 0])
        for j in range(CHUNK):
            n = n0 + j * BN
            rhs = r_desc.load([g * r_group_rows, n])
            acc = tl.dot(lhs, rhs)
            base = c_desc.load([m0, n]).to(tl.float32)
            w_desc.store([m0, n], (base + acc).to(w_desc.dtype))


class StationaryPlan:
    def __init__(self, w, c, lhs, rhs, group_rows, bm, bn, chunk, warps, stages, programs, tma):
        self.w, self.c, self.lhs, self.rhs = w, c, lhs, rhs
        self.k = lhs.shape[1]
        self.group_rows = group_rows
        self.bm, self.bn, self.chunk, self.warps, self.stages, self.tma = bm, bn, chunk, warps, stages, tma
        rows, cols = w.shape
        assert rows % bm == 0 and cols % (bn * chunk) == 0 and group_rows % bm == 0
        units = rows // bm * (cols // (bn * chunk))
        self.programs = min(programs, units)
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            r2 = rhs.reshape(-1, cols)
            self.descs = (TensorDescriptor.from_tensor(w, [bm, bn]), TensorDescriptor.from_tensor(c, [bm, bn]),
                          TensorDescriptor.from_tensor(lhs, [bm, self.k]),
                          TensorDescriptor.from_tensor(r2, [self.k, bn]))

    def run(self):
        rows, cols = self.w.shape
        meta = dict(K=self.k, BM=self.bm, BN=self.bn, CHUNK=self.chunk, num_warps=self.warps,
                    num_stages=self.stages)
        if self.tma:
            _stationary_tma_kernel[(self.programs,)](*self.descs, rows, cols, self.group_rows,
                                                     self.rhs.shape[1], **meta)
        else:
            _stationary_kernel[(self.programs,)](self.w, self.c, self.lhs, self.rhs, rows, cols,
                                                 self.group_rows, self.rhs.stride(0), **meta)


def reference(c, lhs, rhs, group_rows):
    out = c.double().clone()
    k = lhs.shape[1]
    for g in range(c.shape[0] // group_rows):
        rs = slice(g * group_rows, (g + 1) * group_rows)
        out[rs] += lhs[rs].double() @ rhs[g, :k].double()
    return out


def check(device: str, dtype: torch.dtype) -> None:
    """Small shapes against float64 (the interpreter on the CPU: fp16; bf16 only on the GPU)."""
    torch.manual_seed(0)
    configs = [(32, 32, 2, 4, 1, 3, False), (32, 16, 4, 4, 1, 5, False)]
    if device == "cuda":
        configs += [(32, 32, 2, 4, 2, 3, True)]
    for k in (32, 64):
        for bm, bn, chunk, warps, stages, programs, tma in configs:
            rows, cols, group_rows, groups = 128, 128, 64, 2
            w = torch.randn(rows, cols, device=device, dtype=dtype)
            w0 = w.clone()
            lhs = torch.randn(rows, k, device=device, dtype=dtype)
            rhs = torch.randn(groups, k + 8, cols, device=device, dtype=dtype)
            want = reference(w0, lhs, rhs[:, :k], group_rows)
            for inplace in (True, False):
                w.copy_(w0) if inplace else w.fill_(float("nan"))
                plan = StationaryPlan(w, w if inplace else w0, lhs, rhs, group_rows, bm, bn, chunk,
                                      warps, stages, programs, tma)
                plan.run()
                err = (w.double() - want).abs().max().item()
                assert err < 0.05 * want.abs().max().item() * 2 ** -7 * 8, (k, bm, bn, chunk, tma, inplace, err)
    print("check passed", device, dtype)


CONFIGS = [  # GEMM alone: (BM, BN, CHUNK, warps, stages, programs per SM, tma)
    (128, 128, 8, 8, 2, 1, False), (128, 64, 16, 8, 3, 1, False), (64, 128, 8, 4, 3, 2, False),
    (128, 128, 8, 8, 2, 1, True), (128, 64, 16, 8, 3, 1, True), (128, 128, 32, 8, 2, 1, True),
]
SWITCH_CONFIGS = [  # the whole switch with the gather (StripPlan): (BM, BN, CHUNK, warps, stages, programs per SM)
    (128, 128, 8, 8, 2, 1), (128, 64, 16, 8, 3, 1), (64, 128, 8, 4, 3, 2), (128, 128, 16, 8, 3, 1),
]


_KEEP: list = []


def strip_error(shapes, mode: str, config: dict, programs: int) -> float:
    """StripPlan's largest relative error of the update against the float64 oracle, bf16, on one
    weight of each shape of the set (make_problem: the update is about 0.3 |W|, so a wrong kernel
    shows; make_inputs' small factors would hide it under W's rounding); NaN-poisoned in pristine."""
    from adafuse_compile.cutlass_kernels.reference import delta_error, make_problem, oracle_then_poison

    p = make_problem(sorted(set(shapes)), k=2, rank=64, dtype=torch.bfloat16, device="cuda",
                     pristine=mode == "pristine")
    before, expected, _, _ = oracle_then_poison(p)
    plan = StripPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"], config=config, programs=programs)
    plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
    bases = p["pristine"] or before
    return max(delta_error(w, b, e) for w, b, e in zip(p["weights"], bases, expected))


def switch_cases(adapted: str) -> tuple[dict, dict, dict]:
    """The whole switch on the Llama-2-7B shapes: StripPlan's configs against the switch op's CUTLASS
    plan (plan_fastest_form), a fixed pack + variant 14 plan and TritonPlan; with each strip config's
    error against the float64 oracle on one weight of each shape (W's dtype rounding allowed)."""
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan, plan_fastest_form
    from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan
    from benchmarks.bench_sgmm import TOP_K, make_inputs, shapes_for, switch_bytes

    shapes = shapes_for(adapted)
    weights, lora_A, lora_B, experts, gates, pe, pg, pristine = make_inputs(shapes, True)
    _KEEP.append((weights, lora_A, lora_B, pristine))  # the plans hold only these tensors' addresses
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases, meta, errors = {}, {}, {}
    for mode in ("pristine", "inplace"):
        pr = pristine if mode == "pristine" else None
        nbytes = switch_bytes(shapes, mode)
        args = (experts, gates, pe, pg, 0.5)
        plans = {"cutlass_op": plan_fastest_form(weights, lora_A, lora_B, TOP_K, pr),
                 "cutlass_v14": CutlassPlan(weights, lora_A, lora_B, TOP_K, pr, variant=14, raster=1),
                 "triton_default": TritonPlan(weights, lora_A, lora_B, TOP_K, pr)}
        for cfg in SWITCH_CONFIGS:
            bm, bn, chunk, warps, stages, pps = cfg
            name = f"strip_{bm}x{bn}_c{chunk}_w{warps}_s{stages}_p{pps}"
            try:
                cfg_dict = dict(BM=bm, BN=bn, CHUNK=chunk, num_warps=warps, num_stages=stages)
                errors[f"{adapted}/{mode}/{name}"] = strip_error(shapes, mode, cfg_dict, pps * sms)
                plan = StripPlan(weights, lora_A, lora_B, TOP_K, pr, programs=pps * sms, config=cfg_dict)
            except Exception as e:  # a config Triton cannot build: recorded, skipped
                errors[f"{adapted}/{mode}/{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(adapted, mode, name, "failed:", errors[f"{adapted}/{mode}/{name}"], flush=True)
                continue
            plans[name] = plan
        for name, plan in plans.items():
            tag = f"{adapted}/{mode}/{name}"
            cases[tag] = (lambda p=plan, a=args: p.run(*a))
            meta[tag] = dict(set=adapted, mode=mode, impl=name, bytes=nbytes,
                             choice=getattr(plan, "choice", None), rel_error=errors.get(tag))
    print("strip switch errors (relative, vs float64):", errors, flush=True)
    return cases, meta, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--cutlass", default="14", help="CUTLASS variants to time alongside (built ones)")
    ap.add_argument("--sets", default="qv,all7", help="the whole switch on these Llama-2-7B sets ('' for none)")
    args = ap.parse_args()
    if args.check or not torch.cuda.is_available():
        check("cuda" if torch.cuda.is_available() else "cpu", torch.float16)
        if torch.cuda.is_available():
            check("cuda", torch.bfloat16)
        return
    try:  # small shapes first; a failure is recorded and the timing goes on (each config is checked too)
        check("cuda", torch.bfloat16)
        small_check = "passed"
    except Exception as e:
        small_check = f"{type(e).__name__}: {str(e)[:300]}"
        print("small-shape check failed:", small_check, flush=True)

    from benchmarks import probe_sgmm_gemm as probe
    from adafuse_compile.cutlass_kernels import build

    bufs = probe.Buffers(256)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases, meta, errors = {}, {}, {}
    variants = [int(v) for v in args.cutlass.split(",") if v]
    ext = build.load_extension(tuple(variants)) if variants else None
    for k, mode in ((256, "inplace"), (128, "pristine")):
        lhs = bufs.lhs[:, :k].contiguous()
        c = bufs.w if mode == "inplace" else bufs.w0
        for v in variants:
            plan = bufs.plan(ext, v, k, mode, 64)
            name = f"{mode}/cutlass_v{v}"
            cases[name] = plan.run
            meta[name] = dict(mode=mode, k=k, impl="cutlass", variant=v, bytes=bufs.moved_bytes(k, 64))
        for cfg in CONFIGS:
            bm, bn, chunk, warps, stages, pps, tma = cfg
            name = f"{mode}/stationary_{bm}x{bn}_c{chunk}_w{warps}_s{stages}_p{pps}" + ("_tma" if tma else "")
            try:
                plan = StationaryPlan(bufs.w, c, lhs, bufs.rhs, 4096, bm, bn, chunk, warps, stages,
                                      pps * sms, tma)
                plan.run()
                torch.cuda.synchronize()
            except Exception as e:  # a config Triton cannot build (shared memory): recorded, skipped
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                print(name, "failed:", errors[name], flush=True)
                continue
            cases[name] = plan.run
            meta[name] = dict(mode=mode, k=k, impl="triton_stationary", config=cfg,
                              bytes=bufs.moved_bytes(k, 64))
    # correctness of every timed config on its own buffers (two 4096-row groups, an update about
    # 0.3 |W|: the timing buffers' 1e-3 factors would hide a wrong product under W's rounding)
    bufs_check = {}
    for name in [n for n in cases if "stationary" in n]:
        m = meta[name]
        gen = torch.Generator(device="cuda").manual_seed(1)
        w0 = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
        lhs = torch.randn(8192, m["k"], device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
        rhs = torch.randn(2, 256, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
        w = w0.clone() if m["mode"] == "inplace" else torch.full_like(w0, float("nan"))
        bm, bn, chunk, warps, stages, pps, tma = m["config"]
        StationaryPlan(w, w if m["mode"] == "inplace" else w0, lhs, rhs, 4096, bm, bn, chunk, warps,
                       stages, pps * sms, tma).run()
        want = reference(w0, lhs, rhs[:, :m["k"]], 4096)
        bufs_check[name] = round(((w.double() - want).norm() / (want - w0.double()).norm()).item(), 6)
        del w0, w, lhs, rhs
    print("relative max error", bufs_check, flush=True)
    timed = probe.interleaved(cases, args.rounds, 15)
    del cases, bufs
    torch.cuda.empty_cache()
    switch_errors = {}
    for adapted in filter(None, args.sets.split(",")):
        s_cases, s_meta, s_err = switch_cases(adapted)
        meta.update(s_meta)
        switch_errors.update(s_err)
        s_timed = probe.interleaved(s_cases, args.rounds, 15)
        timed["per_case"].update(s_timed["per_case"])
        timed["copy_tb_s_rounds"] += s_timed["copy_tb_s_rounds"]
        del s_cases
        torch.cuda.empty_cache()
    bw = max(timed["copy_tb_s_rounds"])
    rows_out = []
    for name, times in timed["per_case"].items():
        ms = sorted(times)[len(times) // 2]
        frac = meta[name]["bytes"] / (ms * 1e-3) / 1e12 / bw
        row = dict(name=name, **meta[name], median_ms=round(ms, 4), rounds_ms=[round(t, 4) for t in times],
                   copy_fraction=round(frac, 4))
        row.setdefault("rel_error", bufs_check.get(name))
        rows_out.append(row)
        print(f"{name:60s} {ms:.3f} ms  {100 * frac:.1f}% of copy", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            copy_tb_s_rounds=timed["copy_tb_s_rounds"], rows=rows_out, failed=errors,
            switch_errors=switch_errors, small_check=small_check,
            setup="q,v byte volume: W [64 x 4096, 4096] bf16 as 64 groups; L [rows, K] packed; "
                  "R [64, 256, 4096]; GEMM alone (no pack); in place K = 256, pristine K = 128; "
                  "CUDA-graph replays, 15 per round, median over rounds, against the best round's copy. "
                  "Rows with a 'set': the whole switch (bench_sgmm.make_inputs, top-2 of 8, r = 64) per "
                  "mode, bytes = switch_bytes"),
            indent=1))


if __name__ == "__main__":
    main()
