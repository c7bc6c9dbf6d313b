"""Triton SGMM kernel on the CPU, in Triton's interpreter, against a float64 oracle.

fp32 and fp16 only: bf16 tl.dot is wrong in the interpreter (tested on the GPU instead).
"""
import importlib
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from adafuse_compile.cutlass_kernels import ops
from adafuse_compile.cutlass_kernels.reference import (
    assert_matches_oracle, delta_error, make_problem, oracle_then_poison,
)

if not torch.cuda.is_available():
    # A module imported earlier in this process without the interpreter must be re-decorated.
    _mod = sys.modules.get("adafuse_compile.cutlass_kernels.triton_sgmm")
    if _mod is not None:
        importlib.reload(_mod)
    ops.clear_plan_cache()

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter tests; the GPU runs tests/test_sgmm_gpu.py"
)

# Several weights of different shapes in one launch: odd M/N, N not a multiple of the tile,
# one weight with in % 8 != 0 (unaligned: no vectorisation hints), tiles > programs.
SHAPES = [(96, 200), (40, 72), (130, 24), (33, 45)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _args(p):
    return (p["weights"], p["lora_A"], p["lora_B"], p["experts"], p["gates"],
            p["prev_experts"], p["prev_gates"], p["scaling"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("rank", [16, 8])  # 8: K block of 16, masked
def test_triton_matches_oracle(dtype, k, mode, rank):
    p = make_problem(SHAPES, k=k, rank=rank, dtype=dtype, n_experts=5,
                     pristine=mode == "pristine")
    before, expected, e, g = oracle_then_poison(p)
    ops.sgmm_switch_(*_args(p), pristine=p["pristine"], impl="triton")
    bases = p["pristine"] if mode == "pristine" else before
    assert_matches_oracle(p["weights"], expected, bases, TOL[dtype])
    assert torch.equal(p["prev_experts"], e) and torch.equal(p["prev_gates"], g)


def test_triton_two_switches_and_first_token():
    """First call unmerges nothing (zero gates); the second unmerges what the first merged."""
    p = make_problem(SHAPES[:2], k=2)
    p["prev_gates"].zero_()
    w_init = [w.clone() for w in p["weights"]]
    ops.sgmm_switch_(*_args(p), impl="triton")
    p["experts"].copy_(torch.tensor([4, 6]))
    p["gates"].copy_(torch.tensor([0.25, 0.75]))
    ops.sgmm_switch_(*_args(p), impl="triton")
    for i, w in enumerate(p["weights"]):
        a, b = p["lora_A"][i].double(), p["lora_B"][i].double()
        exp = w_init[i].double() + 0.5 * (0.25 * b[4] @ a[4] + 0.75 * b[6] @ a[6])
        assert delta_error(w, w_init[i], exp) < 1e-5
    assert p["prev_experts"].tolist() == [4, 6]


def test_a_large_tile_with_more_stages_than_k_iterations_is_refused():
    """128x256 with 3 stages over a K loop of 2 iterations (pristine, k = 2, r = 64) gave wrong
    results on the GPU (Triton 3.6): the plan refuses it before launching anything, says why and
    what to change; the same tile with 2 stages, or in place (4 iterations), is accepted."""
    from adafuse_compile.cutlass_kernels.triton_sgmm import TritonPlan

    p = make_problem(SHAPES[:1], k=2, rank=64, dtype=torch.float32, pristine=True)
    before = [w.clone() for w in p["weights"]]
    big = dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3)
    with pytest.raises(ValueError, match=r"128x256 tile with 3 pipeline stages over a K loop of 2 iterations"
                                         r".* use num_stages <= 2"):
        TritonPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"], config=big)
    assert all(torch.equal(w, b) for w, b in zip(p["weights"], before))
    TritonPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"], config=dict(big, num_stages=2))
    TritonPlan(p["weights"], p["lora_A"], p["lora_B"], 2, None, config=big)  # in place: 4 iterations
    TritonPlan(p["weights"], p["lora_A"], p["lora_B"], 2, p["pristine"], config=dict(big, BLOCK_N=128))
