"""linear_lora (the fused prefill's adapted linear) on the CPU: the reference and the Triton kernel
(under Triton's interpreter, fp32 and fp16) against a float64 oracle, with K tails, spans of
experts inside one K tile, a bias, a column slice of the group's shrink output as h, and bad
arguments named."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from adafuse_compile.cutlass_kernels import gather_lora as gl
from adafuse_compile.cutlass_kernels.linear_lora import linear_lora, oracle_linear_lora, reference_linear_lora


def _problem(t, n_in, out, n, r, dtype, bias=False, modules=1, seed=0):
    """x, W, bias, and h as the m-th column block of a [T, modules * N r] shrink output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n_in, generator=g).to(dtype)
    w = (torch.randn(out, n_in, generator=g) * 0.1).to(dtype)
    b = (torch.randn(out, generator=g) * 0.1).to(dtype) if bias else None
    h_all = (torch.randn(t, modules * n * r, generator=g)).to(dtype)
    h = h_all[:, (modules - 1) * n * r:]  # the last module's slice: row stride modules * N r
    experts = torch.rand(t, n, generator=g).topk(min(2, n), dim=1).indices
    gates = torch.softmax(torch.randn(t, min(2, n), generator=g), 1)
    gate_matrix = gl.dense_gates(experts, gates, n)
    b_packed = (torch.randn(out, n * r, generator=g) * 0.1).to(dtype)
    return x, w, b, h, gate_matrix, b_packed


def _rel(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_reference_matches_the_oracle_and_the_unfused_dense_form(dtype, tol):
    x, w, b, h, g, bp = _problem(37, 48, 40, 4, 8, dtype, bias=True, modules=2)
    y = linear_lora(x, w, b, h, g, 0.5, bp)
    assert y.dtype == dtype and y.shape == (37, 40)
    assert _rel(y, oracle_linear_lora(x, w, b, h, g, 0.5, bp)) < tol
    # the backend's unfused graph: the group's shrink, dense_lora_packed's delta, added to the linear
    a_cat = (torch.randn(4 * 8, 48, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    (delta,) = gl.dense_lora_packed(x, a_cat, [bp], 4, g, 0.5)
    h = torch.matmul(x, a_cat.t())
    torch.testing.assert_close(linear_lora(x, w, b, h, g, 0.5, bp), torch.nn.functional.linear(x, w, b) + delta,
                               rtol=0, atol=0)


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("kernel,dtype,tol", [("pointer", torch.float32, 1e-5), ("pointer", torch.float16, 2e-3),
                                              ("tma", torch.float16, 2e-3)])
@pytest.mark.parametrize("t,n_in,out,n,r,bias", [
    (5, 32, 32, 4, 16, False),   # even K, one expert per K tile
    (37, 40, 48, 3, 8, True),    # K tails (40, 24), tiles spanning experts, partial row and column tiles
    (20, 64, 24, 8, 4, False),   # rank below the K tile: 4 experts per tile
])
def test_triton_kernel_matches_the_oracle(kernel, dtype, tol, t, n_in, out, n, r, bias):
    from adafuse_compile.cutlass_kernels.triton_linear_lora import linear_lora_triton

    x, w, b, h, g, bp = _problem(t, n_in, out, n, r, dtype, bias=bias, modules=2, seed=t)
    y = linear_lora_triton(x, w, b, h, g, 0.7, bp, kernel=kernel)
    assert y.dtype == dtype and y.shape == (t, out)
    assert torch.isfinite(y).all()
    assert _rel(y, oracle_linear_lora(x, w, b, h, g, 0.7, bp)) < tol
    # the adapter term is in it: the backbone alone is far off
    assert _rel(y, oracle_linear_lora(x, w, b, h, torch.zeros_like(g), 0.7, bp)) > 0.05


@pytest.mark.triton_interpreter
def test_auto_takes_the_pointer_kernel_and_bad_names_are_refused(monkeypatch):
    """The TMA kernel gave wrong rows on the H200 (Triton 3.6, docs/paths.md "Fused prefill"): "auto"
    must never launch it, only an explicit kernel="tma" does."""
    from adafuse_compile.cutlass_kernels import triton_linear_lora as tll

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the TMA kernel was launched")
    monkeypatch.setattr(tll, "_linear_lora_tma_kernel", Refuse())
    monkeypatch.setattr(tll, "_autotuned_tma", Refuse())
    x, w, b, h, g, bp = _problem(5, 32, 32, 4, 16, torch.float16, bias=False, modules=1, seed=0)
    assert tll.tma_applies(x, w, h, bp)  # TMA would apply: auto still does not take it
    y = tll.linear_lora_triton(x, w, b, h, g, 0.7, bp, kernel="auto", config=tll.INTERPRETED_CONFIG)
    assert _rel(y, oracle_linear_lora(x, w, b, h, g, 0.7, bp)) < 2e-3
    with pytest.raises(ValueError, match="kernel='tpu'.*use 'auto'"):
        tll.linear_lora_triton(x, w, b, h, g, 0.7, bp, kernel="tpu")


@pytest.mark.triton_interpreter
def test_tma_kernel_is_refused_where_it_cannot_apply():
    from adafuse_compile.cutlass_kernels.triton_linear_lora import linear_lora_triton, tma_applies

    x, w, b, h, g, bp = _problem(8, 33, 16, 2, 8, torch.float16)  # 66-byte rows: not 16-byte aligned
    assert not tma_applies(x, w, h, bp)
    with pytest.raises(ValueError, match="kernel='tma' needs.*16-byte aligned"):
        linear_lora_triton(x, w, b, h, g, 0.5, bp, kernel="tma")
    y = linear_lora_triton(x, w, b, h, g, 0.5, bp)  # auto: the pointer kernel
    assert _rel(y, oracle_linear_lora(x, w, b, h, g, 0.5, bp)) < 2e-3


@pytest.mark.triton_interpreter
def test_triton_kernel_without_an_adapter_term_is_the_linear():
    """N r = 0: the plain Triton linear (the benchmark's control against cuBLAS)."""
    from adafuse_compile.cutlass_kernels.triton_linear_lora import linear_lora_triton

    x, w, _, _, _, _ = _problem(9, 32, 24, 1, 1, torch.float32)
    y = linear_lora_triton(x, w, None, x.new_empty(9, 0), torch.zeros(9, 1), 1.0, w.new_empty(24, 0))
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_reference_under_torch_compile_is_the_eager_result():
    x, w, b, h, g, bp = _problem(16, 32, 24, 4, 8, torch.float32, bias=True)
    fn = torch.compile(lambda *a: linear_lora(*a, 0.5, bp), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x, w, b, h, g), reference_linear_lora(x, w, b, h, g, 0.5, bp))


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(w=a["w"][:, :-1]), r"expected weight \[24, 32\]"),
    (lambda a: a.update(g=a["g"].double()), "gate_matrix must be float32"),
    (lambda a: a.update(bp=a["bp"].half()), "share one dtype"),
    (lambda a: a.update(w=a["w"].t().contiguous().t()), r"\['weight'\] must have a unit stride"),
    (lambda a: a.update(b=a["b"][:-1]), r"bias must be \[24\]"),
    (lambda a: a.update(g=a["g"][:, :3]), "N dividing 32"),
])
def test_bad_arguments_are_named(change, match):
    x, w, b, h, g, bp = _problem(16, 32, 24, 4, 8, torch.float32, bias=True)
    a = dict(x=x, w=w, b=b, h=h, g=g, bp=bp)
    change(a)
    with pytest.raises(ValueError, match=match):
        linear_lora(a["x"], a["w"], a["b"], a["h"], a["g"], 0.5, a["bp"])


def test_impl_triton_off_cuda_says_use_auto(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as for a user: the interpreter is the tests' own
    x, w, b, h, g, bp = _problem(4, 16, 8, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA device.*impl='auto'"):
        linear_lora(x, w, b, h, g, 0.5, bp, impl="triton")


_AOT = textwrap.dedent("""
    import re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adafuse_compile.cutlass_kernels import triton_linear_lora as tll
    target = GPUTarget("cuda", 90, 32)
    C = "constexpr"
    SPECIALIZED = ("OUT", "IN", "NR", "stride_xt", "stride_wo", "stride_ht", "stride_bo", "stride_yt")
    for dt in ("bf16", "fp16"):
        tiles = tll._TILES if dt == "bf16" else tll._TILES[:1]
        for bt, bo, warps, stages in tiles:
            options = dict(num_warps=warps, num_stages=stages)
            common = dict(R=64, HAS_BIAS=True, BLOCK_T=bt, BLOCK_O=bo, BLOCK_K=64, GROUP_T=8)
            p = "*" + dt
            sig = dict(x_ptr=p, w_ptr=p, bias_ptr=p, h_ptr=p, g_ptr="*fp32", b_ptr=p, y_ptr=p, T="i32",
                       OUT="i32", IN="i32", NR="i32", scaling="fp32", stride_xt="i32", stride_wo="i32",
                       stride_ht="i32", stride_gt="i32", stride_bo="i32", stride_yt="i32", T_BUCKET="i32",
                       R=C, HAS_BIAS=C, EVEN_IN=C, EVEN_NR=C, BLOCK_T=C, BLOCK_O=C, BLOCK_K=C, GROUP_T=C)
            fn = tll._linear_lora_kernel
            # as the JIT specializes them at run time: aligned tensors, ints that are multiples of 16
            attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                     if t.startswith("*") or n in SPECIALIZED}
            k = triton.compile(ASTSource(fn, sig, dict(EVEN_IN=True, EVEN_NR=True, **common), attrs=attrs),
                               target=target, options=options)
            ptx = k.asm["ptx"]
            assert re.search(r"mma", ptx), (dt, bt, bo, "pointer kernel: no tensor-core MMA")
            assert re.search(r"cp[.]async[.]cg[.]shared[.]global .*0x10|ld[.]global[.]v4", ptx), (dt, bt, bo, "no 16-B loads")
            assert k.metadata.shared <= 227 * 1024, (dt, bt, bo, k.metadata.shared)
            desc = lambda rows: f"tensordesc<{dt}[{rows}, 64]>"
            sig = dict(x_desc=desc(bt), w_desc=desc(bo), bias_ptr=p, h_desc=desc(bt), g_ptr="*fp32", b_desc=desc(bo),
                       y_ptr=p, T="i32", OUT="i32", IN="i32", NR="i32", scaling="fp32", stride_gt="i32",
                       stride_yt="i32", T_BUCKET="i32", R=C, HAS_BIAS=C, BLOCK_T=C, BLOCK_O=C, BLOCK_K=C, GROUP_T=C)
            k = triton.compile(ASTSource(tll._linear_lora_tma_kernel, sig, common), target=target, options=options)
            ptx = k.asm["ptx"]
            assert re.search(r"wgmma", ptx), (dt, bt, bo, "TMA kernel: no wgmma")
            assert re.search(r"cp[.]async[.]bulk[.]tensor", ptx), (dt, bt, bo, "TMA kernel: no TMA loads")
            assert k.metadata.shared <= 227 * 1024, (dt, bt, bo, k.metadata.shared)
    print("AOT-OK")
""")


def test_kernels_compile_for_sm90_with_every_autotuned_tile():
    """Both kernels, every autotuned tile (bf16; fp16 one tile), compile to sm_90 on this CPU machine
    (Triton's ptxas): tensor-core MMA (wgmma for the TMA kernel), 16-byte or TMA loads, shared memory
    within the H200's 227 KB per block. Checked under Triton 3.9 and 3.6."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0 and "AOT-OK" in res.stdout, res.stderr[-4000:]
