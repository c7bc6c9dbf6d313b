"""linear_lora's Triton kernel on a CUDA GPU: Llama-2-7B prefill shapes in bf16 and fp16 against a
float64 oracle, odd shapes (K and row tails, rank below the K tile, a
bias), replay inside a CUDA graph with new inputs, and a timing print against the unfused form
(the benchmark proper: benchmarks/bench_prefill_forms.py, forms "fused" and "triton_linear").

First run on the H200 2026-12-05 (Triton 3.6): the pointer kernel right in every case, the TMA
kernel wrong in one (see TMA_KNOWN_WRONG)."""
import pytest
import torch

from adafuse_compile.cutlass_kernels.linear_lora import (
    linear_lora, make_linear_lora_problem, oracle_linear_lora, reference_linear_lora,
)
from adafuse_compile.cutlass_kernels.triton_linear_lora import linear_lora_triton

pytestmark = pytest.mark.gpu

# One rounding of the output (the kernel) against the oracle's exact sum; fp16 and bf16 unit roundoff.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _problem(t, n_in, out, n, r, dtype, bias=False, seed=0):
    return make_linear_lora_problem(t, n_in, out, n, r, dtype, bias, seed, device="cuda")


def _oracle(p, scaling):
    return oracle_linear_lora(**p, scaling=scaling)


def _rel_per_token(y, want):
    return ((y.double() - want).norm(dim=1) / want.norm(dim=1)).max().item()


# The TMA kernel (benchmarks only) returned wrong rows on the H200 with Triton 3.6 in the fp16
# 512 x 4096 -> 11008 case here and at 2048 tokens in bench_prefill_forms (2026-12-05); probe_linear_lora.py
# found three of its six tiles wrong, one only in a few rows (docs/paths.md "Fused prefill"): a known
# failure, the kernel is benchmark-only; kernel="auto" is the pointer kernel.
TMA_KNOWN_WRONG = pytest.mark.xfail(reason="TMA kernel wrong at some shapes on Triton 3.6 (docs/paths.md)",
                                    strict=False)


@pytest.mark.filterwarnings("ignore:linear_lora. the TMA kernel:RuntimeWarning")
@pytest.mark.parametrize("kernel", [pytest.param("tma", marks=TMA_KNOWN_WRONG), "pointer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,n_in,out,n,r,bias", [
    (512, 4096, 4096, 8, 64, False), (512, 4096, 11008, 8, 64, False), (512, 11008, 4096, 8, 64, False),
    (130, 4096, 1000, 8, 16, True), (77, 200, 96, 3, 8, True),
])
def test_triton_matches_the_oracle(kernel, dtype, t, n_in, out, n, r, bias):
    p = _problem(t, n_in, out, n, r, dtype, bias)
    want = _oracle(p, 0.5)
    y = linear_lora_triton(**p, scaling=0.5, kernel=kernel)
    assert y.dtype == dtype and y.shape == (t, out) and torch.isfinite(y).all()
    err = _rel_per_token(y, want)
    assert err < TOL[dtype], err
    # the adapter term is in it: with zero gates the result is far off
    assert _rel_per_token(linear_lora_triton(**{**p, "gate_matrix": torch.zeros_like(p["gate_matrix"])}, scaling=0.5,
                                             kernel=kernel), want) > 10 * TOL[dtype]


def test_fp32_is_ieee_not_tf32():
    """fp32 operands (the pointer kernel; TMA is for 16-bit types) multiply in IEEE fp32, as torch's
    matmul does by default: TF32 would give about 3e-4 here (a review's emulation)."""
    p = _problem(128, 4096, 1024, 8, 64, torch.float32)
    y = linear_lora_triton(**p, scaling=0.5, kernel="auto")
    assert _rel_per_token(y, _oracle(p, 0.5)) < 1e-5


def test_cuda_graph_replay_with_new_inputs():
    p = _problem(512, 4096, 4096, 8, 64, torch.bfloat16)
    static = {k: v.clone() if v is not None else None for k, v in p.items()}
    linear_lora(**static, scaling=0.5, impl="triton")  # autotuning happens outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear_lora(**static, scaling=0.5, impl="triton")
    for seed in (1, 2):
        q = _problem(512, 4096, 4096, 8, 64, torch.bfloat16, seed=seed)
        for k in ("x", "h", "gate_matrix", "b_packed"):
            static[k].copy_(q[k])
        y.fill_(float("nan"))
        graph.replay()
        assert _rel_per_token(y, _oracle(static, 0.5)) < TOL[torch.bfloat16]


@pytest.mark.filterwarnings("ignore:linear_lora. the TMA kernel:RuntimeWarning")
def test_timing_against_the_unfused_form():
    p = _problem(512, 4096, 4096, 8, 64, torch.bfloat16)
    runs = {"fused (Triton, TMA; benchmarks only)": lambda: linear_lora_triton(**p, scaling=0.5, kernel="tma"),
            "fused (Triton, pointer loads)": lambda: linear_lora_triton(**p, scaling=0.5, kernel="pointer"),
            "unfused (cuBLAS linear + dense delta)": lambda: reference_linear_lora(**p, scaling=0.5),
            "cuBLAS linear alone": lambda: torch.nn.functional.linear(p["x"], p["weight"])}
    for fn in runs.values():
        fn()
    torch.cuda.synchronize()
    for name, fn in runs.items():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"linear_lora 512x4096 -> 4096, N r = 512, bf16: {name}: {start.elapsed_time(end) / 50 * 1e3:.1f} us")
