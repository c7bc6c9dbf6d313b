"""Prefill forms of the adapter term, one Llama-2-7B layer's seven linears, H200 (issue #6).

For T prompt tokens, each with its own top-2 of N = 8 experts (r = 64, bf16), every form computes
the seven adapted linears of a layer, y_m = x W_m^T + delta_m, and is timed as 32 layers (each
with its own weights and adapters) captured in one CUDA graph; `ms_per_layer` = median / 32.
Forms (all but `gather` compiled with torch.compile, default Inductor, one function per layer):

  backbone      the seven linears alone (the bar: prefill >= 0.9 x backbone)
  dense         the backend's dense prefill today (gather_lora.dense_lora): every expert's A x in
                one GEMM, gates applied, then an einsum over (expert, rank) that copies B each call
  dense_preB    as dense, with B laid out [out, N r] once beforehand (no copy per call; costs a
                second copy of every B in memory): how much the per-call copy costs
  dense_cat     as dense_preB, and the A of the modules sharing an input concatenated beforehand
                (one shrink GEMM per group): the dense form's best case
  triton_dense  as dense, the expand a Triton GEMM that reads B [N, out, r] where it lies (no copy,
                no extra memory)
  fused         as dense_cat, each linear and its expand one Triton GEMM over K = in + N r
                (linear_lora: the backend's prefill_fused), gate applied in the kernel, no delta;
                linear_lora's kernel ("auto": pointer loads). In the run of 2026-12-05
                (prefill_forms_fused_h200_run1.json) `fused` was the TMA kernel, then auto's choice,
                and `fused_pointer` this one
  fused_tma     the same with the operands loaded by TMA (benchmarks only: wrong rows at 2048 tokens
                on the H200 with Triton 3.6, docs/paths.md)
  triton_linear the seven linears alone in linear_lora's kernel (N r = 0): its speed against
                cuBLAS's, the part of any difference in `fused` that is not the adapters'
  grouped       gathered: rows sorted by expert, torch._grouped_mm shrink and expand (CUTLASS on
                sm90), each token's k rows summed back; FLOPs k / N of the dense forms
  gather        the backend's gather kernels (Triton shrink by expert, expand by expert set)

Each entry has `max_rel_err`: the worst per-token relative error of the layer-0 deltas against an
fp32 reference.

    python benchmarks/bench_prefill_forms.py --out benchmarks/results/prefill_forms_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sgmm import FFN, HIDDEN, LAYERS, N_EXPERTS, RANK, TOP_K, run_header, time_graph  # noqa: E402

from adafuse_compile.cutlass_kernels import gather_lora as gl  # noqa: E402
from adafuse_compile.cutlass_kernels import triton_linear_lora as tll  # noqa: E402
from adafuse_compile.cutlass_kernels.linear_lora import linear_lora  # noqa: E402

SCALING = 0.5
DEVICE = "cuda"  # a CPU smoke test sets "cpu" (and small shapes)
# group -> (input, modules); the input is "h" (hidden) or "f" (ffn)
GROUPS = {"qkv": ("h", [HIDDEN] * 3), "o": ("h", [HIDDEN]), "gate_up": ("h", [FFN] * 2), "down": ("f", [HIDDEN])}
FORMS = ("backbone", "dense", "dense_preB", "dense_cat", "triton_dense", "fused", "fused_tma", "triton_linear", "grouped",
         "gather")


@triton.autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_K": 64}, num_warps=w, num_stages=s)
             for bt, bo, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4),
                                  (128, 256, 8, 3)]],
    key=["T", "OUT", "NR"])
@triton.jit
def _dense_expand_kernel(h_ptr, b_ptr, out_ptr, T, OUT, NR, stride_ht, stride_bn, stride_bo, stride_ot,
                         R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[t, o] = sum_{n, j} h[t, n R + j] * B[n, o, j]: K runs over (expert, rank), B read in place.
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, NR, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_k[None, :],
                    mask=(offs_t[:, None] < T) & (offs_k[None, :] < NR), other=0.0)
        n = offs_k // R
        j = offs_k % R
        b = tl.load(b_ptr + n[:, None] * stride_bn + offs_o[None, :] * stride_bo + j[:, None],
                    mask=(offs_k[:, None] < NR) & (offs_o[None, :] < OUT), other=0.0)
        acc = tl.dot(h, b, acc)
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_o[None, :] < OUT))


@torch.library.custom_op("adafuse_bench::dense_expand", mutates_args=())
def dense_expand(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n, out, r = b.shape
    t = h.shape[0]
    y = h.new_empty(t, out)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(out, meta["BLOCK_O"]))  # noqa: E731
    _dense_expand_kernel[grid](h, b, y, t, out, n * r, h.stride(0), b.stride(0), b.stride(1), y.stride(0), R=r)
    return y


@dense_expand.register_fake
def _(h, b):
    return h.new_empty(h.shape[0], b.shape[1])


def make_layer(dtype=torch.bfloat16):
    # B std 0.1 (not the model's 0.002): deltas comparable to x W^T, so max_rel_err sees them
    layer = {}
    for g, (src, outs) in GROUPS.items():
        n_in = HIDDEN if src == "h" else FFN
        ws = [torch.randn(o, n_in, device=DEVICE, dtype=dtype) * 0.02 for o in outs]
        a = [torch.randn(N_EXPERTS, RANK, n_in, device=DEVICE, dtype=dtype) * 0.02 for _ in outs]
        b = [torch.randn(N_EXPERTS, o, RANK, device=DEVICE, dtype=dtype) * 0.1 for o in outs]
        layer[g] = {"w": ws, "a": a, "b": b}
    return layer


def add_layouts(layer):
    """The precomputed layouts of dense_preB / dense_cat (extra memory: a copy of A and B)."""
    for grp in layer.values():
        grp["b_pre"] = [b.permute(1, 0, 2).reshape(b.shape[1], -1).contiguous() for b in grp["b"]]
        grp["a_cat"] = torch.cat([a.reshape(-1, a.shape[-1]) for a in grp["a"]], 0)


def forms(step):
    G = step["G"] * SCALING  # [T, N] fp32, gate per expert, 0 where not selected

    def gated(h, n):  # [T, N r] -> gate-scaled, factors' dtype
        t = h.shape[0]
        return (h.view(t, n, -1).float() * G[:, :, None]).to(h.dtype).view(t, -1)

    def backbone(xs, layer):
        return [x @ w.t() for g, grp in layer.items() for x in [xs[GROUPS[g][0]]] for w in grp["w"]]

    def dense(xs, layer):
        ys = []
        for g, grp in layer.items():
            x = xs[GROUPS[g][0]]
            deltas = gl.dense_lora(x, grp["a"], grp["b"], step["G"], SCALING)
            ys += [x @ w.t() + d for w, d in zip(grp["w"], deltas)]
        return ys

    def shrink_each(b_key, expand):
        """Each module's own shrink (its A viewed [N r, in]: no copy), then expand(h, grp[b_key][m])."""
        def form(xs, layer):
            ys = []
            for g, grp in layer.items():
                x = xs[GROUPS[g][0]]
                for w, a, b in zip(grp["w"], grp["a"], grp[b_key]):
                    h = gated(x @ a.reshape(-1, a.shape[-1]).t(), a.shape[0])
                    ys.append(x @ w.t() + expand(h, b))
            return ys
        return form

    dense_preB = shrink_each("b_pre", lambda h, bp: h @ bp.t())
    triton_dense = shrink_each("b", dense_expand)

    def dense_cat(xs, layer):
        ys = []
        for g, grp in layer.items():
            x = xs[GROUPS[g][0]]
            hs = (x @ grp["a_cat"].t()).split(N_EXPERTS * RANK, 1)
            for w, h, bp in zip(grp["w"], hs, grp["b_pre"]):
                ys.append(x @ w.t() + gated(h, N_EXPERTS) @ bp.t())
        return ys

    impl = "triton" if DEVICE == "cuda" else "reference"

    def fused(xs, layer):
        ys = []
        for g, grp in layer.items():
            x = xs[GROUPS[g][0]]
            hs = (x @ grp["a_cat"].t()).split(N_EXPERTS * RANK, 1)
            ys += [linear_lora(x, w, None, h, step["G"], SCALING, bp, impl) for w, h, bp in zip(grp["w"], hs, grp["b_pre"])]
        return ys

    def triton_linear(xs, layer):
        ys = []
        for g, grp in layer.items():
            x = xs[GROUPS[g][0]]
            none_g = step["G"][:, :1]
            ys += [linear_lora(x, w, None, x[:, :0], none_g, 1.0, w[:, :0], impl) for w in grp["w"]]
        return ys

    rows, offs, inv, g_sorted = step["rows"], step["offs"], step["inv"], step["g_sorted"]
    tok = rows // TOP_K

    def grouped(xs, layer):
        ys = []
        for g, grp in layer.items():
            x = xs[GROUPS[g][0]]
            t = x.shape[0]
            xs_sorted = x[tok]  # [T k, in]
            for w, a, b in zip(grp["w"], grp["a"], grp["b"]):
                h = torch._grouped_mm(xs_sorted, a.transpose(1, 2), offs=offs)  # [T k, r]
                h = (h.float() * g_sorted[:, None]).to(x.dtype)
                d = torch._grouped_mm(h, b.transpose(1, 2), offs=offs)  # [T k, out]
                ys.append(x @ w.t() + d[inv].view(t, TOP_K, -1).sum(1))
        return ys

    def gather(xs, layer):
        ys = []
        for g, grp in layer.items():
            x = xs[GROUPS[g][0]]
            deltas = gl.gather_lora(x, grp["a"], grp["b"], step["experts"], step["gates"], SCALING,
                                    impl="triton", **step["gather"])
            ys += [x @ w.t() + d for w, d in zip(grp["w"], deltas)]
        return ys

    return {"backbone": backbone, "dense": dense, "dense_preB": dense_preB, "dense_cat": dense_cat,
            "triton_dense": triton_dense, "fused": fused, "fused_tma": fused, "triton_linear": triton_linear,
            "grouped": grouped,
            "gather": gather}


def make_step(T: int, gen: torch.Generator):
    xs = {"h": torch.randn(T, HIDDEN, generator=gen).to(DEVICE, torch.bfloat16),
          "f": torch.randn(T, FFN, generator=gen).to(DEVICE, torch.bfloat16)}
    experts = torch.rand(T, N_EXPERTS, generator=gen).topk(TOP_K, dim=1).indices.to(DEVICE)
    gates = torch.softmax(torch.randn(T, TOP_K, generator=gen), 1).to(DEVICE)
    rows, segments = gl.expert_segments(experts, N_EXPERTS)
    inv = torch.empty_like(rows)
    inv[rows] = torch.arange(rows.numel(), device=DEVICE)
    step = {"experts": experts, "gates": gates, "G": gl.dense_gates(experts, gates, N_EXPERTS),
            "rows": rows, "offs": segments[1:].to(torch.int32), "inv": inv,
            "g_sorted": gates.reshape(-1)[rows].float() * SCALING,
            "gather": {"rows": rows, "segments": segments}}
    step["gather"]["set_order"], step["gather"]["set_work"] = gl.tuple_blocks(experts, N_EXPERTS)
    return xs, step


def max_rel_err(got, ref):
    worst = 0.0
    for y, r in zip(got, ref):
        err = (y.float() - r.float()).norm(dim=1) / r.float().norm(dim=1).clamp_min(1e-30)
        worst = max(worst, float(err.max()))
    return worst


def reference(xs, layer, step):
    ys = []
    for g, grp in layer.items():
        x = xs[GROUPS[g][0]]
        deltas = gl.reference_gather_lora(x.float(), [a.float() for a in grp["a"]], [b.float() for b in grp["b"]],
                                          step["experts"], step["gates"], SCALING)
        ys += [x.float() @ w.float().t() + d for w, d in zip(grp["w"], deltas)]
    return ys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="128,512,2048")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    layers = [make_layer() for _ in range(LAYERS)]
    for layer in layers:
        add_layouts(layer)
    result = dict(run_header(), scaling=SCALING, entries=[])
    gen = torch.Generator().manual_seed(1)
    for T in [int(t) for t in args.tokens.split(",")]:
        xs, step = make_step(T, gen)
        ref0 = reference(xs, layers[0], step)
        base_ms = None
        for name in args.forms.split(","):
            fn = forms(step)[name]
            tll.KERNEL = "tma" if name == "fused_tma" else "auto"  # linear_lora's kernel, read per call
            e = {"tokens": T, "form": name}
            try:
                run = fn if name == "gather" else torch.compile(fn, dynamic=False)
                e["max_rel_err"] = max_rel_err(run(xs, layers[0]), ref0)
                t = time_graph(lambda: [run(xs, layer) for layer in layers], args.reps)
                e["ms_per_layer"] = t["median_ms"] / LAYERS
                e["min_ms_per_layer"] = t["min_ms"] / LAYERS
                if name == "backbone":
                    base_ms = e["ms_per_layer"]
                if base_ms:
                    e["x_backbone_linears"] = base_ms / e["ms_per_layer"]
            except Exception as exc:  # one failing form must not lose the run
                e["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            e["elapsed_s"] = round(time.time() - t0, 1)
            result["entries"].append(e)
            print(json.dumps(e), flush=True)
            with open(args.out, "w") as f:  # after every entry: a timed-out run keeps what it measured
                json.dump(result, f, indent=1)
        torch.compiler.reset()
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
