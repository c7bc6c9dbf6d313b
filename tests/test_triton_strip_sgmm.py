"""The strip-holding Triton SGMM of benchmarks/probe_stationary.py (`StripPlan`, a probe kept out of
the package: slower than the CUTLASS plans on an H100) on the CPU, in Triton's interpreter, against
the float64 oracle, so that the probe's timings are of a correct kernel. fp32 and fp16 only (bf16
tl.dot is wrong in the interpreter); on the GPU the probe checks each config in bf16 against the same
oracle before timing it."""
import pytest
import torch

pytest.importorskip("triton")

from adafuse_compile.cutlass_kernels.reference import (
    assert_matches_oracle, delta_error, make_problem, oracle_then_poison,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests")

# Small tiles so that the interpreter walks many units: strips that end inside a weight (40, 130
# rows), a last chunk of tiles that runs past the weight (200 = 6 tiles of 32 + 8), several shapes
# in one launch, more units than programs.
SMALL = dict(BM=32, BN=32, CHUNK=2, num_warps=4, num_stages=1)
SHAPES = [(96, 200), (40, 72), (130, 24)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _run(p, config=SMALL, programs=3):
    from benchmarks.probe_stationary import StripPlan

    plan = StripPlan(p["weights"], p["lora_A"], p["lora_B"], p["experts"].numel(), p["pristine"],
                     config=config, programs=programs)
    plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
    return plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
def test_strip_sgmm_matches_oracle(dtype, k, mode):
    p = make_problem(SHAPES, k=k, rank=8, dtype=dtype, n_experts=5, pristine=mode == "pristine")
    before, expected, e, g = oracle_then_poison(p)
    plan = _run(p)
    assert not plan.even and plan.num_units > plan.programs
    bases = p["pristine"] if mode == "pristine" else before
    assert_matches_oracle(p["weights"], expected, bases, TOL[dtype])
    assert torch.equal(p["prev_experts"], e) and torch.equal(p["prev_gates"], g)


def test_strip_sgmm_even_shapes_and_second_switch():
    """Shapes that fill every strip and chunk (the unmasked path), then a second switch that must
    unmerge the first one's experts (published by the last program)."""
    p = make_problem([(64, 128), (64, 128)], k=2, rank=16, n_experts=6)
    w_init = [w.clone() for w in p["weights"]]
    p["prev_gates"].zero_()  # first token: nothing to unmerge
    plan = _run(p)
    assert plan.even
    p["experts"].copy_(torch.tensor([4, 0]))
    p["gates"].copy_(torch.tensor([0.25, 0.75]))
    plan.run(p["experts"], p["gates"], p["prev_experts"], p["prev_gates"], p["scaling"])
    for i, w in enumerate(p["weights"]):
        a, b = p["lora_A"][i].double(), p["lora_B"][i].double()
        exp = w_init[i].double() + 0.5 * (0.25 * b[4] @ a[4] + 0.75 * b[0] @ a[0])
        assert delta_error(w, w_init[i], exp) < 1e-5
    assert p["prev_experts"].tolist() == [4, 0]


def test_strip_sgmm_refuses_what_it_cannot_hold():
    from benchmarks.probe_stationary import StripPlan

    p = make_problem([(128, 64)], k=4, rank=128, n_experts=8)  # in place K = 1024 at BM = 128
    with pytest.raises(ValueError, match="does not fit.*TritonPlan"):
        StripPlan(p["weights"], p["lora_A"], p["lora_B"], 4, None)
    q = make_problem([(32, 36)], k=2, rank=8)  # in = 36: rows not 16-byte aligned
    with pytest.raises(ValueError, match="aligned"):
        StripPlan(q["weights"], q["lora_A"], q["lora_B"], 2, None, config=SMALL)
