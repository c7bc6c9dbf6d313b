"""A self-contained HTML page for an `adafuse diff` report: summary, region table, before/after
pictures at layer granularity (inline SVG drawn here), pass notes and every node change.

Nothing external: styles, the SVG and a small script are inline. The script checks that the region
table and both pictures rendered, and records the outcome on <body>: data-rendered="ok" (or
"failed") and data-errors="..." for any script error, so a headless browser's --dump-dom shows it.
"""
from __future__ import annotations

import json
from html import escape

from .diff import SCHEMA, status_line

ROW_H = 34  # px per row of the picture
BOX_H = 24
MAIN_X, MAIN_W = 66, 190  # main column: the backbone's blocks (left margin holds skip-edge arcs)
SIDE_X, SIDE_W = 290, 250  # side column: router, adapter branches, the switching call
ARC_STEP = 7  # px of arc bulge per row skipped (capped)
WIDTH = SIDE_X + SIDE_W + 50

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d2433; }
h1 { font-size: 20px; margin: 0 0 6px; } h2 { font-size: 16px; margin: 22px 0 8px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #cfd6e3; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px; }
.ok { color: #1e7b45; font-weight: 600; } .bad { color: #b42318; font-weight: 600; }
.pictures { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.picture h3 { font-size: 14px; margin: 4px 0; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border: 1px solid; border-radius: 4px; }
svg.layer-graph text { font: 11px ui-monospace, Menlo, Consolas, monospace; fill: #1d2433; }
svg.layer-graph text.ops { fill: #5b6475; font-size: 10px; }
svg.layer-graph path.edge { fill: none; stroke: #8a94a6; stroke-width: 1.2; }
svg.layer-graph path.edge.weights { stroke: #2e8b57; stroke-dasharray: 4 3; }
svg.layer-graph path.edge.hot { stroke: #d35400; stroke-width: 2.4; }
svg.layer-graph g.node rect { stroke-width: 1.3; rx: 4; }
svg.layer-graph g.node:hover rect { stroke-width: 2.6; }
details summary { cursor: pointer; }
"""

_KIND_STYLE = {  # fill, stroke
    "block": ("#e8eef7", "#4a6fa5"),
    "routing": ("#fff3d6", "#c98a00"),
    "removed": ("#fde2e2", "#c0392b"),
    "added": ("#dff5e1", "#2e8b57"),
}

_SCRIPT = """
(function () {
  var body = document.body, errors = [];
  function fail(msg) { errors.push(String(msg)); body.dataset.errors = errors.join("; "); body.dataset.rendered = "failed"; }
  window.addEventListener("error", function (e) { fail(e.message || e); });
  try {
    var table = document.getElementById("regions");
    if (!table) throw new Error("region table missing");
    var rows = table.tBodies[0].rows.length, expected = parseInt(table.dataset.count, 10);
    if (rows !== expected) throw new Error("region table has " + rows + " rows, expected " + expected);
    var svgs = document.querySelectorAll("svg.layer-graph");
    if (svgs.length !== 2) throw new Error("expected 2 pictures, found " + svgs.length);
    svgs.forEach(function (svg) {
      var nodes = svg.querySelectorAll("g.node");
      if (nodes.length === 0) throw new Error(svg.id + ": no nodes drawn");
      var box = svg.getBBox();
      if (!(box.width > 0 && box.height > 0)) throw new Error(svg.id + ": nothing rendered");
      nodes.forEach(function (g) {
        function hot(on) {
          svg.querySelectorAll("path.edge").forEach(function (p) {
            if (p.dataset.src === g.dataset.id || p.dataset.dst === g.dataset.id) p.classList.toggle("hot", on);
          });
        }
        g.addEventListener("mouseenter", function () { hot(true); });
        g.addEventListener("mouseleave", function () { hot(false); });
      });
    });
    if (errors.length === 0) body.dataset.rendered = "ok";
  } catch (e) { fail(e && e.message ? e.message : e); }
})();
"""


def _fit(text: str, width: int) -> str:
    chars = max(4, int(width / 6.7))
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def _layout(nodes: list[dict]) -> dict[str, tuple[int, int]]:
    """(row, column) per group: backbone blocks in column 0 in graph order; side groups (router,
    adapter branches, added nodes) in column 1, sharing a row with a block where one is free."""
    place, side_taken = {}, set()
    row, main_free = -1, False
    for n in nodes:
        side = n["kind"] in ("removed", "added") or (n["kind"] == "routing" and n["id"] != "routing prologue")
        if not side:
            if main_free:
                main_free = False
            else:
                row += 1
            place[n["id"]] = (row, 0)
        elif row >= 0 and row not in side_taken:
            place[n["id"]] = (row, 1)
            side_taken.add(row)
        else:
            row += 1
            place[n["id"]] = (row, 1)
            side_taken.add(row)
            main_free = True
    return place


def _box(col: int) -> tuple[int, int]:
    return (MAIN_X, MAIN_W) if col == 0 else (SIDE_X, SIDE_W)


def render_svg(graph: dict, svg_id: str) -> str:
    """One layer graph (`report["graph"]["before" | "after"]`) as an inline SVG."""
    place = _layout(graph["nodes"])
    rows = max((r for r, _ in place.values()), default=0) + 1
    height = rows * ROW_H + 20
    parts = [f'<svg class="layer-graph" id="{escape(svg_id)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">',
             '<defs>',
             f'<marker id="{svg_id}-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#8a94a6"/></marker>',
             f'<marker id="{svg_id}-arrow-w" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#2e8b57"/></marker>',
             '</defs>']

    def top(r: int) -> float:
        return 10 + r * ROW_H

    for src, dst, kind in graph["edges"]:
        (r1, c1), (r2, c2) = place[src], place[dst]
        x1, w1 = _box(c1)
        x2, w2 = _box(c2)
        if c1 == c2 and r2 == r1 + 1:  # neighbours in one column: straight down
            d = f"M{x1 + w1 / 2},{top(r1) + BOX_H} L{x2 + w2 / 2},{top(r2)}"
        elif c1 == c2:  # a skip within a column: an arc on its outer side
            bulge = min(60, 14 + ARC_STEP * abs(r2 - r1))
            if c1 == 0:
                xa, xb, xc = x1, x2, x1 - bulge
            else:
                xa, xb, xc = x1 + w1, x2 + w2, x1 + w1 + bulge
            ya, yb = top(r1) + BOX_H / 2, top(r2) + BOX_H / 2
            d = f"M{xa},{ya} C{xc},{ya} {xc},{yb} {xb},{yb}"
        else:  # across columns: from the facing sides
            xa = x1 + w1 if c1 < c2 else x1
            xb = x2 if c1 < c2 else x2 + w2
            ya, yb = top(r1) + BOX_H / 2, top(r2) + BOX_H / 2
            xm = (xa + xb) / 2
            d = f"M{xa},{ya} C{xm},{ya} {xm},{yb} {xb},{yb}"
        marker = f"{svg_id}-arrow-w" if kind == "weights" else f"{svg_id}-arrow"
        parts.append(f'<path class="edge {escape(kind)}" data-src="{escape(src)}" data-dst="{escape(dst)}" '
                     f'd="{d}" marker-end="url(#{marker})"/>')

    for n in graph["nodes"]:
        r, c = place[n["id"]]
        x, w = _box(c)
        fill, stroke = _KIND_STYLE.get(n["kind"], _KIND_STYLE["block"])
        dash = ' stroke-dasharray="5 3"' if n["kind"] == "removed" else ""
        tip = (f"{n['label']} [{n['kind']}]\n{n['ops']} estimated launch(es), {len(n['members'])} graph node(s)\n"
               f"modules: {', '.join(n['modules']) or '-'}")
        ops = f"{n['ops']} op" + ("s" if n["ops"] != 1 else "")
        parts.append(
            f'<g class="node" data-id="{escape(n["id"])}" data-kind="{escape(n["kind"])}">'
            f'<title>{escape(tip)}</title>'
            f'<rect x="{x}" y="{top(r)}" width="{w}" height="{BOX_H}" fill="{fill}" stroke="{stroke}"{dash}/>'
            f'<text x="{x + 6}" y="{top(r) + 16}">{escape(_fit(n["label"], w - 46))}</text>'
            f'<text class="ops" x="{x + w - 6}" y="{top(r) + 16}" text-anchor="end">{escape(ops)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list], table_id: str | None = None, numeric: set[int] = frozenset(),
           attrs: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{escape('-' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page."""
    if report.get("schema") != SCHEMA:
        raise ValueError(f"not an adafuse diff report (schema {report.get('schema')!r}, expected {SCHEMA!r})")
    status = (f'<span class="ok">{escape(status_line(report))}</span>' if report["rewritten"]
              else f'<span class="bad">not rewritten</span>: {escape(str(report["stop_reason"]))}')
    est, measured = report["launches"]["estimated"], report["launches"]["measured"]
    launch_rows = [["estimated from the graph", est["before"], est["after"]]]
    if measured:
        launch_rows.append([f"measured on {measured['device']}: GPU kernels", measured["eager_kernels"],
                            measured["compiled_kernels"]])
        launch_rows.append(["measured: host launch calls", measured["eager_launch_calls"],
                            measured["compiled_launch_calls"]])
    regions = report["regions"]
    region_rows = [[r["layer"], r["module"], r["experts"], r["rank"], r["top_k"], ", ".join(r["gate_source"]),
                    r["tokens_per_step"]] for r in regions]
    gs = report["gate_source"]
    gate = (f"<p>Gate source: <code>{escape(', '.join(gs['nodes']))}</code> ({escape(str(gs['target']))}) in "
            f"<code>{escape(str(gs['module']))}</code>, "
            f"{'shared by every region' if gs['shared'] else '<b>not</b> shared by every region'}.</p>"
            if gs["nodes"] else "<p>No gate source (no region found).</p>")
    hoisted = (f"<p>Hoisted into the routing prologue ({len(report['hoisted'])} nodes): "
               + ", ".join(f"<code>{escape(h['name'])}</code>&nbsp;({escape(str(h['target']))})"
                           for h in report["hoisted"]) + "</p>") if report["hoisted"] else ""
    pass_rows = [[p["name"], f"{p['seconds'] * 1000:.1f}", f"{p['nodes_before']} \u2192 {p['nodes_after']}",
                  p["removed"], p["replaced"], p["added"], " | ".join(p["notes"])] for p in report["passes"]]
    change_rows = [[c["pass"], c["change"], c["name"], c["target"], c["module"] or "-", c["region"],
                    c["replaced_by"]] for c in report["changes"]]
    legend = "".join(f'<span style="background:{f};border-color:{s}">{k}</span>' for k, (f, s) in _KIND_STYLE.items())
    before, after = report["graph"]["before"], report["graph"]["after"]
    title = f"adafuse diff: {report['model'] or 'model'}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{_STYLE}</style></head>
<body data-rendered="pending">
<h1>{escape(title)}</h1>
<p>{status}. {report['graphs']} graph(s) compiled for the step; options <code>{escape(json.dumps(report['options']))}</code>.</p>
<h2>Kernel launches per step</h2>
{_table(["count", "before", "after"], launch_rows, "launches", {1, 2})}
<p class="mono" style="max-width: 1100px">estimate rule: {escape(est['rule'])}</p>
{'' if measured else '<p>Measured counts need a CUDA model (torch.profiler).</p>'}
<h2>Regions ({len(regions)})</h2>
{_table(["layer", "module", "experts", "rank", "top-k", "gate source", "tokens/step"], region_rows, "regions",
        {0, 2, 3, 4, 6}, f' data-count="{len(regions)}"')}
{gate}
{hoisted}
<h2>Before and after, by layer</h2>
<p class="legend">{legend} solid arrows: data flow; dashed green: the switching call writes the weights the block reads.
Hover a box for its modules; hovering highlights its edges.</p>
<div class="pictures">
<div class="picture"><h3>before the passes ({len(before['nodes'])} groups, {est['before']} estimated launches)</h3>
{render_svg(before, "graph-before")}</div>
<div class="picture"><h3>after the passes ({len(after['nodes'])} groups, {est['after']} estimated launches)</h3>
{render_svg(after, "graph-after")}</div>
</div>
<h2>Passes</h2>
{_table(["pass", "ms", "nodes", "removed", "replaced", "added", "notes"], pass_rows, "passes", {1, 3, 4, 5})}
<h2>Node changes ({len(report['changes'])})</h2>
<details><summary>every node removed, replaced or added, with the pass that did it</summary>
{_table(["pass", "change", "node", "target", "module", "region", "replaced by"], change_rows, "changes")}
</details>
<script>{_SCRIPT}</script>
</body></html>
"""
