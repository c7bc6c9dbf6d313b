"""rewrite_gather: steps that cannot merge (prefill, batch > 1) compute their experts unmerged,
with ONE fused gather call per group of adapted linears that share an input.

    before:  y_q = linear(x, Wq) + branch_q(x, Aq, Bq, gates);  y_v = linear(x, Wv) + branch_v(...)
    after:   dq, dv = adafuse.gather_lora(x, [Aq, Av], [Bq, Bv], experts, gates, scaling)
             y_q = linear(x, Wq) + dq;  y_v = linear(x, Wv) + dv

On CUDA (setting side_stream, default on) the call is split in two, gather_lora_start right
after x and the routing exist and gather_lora_join before the first add, so the adapter kernels
run on a second stream while the group's backbone linears run on the first (gather_lora.py).

Each token keeps its own experts (per-token indices from the one hoisted router, or, layer-wise,
from each region's own router, see below): exact, like the
eager layer, but one shrink and one expand launch per group instead of a gather, two einsums and
the gate arithmetic per module. For steps long enough that the Triton shrink sorts its rows by
expert (prefill), the sort and the experts' segments are computed ONCE per step and shared by
every call: pre-gating makes them the same for every layer.

Prefill-sized steps (setting prefill_expand, default "auto": from DENSE_MIN_TOKENS tokens, or a
dynamic token count that is not a decode batch) take a dense form instead: per group one
dense_lora call, every expert's term in plain matmuls weighted by one gate matrix for the step
(zero outside each token's top-k), which Inductor compiles to cuBLAS GEMMs; no kernel of ours, no
side stream, sgmm_impl does not apply. Measured faster than the gather kernels at 512 tokens. By
default (setting prefill_packed) those GEMMs read packed copies of the factors, kept in sync with
the model's by the runtime (runtime/dense_packs.py): all seven linears 0.664x -> 0.723x of the
backbone's prefill tokens/s on the H200.

A training step (grad mode on, inputs requiring grad) takes the dense form, unpacked, whatever
its size: the gather, switch and slot kernels have no autograd formula, the dense matmuls do.

Layer-wise routing (MoLA style, prove_pregating's "adafuse_layerwise"): the same rewrite, with
each group's experts and gates taken from its own router where that router computed them (a group
is then the regions sharing an input AND a router), and the sort, sets or gate matrix computed
once per router instead of once per step.
"""
from __future__ import annotations

import operator
import weakref

import torch
import torch.fx as fx

from ..cutlass_kernels import gather_lora
from ..cutlass_kernels.gather_lora import (  # also registers the ops
    DENSE_MAX_EXPANSION, DENSE_MIN_TOKENS, MAX_TUPLE_KEYS, SORTED_MIN_ROWS, dense_gates, dense_lora, dense_lora_packed,
    tuple_keys,
)
from ..cutlass_kernels.linear_lora import linear_lora
from ..cutlass_kernels.plan_cache import resolve_triton_or_reference
from ..runtime.dense_packs import packs_for
from ..settings import BackendSettings
from .manager import clean_up, note, stop, warn
from .regions import TRAINING_NOTE, add_static_inputs, example_value, graph_inputs, regions_of, trains


def rewrite_gather(gm: fx.GraphModule, settings: BackendSettings) -> fx.GraphModule:
    if "adafuse_switch" in gm.meta or "adafuse_factor" in gm.meta:
        return gm  # a one-token decode step, already rewritten by rewrite_switch or rewrite_factor
    regions = regions_of(gm)
    scalings = {r.factors["scaling"] for r in regions}
    if len(scalings) != 1:
        return stop(gm, f"regions have different scalings {sorted(scalings)}; one gather call per group needs one")
    scaling = float(scalings.pop())
    top_k = regions[0].factors["top_k"]
    impl = settings.sgmm_impl if settings.sgmm_impl != "cutlass" else "auto"
    inputs = graph_inputs(gm)
    device = inputs[regions[0].factors["lora_A"]].device
    tokens = regions[0].tokens
    layerwise = gm.meta.get("adafuse_layerwise_routing")

    def router_of(r):  # the key of a region's routing: None for the step's one router (pre-gated)
        return r.gate_sources[0] if layerwise is not None else None
    groups: dict[tuple, list] = {}  # (input, router) -> the regions that share both, in order
    for r in regions:
        groups.setdefault((r.x, router_of(r)), []).append(r)
    n_experts = regions[0].factors["num_experts"]
    training = trains(gm)
    prefill_dense = _dense(settings.prefill_expand, tokens, regions[0].x, n_experts, top_k)
    dense = training or prefill_dense
    if not dense:  # the kernel plans now: one that cannot be built is a compile-time fallback, not a failed step
        try:
            for group in groups.values():
                gather_lora.prepare_plan([inputs[r.factors["lora_A"]] for r in group],
                                         [inputs[r.factors["lora_B"]] for r in group], impl)
        except (RuntimeError, ValueError, OSError) as exc:
            return stop(gm, f"the gather kernels cannot be planned ({type(exc).__name__}: {exc}); compiled "
                            "unchanged (exact, unmerged)")
    graph = gm.graph
    routes = {}  # router key -> (experts, gates) as [T, k] nodes, right after that router's outputs
    for key, routing in (layerwise or {None: gm.meta["adafuse_routing"]}).items():
        with graph.inserting_after(routing["last"]):
            experts = graph.call_method("reshape", (routing["experts"], -1, top_k))
        with graph.inserting_after(experts):
            routes[key] = (experts, graph.call_method("reshape", (routing["weights"], -1, top_k)))
    if dense:
        if training:
            note(gm, f"rewrite_gather: {TRAINING_NOTE}: the dense form (plain matmuls, differentiable), unpacked")
            if not prefill_dense:  # a decode step: slower than the kernels it would have taken
                warn(gm, f"a decode-sized step traced with gradients enabled ({TRAINING_NOTE}) takes the differentiable "
                         "dense form, slower than adafuse's kernels; for inference run the model under "
                         "torch.no_grad() or torch.inference_mode()")
        fused = _fused_impl(gm, settings, device) if settings.prefill_fused and not training else None
        return _rewrite_dense(gm, groups, routes, scaling, tokens, settings.prefill_packed and not training, fused)
    prefill_expand = "sets" if settings.prefill_expand in ("auto", "dense") else settings.prefill_expand
    # A step with enough rows for the sorted shrink (or a dynamic token count: a decode batch, or a
    # prefill with prefill_expand "sets" / "slots") sorts its rows by expert once per routing
    # (_step_args): once for the step when pre-gated.
    sorted_rows = (impl == "triton" or (impl == "auto" and device.type == "cuda")) and (
        tokens is None or tokens * top_k >= SORTED_MIN_ROWS)
    per_slot = sorted_rows and prefill_expand == "slots"
    side = side_stream_choice(settings.side_stream, device)
    if side:  # the gates the start and the join both take: one buffer (gather_lora.py, "Lifetimes")
        for key, (experts, gates) in routes.items():
            with graph.inserting_after(gates):  # the gates' reshape sits after the experts' (above)
                routes[key] = (experts, graph.call_function(torch.ops.adafuse.side_input.default, (gates,)))
    step_args = {key: _step_args(graph, experts, gates, n_experts, top_k, sorted_rows, prefill_expand)
                 for key, (experts, gates) in routes.items()}
    for (x, key), group in groups.items():
        experts, gates = routes[key]
        step_nodes = [n for n in step_args[key] if isinstance(n, fx.Node)]
        order = {n: i for i, n in enumerate(graph.nodes)}  # earlier groups added nodes
        first_add = min((r.add for r in group), key=order.__getitem__)
        in_features = group[0].factors["in_features"]
        args = ([r.factors["lora_A"] for r in group], [r.factors["lora_B"] for r in group],
                experts, gates, scaling, impl, *step_args[key])
        if side:
            # Fork as soon as x and the step's routing exist, join just before the first add: the
            # group's backbone linears run in between, concurrently with the adapter kernels.
            ready = max((x, gates, *step_nodes), key=order.__getitem__)
            with graph.inserting_after(ready):
                x2d = graph.call_method("reshape", (x, -1, in_features))
            with graph.inserting_after(x2d):
                deltas = graph.call_function(torch.ops.adafuse.gather_lora_start.default, (x2d, *args))
            # A model computes q (linear + adapter add), then k, then v: bring the group's later
            # linears up before the first add, so that all of them run between fork and join.
            # A linear only reads x and parameters, so moving it up is exact; one that reads a
            # node defined after the first add stays where it is (and outside the overlap).
            linears = []
            for r in sorted(group, key=lambda r: order[r.linear]):
                if order[r.linear] > order[first_add]:
                    if any(order[n] >= order[first_add] for n in r.linear.all_input_nodes):
                        continue
                    first_add.prepend(r.linear)
                    order = {n: i for i, n in enumerate(graph.nodes)}
                linears.append(r.linear)
            keep = [x2d, experts, gates, *step_nodes, *linears]
            with graph.inserting_before(first_add):
                graph.call_function(torch.ops.adafuse.gather_lora_join.default, (deltas, keep))
        else:
            with graph.inserting_before(first_add):
                x2d = graph.call_method("reshape", (x, -1, in_features))
                deltas = graph.call_function(torch.ops.adafuse.gather_lora.default, (x2d, *args))
        _add_deltas(gm, group, deltas, per_slot)
    gm.meta["adafuse_gather_groups"] = len(groups)
    names = list(graph_inputs(gm))
    group_pos = [([names.index(r.factors["lora_A"]) for r in g], [names.index(r.factors["lora_B"]) for r in g])
                 for g in groups.values()]

    def prepare(args):
        """Another instance of the model runs this graph: build its gather plans now, not while
        CUDA-graph trees record the graph for its addresses."""
        for a_pos, b_pos in group_pos:
            gather_lora.prepare_plan([args[i] for i in a_pos], [args[i] for i in b_pos], impl)
    gm.meta["adafuse_prepare"] = prepare
    if layerwise is not None:
        shared = (f"; layer-wise routing: each call takes its own router's experts ({len(routes)} routers)"
                  + ("; experts sorted once per router" if sorted_rows else ""))
    else:
        shared = "; experts sorted once for the step, shared by every call" if sorted_rows else ""
    if per_slot:
        shared += "; expand by expert, per-slot terms summed in the add"
    if side:
        shared += "; adapter kernels on a side stream, concurrent with the backbone linears"
    note(gm, f"rewrite_gather: {len(regions)} adapter branches -> {len(groups)} fused gather call(s) "
             f"(per-token experts, unmerged, exact){shared}")
    return clean_up(gm)


def side_stream_choice(asked: bool | None, device: torch.device) -> bool:
    """Whether the gather calls run on a side stream: as asked, else on CUDA (both routings).

    Layer-wise routed graphs kept the kernels in line by default while a 7B layer-wise decode with
    the side stream was wrong (it read freed gates on an H100; fixed by adafuse::side_input). The
    fix held on the H100 on 2026-12-05: the 7B layer-wise q,v decode with the side stream matched
    eager as closely as the in-line graph and took 1.218x the backbone's time against 1.330x
    (benchmarks/results/decode_llama2-7b_qv_layerwise_side_h100_s21.json), so the default is on again."""
    if asked is not None:
        return asked
    return device.type == "cuda"


def _step_args(graph: fx.Graph, experts: fx.Node, gates: fx.Node, n_experts: int, top_k: int, sorted_rows: bool,
               prefill_expand: str) -> tuple:
    """The gather op's arguments after (x, factors, experts, gates, scaling, impl) for one router's
    routing: rows, segments, set_order, set_work, per_slot (the op's schema). With enough rows for the
    sorted shrink (`sorted_rows`: or a dynamic token count) the expert order is computed once here,
    after the gates, for every call of that routing, with the sets of experts or the per-slot form
    for its expand."""
    if not sorted_rows:
        return (None, None)
    with graph.inserting_after(gates):
        both = graph.call_function(torch.ops.adafuse.expert_segments.default, (experts, n_experts))
    with graph.inserting_after(both):
        rows = graph.call_function(operator.getitem, (both, 0))
    with graph.inserting_after(rows):
        args = (rows, graph.call_function(operator.getitem, (both, 1)))
    if prefill_expand == "slots":  # the expand by expert, each slot's term apart
        return (*args, None, None, True)
    if tuple_keys(n_experts, top_k) <= MAX_TUPLE_KEYS:  # the expand by sets of experts
        with graph.inserting_after(args[1]):
            sets = graph.call_function(torch.ops.adafuse.tuple_blocks.default, (experts, n_experts))
        with graph.inserting_after(sets):
            order_node = graph.call_function(operator.getitem, (sets, 0))
        with graph.inserting_after(order_node):
            args = (*args, order_node, graph.call_function(operator.getitem, (sets, 1)))
    return args


def _one_token_per_sequence(x: fx.Node) -> bool:
    """x is [batch, 1, features] with a static 1: a decode step, whatever its (dynamic) batch."""
    shape = getattr(example_value(x), "shape", ())
    return len(shape) >= 3 and isinstance(shape[-2], int) and shape[-2] == 1


def _dense(prefill_expand: str, tokens: int | None, x: fx.Node, n_experts: int, top_k: int) -> bool:
    """Whether this step computes its deltas in dense matmuls. "dense": every multi-token step.
    "auto": prefill-sized steps (DENSE_MIN_TOKENS tokens or more, or a dynamic count that is not a
    decode step's batch), when dense does at most DENSE_MAX_EXPANSION times the gathered arithmetic
    (N / k: measured at 4 only)."""
    multi = tokens is None or tokens > 1
    if prefill_expand == "dense":
        return multi
    if prefill_expand != "auto":
        return False
    prefill_sized = tokens >= DENSE_MIN_TOKENS if tokens is not None else not _one_token_per_sequence(x)
    return prefill_sized and n_experts <= DENSE_MAX_EXPANSION * top_k


def _fused_impl(gm: fx.GraphModule, settings: BackendSettings, device: torch.device) -> str:
    """linear_lora's impl: Triton on CUDA unless the user asked for the reference. An explicit
    sgmm_impl="triton" where Triton cannot run (off CUDA) is checked now, not on the first call: the
    fused calls then take the reference (the dense form's own numbers), with a note."""
    impl = settings.sgmm_impl if settings.sgmm_impl in ("reference", "triton") else "auto"
    try:
        resolve_triton_or_reference(impl, device, "prefill_fused")
    except ValueError as exc:
        note(gm, f"rewrite_gather: {exc}; the fused calls use the reference")
        return "auto"
    return impl


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _unfusable(r, inputs: dict) -> str | None:
    """Why this region's linear and expand cannot be one linear_lora call, or None."""
    if len(r.linear.users) != 1:
        return f"{r.name}: the linear's output is read outside the adapter add"
    x, bias = example_value(r.x), _bias(r.linear)
    # The linear's own output dtype too: under autocast it differs from its inputs' (linear_lora has
    # no autocast rule, and the group's shrink would run in the autocast dtype).
    dtypes = {getattr(x, "dtype", None), getattr(example_value(r.linear), "dtype", None), inputs[r.weight].dtype,
              inputs[r.factors["lora_A"]].dtype, inputs[r.factors["lora_B"]].dtype}
    if isinstance(bias, fx.Node):
        dtypes.add(getattr(example_value(bias), "dtype", None))
    if len(dtypes) != 1:
        return (f"{r.name}: the input, weight, output and factors differ in dtype ({sorted(map(str, dtypes))}; "
                "autocast, or factors in another dtype than the backbone)")
    if inputs[r.weight].dim() != 2 or inputs[r.weight].stride(-1) != 1:
        return f"{r.name}: the weight is not a row-major matrix"
    return None


def _add_deltas(gm: fx.GraphModule, group: list, deltas: fx.Node, per_slot: bool = False) -> None:
    """Each region's adapter branch becomes linear + its delta (deltas[i], [T, out], or [T, k, out]
    per slot)."""
    graph = gm.graph
    for i, r in enumerate(group):
        with graph.inserting_before(r.add):  # after this region's own linear
            delta = graph.call_function(operator.getitem, (deltas, i))
            if per_slot:  # [T, k, out]: the slots' sum, which Inductor fuses into this add
                delta = graph.call_method("sum", (delta, 1))
            shaped = graph.call_method("view_as", (delta, r.linear))
            summed = graph.call_function(operator.add, (r.linear, shaped))
        r.add.replace_all_uses_with(summed)
        gm.meta["adafuse_replaced"][r.add.name] = summed.name


def _fuse_linears(gm: fx.GraphModule, group: list, h_all: fx.Node, b_packed: list, gate_matrix: fx.Node,
                  scaling: float, impl: str) -> None:
    """Each region's `linear(x, W, b) + delta` becomes linear_lora(x, W, b, h_m, G, s, B_m): h_m is
    the module's columns of the group's shrink output (the packed A stacks the group's modules in
    order), B_m its packed B. The replaced linear and branch are left for clean_up."""
    graph = gm.graph
    start = 0
    for r, b in zip(group, b_packed):
        width = r.factors["num_experts"] * r.factors["rank"]
        with graph.inserting_before(r.add):
            h = graph.call_method("narrow", (h_all, 1, start, width))
            y = graph.call_function(linear_lora, (r.x, r.weight, _bias(r.linear), h, gate_matrix, scaling, b, impl))
        start += width
        r.add.replace_all_uses_with(y)
        gm.meta["adafuse_replaced"][r.add.name] = y.name


def _rewrite_dense(gm: fx.GraphModule, groups: dict, routes: dict, scaling: float, tokens: int | None, packed: bool,
                   fused: str | None = None) -> fx.GraphModule:
    """A prefill-sized step: every group's deltas in dense matmuls over all experts, weighted by one
    gate matrix for the step (dense_gates; one per router when layer-wise); Inductor compiles them. Packed (setting prefill_packed):
    the GEMMs read the model's packed copies of the factors (runtime/dense_packs.py), static graph
    inputs re-packed before any call whose factors changed; else dense_lora permutes B per call.
    Fused (setting prefill_fused, packed only; `fused` is linear_lora's impl): the group's shrink
    stays one GEMM, and each adapted linear with its expand becomes one linear_lora call, which
    replaces the linear and the add."""
    graph = gm.graph
    n_experts = regions_of(gm)[0].factors["num_experts"]
    gate_matrices = {}
    for key, (experts, gates) in routes.items():
        with graph.inserting_after(gates):
            gate_matrices[key] = graph.call_function(dense_gates, (experts, gates, n_experts))
    inputs = graph_inputs(gm)
    names = list(inputs)
    group_list = list(groups.items())
    positions = [([names.index(r.factors["lora_A"]) for r in g], [names.index(r.factors["lora_B"]) for r in g])
                 for _, g in group_list]

    def sources(values) -> list:  # each group's (A list, B list), from the graph's inputs in order
        return [([values[i] for i in a_pos], [values[i] for i in b_pos]) for a_pos, b_pos in positions]
    example = list(inputs.values())
    if packed and any(len({(*a.shape[:2], a.dtype, a.device) for a in lora_a}) != 1 for lora_a, _ in sources(example)):
        packed = False  # one shrink GEMM per group cannot serve modules of different N, r, dtype or device
        note(gm, "rewrite_gather: dense prefill unpacked (modules sharing an input differ in experts, rank, dtype "
                 "or device)")
    if fused is not None and not packed:
        note(gm, "rewrite_gather: prefill_fused needs the packed factors (prefill_packed, not a training step): "
                 "the expand stays apart from the linears")
        fused = None
    buffers = iter(())
    if packed:
        channel = regions_of(gm)[0].factors["channel"]
        packs = packs_for(channel, sources(example))
        buffers = iter(add_static_inputs(gm, [f"adafuse_dense_pack_{i}" for i in range(len(packs.buffers))]))
    n_fused, unfused = 0, []
    for (x, key), group in group_list:
        gate_matrix = gate_matrices[key]
        order = {n: i for i, n in enumerate(graph.nodes)}
        first_add = min((r.add for r in group), key=order.__getitem__)
        in_features = group[0].factors["in_features"]
        why_not = [w for w in (_unfusable(r, inputs) for r in group) if w] if fused is not None else []
        unfused += why_not
        fuse = fused is not None and not why_not  # fused is None unless packed
        with graph.inserting_before(first_add):
            x2d = graph.call_method("reshape", (x, -1, in_features))
            if packed:
                a_cat = (next(buffers) if len(group) > 1
                         else graph.call_method("reshape", (group[0].factors["lora_A"], -1, in_features)))
                b_packed = [next(buffers) for _ in group]
                if fuse:
                    h_all = graph.call_function(torch.matmul, (x2d, graph.call_method("t", (a_cat,))))
                else:
                    deltas = graph.call_function(dense_lora_packed, (x2d, a_cat, b_packed, n_experts, gate_matrix,
                                                                     scaling))
            else:
                deltas = graph.call_function(dense_lora, (x2d, [r.factors["lora_A"] for r in group],
                                                          [r.factors["lora_B"] for r in group], gate_matrix,
                                                          scaling))
        if fuse:
            _fuse_linears(gm, group, h_all, b_packed, gate_matrix, scaling, fused)
            n_fused += len(group)
        else:
            _add_deltas(gm, group, deltas)
    gm.meta["adafuse_gather_groups"] = len(groups)
    if packed:
        gm.meta["adafuse_extra_inputs"] = packs.buffers

        def rebind(channel, args):
            """Another instance of the model runs this graph: its own packs."""
            return None, packs_for(channel, sources(args)).buffers

        # channel -> its packs, so that a call does not rebuild the key; weak: the packs live and die
        # with the model (its channel holds them), not with this graph
        bound = weakref.WeakKeyDictionary()
        flat_positions = [i for a_pos, b_pos in positions for i in (*a_pos, *b_pos)]
        # itemgetter returns a bare item for one position: always a sequence here
        flat_of = (operator.itemgetter(*flat_positions) if len(flat_positions) > 1
                   else lambda args: (args[flat_positions[0]],))

        def refresh(channel, args):
            """Before every call: re-pack the factors that changed since they were packed."""
            packs = bound.get(channel)
            if packs is None:
                packs = bound[channel] = packs_for(channel, sources(args))
            packs.refresh(flat_of(args))
        gm.meta["adafuse_rebind"] = rebind
        gm.meta["adafuse_refresh"] = refresh
        gm.meta["adafuse_dense_pack_bytes"] = packs.nbytes
    count = "a dynamic number of" if tokens is None else tokens
    how = (f"; reads packed factors ({packs.nbytes / 2**20:.1f} MiB, re-packed when a factor changes)" if packed
           else "; permutes each B per call")
    if n_fused:
        how += f"; {n_fused} adapted linear(s) fused with their expand (one linear_lora GEMM each)"
    if unfused:
        how += f"; not fused: {'; '.join(unfused)}"
    if None not in routes:
        how += f"; layer-wise routing: one gate matrix per router ({len(routes)})"
    note(gm, f"rewrite_gather: {sum(len(g) for g in groups.values())} adapter branches -> {len(groups)} dense "
             f"call(s) over every expert ({count} tokens per step, prefill_expand: dense from {DENSE_MIN_TOKENS} "
             f"tokens; zero gates outside each token's top-k){how}")
    return clean_up(gm)
