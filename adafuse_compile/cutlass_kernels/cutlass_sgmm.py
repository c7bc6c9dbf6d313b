"""CUTLASS SGMM launcher (Hopper sm_90a): pack launch + one pointer-array grouped GEMM.

`CutlassPlan` owns, per weight set:
- a packed-factor workspace (per weight L [out, Kc] and R [Kc, in], 128-byte aligned),
  whose addresses never change, so the GEMM arguments are fixed;
- the pack descriptor table on the device (A, B, L, R pointers, out, in);
- a CUTLASS plan (device arrays of problem shapes, strides and the L/R/C/D pointers, built
  once; C = W, beta = 1 for "inplace", C = W0 for "pristine"; D = W).
`run` = pack launch (gathers the experts named by the device index tensors, scales by the
gates, writes prev_* for the next call) + the grouped GEMM launch. No host sync, no copies.
"""
from __future__ import annotations

import torch
from torch import Tensor

from adafuse_compile.cutlass_kernels import build

# Variant ids as in ADAFUSE_SGMM_VARIANTS (sgmm_sm90.cu); default set from the H200 benchmark
# (benchmarks/results/sgmm_h200*.json, docs/kernels.md).
# Per mode (benchmarks/results/sgmm_h200.json, run 3, Llama-2-7B shapes, bf16):
#   inplace  (K = 256): coop 128x128x64, epilogue tile 128x64: q,v 1.75 ms (1.74 with the
#            automatic 128x32 epilogue tile, within noise; all seven 10.66 vs 11.40 ms);
#   pristine (K = 128): coop 128x128x64, epilogue tile 128x128: q,v 1.33 ms vs 1.45 (128x64)
#            and 1.48 (auto); all seven 8.44 vs 9.46 / 9.04 ms.
DEFAULT_VARIANT = {"inplace": 1, "pristine": 3}
_ELEMENTS = {torch.bfloat16: build.DTYPE_CODES["bf16"], torch.float16: build.DTYPE_CODES["fp16"]}
_ALIGN_ELEMS = 64  # 128 bytes between packed blocks (TMA needs 16)


def unsupported_reason(weights: list[Tensor], lora_A: list[Tensor],
                       pristine: list[Tensor] | None) -> str | None:
    """Why the CUTLASS path cannot take these inputs (None: it can). Builds on first use."""
    dev = weights[0].device
    if dev.type != "cuda":
        return f"needs a CUDA device, got {dev}"
    cap = torch.cuda.get_device_capability(dev)
    if cap != (9, 0):
        return f"needs an sm_90 (Hopper) GPU, this one is sm_{cap[0]}{cap[1]}"
    if weights[0].dtype not in _ELEMENTS:
        return f"dtype {weights[0].dtype} (CUTLASS path is bf16/fp16)"
    bad = alignment_problem(weights, lora_A, pristine)
    if bad is not None:
        return "unaligned: " + bad
    if build.cutlass_include_dirs() is None:
        return "CUTLASS headers not found (pip install nvidia-cutlass)"
    try:
        build.load_extension(tuple(DEFAULT_VARIANT.values()))
    except RuntimeError as exc:
        return str(exc)
    return None


def alignment_problem(weights, lora_A, pristine) -> str | None:
    """TMA needs 16-byte aligned bases and row strides: in % 8 == 0, r % 8 == 0 (16-bit)."""
    r = lora_A[0].shape[1]
    if r % 8:
        return f"rank {r} is not a multiple of 8"
    for i, w in enumerate(weights):
        if w.shape[1] % 8:
            return f"weights[{i}] {tuple(w.shape)}: in_features not a multiple of 8"
        if w.data_ptr() % 16 or (pristine is not None and pristine[i].data_ptr() % 16):
            return f"weights[{i}] (or its pristine copy) is not 16-byte aligned"
    return None


class CutlassPlan:
    def __init__(self, weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
                 k: int, pristine: list[Tensor] | None, variant: int | None = None,
                 sm_count: int = 0):
        if variant is None:
            variant = DEFAULT_VARIANT["inplace" if pristine is None else "pristine"]
        self.ext = build.load_extension((variant,))
        w0 = weights[0]
        dev, dtype = w0.device, w0.dtype
        self.dtype_code = _ELEMENTS[dtype]
        self.k, self.inplace = k, pristine is None
        self.r = int(lora_A[0].shape[1])
        kc = (2 * k if self.inplace else k) * self.r
        offs, total = [], 0
        for w in weights:
            out, inn = w.shape
            offs.append((total, total + out * kc))
            total += -(-out * kc // _ALIGN_ELEMS) * _ALIGN_ELEMS
            total += -(-kc * inn // _ALIGN_ELEMS) * _ALIGN_ELEMS
        self.workspace = torch.empty(max(total, 1), dtype=dtype, device=dev)
        base, esz = self.workspace.data_ptr(), self.workspace.element_size()
        desc, mnk, ptrs = [], [], [[], [], [], []]
        for g, w in enumerate(weights):
            out, inn = w.shape
            lhs, rhs = base + offs[g][0] * esz, base + offs[g][1] * esz
            c = w if pristine is None else pristine[g]
            desc.append([lora_A[g].data_ptr(), lora_B[g].data_ptr(), lhs, rhs, out, inn])
            mnk.append([out, inn, kc])
            for lst, p in zip(ptrs, (lhs, rhs, c.data_ptr(), w.data_ptr())):
                lst.append(p)
            if any(p % 16 for p in (lhs, rhs, lora_A[g].data_ptr(), lora_B[g].data_ptr())):
                raise ValueError(f"SGMM CUTLASS: factors of weight {g} are not 16-byte aligned")
        # Built once per weight set: the only host-to-device copies this plan makes.
        self.desc = torch.tensor(desc, dtype=torch.int64).to(dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        with torch.cuda.device(dev):
            self.gemm = self.ext.create_plan(
                self.dtype_code, variant, torch.tensor(mnk, dtype=torch.int32),
                torch.tensor(ptrs, dtype=torch.int64), sm_count,
            )
        # Pack grid: (blocks_x, weights); ~8 blocks per SM in all, 256 threads, 16 B each.
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        max_vec = max((w.shape[0] * kc + kc * w.shape[1]) // 8 for w in weights)
        self.blocks_x = int(max(1, min(-(-8 * sms // len(weights)), -(-max_vec // 256))))
        self.num_weights = len(weights)
        self.variant = variant

    def pack(self, experts, gates, prev_experts, prev_gates, scaling):
        self.ext.pack(self.dtype_code, self.desc, self.blocks_x, experts, gates, prev_experts,
                      prev_gates, self.counter, self.k, self.r, self.inplace, float(scaling))

    def run(self, experts: Tensor, gates: Tensor, prev_experts: Tensor, prev_gates: Tensor,
            scaling: float) -> None:
        self.pack(experts, gates, prev_experts, prev_gates, scaling)
        self.gemm.run()
