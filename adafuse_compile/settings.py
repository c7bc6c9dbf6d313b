"""Backend settings: built once from torch.compile(options=..., mode=...), frozen, validated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .runtime.cost_model import validate_overrides

PATHS = ("merge", "factor", "gather", "auto")
AVAILABLE_PATHS = PATHS
CODEGENS = ("inductor", "eager")
SGMM_IMPLS = ("auto", "reference", "triton", "cutlass")
PREFILL_EXPANDS = ("auto", "dense", "sets", "slots")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class AdaFuseOptionsError(ValueError):
    """A torch.compile option for the adafuse backend is invalid; the message lists the valid ones."""


@dataclass(frozen=True)
class BackendSettings:
    # merge: one-token steps merge, others stay eager-unmerged; factor: one-token steps read their
    # experts from fixed slots (W untouched), others gather; gather: every step unmerged through the
    # fused gather op; auto: one-token decode steps merge or use the slots, whichever the cost
    # model (runtime/cost_model.py) estimates faster; multi-token steps gather
    path: str = "auto"
    # auto only: measure the cost model's copy bandwidth and small-kernel cost on this GPU once
    # (cached on disk); False, or ADAFUSE_CALIBRATE=0, uses the documented H200 defaults
    calibrate: bool = True
    # auto only: cost parameters to use instead of the calibrated/default ones, any of
    # runtime.cost_model.COST_PARAMETERS, e.g. {"launch_s": 3e-6}; stored as sorted (key, value) pairs
    auto_costs: dict | tuple | None = None
    # Merge into buffers of our own (M = W0 + delta_t, W never written): no drift, costs one copy of the adapted weights.
    # None: exact unless that copy exceeds pristine_memory_fraction of free GPU memory.
    exact: bool | None = None
    pristine_memory_fraction: float = 0.5
    resync_every: int | None = None  # in-place mode: switches between exact resyncs (None: 64, measured)
    codegen: str = "inductor"  # inductor | eager (run the rewritten graph as is)
    cudagraphs: bool | None = None  # None: on for CUDA graphs when mode="reduce-overhead"
    sgmm_impl: str = "auto"
    # gather path on CUDA: launch each group's adapter kernels on a second stream, concurrently with
    # the group's backbone linears (small latency-bound kernels next to bandwidth-bound GEMMs).
    # None: on for CUDA (both routings: rewrite_gather.side_stream_choice); False: in line, one
    # after the other; True: the split graph everywhere
    # (off CUDA the start runs in place and the join does nothing: for tests of the graph)
    side_stream: bool | None = None
    # gather path, prefill-sized steps (from DENSE_MIN_TOKENS tokens, or a dynamic count): "dense"
    # computes every expert's term in dense matmuls weighted by a gate matrix (no kernel of ours:
    # Inductor's GEMMs); "sets" / "slots" keep the Triton gather kernels, the expand grouping the
    # tokens by their set of experts, or the rows by expert with each slot's term summed in the add.
    # "auto": dense, faster than both at 512 tokens on the H200 (docs/paths.md, fourth run).
    prefill_expand: str = "auto"
    # gather path, dense prefill: read packed copies of the expert factors (each B as [out, N r], the
    # A of modules sharing an input stacked), kept by the model and re-packed whenever a factor
    # changes (runtime/dense_packs.py), instead of permuting every B on every prefill step. Costs one
    # more copy of the adapters in device memory (logged); False: no copy, slower prefill.
    prefill_packed: bool = True
    # gather path, dense prefill over packed factors: compute each adapted linear and its adapter
    # term in one GEMM (x W^T + gated h B^T over K = in + N r, a Triton kernel on CUDA), so no delta
    # is written and read back. Opt-in: measured slower than the unfused form on the H200, its Triton
    # GEMM behind cuBLAS (docs/paths.md "Fused prefill").
    prefill_fused: bool = False

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise AdaFuseOptionsError(f"path={self.path!r} is not one of {PATHS}")
        if self.codegen not in CODEGENS:
            raise AdaFuseOptionsError(f"codegen={self.codegen!r} is not one of {CODEGENS}")
        if self.sgmm_impl not in SGMM_IMPLS:
            raise AdaFuseOptionsError(f"sgmm_impl={self.sgmm_impl!r} is not one of {SGMM_IMPLS}")
        if not (self.exact is None or isinstance(self.exact, bool)):
            raise AdaFuseOptionsError(f"exact must be True, False or None (auto), got {self.exact!r}")
        fraction = self.pristine_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise AdaFuseOptionsError(f"pristine_memory_fraction must be a number in (0, 1], got {fraction!r}")
        if self.resync_every is not None and (isinstance(self.resync_every, bool) or not isinstance(self.resync_every, int)
                                              or self.resync_every < 0):
            raise AdaFuseOptionsError(f"resync_every must be a non-negative int (0: never) or None, got {self.resync_every!r}")
        if self.prefill_expand not in PREFILL_EXPANDS:
            raise AdaFuseOptionsError(f"prefill_expand={self.prefill_expand!r} is not one of {PREFILL_EXPANDS}")
        if not (self.side_stream is None or isinstance(self.side_stream, bool)):
            raise AdaFuseOptionsError(f"side_stream must be True, False or None (CUDA only), got {self.side_stream!r}")
        if not isinstance(self.prefill_packed, bool):
            raise AdaFuseOptionsError(f"prefill_packed must be True or False, got {self.prefill_packed!r}")
        if not isinstance(self.prefill_fused, bool):
            raise AdaFuseOptionsError(f"prefill_fused must be True or False, got {self.prefill_fused!r}")
        if not isinstance(self.calibrate, bool):
            raise AdaFuseOptionsError(f"calibrate must be True or False, got {self.calibrate!r}")
        if self.auto_costs is not None:
            try:
                costs = dict(self.auto_costs) if isinstance(self.auto_costs, tuple) else self.auto_costs
                validate_overrides(costs)
            except (TypeError, ValueError) as exc:
                raise AdaFuseOptionsError(f"auto_costs: {exc}" if "auto_costs" not in str(exc) else str(exc)) from None
            object.__setattr__(self, "auto_costs", tuple(sorted(costs.items())))  # frozen and hashable
        if not (self.cudagraphs is None or isinstance(self.cudagraphs, bool)):
            raise AdaFuseOptionsError(f"cudagraphs must be True, False or None, got {self.cudagraphs!r}")

    @classmethod
    def from_compile_args(cls, options: dict | None = None, mode: str | None = None) -> "BackendSettings":
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise AdaFuseOptionsError(f"unknown adafuse option(s) {unknown}; valid options: {valid}")
        if mode not in MODES:
            raise AdaFuseOptionsError(f"mode={mode!r} is not one of {MODES[1:]}")
        # A custom backend gets `mode` but torch does not apply it: map it here.
        if mode == "reduce-overhead" and options.get("cudagraphs") is None:
            options["cudagraphs"] = True
        return cls(**options)
