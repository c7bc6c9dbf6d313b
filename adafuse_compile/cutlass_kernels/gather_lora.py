"""Gather LoRA (the `gather` path): per-token experts, M modules sharing one input.

    gather_lora(x, lora_A, lora_B, experts, gates, scaling, impl="auto", rows=None, segments=None,
                set_order=None, set_work=None, per_slot=False) -> [delta_m]

For T tokens, x [T, in]; for each module m, lora_A[m] [N, r, in] and lora_B[m] [N, out_m, r];
experts [T, k] int64 and gates [T, k] (any float dtype, used in fp32):

    delta_m[t] = sum_j scaling * gates[t, j] * B_m[e_tj] @ (A_m[e_tj] @ x[t])     [T, out_m]

in x's dtype, accumulated in fp32. This is Punica's BGMV/SGMV, vLLM's shrink/expand:
the shrink computes h[m, t, j] = s * g_tj * A_m[e_tj] x_t for every module in one launch,
the expand computes every delta_m from h in one launch (triton_gather.py).

Implementations: `reference` (PyTorch, the CPU path), `triton`; `auto` = triton on CUDA,
reference elsewhere. The Triton pointer tables are built once per adapter set and cached on
the factors' data_ptrs (make one warm-up call before CUDA-graph capture). After that a call
makes no host sync and no host-to-device copy. Out-of-range expert ids raise in the reference;
the Triton kernels, which cannot check without a sync, let them contribute nothing.

For steps of more than SORTED_MIN_ROWS (token, slot) rows (prefill) the Triton shrink works on
the rows sorted by expert. `expert_segments(experts, N)` computes that order and each expert's
segment; pre-gating gives every layer of a step the same experts, so the backend computes them
once per step and passes them to every call (`rows`, `segments`); without them each call sorts.

Importable on a CPU-only machine without Triton: it loads lazily.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from adafuse_compile.cutlass_kernels.plan_cache import PlanCache, resolve_triton_or_reference

__all__ = ["gather_lora", "expert_segments", "tuple_blocks", "reference_gather_lora", "oracle_gather_lora", "validate",
           "make_gather_problem", "clear_plan_cache", "IMPLS", "SORTED_MIN_ROWS", "dense_gates", "dense_lora",
           "dense_lora_packed", "DENSE_MIN_TOKENS", "DENSE_MAX_EXPANSION"]

IMPLS = ("auto", "reference", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_K = 4
# (token, slot) rows above which the Triton shrink sorts the rows by expert (prefill); at or below,
# one masked row block serves all rows (decode).
SORTED_MIN_ROWS = 65


def expert_segments(experts: Tensor, n_experts: int, bounds: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(rows, segments): the (token, slot) rows of `experts` [T, k] sorted by expert (stable), and
    where each expert's run starts, [N + 1] (expert e's rows are rows[seg[e]:seg[e+1]]). Device ops,
    no host sync (torch.bincount would sync). `bounds`: arange(N + 1) kept by the caller, if any."""
    sorted_ids, rows = torch.sort(experts.reshape(-1), stable=True)
    if bounds is None:
        bounds = torch.arange(n_experts + 1, device=experts.device, dtype=sorted_ids.dtype)
    return rows, torch.searchsorted(sorted_ids, bounds)


# Prefill expand (Triton): tokens grouped by their set of experts, TUPLE_BLOCK_T tokens per program.
# 16, not 32: on the H200 as fast or faster at T = 512 in all four 7B groups, and 1.4x faster at
# T = 128 (benchmarks/results/gather_h200_variants_prefill_run1.json): a set holds T / 36 tokens on
# average (N = 8, top-2), so 32-token blocks were mostly padding.
TUPLE_BLOCK_T = 16
# Sets are keyed (N + 1)^k ways (digit N: an out-of-range id, which contributes nothing); above this
# many keys the expand keeps its per-token-block form.
MAX_TUPLE_KEYS = 4096


def tuple_keys(n_experts: int, k: int) -> int:
    return (n_experts + 1) ** k


def tuple_blocks(experts: Tensor, n_experts: int, block_t: int = TUPLE_BLOCK_T) -> tuple[Tensor, Tensor]:
    """(order, work) for the prefill expand: the tokens of `experts` [T, k] sorted by their set of
    experts (its sorted ids as a base-(N+1) key), and one work item per block of at most `block_t`
    tokens that share a set: work [3, W] int64 = (key, start, end) into `order`, with
    W = ceil(T / block_t) + min(T, keys) an upper bound that needs no host sync; unused items have
    start == end. A program of the expand then runs exactly one dot per expert of its set, where
    a block of tokens with mixed sets runs one per expert present in the block (up to N).
    Device ops, no host sync; computed once per step, like expert_segments."""
    n_tok, k = experts.shape
    base = n_experts + 1
    n_keys = base ** k
    dev = experts.device
    ids = torch.where((experts >= 0) & (experts < n_experts), experts, n_experts)
    place = base ** torch.arange(k - 1, -1, -1, device=dev, dtype=torch.int64)
    key = (ids.sort(dim=1).values * place).sum(1)
    keys_sorted, order = torch.sort(key, stable=True)
    seg = torch.searchsorted(keys_sorted, torch.arange(n_keys + 1, device=dev, dtype=keys_sorted.dtype))
    blocks = (seg[1:] - seg[:-1] + block_t - 1) // block_t
    ends = blocks.cumsum(0)
    n_work = (n_tok + block_t - 1) // block_t + torch.sym_min(n_tok, n_keys)
    w = torch.arange(n_work, device=dev, dtype=torch.int64)
    wkey = torch.searchsorted(ends, w, right=True).clamp(max=n_keys - 1)
    start = seg[wkey] + (w - (ends - blocks)[wkey]) * block_t
    end = torch.minimum(start + block_t, seg[wkey + 1])
    end = torch.where(w < ends[-1], end, start)
    return order, torch.stack([wkey, start, end])


# The same two as ops of their own, for the backend's graphs: their outputs are then buffers that
# Inductor hands unchanged to every consumer. Traced as plain functions, Inductor lowers the sorts
# to its own kernels on CUDA and may materialise their results once per consumer, so the side
# stream's start and its join would see different copies ("Lifetimes" below).
@torch.library.custom_op("adafuse::expert_segments", mutates_args=())
def expert_segments_op(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    return expert_segments(experts, n_experts)


@expert_segments_op.register_fake
def _expert_segments_fake(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    return (experts.new_empty(experts.numel(), dtype=torch.int64),
            experts.new_empty(n_experts + 1, dtype=torch.int64))


@torch.library.custom_op("adafuse::tuple_blocks", mutates_args=())
def tuple_blocks_op(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    return tuple_blocks(experts, n_experts)


@tuple_blocks_op.register_fake
def _tuple_blocks_fake(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    n_tok, k = experts.shape
    n_work = (n_tok + TUPLE_BLOCK_T - 1) // TUPLE_BLOCK_T + torch.sym_min(n_tok, (n_experts + 1) ** k)
    return experts.new_empty(n_tok, dtype=torch.int64), experts.new_empty(3, n_work, dtype=torch.int64)


# Prefill in dense matmuls (the backend's prefill_expand="auto" from this many tokens per step): every
# expert's low-rank term for every token, weighted by a gate matrix that is zero outside each token's
# top-k. N / k times the gathered arithmetic, but in large cuBLAS GEMMs, with no sort: on the H200
# at 512 tokens (Llama-2-7B shape, N = 8, r = 64, top-2) it reached 0.892x (q,v) and 0.662x (all
# seven) of the backbone's tokens/s, where the Triton gather kernels reached 0.86-0.87x and
# 0.52-0.55x (docs/paths.md, fourth run). At batch-32 decode the gather kernels won by far (the
# naive model's dense form: 1.68x the backbone's time vs gather's 1.30x, all seven); the crossover
# lies between 32 and 128 tokens: at 128, one 7B layer's seven linears took 0.288 ms dense against
# 0.355 ms with the gather kernels (benchmarks/bench_prefill_forms.py); 64 is not measured, so 128
# stays. Only measured at N / k = 4: "auto"
# stays with the kernels above DENSE_MAX_EXPANSION.
DENSE_MIN_TOKENS = 128
DENSE_MAX_EXPANSION = 4


def dense_gates(experts: Tensor, gates: Tensor, n_experts: int) -> Tensor:
    """[T, N] fp32: each token's gate for each expert (summed over the slots that name it), 0 for
    the experts it did not select; an out-of-range id contributes nothing. Once per step."""
    valid = (experts >= 0) & (experts < n_experts)
    ids = torch.where(valid, experts, 0)
    g = torch.where(valid, gates.to(torch.float32), 0.0)
    return torch.zeros(experts.shape[0], n_experts, dtype=torch.float32, device=experts.device).scatter_add(1, ids, g)


def dense_lora(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], gate_matrix: Tensor,
               scaling: float) -> list[Tensor]:
    """The deltas of modules sharing x [T, in] in dense matmuls over every expert:
    delta_m = sum_n (s * G[:, n]) * B_m[n] (A_m[n] x), G = dense_gates(...). Plain torch ops, so
    Inductor compiles them (cuBLAS GEMMs, the gate product fused). Numerics as the eager layer's
    own dense form: A x is rounded to the factors' dtype once before the gate (the Triton path
    keeps it in fp32), and an unselected expert whose A x overflows (fp16) would turn its zero
    gate into NaN, where the gather kernels never compute it. The contraction over (expert, rank)
    reads lora_B [N, out, r] through a permuted copy each call (about 2 x N r out bytes per module)."""
    deltas = []
    for a, b in zip(lora_A, lora_B):
        n, r, n_in = a.shape
        h = torch.matmul(x.to(a.dtype), a.reshape(n * r, n_in).t())  # [T, N * r]: every expert's A x
        h = (h.view(-1, n, r).float() * (gate_matrix * scaling)[:, :, None]).to(a.dtype)
        deltas.append(torch.einsum("tnr,nor->to", h, b).to(x.dtype))
    return deltas


def dense_lora_packed(x: Tensor, a_cat: Tensor, b_packed: list[Tensor], n_experts: int, gate_matrix: Tensor,
                      scaling: float) -> list[Tensor]:
    """dense_lora over packed factors (runtime/dense_packs.py): one shrink GEMM for the whole group,
    x [T, in] @ a_cat [sum_m N r, in]^T, then per module delta_m = (gated h_m) @ b_packed_m [out, N r]^T,
    reading B where it lies. Same numerics as dense_lora: h rounded to the factors' dtype, the gate
    product in fp32, rounded again before the expand."""
    h_all = torch.matmul(x.to(a_cat.dtype), a_cat.t())  # [T, M * N r]
    t = h_all.shape[0]
    m = len(b_packed)
    g = (gate_matrix * scaling)[:, None, :, None]  # [T, 1, N, 1]
    h_all = (h_all.view(t, m, n_experts, -1).float() * g).to(a_cat.dtype).view(t, -1)
    widths = [b.shape[1] for b in b_packed]
    return [torch.matmul(h, b.t()).to(x.dtype) for h, b in zip(h_all.split(widths, 1), b_packed)]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
             gates: Tensor, impl: str) -> None:
    """Metadata checks only (no device reads): raise ValueError naming the offending input."""
    if impl not in IMPLS:
        raise ValueError(f"gather_lora: impl must be one of {IMPLS}, got {impl!r}")
    if x.dim() != 2:
        raise ValueError(f"gather_lora: x must be 2-D [T, in], got {_shape(x)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"gather_lora: x has dtype {x.dtype}; expected one of {_DTYPES}")
    n_tok, n_in = x.shape
    if len(lora_A) == 0:
        raise ValueError("gather_lora: `lora_A` is empty (need at least one module)")
    if len(lora_B) != len(lora_A):
        raise ValueError(f"gather_lora: got {len(lora_A)} lora_A and {len(lora_B)} lora_B")
    if experts.dim() != 2 or experts.shape[0] != n_tok or not 1 <= experts.shape[1] <= _MAX_K:
        raise ValueError(
            f"gather_lora: experts must be [T, k] with T = {n_tok} (rows of x) and k in "
            f"1..{_MAX_K}, got {_shape(experts)}"
        )
    if experts.dtype != torch.int64:
        raise ValueError(f"gather_lora: experts must be int64, got {experts.dtype}")
    if _shape(gates) != _shape(experts):
        raise ValueError(f"gather_lora: gates {_shape(gates)} != experts {_shape(experts)}")
    if not gates.is_floating_point():
        raise ValueError(f"gather_lora: gates must be floating point, got {gates.dtype}")
    for name, t in (("experts", experts), ("gates", gates)):
        if t.device != x.device:
            raise ValueError(f"gather_lora: {name} is on {t.device}, x on {x.device}")
    a0 = lora_A[0]
    if a0.dim() != 3:
        raise ValueError(f"gather_lora: lora_A[0] must be 3-D [N, r, in], got {_shape(a0)}")
    n_exp, r = a0.shape[0], a0.shape[1]
    for m, (a, b) in enumerate(zip(lora_A, lora_B)):
        if a.dim() != 3 or _shape(a) != (n_exp, r, n_in):
            raise ValueError(
                f"gather_lora: lora_A[{m}] is {_shape(a)}, expected [N, r, in] = "
                f"{(n_exp, r, n_in)} (N, r from lora_A[0], in from x {_shape(x)})"
            )
        if b.dim() != 3 or b.shape[0] != n_exp or b.shape[2] != r:
            raise ValueError(
                f"gather_lora: lora_B[{m}] is {_shape(b)}, expected [N, out, r] with N = "
                f"{n_exp}, r = {r} (from lora_A[0] {_shape(a0)})"
            )
        for name, t in (("lora_A", a), ("lora_B", b)):
            if t.dtype != x.dtype:
                raise ValueError(
                    f"gather_lora: {name}[{m}] is {t.dtype}, x is {x.dtype}; one dtype for "
                    "the input and the factors"
                )
            if t.device != x.device:
                raise ValueError(f"gather_lora: {name}[{m}] is on {t.device}, x on {x.device}")
            if not t.is_contiguous():
                raise ValueError(f"gather_lora: {name}[{m}] {_shape(t)} must be contiguous")


# ------------------------------------------------------------------------------------------
# Reference and oracle
# ------------------------------------------------------------------------------------------
def reference_gather_lora(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor],
                          experts: Tensor, gates: Tensor, scaling: float, per_slot: bool = False) -> list[Tensor]:
    """Plain PyTorch, fp32 math, device ops only (no host sync).

    Per module: h [T, k, r] = the selected experts' A rows times x (gathered from x @ A_all^T,
    every expert computed: simple, and cheap next to the backbone on the CPU), scaled by
    s * gate; then the k slots of each token are scattered onto their experts, H [T, N, r],
    and delta = H @ B_all^T, one matmul over all experts' columns. `per_slot`: each slot's
    term apart, [T, k, out] (one such matmul per slot), whose sum over k is the delta.
    """
    n_tok, k = experts.shape
    coef = gates.float() * scaling  # [T, k]
    xf = x.float()
    outs = []
    for a, b in zip(lora_A, lora_B):
        n_exp, r, _ = a.shape
        xa = (xf @ a.float().reshape(n_exp * r, -1).T).view(n_tok, n_exp, r)
        idx = experts.unsqueeze(-1).expand(n_tok, k, r)
        h = xa.gather(1, idx) * coef.unsqueeze(-1)  # [T, k, r]
        b_cat = b.float().permute(1, 0, 2).reshape(b.shape[1], n_exp * r)  # [out, N*r]
        slots = [slice(j, j + 1) for j in range(k)] if per_slot else [slice(0, k)]
        ys = []
        for sl in slots:
            hh = torch.zeros(n_tok, n_exp, r, dtype=torch.float32, device=x.device)
            hh.scatter_add_(1, idx[:, sl], h[:, sl])
            ys.append(hh.view(n_tok, n_exp * r) @ b_cat.T)
        outs.append((torch.stack(ys, 1) if per_slot else ys[0]).to(x.dtype))
    return outs


def oracle_gather_lora(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor],
                       experts: Tensor, gates: Tensor, scaling: float) -> list[Tensor]:
    """float64 per-token loop, the test oracle: delta_m[t] = sum_j s g_tj B[e](A[e] x_t)."""
    outs = []
    for a, b in zip(lora_A, lora_B):
        a64, b64 = a.double(), b.double()
        y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64, device=x.device)
        for t in range(x.shape[0]):
            xt = x[t].double()
            for e, g in zip(experts[t].tolist(), gates[t].double().tolist()):
                y[t] += scaling * g * (b64[e] @ (a64[e] @ xt))
        outs.append(y)
    return outs


def make_gather_problem(
    n_tokens: int, n_in: int, outs: list[int], *, n_experts: int = 8, rank: int = 16,
    k: int = 2, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    a_std: float | None = None, b_std: float = 1.0, generator: torch.Generator | None = None,
) -> dict:
    """Random inputs; each token draws k distinct experts, gates are a softmax (never zero)."""
    draw_on = "cpu" if generator is not None else device

    def rnd(*shape, std=1.0):
        t = torch.randn(*shape, generator=generator, device=draw_on) * std
        return t.to(dtype=dtype, device=device)

    a_std = a_std if a_std is not None else n_in ** -0.5
    x = rnd(n_tokens, n_in)
    lora_A = [rnd(n_experts, rank, n_in, std=a_std) for _ in outs]
    lora_B = [rnd(n_experts, o, rank, std=b_std) for o in outs]
    scores = torch.rand(n_tokens, n_experts, generator=generator, device=draw_on)
    experts = scores.topk(k, dim=1).indices.to(device)
    gates = torch.softmax(torch.randn(n_tokens, k, generator=generator, device=draw_on), 1)
    return dict(x=x, lora_A=lora_A, lora_B=lora_B, experts=experts, gates=gates.to(device),
                scaling=0.5)


def token_errors(got: Tensor, expected64: Tensor) -> Tensor:
    """Per token ||got_t - exp_t|| / ||exp_t|| in float64 (catches a single wrong token)."""
    num = (got.double() - expected64).norm(dim=1)
    den = expected64.norm(dim=1).clamp_min(1e-30)
    return num / den


# ------------------------------------------------------------------------------------------
# Plans (Triton): built once per adapter set, cached on data_ptrs.
# ------------------------------------------------------------------------------------------
_plans = PlanCache()


def clear_plan_cache() -> None:
    _plans.clear()


def _get_triton_plan(lora_A: list[Tensor], lora_B: list[Tensor]):
    # Every tensor's address, shape and dtype: a freed tensor's address can come back holding another.
    key = (
        lora_A[0].device,
        tuple((a.data_ptr(), a.shape, a.dtype) for a in lora_A),
        tuple((b.data_ptr(), b.shape, b.dtype) for b in lora_B),
    )

    def build():
        from adafuse_compile.cutlass_kernels.triton_gather import GatherPlan

        return GatherPlan(lora_A, lora_B)
    return _plans.get(key, build, lora_A[0].device)


def _resolve_impl(impl: str, x: Tensor) -> str:
    return resolve_triton_or_reference(impl, x.device, "gather_lora")


def prepare_plan(lora_A: list[Tensor], lora_B: list[Tensor], impl: str = "auto") -> None:
    """Build (and cache) the plan later calls with these factors will use, outside any CUDA-graph capture."""
    if _resolve_impl(impl, lora_A[0]) == "triton":
        _get_triton_plan(lora_A, lora_B)


def _validate_segments(experts: Tensor, n_experts: int, rows: Tensor | None, segments: Tensor | None) -> None:
    if (rows is None) != (segments is None):
        raise ValueError("gather_lora: pass both `rows` and `segments` (from expert_segments) or neither")
    if rows is None:
        return
    n_rows = experts.numel()
    for name, t, shape in (("rows", rows, (n_rows,)), ("segments", segments, (n_experts + 1,))):
        if _shape(t) != shape or t.dtype != torch.int64 or t.device != experts.device:
            raise ValueError(f"gather_lora: {name} must be int64 {shape} on {experts.device} "
                             f"(expert_segments(experts, N)), got {t.dtype} {_shape(t)} on {t.device}")


def _validate_sets(experts: Tensor, set_order: Tensor | None, set_work: Tensor | None) -> None:
    if (set_order is None) != (set_work is None):
        raise ValueError("gather_lora: pass both `set_order` and `set_work` (from tuple_blocks) or neither")
    if set_order is None:
        return
    n_tok = experts.shape[0]
    if _shape(set_order) != (n_tok,) or set_work.dim() != 2 or set_work.shape[0] != 3 or \
            set_order.dtype != torch.int64 or set_work.dtype != torch.int64:
        raise ValueError(f"gather_lora: set_order / set_work must be int64 [{n_tok}] / [3, W] "
                         f"(tuple_blocks(experts, N)), got {_shape(set_order)} / {_shape(set_work)}")


def _gather_impl(x, lora_A, lora_B, experts, gates, scaling, impl, rows=None, segments=None,
                 set_order=None, set_work=None, per_slot=False, on_side_stream=False) -> list[Tensor]:
    validate(x, lora_A, lora_B, experts, gates, impl)
    _validate_segments(experts, lora_A[0].shape[0], rows, segments)
    _validate_sets(experts, set_order, set_work)
    fork = on_side_stream and x.device.type == "cuda"
    if fork:  # recorded whatever runs after it, so the join always waits on work of this step
        side = side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
    if _resolve_impl(impl, x) == "reference":  # in line, also after a fork
        return reference_gather_lora(x, lora_A, lora_B, experts, gates, scaling, per_slot)
    plan = _get_triton_plan(lora_A, lora_B)
    steps = dict(rows=rows, segments=segments, set_order=set_order, set_work=set_work, per_slot=per_slot)
    if not fork:
        return plan.run(x, experts, gates, scaling, **steps)
    # The outputs on the main stream, which reads (and frees) them after the join; the kernels'
    # own temporaries (h) on the side stream, which alone uses them.
    outs = plan.new_outputs(x, experts.shape[1] if per_slot else None)
    with torch.cuda.stream(side):
        plan.run(x, experts, gates, scaling, outs=outs, **steps)
    # The side stream reads the inputs after this call returns, and the caller may drop them at
    # once (Inductor did: "Lifetimes" below). Held here until the join, after which the current
    # stream has waited for the side stream, so the caching allocator cannot hand their memory to
    # the current stream's next tensors meanwhile. (Tensor.record_stream would do the same, but
    # defers its frees to the end of a CUDA-graph capture and has open allocator issues there.)
    pending = _pending_inputs()
    pending[outs[0].data_ptr()] = (x, experts, gates, rows, segments, set_order, set_work)
    if len(pending) > MAX_PENDING_STARTS:  # starts whose join never ran (a step that raised): drop the oldest
        pending.pop(next(iter(pending)))
    return outs


# Inductor gives a custom op's inputs the exact strides they had in eager by default: where it
# padded a buffer's rows (on the GPU, rows of more than 1024 elements that are not a multiple of
# 128 bytes: the test model's 1376-wide MLP input), each op got a contiguous copy of its own, so a
# side stream's start and its join held different copies and the guard of the join caught it
# (tests on the H100, 2026-12-05). With a fixed stride order instead, every op takes the one
# padded buffer, in line with no copy, and the shrink reads x by its row stride.
_STRIDE_ORDER = (torch.Tag.needs_fixed_stride_order,)


_SCHEMA = (
    "(Tensor x, Tensor[] lora_A, Tensor[] lora_B, Tensor experts, Tensor gates, "
    "float scaling, str impl, Tensor? rows=None, Tensor? segments=None, "
    "Tensor? set_order=None, Tensor? set_work=None, bool per_slot=False) -> Tensor[]"
)


@torch.library.custom_op("adafuse::gather_lora", mutates_args=(), schema=_SCHEMA, tags=_STRIDE_ORDER)
def gather_lora_op(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
                   gates: Tensor, scaling: float, impl: str, rows: Tensor | None = None,
                   segments: Tensor | None = None, set_order: Tensor | None = None,
                   set_work: Tensor | None = None, per_slot: bool = False) -> list[Tensor]:
    return _gather_impl(x, lora_A, lora_B, experts, gates, scaling, impl, rows, segments, set_order, set_work,
                        per_slot)


@gather_lora_op.register_fake
def _gather_lora_fake(x, lora_A, lora_B, experts, gates, scaling, impl, rows=None, segments=None,
                      set_order=None, set_work=None, per_slot=False) -> list[Tensor]:
    validate(x, lora_A, lora_B, experts, gates, impl)
    _validate_segments(experts, lora_A[0].shape[0], rows, segments)
    _validate_sets(experts, set_order, set_work)
    if per_slot:
        return [x.new_empty(x.shape[0], experts.shape[1], b.shape[1]) for b in lora_B]
    return [x.new_empty(x.shape[0], b.shape[1]) for b in lora_B]


def gather_lora(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
                gates: Tensor, scaling: float, impl: str = "auto", rows: Tensor | None = None,
                segments: Tensor | None = None, set_order: Tensor | None = None,
                set_work: Tensor | None = None, per_slot: bool = False) -> list[Tensor]:
    """delta_m = sum_j s g_j B_m[e_j] (A_m[e_j] x) per token, for all modules (module doc).
    `rows`, `segments`: this step's expert_segments(experts, N), computed once for all calls;
    `set_order`, `set_work`: its tuple_blocks(experts, N), likewise. `per_slot`: each slot's term
    apart, [T, k, out_m], for the caller to sum over k (prefill: the expand by expert)."""
    return torch.ops.adafuse.gather_lora(x, lora_A, lora_B, experts, gates, float(scaling),
                                          impl, rows, segments, set_order, set_work, per_slot)


# ------------------------------------------------------------------------------------------
# Side-stream form, for the backend's gather rewrite on CUDA: start ... join.
# ------------------------------------------------------------------------------------------
# At decode shapes the adapter kernels are latency-bound (a few microseconds each on few
# programs) while the backbone linears that read the same x are bandwidth-bound over every SM.
# `gather_lora_start` forks: it makes a second stream wait for the current one and launches the
# shrink and expand there; the graph then runs the group's backbone linears on the current
# stream, concurrently; `gather_lora_join` makes the current stream wait for the second before
# the deltas are added. A CUDA-graph capture records the fork and the join as graph edges, so a
# replay overlaps the same way. Lifetimes: the side stream reads x, experts, gates and the step's
# order and sets after the start has returned, so none of them may be reused before the join. Two
# guards: the start holds them until the join (_pending_inputs: no reuse through the caching
# allocator), and the caller passes them to the join as well, which in a compiled graph keeps
# Inductor from reusing their buffers for later kernels of the current stream. For that the join
# must receive the very buffers the start read: Inductor computed a layer-wise router's softmax
# twice, one buffer for the start and one for the join, and the start's was overwritten while the
# side stream still read it (the 7B layer-wise decode on the H100, 2026-12-05), so the backend
# passes gates through adafuse::side_input, whose output is one buffer for both. The deltas are
# allocated on the current stream.
# One side stream per (thread, device): two threads decoding two models (each may be capturing a
# CUDA graph) must not join each other's work or captures through a shared stream.
_side_streams = threading.local()


MAX_PENDING_STARTS = 256  # a graph has a few starts open at a time (layer-wise q, k, v: three)


def _pending_inputs() -> dict:
    """This thread's started gathers: the first delta's address -> the inputs the side stream reads."""
    return _side_streams.__dict__.setdefault("pending", {})


def side_stream(device: torch.device) -> torch.cuda.Stream:
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    streams = _side_streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@torch.library.custom_op("adafuse::gather_lora_start", mutates_args=(), schema=_SCHEMA, tags=_STRIDE_ORDER)
def gather_lora_start_op(x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
                         gates: Tensor, scaling: float, impl: str, rows: Tensor | None = None,
                         segments: Tensor | None = None, set_order: Tensor | None = None,
                         set_work: Tensor | None = None, per_slot: bool = False) -> list[Tensor]:
    """gather_lora, launched on the side stream (CUDA, Triton); elsewhere it runs in place and the
    join does nothing. The deltas must not be read before gather_lora_join."""
    return _gather_impl(x, lora_A, lora_B, experts, gates, scaling, impl, rows, segments, set_order, set_work,
                        per_slot, on_side_stream=True)


gather_lora_start_op.register_fake(_gather_lora_fake)


# `deltas` is declared mutated although the join only waits: the declaration is what orders every
# later read of the deltas after the join (a pure op with no output would be dropped or moved).
# `keep` is read-only; listing the group's backbone linear outputs there also keeps Inductor from
# scheduling the join before them (it would otherwise move it up to the start, losing the overlap).
@torch.library.custom_op("adafuse::gather_lora_join", mutates_args=("deltas",), tags=_STRIDE_ORDER)
def gather_lora_join_op(deltas: list[Tensor], keep: list[Tensor]) -> None:
    if deltas and deltas[0].is_cuda:
        torch.cuda.current_stream(deltas[0].device).wait_stream(side_stream(deltas[0].device))
        read = _pending_inputs().pop(deltas[0].data_ptr(), None)  # the side stream is waited for now
        if read is not None and keep and _check_keep():
            _check_join_keeps(read, keep)


_joins_to_check = 1024  # joins checked outside a CUDA-graph capture, per process (a few us each)


def _check_keep() -> bool:
    """Check this join: always while a CUDA graph is captured (replays run no Python), else only for
    the process's first joins (a compiled graph's code is the same on every call)."""
    global _joins_to_check
    if torch.cuda.is_current_stream_capturing():
        return True
    _joins_to_check -= 1
    return _joins_to_check >= 0


def _check_join_keeps(read: tuple, keep: list[Tensor]) -> None:
    """Every tensor the side stream read must be among those the join keeps: in a compiled graph
    that is what keeps Inductor from handing its buffer to a later kernel before the join."""
    kept = {t.untyped_storage().data_ptr() for t in keep}
    missing = [t for t in read if t is not None and t.untyped_storage().data_ptr() not in kept]
    if missing:
        raise RuntimeError(
            f"adafuse: {len(missing)} tensor(s) read by a gather call's side stream ({[tuple(t.shape) for t in missing]}) "
            "are not among those its join keeps alive: the graph passed the join other copies, so later kernels "
            "may overwrite them before the side stream has read them, and the adapter terms would be wrong. "
            "Compile with options={'side_stream': False} (exact, the adapter kernels in line) and report this")


@gather_lora_join_op.register_fake
def _gather_lora_join_fake(deltas, keep) -> None:
    return None


# A copy made by an op of its own: Inductor cannot fuse it into the kernel that computes `t`, so
# its output is one buffer, which the graph hands to both the start and the join (see Lifetimes).
# One small launch per router: once per step for a pre-gated model, once per region layer-wise.
@torch.library.custom_op("adafuse::side_input", mutates_args=())
def side_input_op(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


@side_input_op.register_fake
def _side_input_fake(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)
