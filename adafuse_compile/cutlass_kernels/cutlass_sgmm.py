"""CUTLASS SGMM launcher (Hopper sm_90a): one pointer-array grouped GEMM for every weight.

Two ways to feed the GEMM the selected experts (L = gate-scaled B's, R = A's, per weight):
- pack: a launch first gathers and scales the factors into a workspace (per weight
  L [out, Kc] and R [Kc, in], 128-byte aligned) that the GEMM reads; any rank, multiple of 8;
- gather (`gather=True`, rank a multiple of 64): the GEMM reads the stacked experts itself
  (variants 23-25: the expert of each k-block picked in its TMA load, each slot's product scaled
  in fp32 registers); a one-block launch before it writes the slot table (experts,
  +-scaling * gates) and publishes this token's experts as the next call's previous ones.
Which is faster depends on the GPU (docs/kernels.md): on the H200 pack + GEMM was faster in
pristine mode and tied in place, on an H100 the gather form was faster everywhere. The switch op
times both once per weight-set shape and keeps the faster (`plan_fastest_form`). Every timing
runs on a twin plan over the same weights with `cancelling` factors and gates: a real switch's
work, an update of exactly 0.
Either way the plan's addresses never change, so every GEMM argument (device arrays of problem
shapes, strides and pointers; C = W, beta = 1 for "inplace", C = W0 for "pristine"; D = W) is
built once, and `run` is two launches: no host sync, no copies, capturable in a CUDA graph.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from adafuse_compile.cutlass_kernels import build, cancelling
from adafuse_compile.runtime.cost_model import cuda_elapsed_after_idle_s

# Variant ids as in ADAFUSE_SGMM_VARIANTS (sgmm_sm90.cu), each with the tile scheduler's raster
# order (0 along M, 1 along N). Per mode, the candidates a plan chooses between on its first
# build (timed on the device, `choose_gemm`), best first. From the interleaved H200 probe
# (benchmarks/results/probe_sgmm_gemm_h200_run3.json, Llama-2-7B shapes, bf16, whole switch):
#   pristine (K = 128): variant 14 (128x64 epilogue subtiles, D in its own 2 buffers, 4 C stages)
#            along N: q,v 1.215 ms (86% of copy bandwidth), all seven 8.72 ms, bimodal 7.6-9.1;
#            variant 17 (one 128x128 subtile, 2 C + 2 D buffers) along N: q,v 1.302, all seven
#            7.49 ms (84%). Neither wins both sets, hence the timed choice.
#   inplace  (K = 256): variant 14 along N and variant 1 along N within 2% on both sets.
# The previous fixed defaults (1 inplace, 3 pristine, along M) measured q,v 1.646 / 1.381 and
# all seven 10.83 / 8.17 ms in the same probe.
# A candidate is (variant, raster, grid share): the share of the SMs its persistent grid takes (1: all).
GEMM_CANDIDATES = {"pristine": ((14, 1, 1.0), (17, 1, 1.0)), "inplace": ((14, 1, 1.0), (1, 1, 1.0))}
# The same three GEMMs with the experts gathered inside (sgmm_sm90.cu, GatherMainloop): 23 = 14,
# 24 = 17, 25 = 1. They need the rank to be a whole number of 64-wide k-blocks. Whole switch on
# the H200 (probe_sgmm_gemm_h200_run7_gather.json, _run10_four_slots.json, 7B shapes): q,v
# pristine 1.34-1.36 ms against 1.21-1.25 packed (v14), in place 1.55 against 1.53 (after the
# four-slot loop; 1.87 before); all seven pristine 8.45 against 7.55 (v17, run 7).
# In place only 23: every real switch measured it faster than 25, q,v 1.544 against 1.672 ms and
# all seven 10.63 against 11.09 on the H200 (probe_sgmm_gemm_h200_s23.json), 1.715 against 1.748
# and 10.88 against 11.17 on an H100 (_h100_s22.json). (25 was kept by the earlier zero-gate
# timing, which ran the generic loop where the two tie within 1%, not the four-slot loop real
# top-2, r = 64 gates take; the timing now runs on `cancelling` inputs, the real loop.)
# In place 23 also on 7/8 of the SMs: on an H100 (session 27, probe_switch_contexts_sm_counts*_h100_s27.json)
# the all-seven in-place gather switch timed alone between a decode's weight reads ran at a median
# 17.4-17.6 ms on all 132 SMs (at the top SM clock; 10.8-11.1 back to back, where the GPU sits at
# its power cap) and 10.7-10.9 ms on 116; 124 stayed slow (18.9), 108 took 11.3, 100 11.5. The
# pack form's 15.5 ms, which the op kept, got no better on 108-124 SMs. Pristine, fewer SMs only
# cost (v24 9.66 -> 10.77 ms on 116), so the share is a candidate in place only, timed like the rest.
GATHER_CANDIDATES = {"pristine": ((23, 1, 1.0), (24, 1, 1.0)), "inplace": ((23, 1, 1.0), (23, 1, 0.875))}
GATHER_RANK_MULTIPLE = 64
# Every timing (the GEMM candidates, the two forms) runs each launch alone after the GPU idled
# this many cycles (about 5 ms at 2 GHz): where a decode runs the switch, after the backbone's
# weight reads, not back to back. On an H100 back to back switches hold the GPU at its 700 W cap
# (SM clock 1380-1470 MHz), where the all-seven in-place gather GEMM on all SMs runs fast (10.4
# ms) and between a decode's reads slow (16.5-16.7): timed back to back, one fresh twin in three
# kept all SMs; after the gap, three in three kept 7/8 (10.5-11.0 ms there)
# (probe_timing_context_h100_s28.json, probe_decode_h100_s28.json). On q,v in place both timings
# keep 7/8, within a few percent of all SMs either way between runs.
IDLE_CYCLES = 10_000_000
_chosen: dict[tuple, tuple[int, int, float]] = {}  # weight-set signature -> candidate, per process
_ELEMENTS = {torch.bfloat16: build.DTYPE_CODES["bf16"], torch.float16: build.DTYPE_CODES["fp16"]}
_ALIGN_ELEMS = 64  # 128 bytes between packed blocks (TMA needs 16)


def unsupported_reason(weights: list[Tensor], lora_A: list[Tensor],
                       pristine: list[Tensor] | None, lora_B: list[Tensor] | None = None) -> str | None:
    """Why the CUTLASS path cannot take these inputs (None: it can). Builds on first use."""
    dev = weights[0].device
    if dev.type != "cuda":
        return f"needs a CUDA device, got {dev}"
    cap = torch.cuda.get_device_capability(dev)
    if cap != (9, 0):
        return f"needs an sm_90 (Hopper) GPU, this one is sm_{cap[0]}{cap[1]}"
    if weights[0].dtype not in _ELEMENTS:
        return f"dtype {weights[0].dtype} (CUTLASS path is bf16/fp16)"
    bad = alignment_problem(weights, lora_A, pristine, lora_B)
    if bad is not None:
        return "unaligned: " + bad
    if build.cutlass_include_dirs() is None:
        return "CUTLASS headers not found (pip install nvidia-cutlass)"
    try:
        build.load_extension(build.BUILD_VARIANTS)
    except (RuntimeError, OSError) as exc:
        return str(exc)
    return None


def alignment_problem(weights, lora_A, pristine, lora_B=None) -> str | None:
    """TMA needs 16-byte aligned bases and row strides: in % 8 == 0, r % 8 == 0 (16-bit); the
    pack (or the gathering GEMM) reads the factors in 16-byte vectors."""
    r = lora_A[0].shape[1]
    if r % 8:
        return f"rank {r} is not a multiple of 8"
    for name, factors in (("lora_A", lora_A), ("lora_B", lora_B or [])):
        for i, f in enumerate(factors):
            if f.data_ptr() % 16:
                return f"{name}[{i}] is not 16-byte aligned"
    for i, w in enumerate(weights):
        if w.shape[1] % 8:
            return f"weights[{i}] {tuple(w.shape)}: in_features not a multiple of 8"
        if w.data_ptr() % 16 or (pristine is not None and pristine[i].data_ptr() % 16):
            return f"weights[{i}] (or its pristine copy) is not 16-byte aligned"
    return None


def pack_work_table(vectors: list[int], resident_blocks: int, waves: int = 4,
                    unit: int = 1024) -> Tensor:
    """The pack kernel's blocks: int32 rows (weight, first vector, end vector), one weight each.

    Blocks of one size (a multiple of `unit` 16-byte vectors: 256 threads x 4 in flight; a
    weight's last block may be shorter), about `waves` x `resident_blocks` of them: the GPU's block
    scheduler then evens out the load, and the tail is one small block, where a fixed number of
    blocks per weight left the small weights' blocks idle while the large ones finished.
    `vectors[g]` = weight g's packed L and R vectors.
    """
    if any(v >= 2**31 for v in vectors):  # the kernel indexes one weight's vectors in 32 bits
        raise ValueError(f"SGMM CUTLASS: a weight's packed factors ({max(vectors)} 16-byte vectors) "
                         "exceed 2^31; use the Triton implementation")
    target = max(1, waves * resident_blocks)
    chunk = max(unit, -(-sum(vectors) // target // unit) * unit)
    rows = [[g, first, min(n, first + chunk)] for g, n in enumerate(vectors)
            for first in range(0, max(n, 1), chunk)]
    return torch.tensor(rows, dtype=torch.int32)


class CutlassPlan:
    """Grouped-GEMM plan for one weight set, with its pack workspace and block table or its
    slot table (gather).

    `variant=None`: the GEMM is chosen among GEMM_CANDIDATES[mode] (pack) or
    GATHER_CANDIDATES[mode] (`gather=True`) by timing each on this device once per weight-set
    shape (`choose_gemm`), on a twin plan over the same weights with `cancelling` factors and
    gates (`for_timing`), so the timing does a real switch's work and adds exactly 0; a `variant`
    given (with `raster`) is used as is, and decides pack or gather. `choice` records what was
    used and why.
    """

    def __init__(self, weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
                 k: int, pristine: list[Tensor] | None, variant: int | None = None,
                 sm_count: int = 0, raster: int = 0, swizzle: int = 1, gather: bool = False,
                 timing_probe: bool = False, _timing_steps: list | None = None):
        if variant == build.UNSCALED_PROBE_VARIANT and not timing_probe:
            raise ValueError(f"SGMM CUTLASS: variant {variant} is a timing probe that leaves the gates "
                             "out (wrong results); pass timing_probe=True only to time it")
        mode = "inplace" if pristine is None else "pristine"
        if variant in build.REDUCE_VARIANTS and pristine is not None:
            raise ValueError(f"SGMM CUTLASS: variant {variant} adds the update into W with a reduce-add "
                             "store, so it only switches in place; pristine mode (W = W0 + delta) needs "
                             f"a variant that reads W0, e.g. one of {GEMM_CANDIDATES['pristine']}")
        self.r, self.n_experts = int(lora_A[0].shape[1]), int(lora_A[0].shape[0])
        if variant is not None:
            gather = variant in build.GATHER_VARIANTS
        if gather and self.r % GATHER_RANK_MULTIPLE:
            raise ValueError(f"SGMM CUTLASS: the gather GEMM needs a rank that is a multiple of "
                             f"{GATHER_RANK_MULTIPLE}, got {self.r}; use gather=False (pack)")
        for g in range(len(weights)):  # TMA reads the factors (gather) or the pack does (16-byte loads)
            if lora_A[g].data_ptr() % 16 or lora_B[g].data_ptr() % 16:
                raise ValueError(f"SGMM CUTLASS: factors of weight {g} are not 16-byte aligned")
        self.gathers = gather
        table = GATHER_CANDIDATES if gather else GEMM_CANDIDATES
        candidates = table[mode] if variant is None else ((variant, raster, 1.0),)
        # both modes' candidates: one build serves in-place and pristine plans alike
        wanted = [c for cands in table.values() for c in cands] if variant is None else candidates
        self.ext = build.load_extension(tuple(sorted({v for v, *_ in wanted})))
        self.dtype_code = _ELEMENTS[weights[0].dtype]
        self.k, self.inplace = k, pristine is None
        kc = (2 * k if self.inplace else k) * self.r
        # set only by for_timing: the steps on which its factors cancel, run in turn by time_switch
        self.timing_steps = _timing_steps
        self.timing_step = _timing_steps[0] if _timing_steps else None  # what choose_gemm prepares on
        signature = (mode, weights[0].dtype, str(weights[0].device), kc, sm_count, swizzle,
                     candidates, tuple(tuple(w.shape) for w in weights))
        timed, untimed = None, None
        if (_timing_steps is None and len(candidates) > 1 and signature not in _chosen
                and not torch.cuda.is_current_stream_capturing()):
            # before this plan allocates its own workspace: the twin's is the only one at a time
            try:
                timed = CutlassPlan.for_timing(weights, self.r, k, pristine, gather=gather,
                                               sm_count=sm_count, swizzle=swizzle).choice
                # what the twin kept, timed or the only one it could plan ("given", not recorded)
                candidates = ((timed["variant"], timed["raster"], timed["grid_share"]),)
            except torch.OutOfMemoryError as exc:  # the twin's factors and workspace did not fit
                untimed = ("the first candidate, untimed: no GPU memory for the timing twin ("
                           + str(exc).splitlines()[0] + ")")
                candidates = candidates[:1]  # nothing recorded: a later plan with room times
        lhs, rhs = (self._gather_operands(lora_A, lora_B) if gather
                    else self._pack_operands(weights, lora_A, lora_B, kc))
        c_targets = weights if pristine is None else pristine
        mnk = [[w.shape[0], w.shape[1], kc] for w in weights]
        ptrs = [lhs, rhs, [c.data_ptr() for c in c_targets], [w.data_ptr() for w in weights]]
        self._plan_gemm(weights, signature, candidates, sm_count, swizzle, mnk, ptrs)
        if timed is not None:
            self.choice = dict(timed, how=timed["how"] + " (on a twin plan with cancelling inputs)")
        elif untimed is not None:
            self.choice = dict(self.choice, how=untimed)
        self.num_weights = len(weights)
        self.gemm_device = weights[0].device

    @classmethod
    def for_timing(cls, weights: list[Tensor], rank: int, k: int, pristine: list[Tensor] | None,
                   gather: bool = False, **kw) -> "CutlassPlan":
        """A plan over `weights` (and `pristine`) with `cancelling` factors of rank `rank`, whose
        `timing_step` makes a switch do a real switch's work and add exactly 0: W stays W (in
        place) or becomes W0 (pristine, until the next switch). Building it times the GEMM
        candidates (`choose_gemm`) on that step; `time_switch` times its whole switch. Each weight
        reads factors of its own (`cancelling.factors`: up to 4x the L2, then a shape's weights take
        turns), as a real switch does."""
        inplace = pristine is None
        lora_A, lora_B = cancelling.factors(weights, k, rank, inplace)
        steps = cancelling.steps(k, inplace, weights[0].device)
        plan = cls(weights, lora_A, lora_B, k, pristine, gather=gather, _timing_steps=steps, **kw)
        # The plan holds only the factors' addresses (a caller's factors are the model's): keep
        # these alive for as long as the plan can launch on them (time_switch runs after this).
        plan.timing_factors = (lora_A, lora_B)
        return plan

    def _gather_operands(self, lora_A, lora_B):
        """The GEMM reads B [N, out, r] and A [N, r, in] of each weight as they are; the slot
        table (SlotTable in sgmm_sm90.cu: 8 int32 experts, 8 float coefficients) is the only
        per-call state, written by `pack` (the slot launch). Returns the L and R pointers."""
        self.slot_table = torch.zeros(16, dtype=torch.int32, device=lora_A[0].device)
        return [b.data_ptr() for b in lora_B], [a.data_ptr() for a in lora_A]

    def _pack_operands(self, weights, lora_A, lora_B, kc):
        """The pack workspace (L and R per weight), its descriptor table and block table. Returns
        the L and R pointers into the workspace."""
        w0 = weights[0]
        dev, dtype = w0.device, w0.dtype
        offs, total = [], 0
        for w in weights:
            out, inn = w.shape
            offs.append((total, total + out * kc))
            total += -(-out * kc // _ALIGN_ELEMS) * _ALIGN_ELEMS
            total += -(-kc * inn // _ALIGN_ELEMS) * _ALIGN_ELEMS
        self.workspace = torch.empty(max(total, 1), dtype=dtype, device=dev)
        base, esz = self.workspace.data_ptr(), self.workspace.element_size()
        lhs = [base + lo * esz for lo, _ in offs]
        rhs = [base + ro * esz for _, ro in offs]
        if any(p % 16 for p in lhs + rhs):  # 128-byte blocks by construction; a guard for TMA
            raise ValueError("SGMM CUTLASS: the pack workspace is not 16-byte aligned")
        desc = [[lora_A[g].data_ptr(), lora_B[g].data_ptr(), lhs[g], rhs[g], *w.shape]
                for g, w in enumerate(weights)]
        # Built once per weight set: the only host-to-device copies this plan makes.
        self.desc = torch.tensor(desc, dtype=torch.int64).to(dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        with torch.cuda.device(dev):
            resident = self.ext.pack_blocks_per_sm(self.dtype_code)
            # before any GEMM runs: a weight set the pack cannot index fails here, W untouched
            self.work = pack_work_table(
                [(w.shape[0] * kc + kc * w.shape[1]) // 8 for w in weights],
                resident * torch.cuda.get_device_properties(dev).multi_processor_count,
            ).to(dev)
        return lhs, rhs

    def _plan_gemm(self, weights, signature, candidates, sm_count, swizzle, mnk, ptrs):
        """Create the candidate GEMM plans and keep the fastest (`choose_gemm`: a timing plan
        times them after its pack or slot launch has written the cancelling operands; any other
        plan gets the choice its twin recorded for this signature)."""
        dev = weights[0].device
        mnk_t, ptrs_t = torch.tensor(mnk, dtype=torch.int32), torch.tensor(ptrs, dtype=torch.int64)
        gather_args = dict(slot_table=self.slot_table, rank=self.r, n_experts=self.n_experts) \
            if self.gathers else {}
        with torch.cuda.device(dev):
            if signature in _chosen:  # build only the GEMM chosen for this shape earlier
                candidates = (_chosen[signature],)
            gemms, errors = {}, []
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            for v, ra, share in candidates:
                # a given sm_count stands; a share below 1 sizes the persistent grid (0: every SM)
                grid = sm_count or (0 if share >= 1 else max(1, round(share * sms)))
                try:
                    gemms[(v, ra, share)] = self.ext.create_plan(self.dtype_code, v, mnk_t, ptrs_t, grid, ra,
                                                                 swizzle, **gather_args)
                except RuntimeError as exc:  # one candidate CUTLASS refuses must not fail the plan
                    errors.append(f"{_label((v, ra, share))}: {exc}")
            if not gemms:
                raise RuntimeError("SGMM CUTLASS: no candidate GEMM could be planned: " + "; ".join(errors))
            prepare = None if self.timing_step is None else (lambda: self.pack(*self.timing_step, 1.0))
            self.choice = choose_gemm(gemms, prepare, signature)
            if errors:  # refused at planning, before choose_gemm's own launch failures
                self.choice["failed"] = errors + self.choice.get("failed", [])
        self.variant, self.raster = self.choice["variant"], self.choice["raster"]
        self.grid_share = self.choice["grid_share"]
        self.gemm = gemms[(self.variant, self.raster, self.grid_share)]

    def pack(self, experts, gates, prev_experts, prev_gates, scaling):
        """The launch before the GEMM: the slot table (gather) or the packed factors (pack); both
        publish this token's experts and gates as the next call's previous ones."""
        if self.gathers:
            self.ext.slots(experts, gates, prev_experts, prev_gates, self.slot_table, self.k,
                           self.inplace, float(scaling))
        else:
            self.ext.pack(self.dtype_code, self.desc, self.work, experts, gates, prev_experts,
                          prev_gates, self.counter, self.k, self.r, self.inplace, float(scaling))

    def run(self, experts: Tensor, gates: Tensor, prev_experts: Tensor, prev_gates: Tensor,
            scaling: float) -> None:
        self.pack(experts, gates, prev_experts, prev_gates, scaling)
        self.gemm.run()


_form_chosen: dict[tuple, str] = {}  # weight-set signature -> "pack" or "gather", per process


def fastest(candidates: dict, timer, trials: int = 5) -> tuple:
    """(best key, {key: median ms}, {key: error}) of `candidates` ({key: plan}): `trials` rounds,
    candidates alternating (a clock or power drift hits them all), `timer(plan) -> ms`; one whose
    timing raises RuntimeError is left out; a tie goes to the earlier key; best is None if all fail."""
    keys = list(candidates)
    times, failed = {key: [] for key in keys}, {}
    for _ in range(trials):
        for key in keys:
            if key in failed:
                continue
            try:
                times[key].append(timer(candidates[key]))
            except RuntimeError as exc:
                failed[key] = str(exc)
    ok = [key for key in keys if key not in failed]
    medians = {key: sorted(times[key])[len(times[key]) // 2] for key in ok}
    best = min(ok, key=lambda key: (medians[key], keys.index(key))) if ok else None
    return best, medians, failed


def plan_fastest_form(weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], k: int,
                      pristine: list[Tensor] | None, make_plan=None, make_timing_plan=None,
                      timer=None) -> CutlassPlan:
    """The plan of the form (pack or gather) that runs the whole switch faster on this device.

    Which form wins depends on the GPU: on the H200 pack + GEMM was as fast or faster (q,v
    pristine 1.21-1.25 ms against 1.34-1.36 for the gather form, in place tied), on an H100 the
    gather form won everywhere, all seven pristine 9.69 against 13.35 ms, the pack launch alone
    0.48 ms of it (docs/kernels.md; probe_sgmm_gemm_h100_s21.json). So a weight set's first plan
    builds a timing plan of each form over the same weights (`CutlassPlan.for_timing`: cancelling
    factors and gates, a real switch's work that adds exactly 0), times each whole switch
    (`time_switch`: slot or pack launch and GEMM; five alternating trials, the median), drops
    both and builds the faster form on the real factors; later plans of the same shape in this
    process build only that form. A rank that is not a multiple of GATHER_RANK_MULTIPLE, or a
    gather form that cannot be planned, takes pack. `make_plan(weights, lora_A, lora_B, k,
    pristine, gather=...)`, `make_timing_plan(weights, k, pristine, gather=...)` and
    `timer(plan) -> ms` replace CutlassPlan, CutlassPlan.for_timing and the CUDA-event timing
    (tests). `plan.choice["form"]` says which and why."""
    make_plan = make_plan or CutlassPlan
    r = int(lora_A[0].shape[1])
    make_timing_plan = make_timing_plan or (
        lambda w, kk, pr, gather: CutlassPlan.for_timing(w, r, kk, pr, gather=gather))
    signature = (pristine is None, weights[0].dtype, str(weights[0].device), k, r,
                 tuple(tuple(w.shape) for w in weights))

    def one(form: str, why: str):
        plan = make_plan(weights, lora_A, lora_B, k, pristine, gather=form == "gather")
        plan.choice["form"] = f"{form} ({why})"
        return plan

    def chosen(form: str, why: str):
        """The real plan of the form the timing chose, or pack if the gather form cannot be
        planned on these factors (e.g. their alignment: the timing ran on its own)."""
        if form == "pack":
            return one("pack", why)
        try:
            return one("gather", why)
        except (RuntimeError, ValueError) as exc:
            return one("pack", f"the gather form ({why}) could not be planned here: {exc}")

    if r % GATHER_RANK_MULTIPLE:
        return one("pack", f"rank {r} is not a multiple of {GATHER_RANK_MULTIPLE}: the gather form cannot take it")
    if signature in _form_chosen:
        return chosen(_form_chosen[signature], "chosen earlier in this process")
    if timer is None and torch.cuda.is_current_stream_capturing():
        return one("pack", "plan built during CUDA graph capture: no timing")
    if make_plan is CutlassPlan:  # one build of both forms' GEMMs, not the pack's and then a larger one
        build.load_extension(tuple(sorted({v for table in (GEMM_CANDIDATES, GATHER_CANDIDATES)
                                           for cands in table.values() for v, *_ in cands})))
    # A failed twin's memory is freed only once its exception is gone (the traceback holds its
    # frames): the reason is kept and the pack plan built after the except block.
    timed, why_pack = {}, None
    try:
        timed["pack"] = make_timing_plan(weights, k, pristine, gather=False)
    except torch.OutOfMemoryError as exc:  # not recorded: a later weight set with room times
        why_pack = "untimed: no GPU memory for the timing twins (" + str(exc).splitlines()[0] + ")"
    if why_pack is None:
        try:
            timed["gather"] = make_timing_plan(weights, k, pristine, gather=True)
        except (RuntimeError, ValueError) as exc:
            why_pack = f"the gather form could not be planned: {exc}"
    if why_pack is not None:
        del timed
        return one("pack", why_pack)
    timer = timer or time_switch
    best, medians, failed = fastest(timed, timer)  # pack first: it wins a tie
    del timed  # the timing plans' workspaces go before the real plan allocates its own
    if best is None:
        raise RuntimeError("SGMM CUTLASS: the switch failed in both forms: "
                           + "; ".join(f"{form}: {msg}" for form, msg in failed.items()))
    _form_chosen[signature] = best
    if failed:
        ((lost, why),) = failed.items()
        plan = chosen(best, f"the {lost} form failed to run: {why}")
    else:
        plan = chosen(best, "timed")
    plan.choice["form_ms"] = {form: round(ms, 4) for form, ms in medians.items()}
    return plan


def time_switch(plan: CutlassPlan, reps: int = 3) -> float:
    """ms of one whole switch of a timing plan (`CutlassPlan.for_timing`: its slot or pack launch
    and its GEMM), each alone after an idle gap (`launch_elapsed_s`), on its cancelling step:
    W + 0 in place, W0 + 0 in pristine mode."""
    if plan.timing_step is None:
        raise ValueError("time_switch times only a timing plan (CutlassPlan.for_timing): on a plan "
                         "over real factors the switch would change the weights")
    dev = plan.gemm_device
    steps = plan.timing_steps
    with torch.cuda.device(dev):
        # The steps in turn, each after the one whose experts it unmerges (in place: copies in
        # memory of their own, as a real token's previous experts are): start after the last.
        if len(steps) > 1:
            steps[0][2].copy_(steps[-1][0])
        torch.cuda.synchronize()
        turn = itertools.cycle(steps)

        def run():
            plan.run(*next(turn), 1.0)

        run()  # warm
        return launch_elapsed_s(run, reps) * 1e3


def launch_elapsed_s(fn, reps: int) -> float:
    """Seconds of one launch of `fn` as a decode sees it: each alone after IDLE_CYCLES idle, the
    median of `reps` (what time_switch and choose_gemm time with)."""
    return cuda_elapsed_after_idle_s(fn, reps, IDLE_CYCLES)


def choose_gemm(gemms: dict, prepare, signature: tuple, trials: int = 5,
                reps: int = 3, timer=None) -> dict:
    """Pick the fastest of `gemms` ({(variant, raster, grid share): plan}) for this weight set, once per
    process and weight-set signature: `trials` rounds, candidates alternating, `reps` launches
    each timed alone after an idle gap (`launch_elapsed_s`, as a decode runs it); the median per
    candidate decides. A candidate whose launch fails
    is left out (reported under "failed"); if every one fails, the first error is raised.

    Only a timing plan times (`CutlassPlan.for_timing`): `prepare()` runs its pack or slot launch
    on the cancelling step, so every timed GEMM reads non-zero operands, takes the loop a real
    switch takes, and adds exactly 0: in place the targets stay W (W + 0); in pristine mode they
    become W0 (W0 + 0) until the next switch rewrites them. Plans are built right before a switch
    (the op's first call) or for another model instance's decode step (rewrite_switch's rebind),
    whose switch runs before anything reads the targets. The device is synchronized first: the
    targets' pending writes on other streams land before the timing reads them. Any other plan
    (`prepare` None) takes what its twin recorded, or the first candidate on a capturing stream
    (no timing there). `timer(plan) -> ms` replaces the CUDA-event timing (tests).
    """
    keys = list(gemms)

    def picked(key, how):
        return {"variant": key[0], "raster": key[1], "grid_share": key[2], "how": how}

    if _chosen.get(signature) in gemms:
        return picked(_chosen[signature], "chosen earlier in this process")
    if len(keys) == 1:
        return picked(keys[0], "given")
    if timer is None and torch.cuda.is_current_stream_capturing():
        return picked(keys[0], "first candidate (plan built during CUDA graph capture: no timing)")
    if prepare is None:  # a plan over real factors: timing it would change the weights
        raise RuntimeError("SGMM CUTLASS: choose_gemm needs a timing plan's cancelling inputs "
                           "(CutlassPlan.for_timing) to time candidates on the weights")
    if timer is None:
        torch.cuda.synchronize()

        def timer(plan):
            plan.run()  # warm
            return launch_elapsed_s(plan.run, reps) * 1e3
    prepare()
    best, medians, failed = fastest(gemms, timer, trials)
    if best is None:
        raise RuntimeError("SGMM CUTLASS: every candidate GEMM failed: " + "; ".join(failed.values()))
    _chosen[signature] = best
    out = dict(picked(best, "timed"), median_ms={_label(key, short=True): round(ms, 4)
                                                 for key, ms in medians.items()})
    if failed:
        out["failed"] = [f"{_label(key)}: {msg}" for key, msg in failed.items()]
    return out


def _label(candidate: tuple, short: bool = False) -> str:
    """'variant 23, raster 1, 7/8 of the SMs' (short: 'v23_r1_sm0.875'); the share only below 1."""
    v, ra, share = candidate
    if short:
        return f"v{v}_r{ra}" + (f"_sm{share:g}" if share < 1 else "")
    return f"variant {v}, raster {ra}" + (f", {share:g} of the SMs" if share < 1 else "")
