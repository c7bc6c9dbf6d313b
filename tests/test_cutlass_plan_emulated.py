"""CutlassPlan's timing on the CPU, with the extension replaced by an emulator that reads and
writes the same raw addresses the CUDA kernels would (pack, slot table, grouped GEMM: D = C + L R
in fp32, rounded once). What it checks is the plans' logic and data flow, not the kernels: a plan
with candidates to time builds a twin over the same weights with cancelling factors, every timed
launch runs on the twin, the weights come out bit for bit, the twin's workspace is gone before
the plan allocates its own, the plan builds only the GEMM the twin kept, and its switch is right.
The kernels themselves are checked on the GPU (tests/test_sgmm_gpu.py)."""
import contextlib
import ctypes
import types

import pytest
import torch

from adafuse_compile.cutlass_kernels import build, cutlass_sgmm
from adafuse_compile.cutlass_kernels.reference import make_problem, oracle_switch

SHAPES = [(128, 64), (64, 192), (128, 64)]


def _view(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The memory at host address `ptr` as a tensor (shared, writable), as a kernel sees it."""
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = (ctypes.c_uint8 * (numel * itemsize)).from_address(ptr)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)


def _slots(experts, gates, prev_experts, prev_gates, k, inplace, scaling):
    cur = [(int(e), scaling * float(g)) for e, g in zip(experts.tolist(), gates.tolist())]
    if not inplace:
        return cur
    return [(int(e), -scaling * float(g)) for e, g in zip(prev_experts.tolist(), prev_gates.tolist())] + cur


def _combine_slots(products, coef, rank):
    """The gather GEMM's per-slot combine in fp32, step for step as sgmm_sm90.cu does it:
    `mma_four_slots` for four one-k-block slots with c2, c3 non-zero, else `mma`'s fold (slot 0
    into the accumulator, each later slot folded in as c0 acc + c1 partial, then acc + cj partial;
    one slot alone scaled by c0)."""
    c = [torch.tensor(x, dtype=torch.float32) for x in coef]
    if len(products) == 4 and rank == 64 and abs(coef[2]) > 1e-30 and abs(coef[3]) > 1e-30:
        accum = products[0] * (c[0] / c[2]) + products[2]
        other = products[1] * (c[1] / c[3]) + products[3]
        return c[2] * accum + c[3] * other
    accum = products[0]
    for j in range(1, len(products)):
        accum = (c[0] if j == 1 else 1.0) * accum + c[j] * products[j]
    return accum * c[0] if len(products) == 1 else accum


class _Gemm:
    def __init__(self, ext, variant, mnk, ptrs, slot_table, rank, n_experts, sm_count=0):
        self.ext, self.variant, self.mnk, self.ptrs, self.sm_count = ext, variant, mnk, ptrs, sm_count
        self.slot_table, self.rank, self.n_experts = slot_table, rank, n_experts

    def run(self):
        self.ext.runs.append(self)
        dtype = self.ext.dtype
        for g, (m, n, kc) in enumerate(self.mnk):
            lhs, rhs, c, d = (self.ptrs[i][g] for i in range(4))
            if self.slot_table is not None:  # gather: the stacked experts and the slot table
                b = _view(lhs, (self.n_experts, m, self.rank), dtype)
                a = _view(rhs, (self.n_experts, self.rank, n), dtype)
                table = self.slot_table
                experts, coef = table[:8].tolist(), table[8:].view(torch.float32).tolist()
                products = [b[e].float() @ a[e].float() for e in experts[:kc // self.rank]]
                acc = _combine_slots(products, coef, self.rank)
            else:
                acc = _view(lhs, (m, kc), dtype).float() @ _view(rhs, (kc, n), dtype).float()
            _view(d, (m, n), dtype).copy_((_view(c, (m, n), dtype).float() + acc).to(dtype))


class _Ext:
    """Stands in for the built extension (build._BINDING's functions)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.plans, self.runs, self.packs = [], [], []

    def create_plan(self, dtype_code, variant, mnk, ptrs, sm_count, raster, swizzle,
                    slot_table=None, rank=0, n_experts=0):
        plan = _Gemm(self, variant, mnk.tolist(), ptrs.tolist(), slot_table, rank, n_experts, sm_count)
        self.plans.append(plan)
        return plan

    def pack_blocks_per_sm(self, dtype_code):
        return 4

    def pack(self, dtype_code, desc, work, experts, gates, prev_experts, prev_gates, counter, k, r,
             inplace, scaling):
        slots = _slots(experts, gates, prev_experts, prev_gates, k, inplace, scaling)
        self.packs.append([row[:2] for row in desc.tolist()])
        for a_ptr, b_ptr, l_ptr, r_ptr, out, inn in desc.tolist():
            n = max(e for e, _ in slots) + 1
            b, a = _view(b_ptr, (n, out, r), self.dtype), _view(a_ptr, (n, r, inn), self.dtype)
            lhs, rhs = _view(l_ptr, (out, len(slots) * r), self.dtype), _view(r_ptr, (len(slots) * r, inn), self.dtype)
            for j, (e, c) in enumerate(slots):  # coef * B in fp32, rounded to 16 bits, as the kernel
                lhs[:, j * r:(j + 1) * r] = (c * b[e].float()).to(self.dtype)
                rhs[j * r:(j + 1) * r] = a[e]
        prev_experts.copy_(experts), prev_gates.copy_(gates)

    def slots(self, experts, gates, prev_experts, prev_gates, table, k, inplace, scaling):
        slots = _slots(experts, gates, prev_experts, prev_gates, k, inplace, scaling)
        table[:len(slots)] = torch.tensor([e for e, _ in slots], dtype=torch.int32)
        table[8:8 + len(slots)] = torch.tensor([c for _, c in slots], dtype=torch.float32).view(torch.int32)
        prev_experts.copy_(experts), prev_gates.copy_(gates)


@pytest.fixture
def emulated(monkeypatch):
    """CutlassPlan on CPU tensors with the emulator; `ms[(gather, variant)]` scripts the timings."""
    state = types.SimpleNamespace(ext=None, ms={})

    def load_extension(variants=None):
        return state.ext

    def elapsed(fn, reps):  # scripted per (gather, variant, grid) or per (gather, variant)
        fn()
        last = state.ext.runs[-1]
        key = (last.slot_table is not None, last.variant)
        return state.ms.get(key + (last.sm_count,), state.ms.get(key, 1.0)) * 1e-3

    monkeypatch.setattr(build, "load_extension", load_extension)
    monkeypatch.setattr(cutlass_sgmm, "launch_elapsed_s", elapsed)
    monkeypatch.setattr(cutlass_sgmm, "_chosen", {})
    monkeypatch.setattr(cutlass_sgmm, "_form_chosen", {})
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(multi_processor_count=2))
    return state


def _grid(share: float, sms: int = 2) -> int:
    """The persistent grid a candidate's share gives on the emulated 2-SM device (0: every SM)."""
    return 0 if share >= 1 else max(1, round(share * sms))


def _problem(mode, k, rank, seed=0):
    return make_problem(SHAPES, k=k, rank=rank, n_experts=4, dtype=torch.bfloat16,
                        pristine=mode == "pristine", generator=torch.Generator().manual_seed(seed))


def _check_switch(plan, p, mode):
    expected = oracle_switch(p["weights"], p["lora_A"], p["lora_B"], p["experts"], p["gates"],
                             p["prev_experts"], p["prev_gates"], p["scaling"], pristine=p["pristine"])
    plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
    for w, e in zip(p["weights"], expected):
        assert (w.double() - e).abs().max() <= 0.02 * e.abs().max()


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_a_plan_times_on_its_twin_and_builds_only_the_kept_gemm(emulated, gather, mode, k):
    p = _problem(mode, k, 64)
    emulated.ext = _Ext(torch.bfloat16)
    table = cutlass_sgmm.GATHER_CANDIDATES if gather else cutlass_sgmm.GEMM_CANDIDATES
    candidates = table[mode]
    fastest = candidates[-1]  # scripted: the last candidate is the fastest
    emulated.ms = {(gather, v, _grid(share)): (0.5 if (v, ra, share) == fastest else 1.0)
                   for v, ra, share in candidates}
    target = [w.clone() for w in (p["pristine"] or p["weights"])]
    real = set(t.data_ptr() for t in p["lora_A"] + p["lora_B"])

    plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], k, p["pristine"], gather=gather)

    assert all(torch.equal(w.view(torch.int16), t.view(torch.int16)) for w, t in zip(p["weights"], target))
    ext = emulated.ext
    timed = [g for g in ext.runs]
    if len(candidates) > 1:
        assert plan.choice["how"] == "timed (on a twin plan with cancelling inputs)", plan.choice
        assert (plan.variant, plan.raster, plan.grid_share) == fastest
        assert ext.plans[-1].sm_count == _grid(fastest[2])
        assert len(ext.plans) == len(candidates) + 1  # the twin's candidates, then the kept one alone
        assert ext.plans[-1].variant == fastest[0] and not any(g is ext.plans[-1] for g in timed)
        twin_factors = {ptr for g in ext.plans[:-1] for ptr in g.ptrs[0] + g.ptrs[1]} if gather \
            else {ptr for rows in ext.packs for row in rows for ptr in row}
        assert twin_factors and not twin_factors & real  # every timed launch read the twin's factors
    else:
        assert plan.choice["how"] == "given" and not timed and len(ext.plans) == 1
    _check_switch(plan, p, mode)


def test_the_twins_workspace_is_freed_before_the_plan_allocates_its_own(emulated, monkeypatch):
    import weakref

    p = _problem("inplace", 2, 64)
    emulated.ext = _Ext(torch.bfloat16)
    emulated.ms = {(False, 14): 1.0, (False, 1): 0.5}
    workspaces = []
    original = cutlass_sgmm.CutlassPlan._pack_operands

    def tracked(self, *args):
        out = original(self, *args)
        alive = [ref() is not None for ref in workspaces]
        workspaces.append(weakref.ref(self.workspace))
        tracked.alive_at_allocation.append(alive)
        return out
    tracked.alive_at_allocation = []
    monkeypatch.setattr(cutlass_sgmm.CutlassPlan, "_pack_operands", tracked)
    cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], 2, None)
    assert tracked.alive_at_allocation == [[], [False]]  # the twin's, then the plan's: one at a time


@pytest.mark.parametrize("faster", [False, True])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
def test_the_switch_op_times_both_forms_on_twins_and_keeps_the_faster(emulated, faster, mode):
    """plan_fastest_form with the emulator: both forms' twins timed (their GEMM candidates and
    their whole switches), the weights bit for bit, the kept form built on the real factors."""
    p = _problem(mode, 2, 64)
    emulated.ext = _Ext(torch.bfloat16)
    emulated.ms = {(g, v): (0.5 if g == faster else 1.0) for g in (False, True) for v in range(32)}
    target = [w.clone() for w in (p["pristine"] or p["weights"])]
    plan = cutlass_sgmm.plan_fastest_form(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"])
    assert all(torch.equal(w.view(torch.int16), t.view(torch.int16)) for w, t in zip(p["weights"], target))
    assert plan.gathers == faster and plan.choice["form"] == f"{'gather' if faster else 'pack'} (timed)"
    assert plan.choice["form_ms"] == {"pack": 1.0 if faster else 0.5, "gather": 0.5 if faster else 1.0}
    assert not any(g in emulated.ext.runs for g in [plan.gemm])  # the kept plan never ran while timing
    _check_switch(plan, p, mode)


@pytest.mark.parametrize("gather", [False, True])
def test_a_timing_plan_keeps_its_factors_alive(emulated, gather):
    """A plan keeps only its factors' addresses: a timing plan's own factors must live as long as
    it does. Memory freed after the twin's build and refilled with NaN must not reach W."""
    p = _problem("inplace", 2, 64)
    emulated.ext = _Ext(torch.bfloat16)
    target = [w.clone() for w in p["weights"]]
    plan = cutlass_sgmm.CutlassPlan.for_timing(p["weights"], 64, 2, None, gather=gather)
    pointers = {t.data_ptr() for pair in plan.timing_factors for t in pair}
    used = {ptr for g in emulated.ext.plans for ptr in g.ptrs[0] + g.ptrs[1]} if gather \
        else {ptr for row in plan.desc.tolist() for ptr in row[:2]}
    assert used <= pointers
    junk = [torch.full((n,), float("nan"), dtype=torch.bfloat16) for n in (2**12, 2**14, 2**16) * 8]
    cutlass_sgmm.time_switch(plan)
    assert all(torch.equal(w.view(torch.int16), t.view(torch.int16)) for w, t in zip(p["weights"], target))
    del junk


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_time_switch_reads_a_real_switchs_memory_and_adds_zero(emulated, monkeypatch, gather, mode, k):
    """Every timed switch of a twin reads its slots' experts from memory of their own: no expert
    read twice in a call (in place the steps take turns, so the previous experts are never this
    token's), each weight its own factors; and every call leaves the weights bit for bit."""
    p = _problem(mode, k, 64)
    emulated.ext = _Ext(torch.bfloat16)
    inplace = mode == "inplace"
    target = [w.clone() for w in (p["pristine"] or p["weights"])]
    monkeypatch.setattr(cutlass_sgmm, "launch_elapsed_s", lambda fn, reps: [fn() for _ in range(reps)] and 1e-3)
    plan = cutlass_sgmm.CutlassPlan.for_timing(p["weights"], 64, k, p["pristine"], gather=gather)
    calls = []
    original = plan.pack

    def recording(experts, gates, prev_experts, prev_gates, scaling):
        calls.append(_slots(experts, gates, prev_experts, prev_gates, k, inplace, scaling))
        original(experts, gates, prev_experts, prev_gates, scaling)
    plan.pack = recording
    cutlass_sgmm.time_switch(plan, reps=5)
    assert len(calls) == 6  # the warm-up, then the timed ones
    for slots in calls:
        experts = [e for e, _ in slots]
        assert len(set(experts)) == len(experts), slots
        assert sum(c for _, c in slots) == 0 or (not inplace and k == 1)  # cancels (copies, below)
    assert all(torch.equal(w.view(torch.int16), t.view(torch.int16)) for w, t in zip(p["weights"], target))
    lora_A, lora_B = plan.timing_factors
    assert len({t.data_ptr() for t in lora_A + lora_B}) == 2 * len(SHAPES)  # shapes 0 and 2 are alike


@pytest.mark.parametrize("gather", [False, True])
def test_no_memory_for_the_twin_plans_the_first_candidate_untimed(emulated, monkeypatch, gather):
    """A GPU too full for the timing twin (its factors, its workspace) still gets a right plan:
    the first candidate, untimed, saying so, nothing recorded for the shape; the switch op's
    form choice falls back to the pack form the same way."""
    from adafuse_compile.cutlass_kernels import cancelling

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 MiB\nmore")
    monkeypatch.setattr(cancelling, "factors", full)
    p = _problem("pristine", 2, 64)
    emulated.ext = _Ext(torch.bfloat16)
    target = [w.clone() for w in p["pristine"]]
    table = cutlass_sgmm.GATHER_CANDIDATES if gather else cutlass_sgmm.GEMM_CANDIDATES
    plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"], gather=gather)
    assert (plan.variant, plan.raster, plan.grid_share) == table["pristine"][0] and not emulated.ext.runs
    assert plan.choice["how"].startswith("the first candidate, untimed: no GPU memory for the timing twin (CUDA out of memory")
    assert not cutlass_sgmm._chosen
    assert all(torch.equal(w.view(torch.int16), t.view(torch.int16)) for w, t in zip(p["pristine"], target))
    _check_switch(plan, p, "pristine")
    op_plan = cutlass_sgmm.plan_fastest_form(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"])
    assert not op_plan.gathers and op_plan.choice["form"].startswith("pack (untimed: no GPU memory")
    assert not cutlass_sgmm._form_chosen


@pytest.mark.parametrize("op", [False, True])
def test_a_twin_that_ran_out_of_memory_is_freed_before_the_real_plan_allocates(emulated, monkeypatch, op):
    """What a failed twin had allocated is gone before the real plan allocates its workspace
    (an exception's traceback keeps the failed frames' tensors alive inside its except block)."""
    import weakref

    from adafuse_compile.cutlass_kernels import cancelling

    allocated = []

    def fills_then_fails(*args, **kwargs):
        held = torch.empty(1 << 16)
        allocated.append(weakref.ref(held))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 MiB")
    monkeypatch.setattr(cancelling, "factors", fills_then_fails)
    alive_at_allocation = []
    original = cutlass_sgmm.CutlassPlan._pack_operands

    def tracked(self, *args):
        alive_at_allocation.append([ref() is not None for ref in allocated])
        return original(self, *args)
    monkeypatch.setattr(cutlass_sgmm.CutlassPlan, "_pack_operands", tracked)
    p = _problem("inplace", 2, 64)
    emulated.ext = _Ext(torch.bfloat16)
    if op:
        plan = cutlass_sgmm.plan_fastest_form(p["weights"], p["lora_A"], p["lora_B"], 2, None)
    else:
        plan = cutlass_sgmm.CutlassPlan(p["weights"], p["lora_A"], p["lora_B"], 2, None)
    assert not plan.gathers and len(allocated) == (2 if op else 1)  # the op's twin, then the plan's
    assert alive_at_allocation == [[False] * len(allocated)]
