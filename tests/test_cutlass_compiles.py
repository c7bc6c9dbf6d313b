"""The sm_90a SGMM CUDA source compiles with nvcc on a CPU-only machine (nothing runs).

A grouped-GEMM unit takes about 25 s of nvcc alone on a 2-core CPU machine (variant 8, the
slowest, about 1.5x that). `pytest -q` (the CI command) runs the `slow` tests too: the pack
kernel and registry, the two default variants (inplace's in bf16, pristine's in fp16) and one
unmeasured variant (9, bf16), about 3 minutes on the CI machine (each compile there takes about a
minute). ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1 compiles every variant in both dtypes (about 9 minutes
with two pytest processes on 2 cores).
"""
import os
import re
import shutil
import subprocess
import types

import pytest

from adafuse_compile.cutlass_kernels import build
from adafuse_compile.cutlass_kernels.cutlass_sgmm import GATHER_CANDIDATES, GEMM_CANDIDATES

NVCC = shutil.which("nvcc")
INCLUDES = build.cutlass_include_dirs()
ALL_VARIANTS = os.environ.get("ADAFUSE_COMPILE_ALL_SGMM_VARIANTS") == "1"
# Compiled in the default run besides the candidates: the pingpong schedule with the epilogue
# override covers the template paths the candidates do not (pingpong kernel; D in its own buffers),
# one gather variant the main loop that reads the stacked experts itself (GatherMainloop), and one
# reduce-add variant the epilogue without C whose store adds into W (ReduceAddEpilogue).
REPRESENTATIVES = ("pingpong_64x256x64_e64x128_sepd2", "gather_coop_128x128x64_e128x64_sepd2",
                   "reduce_coop_128x128x64_e128x64")
# The GEMMs a plan chooses between by default (packed; each compiled once, dtypes alternating).
CANDIDATES = sorted({v for cands in GEMM_CANDIDATES.values() for v, *_ in cands})

needs_nvcc = pytest.mark.skipif(
    NVCC is None or INCLUDES is None,
    reason="nvcc not installed" if NVCC is None else "nvidia-cutlass wheel (headers) not installed")


def _registry() -> tuple[list[tuple[int, str]], int]:
    """(id, name) of each ADAFUSE_SGMM_VARIANTS entry in sgmm_sm90.cu, and its variant count."""
    text = build.CU_SOURCE.read_text()
    entries = [(int(i), n) for i, n in re.findall(r"^\s*X\((\d+),\s*(\w+),", text, flags=re.M)]
    count = int(re.search(r"#define ADAFUSE_SGMM_NUM_VARIANTS (\d+)", text).group(1))
    return entries, count


VARIANTS, VARIANT_COUNT = _registry()


def _nvcc(tmp_path, *defines):
    out = tmp_path / "sgmm.o"
    cmd = [NVCC, *build.nvcc_flags(INCLUDES), *defines, "-c", str(build.CU_SOURCE), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.stat().st_size > 0


def _gemm_defines(dtype: str, variant: int) -> list[str]:
    return ["-DADAFUSE_SGMM_GEMM_TU", f"-DADAFUSE_SGMM_DTYPE={build.DTYPE_CODES[dtype]}",
            f"-DADAFUSE_SGMM_VARIANT={variant}"]


def test_variant_registry_matches_build():
    ids = [i for i, _ in VARIANTS]
    names = [n for _, n in VARIANTS]
    assert ids == list(range(VARIANT_COUNT))
    assert build.NUM_VARIANTS == VARIANT_COUNT
    assert len(set(names)) == len(names)
    assert set(build.BUILD_VARIANTS) <= set(ids)
    assert set(REPRESENTATIVES) <= set(names)
    # The measured variants keep their ids when variants are appended.
    assert names[1] == "coop_128x128x64_e128x64" and names[3] == "coop_128x128x64_e128x128"
    assert names[14] == "coop_128x128x64_e128x64_sepd2" and names[17] == "coop_128x128x64_e128x128_sepd2"
    # The gather and reduce-add variants are the ids build.py names, and only those.
    assert all(n.startswith("gather_") == (i in build.GATHER_VARIANTS) for i, n in VARIANTS)
    assert all(n.startswith("reduce_") == (i in build.REDUCE_VARIANTS) for i, n in VARIANTS)
    assert all(v in build.GATHER_VARIANTS for cands in GATHER_CANDIDATES.values() for v, *_ in cands)
    assert all(v not in build.GATHER_VARIANTS for cands in GEMM_CANDIDATES.values() for v, *_ in cands)
    # reduce-add variants cannot read W0: never a pristine candidate
    assert all(v not in build.REDUCE_VARIANTS for v, *_ in GEMM_CANDIDATES["pristine"])
    assert set(CANDIDATES) <= set(build.BUILD_VARIANTS)  # a plan's candidates need no second build


@needs_nvcc
def test_pack_kernel_and_registry_compile(tmp_path):
    _nvcc(tmp_path)


def _all_or(default: list, every: list) -> list:
    """The default run's parameters, or every combination with ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1."""
    return every if ALL_VARIANTS else default


# Each candidate once, dtypes alternating (the dtype only changes the template's element type; each
# compile takes about a minute of CI), every combination with ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1.
@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("dtype,variant", _all_or(
    [(("bf16", "fp16")[i % 2], v) for i, v in enumerate(CANDIDATES)],
    [(d, v) for d in ("bf16", "fp16") for v in CANDIDATES]))
def test_candidate_grouped_gemm_compiles(tmp_path, dtype, variant):
    _nvcc(tmp_path, *_gemm_defines(dtype, variant))


_OTHER = [
    pytest.param(v, id=f"{v}-{name}", marks=[] if name in REPRESENTATIVES or ALL_VARIANTS else [
        pytest.mark.skip(reason="set ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1 to compile it")])
    for v, name in VARIANTS if v not in CANDIDATES
]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("variant", _OTHER)
@pytest.mark.parametrize("dtype", _all_or(["bf16"], ["bf16", "fp16"]))
def test_grouped_gemm_variant_compiles(tmp_path, dtype, variant):
    _nvcc(tmp_path, *_gemm_defines(dtype, variant))


# The pack launch's block table (CPU, no CUDA needed) ------------------------------------------

def test_pack_work_table_covers_every_vector_once_in_even_blocks():
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import pack_work_table

    # all seven linears of 32 7B layers, inplace (K = 256): 4 x 4096^2, 2 x 11008x4096, 4096x11008
    vectors = [(o * 256 + 256 * i) // 8 for o, i in [(4096, 4096)] * 4 + [(11008, 4096)] * 2
               + [(4096, 11008)]] * 32
    resident = 4 * 132
    work = pack_work_table(vectors, resident).tolist()
    seen = {}
    for g, first, end in work:
        seen.setdefault(g, []).append((first, end))
    assert sorted(seen) == list(range(len(vectors)))
    for g, ranges in seen.items():  # each weight's vectors split into adjacent, disjoint ranges
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == vectors[g]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        # every block but a weight's last has the one block size, a multiple of 1024 vectors
        assert len({b - a for a, b in ranges[:-1]} | {1024 * ((ranges[0][1] - ranges[0][0]) // 1024)}) == 1
    sizes = [end - first for _, first, end in work]
    assert max(sizes) % 1024 == 0
    assert 3.5 * resident <= len(work) <= 4.5 * resident  # about four waves of equal blocks


def test_pack_work_table_small_and_huge_weights():
    from adafuse_compile.cutlass_kernels.cutlass_sgmm import pack_work_table

    work = pack_work_table([3, 5000], resident_blocks=1000).tolist()
    assert work[0] == [0, 0, 3]  # a tiny weight still gets its block
    assert [w[0] for w in work].count(1) >= 2
    with pytest.raises(ValueError, match="2\\^31"):
        pack_work_table([2**31], 100)


# The plan's choice between candidate GEMMs (the timing replaced: CPU) ---------------------------

def test_choose_gemm_takes_the_median_fastest_once_per_weight_set(monkeypatch):
    import torch

    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    monkeypatch.setattr(cutlass_sgmm, "_chosen", {})
    # candidate b is faster in most trials; one outlier trial must not decide
    script = {"a": iter([2.0, 2.0, 0.5, 2.0, 2.0]), "b": iter([1.0, 1.1, 9.0, 1.0, 1.2])}
    calls = []

    def timer(plan):
        calls.append(plan)
        return next(script[plan])

    prepared = []  # a timing plan's pack or slot launch on its cancelling step, before any timing
    sig = ("pristine", torch.bfloat16, "cuda:0", 128, ((4096, 4096),))
    got = cutlass_sgmm.choose_gemm({(14, 1, 1.0): "a", (17, 1, 1.0): "b"}, lambda: prepared.append(len(calls)),
                                   sig, timer=timer)
    assert (got["variant"], got["raster"], got["how"]) == (17, 1, "timed")
    assert calls == ["a", "b"] * 5  # alternating trials
    assert prepared == [0]  # once, before the first timed launch
    again = cutlass_sgmm.choose_gemm({(14, 1, 1.0): "a", (17, 1, 1.0): "b"}, None, sig, timer=timer)
    assert (again["variant"], again["how"]) == (17, "chosen earlier in this process")
    assert len(calls) == 10  # not timed twice
    other = cutlass_sgmm.choose_gemm({(14, 1, 1.0): "a"}, None, sig[:-1] + (((8, 8),),))
    assert (other["variant"], other["how"]) == (14, "given")


def test_choose_gemm_times_grid_shares_as_candidates(monkeypatch):
    """The same GEMM on all SMs and on 7/8 of them are two candidates: the faster is kept with its
    share, and the timing names each (the share only below 1)."""
    import torch

    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    monkeypatch.setattr(cutlass_sgmm, "_chosen", {})
    sig = ("inplace", torch.bfloat16, "cuda:0", 256, ((64, 64),))
    got = cutlass_sgmm.choose_gemm({(23, 1, 1.0): "all", (23, 1, 0.875): "fewer"}, lambda: None, sig,
                                   timer=lambda plan: {"all": 17.0, "fewer": 11.0}[plan])
    assert (got["variant"], got["raster"], got["grid_share"], got["how"]) == (23, 1, 0.875, "timed")
    assert got["median_ms"] == {"v23_r1": 17.0, "v23_r1_sm0.875": 11.0}
    assert cutlass_sgmm._chosen[sig] == (23, 1, 0.875)
    assert cutlass_sgmm.GATHER_CANDIDATES["inplace"] == ((23, 1, 1.0), (23, 1, 0.875))


def test_choose_gemm_times_only_on_cancelling_inputs(monkeypatch):
    """A plan over the real factors (no `prepare`) must never time its candidates: every timed
    launch would add its update to the weights."""
    import torch

    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    monkeypatch.setattr(cutlass_sgmm, "_chosen", {})
    sig = ("inplace", torch.bfloat16, "cuda:0", 256, ((64, 64),))
    with pytest.raises(RuntimeError, match="needs a timing plan's cancelling inputs"):
        cutlass_sgmm.choose_gemm({(14, 1, 1.0): "a", (1, 1, 1.0): "b"}, None, sig, timer=lambda plan: pytest.fail("timed"))
    with pytest.raises(ValueError, match="times only a timing plan"):
        cutlass_sgmm.time_switch(types.SimpleNamespace(timing_step=None))


def test_choose_gemm_leaves_out_a_failing_candidate(monkeypatch):
    import torch

    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    monkeypatch.setattr(cutlass_sgmm, "_chosen", {})

    def timer(plan):
        if plan == "broken":
            raise RuntimeError("SGMM grouped GEMM launch failed (code 1)")
        return 1.0

    sig = ("inplace", torch.float16, "cuda:0", 256, ((64, 64),))
    got = cutlass_sgmm.choose_gemm({(14, 1, 1.0): "broken", (1, 1, 1.0): "fine"}, lambda: None, sig, timer=timer)
    assert (got["variant"], got["raster"]) == (1, 1)
    assert got["failed"] == ["variant 14, raster 1: SGMM grouped GEMM launch failed (code 1)"]
    with pytest.raises(RuntimeError, match="every candidate GEMM failed"):
        cutlass_sgmm.choose_gemm({(14, 1, 1.0): "broken", (17, 1, 1.0): "broken"}, lambda: None, sig[:-1] + (((8, 8),),),
                                 timer=timer)


def test_unscaled_probe_variant_is_refused_outside_timing_probes():
    """Variant 26 leaves the gates out (a timing probe): a plan refuses it before building anything."""
    import torch

    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan

    w, a, b = torch.zeros(8, 8), torch.zeros(2, 64, 8), torch.zeros(2, 8, 64)
    with pytest.raises(ValueError, match="timing probe"):
        CutlassPlan([w], [a], [b], 1, None, variant=build.UNSCALED_PROBE_VARIANT)
    with pytest.raises(ValueError, match="multiple of 64"):
        CutlassPlan([w], [torch.zeros(2, 16, 8)], [torch.zeros(2, 8, 16)], 1, None, gather=True)


def test_reduce_add_variants_are_refused_in_pristine_mode():
    """27-29 add the update into W through the store: they cannot write W = W0 + delta, and a
    pristine plan asking for one fails before building anything."""
    import torch

    from adafuse_compile.cutlass_kernels.cutlass_sgmm import CutlassPlan

    w, a, b = torch.zeros(8, 8), torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)
    for v in build.REDUCE_VARIANTS:
        with pytest.raises(ValueError, match="only switches in place"):
            CutlassPlan([w], [a], [b], 1, [w.clone()], variant=v)


# The choice between the pack and gather forms (plans and timing replaced: CPU) -------------------

class _FakePlan:
    """Stands in for CutlassPlan: records its form and whether it is a timing plan (over
    cancelling factors) or the real one (the caller's factors); forms in `refuse` raise when
    built, those in `fail` are marked for the test's timer to raise."""

    def __init__(self, gather, timing, refuse=(), fail=()):
        self.form = "gather" if gather else "pack"
        self.timing = timing
        if self.form in refuse:
            raise RuntimeError("CUTLASS cannot plan this")
        self.fails = self.form in fail
        self.choice = {"variant": 14, "raster": 1, "how": "timed"}


def _forms_setup(monkeypatch, rank=64, refuse=(), fail=()):
    """plan_fastest_form with fake plans: `built` lists "timing pack", "gather" (a real plan), ..."""
    import torch

    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    monkeypatch.setattr(cutlass_sgmm, "_form_chosen", {})
    weights = [torch.zeros(64, 32), torch.zeros(96, 32)]
    lora_A = [torch.zeros(8, rank, 32)] * 2
    lora_B = [torch.zeros(8, 64, rank), torch.zeros(8, 96, rank)]
    built = []

    def make_plan(w, a, b, k, pristine, gather=False):
        assert a is lora_A and b is lora_B  # the kept plan runs on the caller's factors
        plan = _FakePlan(gather, timing=False, refuse=refuse, fail=fail)
        built.append(plan.form)
        return plan

    def make_timing_plan(w, k, pristine, gather=False):
        assert w is weights and k == 2
        plan = _FakePlan(gather, timing=True, refuse=refuse, fail=fail)
        built.append("timing " + plan.form)
        return plan

    def forms(timer, pristine=None):
        return cutlass_sgmm.plan_fastest_form(weights, lora_A, lora_B, 2, pristine, make_plan=make_plan,
                                              make_timing_plan=make_timing_plan, timer=timer)
    return forms, built


@pytest.mark.parametrize("faster", ["pack", "gather"])
def test_the_switch_keeps_the_faster_form_once_per_weight_set(monkeypatch, faster):
    """The H200 favoured pack, an H100 the gather form: both are built and their whole switches
    timed (alternating, the median decides: one outlier trial must not), the faster kept, and a
    later plan of the same shape builds only that form."""
    import itertools

    forms, built = _forms_setup(monkeypatch)
    slow = "gather" if faster == "pack" else "pack"
    script = {faster: itertools.cycle([1.0, 1.1, 9.0, 1.0, 1.2]), slow: itertools.cycle([2.0, 2.0, 0.5, 2.0, 2.0])}
    calls = []

    def timer(plan):
        assert plan.timing  # only the timing plans run: their switch adds exactly 0
        calls.append(plan.form)
        return next(script[plan.form])

    plan = forms(timer)
    assert plan.form == faster and not plan.timing and plan.choice["form"] == f"{faster} (timed)"
    assert plan.choice["form_ms"] == {faster: 1.1, slow: 2.0}
    assert calls == ["pack", "gather"] * 5 and built == ["timing pack", "timing gather", faster]
    again = forms(timer)
    assert again.form == faster and "chosen earlier" in again.choice["form"]
    assert built[3:] == [faster] and len(calls) == 10  # one form built, nothing timed
    other = forms(timer, pristine=[object(), object()])  # another mode: another signature, timed again
    assert len(calls) == 20 and other.choice["form"].endswith("(timed)")


def test_a_tie_keeps_pack_and_a_rank_the_gather_form_cannot_take_builds_pack_alone(monkeypatch):
    forms, built = _forms_setup(monkeypatch)
    assert forms(lambda plan: 1.0).form == "pack"  # a tie: pack, the form measured first
    forms, built = _forms_setup(monkeypatch, rank=24)  # nothing timed, no timing plan built
    plan = forms(lambda plan: pytest.fail("nothing to time"))
    assert plan.form == "pack" and built == ["pack"] and "rank 24 is not a multiple of 64" in plan.choice["form"]


def test_a_gather_form_that_cannot_be_planned_or_run_leaves_pack(monkeypatch):
    forms, built = _forms_setup(monkeypatch, refuse=("gather",))
    plan = forms(lambda plan: pytest.fail("nothing to time"))
    assert plan.form == "pack" and "gather form could not be planned: CUTLASS cannot plan this" in plan.choice["form"]
    assert built == ["timing pack", "pack"]

    def timer(plan):
        if plan.fails:
            raise RuntimeError("SGMM grouped GEMM launch failed (code 1)")
        return 5.0
    forms, built = _forms_setup(monkeypatch, fail=("gather",))
    plan = forms(timer)
    assert plan.form == "pack" and "gather form failed to run: SGMM grouped GEMM launch failed" in plan.choice["form"]
    forms, built = _forms_setup(monkeypatch, fail=("gather", "pack"))
    with pytest.raises(RuntimeError, match="failed in both forms"):
        forms(timer)


def test_a_cached_gather_form_this_weight_set_cannot_take_falls_back_to_pack(monkeypatch):
    from adafuse_compile.cutlass_kernels import cutlass_sgmm

    refuse = []  # read by every plan built: the second weight set's gather form is refused
    forms, built = _forms_setup(monkeypatch, refuse=refuse)
    assert forms(lambda plan: 1.0 if plan.form == "gather" else 2.0).form == "gather"
    refuse.append("gather")
    plan = forms(lambda plan: pytest.fail("nothing to time"))
    assert plan.form == "pack"
    assert "gather form (chosen earlier in this process) could not be planned here: CUTLASS cannot plan this" \
        in plan.choice["form"]
    assert list(cutlass_sgmm._form_chosen.values()) == ["gather"]


def test_a_timed_gather_form_the_real_factors_cannot_take_falls_back_to_pack(monkeypatch):
    """The timing plans run on their own factors: the caller's may still be refused by the gather
    form (e.g. their alignment), and the switch then keeps pack."""
    refuse = []
    forms, built = _forms_setup(monkeypatch, refuse=refuse)

    def timer(plan):
        refuse.append("gather")  # refused from now on: the real plan, after the timing plans
        return 1.0 if plan.form == "gather" else 2.0
    plan = forms(timer)
    assert plan.form == "pack" and built == ["timing pack", "timing gather", "pack"]
    assert plan.choice["form"].startswith("pack (the gather form (timed) could not be planned here")
