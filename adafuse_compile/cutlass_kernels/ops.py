"""SGMM switching op: validation, dispatch between CUTLASS / Triton / reference, custom op.

    sgmm_switch_(weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates,
                 scaling, pristine=None, impl="auto")

For each weight W_i [out, in], LoRA experts A_i [N, r, in], B_i [N, out, r]:
  pristine is None ("inplace"): W_i += s * (sum_j g_j B_i[e_j] A_i[e_j] - sum_j pg_j B_i[pe_j] A_i[pe_j])
  otherwise ("pristine"):       W_i  = W0_i + s * sum_j g_j B_i[e_j] A_i[e_j]
then prev_experts / prev_gates hold experts / gates (written on the device).

The per-weight tables (pointers, shapes) are built once per weight set, keyed on the tensors'
data_ptrs, and kept on the device; a call then launches one kernel (Triton) or a light pack
kernel plus one grouped GEMM (CUTLASS), with no host sync and no host-to-device copy, so it
can be captured in a CUDA graph (make one warm-up call before capturing).

Importable on a CPU-only machine with neither Triton nor CUTLASS: those load lazily.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from adafuse_compile.cutlass_kernels.plan_cache import PlanCache, check_triton_runs_on
from adafuse_compile.cutlass_kernels.reference import reference_switch_, simple_merge_switch_

__all__ = ["sgmm_switch_", "simple_merge_switch_", "IMPLS", "clear_plan_cache"]

IMPLS = ("auto", "reference", "triton", "cutlass")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_K = 4


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_step(experts: Tensor, gates: Tensor, prev_experts: Tensor, prev_gates: Tensor,
                  dev: torch.device) -> None:
    """The per-call tensors' metadata (no device reads): checked on every call, since a cached plan
    is keyed on the weight table only."""
    if experts.dim() != 1 or not 1 <= experts.numel() <= _MAX_K:
        raise ValueError(
            f"sgmm_switch_: experts must be 1-D with k in 1..{_MAX_K}, got {_shape(experts)}"
        )
    k = experts.numel()
    for name, t, want in (
        ("experts", experts, torch.int64), ("gates", gates, torch.float32),
        ("prev_experts", prev_experts, torch.int64), ("prev_gates", prev_gates, torch.float32),
    ):
        if t.dtype != want:
            raise ValueError(f"sgmm_switch_: {name} must be {want}, got {t.dtype}")
        if _shape(t) != (k,):
            raise ValueError(
                f"sgmm_switch_: {name} has shape {_shape(t)}, expected ({k},) (k from experts)"
            )
        if t.device != dev:
            raise ValueError(f"sgmm_switch_: {name} is on {t.device}, weights on {dev}")
        if not t.is_contiguous():
            raise ValueError(f"sgmm_switch_: {name} must be contiguous")


def validate_table(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], pristine: list[Tensor] | None,
) -> None:
    """The weight table's metadata (no device reads), checked when its plan is built; `weights` is
    not empty (the caller checked)."""
    n = len(weights)
    if len(lora_A) != n or len(lora_B) != n:
        raise ValueError(
            f"sgmm_switch_: got {n} weights, {len(lora_A)} lora_A and {len(lora_B)} lora_B"
        )
    if pristine is not None and len(pristine) != n:
        raise ValueError(f"sgmm_switch_: got {n} weights but {len(pristine)} pristine copies")
    dev, dtype = weights[0].device, weights[0].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"sgmm_switch_: weights[0] has dtype {dtype}; expected one of {_DTYPES}")
    r = lora_A[0].shape[1] if lora_A[0].dim() == 3 else None
    for i in range(n):
        w, a, b = weights[i], lora_A[i], lora_B[i]
        if w.dim() != 2:
            raise ValueError(f"sgmm_switch_: weights[{i}] must be 2-D [out, in], got {_shape(w)}")
        out, inn = w.shape
        if a.dim() != 3 or b.dim() != 3:
            raise ValueError(
                f"sgmm_switch_: lora_A[{i}] {_shape(a)} / lora_B[{i}] {_shape(b)} must be "
                "3-D [N, r, in] / [N, out, r]"
            )
        if a.shape[2] != inn or b.shape[1] != out or a.shape[0] != b.shape[0] \
                or a.shape[1] != b.shape[2]:
            raise ValueError(
                f"sgmm_switch_: weights[{i}] {_shape(w)} does not match lora_A[{i}] "
                f"{_shape(a)} = [N, r, in] and lora_B[{i}] {_shape(b)} = [N, out, r]"
            )
        if a.shape[1] != r:
            raise ValueError(
                f"sgmm_switch_: lora_A[{i}] has rank {a.shape[1]}, lora_A[0] has rank {r}; "
                "one rank for all weights"
            )
        tensors = [("weights", w), ("lora_A", a), ("lora_B", b)]
        if pristine is not None:
            p = pristine[i]
            if _shape(p) != _shape(w):
                raise ValueError(
                    f"sgmm_switch_: pristine[{i}] {_shape(p)} != weights[{i}] {_shape(w)}"
                )
            if p.data_ptr() == w.data_ptr():
                raise ValueError(f"sgmm_switch_: pristine[{i}] aliases weights[{i}]")
            tensors.append(("pristine", p))
        for name, t in tensors:
            if t.dtype != dtype:
                raise ValueError(
                    f"sgmm_switch_: {name}[{i}] is {t.dtype}, weights[0] is {dtype}; "
                    "one dtype for all weights and factors"
                )
            if t.device != dev:
                raise ValueError(f"sgmm_switch_: {name}[{i}] is on {t.device}, weights[0] on {dev}")
            if not t.is_contiguous():
                raise ValueError(f"sgmm_switch_: {name}[{i}] {_shape(t)} must be contiguous")


# ------------------------------------------------------------------------------------------
# Plans: built once per (weight set, k, mode, impl), cached on data_ptrs.
# ------------------------------------------------------------------------------------------
_plans = PlanCache()


def clear_plan_cache() -> None:
    _plans.clear()


def _plan_key(impl, weights, lora_A, lora_B, pristine, k) -> tuple:
    return (
        impl, k, weights[0].device,  # each tensor's dtype is in its entry below
        tuple((w.data_ptr(), w.shape, w.dtype) for w in weights),
        # Shapes and dtypes too: a freed tensor's address can come back holding another tensor.
        tuple((a.data_ptr(), a.shape, a.dtype) for a in lora_A),
        tuple((b.data_ptr(), b.shape, b.dtype) for b in lora_B),
        None if pristine is None else tuple((p.data_ptr(), p.shape, p.dtype) for p in pristine),
    )


def _resolve_impl(impl: str, weights, lora_A, lora_B, pristine) -> str:
    dev = weights[0].device
    if impl == "reference":
        return impl
    if dev.type != "cuda":
        if impl == "auto":
            return "reference"
        if impl == "triton":
            check_triton_runs_on(dev, "sgmm_switch_")
            return "triton"
        raise ValueError(f"sgmm_switch_: impl 'cutlass' needs a CUDA device, weights are on {dev}; "
                         "use impl='auto' (the PyTorch reference off CUDA) or move the model to the GPU")
    if impl in ("auto", "cutlass"):
        from adafuse_compile.cutlass_kernels import cutlass_sgmm

        why = cutlass_sgmm.unsupported_reason(weights, lora_A, pristine, lora_B)
        if why is None:
            return "cutlass"
        if impl == "cutlass" or why.startswith("unaligned"):
            warnings.warn(f"sgmm_switch_: CUTLASS path not taken ({why}); using Triton",
                          stacklevel=3)
        return "triton"
    return impl


def _get_plan(impl, weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates,
              pristine):
    if impl not in IMPLS:
        raise ValueError(f"sgmm_switch_: impl must be one of {IMPLS}, got {impl!r}")
    if len(weights) == 0:
        raise ValueError("sgmm_switch_: `weights` is empty")
    validate_step(experts, gates, prev_experts, prev_gates, weights[0].device)
    key = _plan_key(impl, weights, lora_A, lora_B, pristine, experts.numel())

    def build():
        validate_table(weights, lora_A, lora_B, pristine)
        chosen = _resolve_impl(impl, weights, lora_A, lora_B, pristine)
        k = experts.numel()
        if chosen == "reference":
            return "reference"
        if chosen == "triton":
            from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan

            return TritonPlan(weights, lora_A, lora_B, k, pristine)
        from adafuse_compile.cutlass_kernels.cutlass_sgmm import plan_fastest_form

        try:  # pack or gather, whichever switches faster on this GPU (timed once per shape)
            return plan_fastest_form(weights, lora_A, lora_B, k, pristine)
        # e.g. CUTLASS refuses every candidate GEMM for these shapes (RuntimeError), a factor the
        # plan cannot address (ValueError), a build directory it cannot write (OSError)
        except (RuntimeError, ValueError, OSError) as exc:
            if impl == "cutlass":
                raise
            warnings.warn(f"sgmm_switch_: CUTLASS plan failed ({exc}); using Triton", stacklevel=4)
            from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan

            return TritonPlan(weights, lora_A, lora_B, k, pristine)
    return _plans.get(key, build, weights[0].device)


def prepare_plan(impl, weights, lora_A, lora_B, prev_experts, prev_gates, pristine) -> None:
    """Build (and cache) the plan a later call with these tensors will use, outside any CUDA-graph
    capture; `prev_experts`/`prev_gates` stand in for this step's experts and gates (same k)."""
    _get_plan(impl, weights, lora_A, lora_B, prev_experts, prev_gates, prev_experts, prev_gates, pristine)


def _switch_impl(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
    gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    pristine: Optional[list[Tensor]], impl: str,
) -> None:
    plan = _get_plan(impl, weights, lora_A, lora_B, experts, gates, prev_experts,
                     prev_gates, pristine)
    if plan == "reference":
        reference_switch_(weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates,
                          scaling, pristine)
    else:
        plan.run(experts, gates, prev_experts, prev_gates, scaling)


# Explicit schema: `Tensor[]?` (pristine) cannot be inferred from the annotations.
_SCHEMA = (
    "(Tensor(a!)[] weights, Tensor[] lora_A, Tensor[] lora_B, Tensor experts, Tensor gates, "
    "Tensor(b!) prev_experts, Tensor(c!) prev_gates, float scaling, Tensor[]? pristine, "
    "str impl) -> ()"
)


@torch.library.custom_op(
    "adafuse::sgmm_switch", mutates_args=("weights", "prev_experts", "prev_gates"),
    schema=_SCHEMA,
)
def sgmm_switch(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
    gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    pristine: Optional[list[Tensor]], impl: str,
) -> None:
    _switch_impl(weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates, scaling,
                 pristine, impl)


@sgmm_switch.register_fake
def _sgmm_switch_fake(weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates,
                      scaling, pristine, impl) -> None:
    return None


def sgmm_switch_(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
    gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    pristine: list[Tensor] | None = None, impl: str = "auto",
) -> None:
    """Switch every adapted weight to this token's experts in one launch (see module doc)."""
    torch.ops.adafuse.sgmm_switch(
        weights, lora_A, lora_B, experts, gates, prev_experts, prev_gates, float(scaling),
        pristine, impl,
    )
