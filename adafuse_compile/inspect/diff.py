"""Graph-diff inspection: what the adafuse passes found and changed in ONE compiled step, and why.

The report is read from the pass manager's records (`adafuse_compile.backend.last_compilations`:
per pass its notes, node snapshots before/after and replaced nodes), so it shows exactly what the
passes did rather than a re-derivation.

    comp = capture_step(model, (tokens, input_pos))        # compile (backend "adafuse") + one step
    report = diff_report(comp)                             # a plain, JSON-serialisable dict
    print(render_text(report)); render_json(report); html.render_html(report)

JSON schema ("schema": "adafuse.diff/1"); every key is always present, null where unknown:

    schema        "adafuse.diff/1"
    model         str | null          what was compiled (the CLI's --module, or "demo")
    options       dict                the torch.compile options used
    graphs        int                 graphs Dynamo compiled for the step (1 = no graph break)
    rewritten     bool                True when the step runs ONE switching call and no adapter branch
    stop_reason   str | null          why the passes left the graph unchanged (null when rewritten)
    notes         [str]               every pass note, in order
    passes        [{name, seconds, nodes_before, nodes_after, notes: [str],
                    removed: int, added: int, replaced: int}]
    regions       [{layer: int | null, module, experts, rank, top_k, gate_source: [str],
                    tokens_per_step}]
    gate_source   {nodes: [str], module: str | null, target: str | null, shared: bool}
                  shared: every region derives its gate from the same top-k node(s)
    hoisted       [{name, op, target, module}]   the routing prologue, in its new order
    changes       [{change: "removed" | "added" | "replaced", pass, name, op, target, module,
                    region: str | null, replaced_by: str | null}]
                  one entry per node; a replaced node was removed and its uses now read
                  `replaced_by`; `region` is the adapted module whose branch the node belonged to
    launches      {estimated: {before, after, rule, before_by_target: {target: n},
                               after_by_target: {target: n}},
                   measured: null | {device, eager_kernels, compiled_kernels,
                                     eager_launch_calls, compiled_launch_calls, method}}
    graph         {before: LayerGraph, after: LayerGraph}
                  LayerGraph = {nodes: [{id, label, kind, ops, modules: [str], members: [str]}],
                                edges: [[source id, target id, "data" | "weights"], ...]}
                  node kind: "block" | "routing" | "removed" | "added"; ops = estimated launches,
                  members = the graph nodes in the group; see `layer_graph` for the grouping rule

Kernel-launch estimate (rule `ESTIMATE_RULE`): every node of the graph counts one launch, except
placeholders, get_attr, output, and the view-like / bookkeeping ops in `NO_LAUNCH` (getitem, view,
reshape, transpose, size, ...), which launch nothing on their own. A dtype cast counts one even where
it is a no-op, a call_module counts one; the switching op counts one (it is one fused SGMM launch on
GPU). The estimate compares graphs, it is not a profile. On a CUDA model `capture_step` also
measures: torch.profiler over one eager step and one compiled step (after a warm-up each), counting
GPU kernels (memcpy/memset excluded) and host launch calls (cudaLaunchKernel & co., a CUDA-graph
replay is one cudaGraphLaunch).
"""
from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch

SCHEMA = "adafuse.diff/1"

NO_LAUNCH = frozenset({
    "getitem", "view", "view_as", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "t",
    "permute", "expand", "expand_as", "flatten", "unflatten", "narrow", "select", "split", "chunk", "unbind",
    "size", "dim", "stride", "detach", "alias", "as_strided", "type_as_view",
})
SKIPPED_OPS = frozenset({"placeholder", "get_attr", "output"})
ESTIMATE_RULE = (
    "one launch per graph node, except placeholder/get_attr/output nodes and view-like ops ("
    + ", ".join(sorted(NO_LAUNCH)) + "); casts and call_module count one, the switching op counts one"
)
_LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
_SWITCH_TARGET = "sgmm_switch"


@dataclass
class Compilation:
    """One captured step: the pass record of its rewritten (or last) graph, and what surrounds it."""

    record: dict  # an entry of backend.last_compilations
    graphs: int = 1  # graphs compiled for the step
    options: dict = field(default_factory=dict)
    model: str | None = None
    measured: dict | None = None  # GPU launch counts, see `measure_launches`


# --------------------------------------------------------------------------------------- capture

def capture_step(model, example_args, options: dict | None = None, *, name: str | None = None,
                 measure: bool | None = None) -> Compilation:
    """Compile `model` with backend "adafuse" (codegen "eager" unless `options` says otherwise), run one
    step on `example_args`, and return the record of the graph the passes rewrote (else the last one).

    On a CUDA model (or with measure=True) the eager and compiled steps are profiled for kernel counts.
    The model's adapted weights are restored afterwards, so the eager model is unchanged.
    """
    from .. import backend

    options = {"codegen": "eager", **(options or {})}
    args = tuple(example_args)
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    measure = on_cuda if measure is None else measure
    torch._dynamo.reset()
    first = len(backend.last_compilations)
    # The backend callable itself (same as backend="adafuse"), so an uninstalled checkout works too.
    compiled = torch.compile(model, backend=backend.adafuse_backend, options=options)
    try:
        with torch.no_grad():
            eager = _profile_step(model, args) if measure else None
            compiled(*args)
            compiled_counts = _profile_step(compiled, args) if measure else None
    finally:
        _restore_weights(model)
    records = backend.last_compilations[first:]
    if not records:
        raise RuntimeError("the adafuse backend compiled no graph for this step (did Dynamo skip the model?)")
    # the step's graph whose adapter branches some path rewrote (merge, factor or gather), else the last
    chosen = next((r for r in reversed(records) if r.get("path")), records[-1])
    measured = None
    if measure:
        measured = {"device": torch.cuda.get_device_name() if on_cuda else "cpu",
                    "eager_kernels": eager[0], "compiled_kernels": compiled_counts[0],
                    "eager_launch_calls": eager[1], "compiled_launch_calls": compiled_counts[1],
                    "method": "torch.profiler, one step after a warm-up; kernels = GPU kernel events "
                              "(memcpy/memset excluded), launch calls = " + "/".join(_LAUNCH_APIS)}
    return Compilation(chosen, len(records), options, name, measured)


def _profile_step(fn, args) -> tuple[int, int]:
    """(GPU kernels, host launch calls) of one call of `fn`, after a warm-up call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=activities) as prof:
            fn(*args)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset")))
    launches = sum(1 for e in events if e.name in _LAUNCH_APIS)
    return kernels, launches


def _restore_weights(model) -> None:
    """Put merged backbone weights back (the backend's SwitchState knows how), as the backend does."""
    if not isinstance(model, torch.nn.Module):
        return
    seen = []
    for p in model.parameters():
        tag = getattr(p, "_adafuse_tag", None)
        state = getattr(getattr(tag, "channel", None), "switch_state", None)
        if state is not None and all(state is not s for s in seen):
            seen.append(state)
            state.restore()


# ---------------------------------------------------------------------------------------- report

def _get(rec, key: str, default=None):
    return rec.get(key, default) if isinstance(rec, dict) else getattr(rec, key, default)


def is_launch(node: dict) -> bool:
    """The estimate's rule for one snapshot node (see the module docstring)."""
    return node["op"] not in SKIPPED_OPS and node["target"] not in NO_LAUNCH


def estimate_launches(snapshot: list[dict]) -> tuple[int, dict[str, int]]:
    counts = Counter(n["target"] for n in snapshot if is_launch(n))
    return sum(counts.values()), dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(module: str) -> int | None:
    """'layers.3.self_attn.q_proj' -> 3 (the first numeric path component)."""
    m = _LAYER.search(module or "")
    return int(m.group(1)) if m else None


def _key(node: dict) -> tuple[str, str]:
    return node["name"], node["target"]


def _pass_changes(rec) -> tuple[list[dict], list[dict], dict[str, str]]:
    before, after = _get(rec, "graph_before") or [], _get(rec, "graph_after") or []
    kb, ka = {_key(n) for n in before}, {_key(n) for n in after}
    removed = [n for n in before if _key(n) not in ka]
    added = [n for n in after if _key(n) not in kb]
    return removed, added, dict(_get(rec, "replaced") or {})


def _hoisted(compilation_record: dict, records: list) -> list[str]:
    """Names of the routing prologue. Taken from the record when it carries them; otherwise read off
    hoist_routing's snapshots: the shortest prefix of its output (after the placeholders) whose removal
    leaves both graphs in the same order is what it moved to the front."""
    explicit = compilation_record.get("hoisted")
    for rec in records:
        explicit = explicit or _get(rec, "hoisted")
    if explicit:
        return list(explicit)
    rec = next((r for r in records if _get(r, "name") == "hoist_routing"), None)
    if rec is None or not _get(rec, "graph_after"):
        return []
    graph_before, graph_after = _get(rec, "graph_before") or [], _get(rec, "graph_after")
    common = {n["name"] for n in graph_before} & {n["name"] for n in graph_after}
    before = [n["name"] for n in graph_before if n["op"] != "placeholder" and n["name"] in common]
    after = [n["name"] for n in graph_after if n["op"] != "placeholder" and n["name"] in common]
    for k in range(len(after) + 1):
        moved = set(after[:k])
        if [n for n in before if n not in moved] == after[k:]:
            return after[:k]
    return []


def diff_report(record) -> dict:
    """The report (see the module docstring for its schema) of a `Compilation` or a raw record dict."""
    comp = record if isinstance(record, Compilation) else Compilation(record)
    rec = comp.record
    records = list(rec.get("records", []))
    first_graph = (_get(records[0], "graph_before") if records else None) or []
    last_graph = (_get(records[-1], "graph_after") if records else None) or []
    by_name = {n["name"]: n for r in records for n in (_get(r, "graph_before") or []) + (_get(r, "graph_after") or [])}

    regions = []
    for r in rec.get("regions", []):
        regions.append({"layer": layer_of(r.get("module", "")), "module": r.get("module"),
                        "experts": r.get("experts"), "rank": r.get("rank"), "top_k": r.get("top_k"),
                        "gate_source": list(r.get("gate_source") or []),
                        "tokens_per_step": r.get("tokens_per_step")})
    region_modules = sorted({r["module"] for r in regions if r["module"]}, key=len, reverse=True)

    def region_of(module: str) -> str | None:
        return next((m for m in region_modules if module == m or module.startswith(m + ".")), None)

    sources = sorted({s for r in regions for s in r["gate_source"]})
    src = by_name.get(sources[0]) if sources else None
    gate_source = {"nodes": sources, "module": src["module"] if src else None,
                   "target": src["target"] if src else None,
                   "shared": bool(regions) and len({tuple(r["gate_source"]) for r in regions}) == 1}

    passes, changes = [], []
    for r in records:
        removed, added, replaced = _pass_changes(r)
        name = _get(r, "name")
        passes.append({"name": name, "seconds": _get(r, "seconds"), "nodes_before": _get(r, "nodes_before"),
                       "nodes_after": _get(r, "nodes_after"), "notes": list(_get(r, "notes") or []),
                       "removed": sum(1 for n in removed if n["name"] not in replaced), "added": len(added),
                       "replaced": sum(1 for n in removed if n["name"] in replaced)})
        for n in removed:
            changes.append(_change("replaced" if n["name"] in replaced else "removed", name, n,
                                   region_of(n["module"]), replaced.get(n["name"])))
        for n in added:
            changes.append(_change("added", name, n, None, None))

    hoisted_names = _hoisted(rec, records)
    hoist_after = next((_get(r, "graph_after") for r in records if _get(r, "name") == "hoist_routing"), None) or []
    hoist_nodes = {n["name"]: n for n in hoist_after}
    hoisted = [{k: (hoist_nodes.get(h) or by_name.get(h) or {}).get(k) for k in ("name", "op", "target", "module")}
               for h in hoisted_names]

    before_n, before_by = estimate_launches(first_graph)
    after_n, after_by = estimate_launches(last_graph)
    notes = list(rec.get("notes", []))
    path = rec.get("path")
    stop_reason = None if path else (rec.get("failed") or _stop_note(notes) or "no pass ran")
    return {
        "schema": SCHEMA, "model": comp.model, "options": dict(comp.options), "graphs": comp.graphs,
        "rewritten": bool(path), "path": path, "stop_reason": stop_reason,
        "fallbacks": [n for n in notes if any(m in n for m in _FALLBACK_MARKS)], "notes": notes,
        "passes": passes, "regions": regions, "gate_source": gate_source, "hoisted": hoisted,
        "changes": changes,
        "launches": {"estimated": {"before": before_n, "after": after_n, "rule": ESTIMATE_RULE,
                                   "before_by_target": before_by, "after_by_target": after_by},
                     "measured": comp.measured},
        "graph": {"before": layer_graph(first_graph, changes, set(hoisted_names), region_modules, after=False),
                  "after": layer_graph(last_graph, changes, set(hoisted_names), region_modules, after=True)},
    }


def _change(kind: str, pass_name: str, node: dict, region: str | None, replaced_by: str | None) -> dict:
    return {"change": kind, "pass": pass_name, "name": node["name"], "op": node["op"], "target": node["target"],
            "module": node["module"], "region": region, "replaced_by": replaced_by}


# ------------------------------------------------------------------------------ layer-level graph

_BLOCK_ALIASES = {"self_attn": "attn", "attention": "attn", "self_attention": "attn", "feed_forward": "mlp",
                  "ffn": "mlp", "block_sparse_moe": "moe"}


def _raw_group(module: str) -> tuple[str, str] | None:
    """(scope, block) of a module path: 'layers.0.self_attn.q_proj' -> ('layers.0', 'attn');
    'layers.0' -> ('layers.0', ''); 'lm_head' -> ('', 'lm_head'); '' -> None."""
    if not module:
        return None
    parts = module.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        return "", parts[0]
    scope = ".".join(parts[: idx + 1])
    block = parts[idx + 1] if idx + 1 < len(parts) else ""
    return scope, _BLOCK_ALIASES.get(block, block)


def layer_graph(snapshot: list[dict], changes: list[dict], hoisted: set[str], region_modules: list[str],
                *, after: bool) -> dict:
    """Collapse a node snapshot to layer/module groups ("embed_tokens", "layers.0.attn", "layers.0.mlp",
    "routing prologue", "SGMM switch", "lm_head", ...) with the edges between them.

    Grouping: a node goes to its module's block within its layer. Norms join the block they feed and
    layer-level nodes (residual adds) the block before them; other nodes with no module join their
    first consumer, unless they read only graph inputs (input plumbing such as rope-table lookups,
    used by every layer), which are not drawn. Before the rewrite, nodes the rewrite removed form one
    "adapters" group per layer and the router nodes inside an adapted module a "router" group; after
    it, the hoisted nodes form the "routing prologue" and the nodes the passes added (besides graph
    inputs) their own group ("SGMM switch").
    Edges: "data" where a group reads a value another computes; "weights" from an added group that
    takes graph inputs (the switching call writes the backbone weights) to the groups reading them.
    """
    removed = {c["name"] for c in changes if c["change"] in ("removed", "replaced") and not after}
    added = {c["name"]: c["pass"] for c in changes if c["change"] == "added" and after}
    inputs = {n["name"] for n in snapshot if n["op"] in SKIPPED_OPS}
    plumbing = set()
    for n in snapshot:  # module-less nodes that read only graph inputs (or other such nodes)
        if n["op"] not in SKIPPED_OPS and not n["module"] and n["name"] not in added \
                and all(i in inputs or i in plumbing for i in n["inputs"]):
            plumbing.add(n["name"])
    nodes = [n for n in snapshot if n["op"] not in SKIPPED_OPS and n["name"] not in plumbing]
    group: dict[str, tuple[str, str]] = {}  # node name -> (group id, kind)
    pending = []  # (index, name, how) resolved after the first sweep
    for i, n in enumerate(nodes):
        name, module = n["name"], n["module"]
        if name in removed:
            layer = layer_of(module)
            group[name] = (f"layers.{layer}.adapters" if layer is not None else "adapters", "removed")
        elif name in added:
            group[name] = (f"added:{added[name]}", "added")
        elif after and name in hoisted:
            group[name] = ("routing prologue", "routing")
        elif not after and name in hoisted and any(module.startswith(m + ".") for m in region_modules):
            group[name] = (module, "routing")
        else:
            raw = _raw_group(module)
            if raw is None:
                pending.append((i, name, "consumer"))
            elif "norm" in raw[1]:
                pending.append((i, name, "next"))
            elif raw[1] == "":
                pending.append((i, name, "previous"))
            else:
                group[name] = (f"{raw[0]}.{raw[1]}" if raw[0] else raw[1], "block")

    order = [n["name"] for n in nodes]
    pos = {name: i for i, name in enumerate(order)}
    scope = {n["name"]: (_raw_group(n["module"]) or ("", ""))[0] for n in nodes}
    users: dict[str, list[str]] = {}
    for n in snapshot:
        for inp in n["inputs"]:
            users.setdefault(inp, []).append(n["name"])

    def block_near(i: int, step: int, same_scope: str) -> tuple[str, str] | None:
        j = i + step
        while 0 <= j < len(order):
            g = group.get(order[j])
            if g and g[1] == "block" and scope[order[j]] == same_scope:
                return g
            j += step
        return None

    for i, name, how in pending:  # norms and layer-level nodes
        fallback = (scope[name] or "model", "block")
        if how == "next":
            group[name] = block_near(i, 1, scope[name]) or block_near(i, -1, scope[name]) or fallback
        elif how == "previous":
            group[name] = block_near(i, -1, scope[name]) or block_near(i, 1, scope[name]) or fallback
    for i, name, how in reversed(pending):  # other nodes with no module: their first consumer's group
        if how == "consumer":
            grouped = sorted((u for u in users.get(name, []) if u in group), key=pos.get)
            group[name] = group[grouped[0]] if grouped else ("model", "block")

    g = nx.DiGraph()
    for n in nodes:
        gid, kind = group[n["name"]]
        if gid not in g:
            g.add_node(gid, kind=kind, first=pos[n["name"]], ops=0, modules=[], members=[])
        data = g.nodes[gid]
        data["ops"] += is_launch(n)
        data["members"].append(n["name"])
        if n["module"] and n["module"] not in data["modules"]:
            data["modules"].append(n["module"])
        for inp in n["inputs"]:
            src = group.get(inp)
            if src and src[0] != gid:
                g.add_edge(src[0], gid, kind="data")
    for n in nodes:
        gid, kind = group[n["name"]]
        if kind != "added":
            continue
        for inp in n["inputs"]:
            if inp not in inputs:
                continue
            for reader in users.get(inp, []):
                dst = group.get(reader)
                if dst and dst[0] != gid and not g.has_edge(gid, dst[0]):
                    g.add_edge(gid, dst[0], kind="weights")
    out_nodes = []
    for gid, data in sorted(g.nodes(data=True), key=lambda kv: kv[1]["first"]):
        out_nodes.append({"id": gid, "label": _label(gid, data), "kind": data["kind"], "ops": data["ops"],
                          "modules": data["modules"], "members": data["members"]})
    index = {n["id"]: i for i, n in enumerate(out_nodes)}
    edges = sorted(([a, b, k] for a, b, k in g.edges(data="kind")), key=lambda e: (index[e[0]], index[e[1]]))
    return {"nodes": out_nodes, "edges": edges}


def _label(gid: str, data: dict) -> str:
    if gid.startswith("added:"):
        return "SGMM switch" if any(_SWITCH_TARGET in m for m in data["members"]) else f"added by {gid[6:]}"
    if data["kind"] == "routing" and gid != "routing prologue":
        layer = layer_of(gid)
        return "router" + (f" (layers.{layer})" if layer is not None else "")
    if gid.endswith(".adapters"):
        subs = sorted({m.split(".")[-1] for m in data["modules"]})
        return f"{gid[:-9]} adapters: {', '.join(subs)}"
    return gid


# ----------------------------------------------------------------------------------------- render

def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


# Notes of a path the step did not take although asked or preferred (a kernel plan that could not be
# built, a policy's second choice): shown next to the path that was taken.
_FALLBACK_MARKS = ("cannot be planned", "left to the other paths", "not rewritten:", "not fused:",
                   "the expand stays apart")
_PATH_WORDS = {"merge": "one switching call, no adapter branch", "factor": "expert factors in fixed slots, W untouched",
               "gather": "per-token experts through fused gather calls, unmerged"}


def _stop_note(notes: list[str]) -> str | None:
    """Why nothing was rewritten: the last note that is not a pass's success report."""
    return next((n for n in reversed(notes) if not n.startswith(("detect_adapters:", "prove_pregating:",
                                                                  "hoist_routing:"))), notes[-1] if notes else None)


def status_line(report: dict) -> str:
    """'rewritten: <path> path (...)' or 'NOT rewritten: <reason>', with any fallback's reason."""
    if not report.get("rewritten"):
        return f"NOT rewritten: {report['stop_reason']}"
    path = report["path"]
    return f"rewritten: {path} path ({_PATH_WORDS.get(path, path)})" + "".join(f"; {f}" for f in report["fallbacks"])


def _node_list(changes: list[dict], limit: int | None = None) -> str:
    items = [c["name"] if c["op"] == "placeholder" else f"{c['name']}({c['target']})" for c in changes]
    if limit is not None and len(items) > limit:
        items = items[:limit] + [f"... {len(items) - limit} more"]
    return ", ".join(items)


def render_text(report: dict, width: int = 110) -> str:
    """A readable summary (rich tables, exported to plain text)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    status = status_line(report)
    console.print(f"adafuse diff: {report['model'] or 'model'}: {report['graphs']} graph(s), {status}")
    console.print(f"options: {json.dumps(report['options'])}")

    t = Table(title="Passes", title_justify="left")
    for col in ("pass", "ms", "nodes", "removed", "replaced", "added", "notes"):
        t.add_column(col, overflow="fold")
    for p in report["passes"]:
        t.add_row(p["name"], f"{p['seconds'] * 1000:.1f}", f"{p['nodes_before']} -> {p['nodes_after']}",
                  str(p["removed"]), str(p["replaced"]), str(p["added"]), "\n".join(p["notes"]))
    console.print(t)

    t = Table(title=f"Regions ({len(report['regions'])})", title_justify="left")
    for col in ("layer", "module", "experts", "rank", "top-k", "gate source", "tokens/step"):
        t.add_column(col)
    for r in report["regions"]:
        t.add_row(*("-" if v is None else str(v) for v in (
            r["layer"], r["module"], r["experts"], r["rank"], r["top_k"], ", ".join(r["gate_source"]),
            r["tokens_per_step"])))
    console.print(t)

    gs = report["gate_source"]
    if gs["nodes"]:
        console.print(f"gate source: {', '.join(gs['nodes'])} ({gs['target']}) in {gs['module'] or '?'}; "
                      f"{'shared by every region' if gs['shared'] else 'NOT shared by every region'}")
    if report["hoisted"]:
        console.print(f"hoisted ({len(report['hoisted'])} nodes, now the routing prologue): "
                      + ", ".join(f"{h['name']}({h['target']})" for h in report["hoisted"]))

    t = Table(title="Changes", title_justify="left")
    for col in ("pass", "change", "region / module", "nodes"):
        t.add_column(col, overflow="fold")
    groups: dict[tuple, list[dict]] = {}
    for c in report["changes"]:
        where = "(new graph inputs)" if c["op"] == "placeholder" else (c["region"] or c["module"] or "-")
        groups.setdefault((c["pass"], c["change"], where), []).append(c)
    for (pass_name, change, where), cs in groups.items():
        if change == "replaced":
            nodes = ", ".join(f"{c['name']}({c['target']}) -> {c['replaced_by']}" for c in cs)
        else:
            nodes = _node_list(cs)
        t.add_row(pass_name, f"{change} {len(cs)}", where, nodes)
    console.print(t)

    est = report["launches"]["estimated"]
    console.print(f"kernel launches, estimated from the graph: {est['before']} -> {est['after']} "
                  f"(rule: {est['rule']})")
    m = report["launches"]["measured"]
    if m:
        console.print(f"kernel launches, measured on {m['device']}: eager {m['eager_kernels']} kernels "
                      f"({m['eager_launch_calls']} launch calls) -> compiled {m['compiled_kernels']} kernels "
                      f"({m['compiled_launch_calls']} launch calls)")
    else:
        console.print("kernel launches, measured: not measured (needs a CUDA model)")
    before, after = report["graph"]["before"], report["graph"]["after"]
    console.print(f"layer graph: {len(before['nodes'])} groups before, {len(after['nodes'])} after "
                  f"(see --format html for the picture)")
    return console.export_text()
