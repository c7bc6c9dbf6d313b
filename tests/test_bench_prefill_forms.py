"""benchmarks/bench_prefill_forms.py on the CPU, small shapes: every form it times computes the same
seven adapted linears as an fp32 reference (so its timings compare like with like), and its Triton
dense expand (run in Triton's interpreter, fp32 and fp16) reads B [N, out, r] correctly."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prefill_forms.py"
TORCH_FORMS = ("dense", "dense_preB", "dense_cat", "fused", "grouped")  # fused: linear_lora's reference on the CPU


@pytest.fixture(scope="module")
def bpf():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports bench_sgmm from its own folder
    spec = importlib.util.spec_from_file_location("bench_prefill_forms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small(bpf, monkeypatch):
    monkeypatch.setattr(bpf, "DEVICE", "cpu")
    monkeypatch.setattr(bpf, "HIDDEN", 64)
    monkeypatch.setattr(bpf, "FFN", 96)
    monkeypatch.setattr(bpf, "RANK", 16)
    monkeypatch.setattr(bpf, "GROUPS", {"qkv": ("h", [64] * 3), "o": ("h", [64]), "gate_up": ("h", [96] * 2),
                                        "down": ("f", [64])})
    torch.manual_seed(0)
    layer = bpf.make_layer()
    bpf.add_layouts(layer)
    xs, step = bpf.make_step(40, torch.Generator().manual_seed(1))
    return layer, xs, step, bpf.reference(xs, layer, step)


@pytest.mark.parametrize("form", TORCH_FORMS)
def test_each_form_computes_the_adapted_linears(bpf, small, form):
    layer, xs, step, ref = small
    forms = bpf.forms(step)
    got = forms[form](xs, layer)
    assert len(got) == 7
    # bf16 rounding: a few 1e-3; the backbone alone (no adapter term) is far off, so the check sees deltas.
    assert bpf.max_rel_err(got, ref) < 1e-2
    assert bpf.max_rel_err(forms["backbone"](xs, layer), ref) > 0.1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("tokens,experts,rank,out,block_k", [(5, 4, 16, 40, 64), (70, 8, 64, 200, 64),
                                                             (33, 3, 32, 50, 16)])
@pytest.mark.triton_interpreter
def test_triton_dense_expand_reads_b_in_place(bpf, dtype, tol, tokens, experts, rank, out, block_k):
    g = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, experts * rank, generator=g).to(dtype)
    b = torch.randn(experts, out, rank, generator=g).to(dtype)
    y = torch.full((tokens, out), float("nan"), dtype=dtype)
    grid = (triton.cdiv(tokens, 16), triton.cdiv(out, 32))
    bpf._dense_expand_kernel.fn[grid](h, b, y, tokens, out, experts * rank, h.stride(0), b.stride(0), b.stride(1),
                                      y.stride(0), R=rank, BLOCK_T=16, BLOCK_O=32, BLOCK_K=block_k)
    ref = h.double() @ b.double().permute(0, 2, 1).reshape(experts * rank, out)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol


def test_triton_linear_control_is_the_backbone(bpf, small):
    """The `triton_linear` control computes the plain linears (no adapter term), like `backbone`."""
    layer, xs, step, _ = small
    forms = bpf.forms(step)
    for got, want in zip(forms["triton_linear"](xs, layer), forms["backbone"](xs, layer)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
