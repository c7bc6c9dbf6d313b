"""`adafuse diff`: the report of one compiled decode step of the demo model, its renderings, the CLI."""
import argparse
import json
import re
import shutil
import subprocess

import pytest
import torch

from adafuse_compile.cli import DEMO_MODEL, build_demo_model
from adafuse_compile.inspect import capture_step, diff_report, render_html, render_json, render_text
from adafuse_compile.inspect.cli_diff import add_diff_parser
from adafuse_compile.inspect.diff import NO_LAUNCH, SCHEMA, status_line
from adafuse_compile.modeling import TinyLlama

LAYERS = DEMO_MODEL.num_hidden_layers
ADAPTED = {f"layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")}
SCHEMA_KEYS = {"schema", "model", "options", "graphs", "rewritten", "path", "stop_reason", "fallbacks", "notes", "passes", "regions",
               "gate_source", "hoisted", "changes", "launches", "graph"}
CHROMIUM = shutil.which("chromium")


def decode_args():
    return torch.tensor([[3]]), torch.tensor([0])


@pytest.fixture(scope="module")
def captured():
    model = build_demo_model()
    model.setup_cache(1)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    comp = capture_step(model, decode_args(), name="demo")
    return model, original, comp, diff_report(comp)


@pytest.fixture(scope="module")
def report(captured):
    return captured[3]


def final_graph(comp):
    return comp.record["records"][-1].graph_after


def test_capture_returns_the_rewritten_graph_and_leaves_the_model_unmerged(captured):
    model, original, comp, report = captured
    assert comp.record["rewritten"] and report["rewritten"] and report["stop_reason"] is None
    assert comp.options == {"codegen": "eager"} and comp.graphs == 1
    targets = [str(n.target) for n in comp.record["graph"].graph.nodes]
    assert sum("sgmm_switch" in t for t in targets) == 1
    # The compiled step merged this token's experts; capture_step must put the backbone back.
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, original[name], rtol=0, atol=0, msg=name)


def test_regions_with_layer_experts_rank_top_k(report):
    regions = report["regions"]
    assert len(regions) == 2 * LAYERS
    assert {r["module"] for r in regions} == ADAPTED
    for r in regions:
        assert (r["experts"], r["rank"], r["top_k"], r["tokens_per_step"]) == (8, 16, 2, 1)
        assert r["layer"] == int(r["module"].split(".")[1])
        assert r["gate_source"] == ["topk"]


def test_gate_source_is_the_shared_router_top_k(report):
    gs = report["gate_source"]
    assert gs == {"nodes": ["topk"], "module": "layers.0.self_attn.q_proj.router", "target": "topk", "shared": True}


def test_hoisted_routing_runs_before_every_adapted_linear(captured, report):
    comp = captured[2]
    hoisted = [h["name"] for h in report["hoisted"]]
    targets = {h["target"] for h in report["hoisted"]}
    assert {"embedding", "rms_norm", "linear", "topk", "softmax"} <= targets
    assert any("13 routing node(s)" in n for n in report["notes"]) and len(hoisted) == 13
    graph = final_graph(comp)
    order = [n["name"] for n in graph]
    adapted_linears = [i for i, n in enumerate(graph) if n["target"] == "linear" and n["module"] in ADAPTED]
    assert len(adapted_linears) == len(ADAPTED)
    assert max(order.index(h) for h in hoisted) < min(adapted_linears)
    # ...and they form the prologue: right after the graph inputs, in this order.
    first = next(i for i, n in enumerate(graph) if n["op"] != "placeholder")
    assert order[first:first + len(hoisted)] == hoisted


def test_removed_replaced_and_added_nodes_with_provenance(captured, report):
    comp = captured[2]
    changes = report["changes"]
    assert {c["pass"] for c in changes} == {"rewrite_switch"}  # detect/prove/hoist change no node
    removed = [c for c in changes if c["change"] == "removed"]
    replaced = [c for c in changes if c["change"] == "replaced"]
    added = [c for c in changes if c["change"] == "added"]
    final = {n["name"]: n for n in final_graph(comp)}
    # Every adapter branch is gone, and each region lost its own branch (gathers, einsums, gate scaling).
    assert removed and all(c["name"] not in final for c in removed + replaced)
    for module in ADAPTED:
        branch = [c["target"] for c in removed if c["region"] == module]
        assert branch.count("einsum") == 2 and "mul" in branch, module
    # Each region's `linear + delta` is replaced by the plain linear, which survives.
    assert len(replaced) == len(ADAPTED) and {c["region"] for c in replaced} == ADAPTED
    for c in replaced:
        assert c["target"] == "add" and final[c["replaced_by"]]["target"] == "linear"
        assert final[c["replaced_by"]]["module"] == c["region"]
    # Exactly one switching call is added, plus its inputs (previous experts/gates, merged buffers).
    switch = [c for c in added if c["target"] == "sgmm_switch.default"]
    assert len(switch) == 1 and switch[0]["name"] in final
    assert {"adafuse_prev_experts", "adafuse_prev_gates"} <= {c["name"] for c in added if c["op"] == "placeholder"}
    by_pass = {p["name"]: p for p in report["passes"]}
    assert list(by_pass) == ["detect_adapters", "prove_pregating", "hoist_routing", "rewrite_switch", "rewrite_factor",
                             "rewrite_gather"]
    for later in ("rewrite_factor", "rewrite_gather"):  # a merged step: they change nothing
        assert by_pass[later]["nodes_before"] == by_pass[later]["nodes_after"]
    assert (by_pass["rewrite_switch"]["removed"], by_pass["rewrite_switch"]["replaced"],
            by_pass["rewrite_switch"]["added"]) == (len(removed), len(replaced), len(added))


def test_estimated_launches_drop_by_the_branch_ops_minus_the_switch(report):
    est = report["launches"]["estimated"]
    assert est["after"] < est["before"]

    def launches(cs):
        return sum(1 for c in cs if c["op"] not in ("placeholder", "get_attr", "output") and c["target"] not in NO_LAUNCH)
    gone = launches(c for c in report["changes"] if c["change"] != "added")
    new = launches(c for c in report["changes"] if c["change"] == "added")
    assert est["before"] - est["after"] == gone - new
    assert est["after_by_target"]["sgmm_switch.default"] == 1 and "einsum" not in est["after_by_target"]
    assert est["before_by_target"]["einsum"] == 2 * len(ADAPTED)
    assert "getitem" in est["rule"] and report["launches"]["measured"] is None  # CPU: nothing measured


def test_layer_graph_before_and_after(report):
    before, after = report["graph"]["before"], report["graph"]["after"]
    kinds_before = {n["id"]: n["kind"] for n in before["nodes"]}
    kinds_after = {n["id"]: n["kind"] for n in after["nodes"]}
    assert [i for i, k in kinds_before.items() if k == "removed"] == [f"layers.{i}.adapters" for i in range(LAYERS)]
    assert "removed" not in kinds_after.values()
    assert [n["label"] for n in after["nodes"] if n["kind"] == "added"] == ["SGMM switch"]
    assert after["nodes"][0]["id"] == "routing prologue"
    blocks = [f"layers.{i}.{b}" for i in range(LAYERS) for b in ("attn", "mlp")]
    assert [i for i, k in kinds_after.items() if k == "block"] == blocks + ["lm_head"]
    switch = next(n["id"] for n in after["nodes"] if n["kind"] == "added")
    writes = {dst for src, dst, kind in after["edges"] if kind == "weights" and src == switch}
    assert writes == {f"layers.{i}.attn" for i in range(LAYERS)}
    assert ["routing prologue", switch, "data"] in after["edges"]
    assert ["layers.3.mlp", "lm_head", "data"] in after["edges"]
    # Every graph node of the picture is in exactly one group.
    members = [m for n in after["nodes"] for m in n["members"]]
    assert len(members) == len(set(members))


def test_json_round_trips_with_the_documented_schema(report):
    loaded = json.loads(render_json(report))
    assert loaded == report
    assert set(loaded) == SCHEMA_KEYS and loaded["schema"] == SCHEMA
    assert set(loaded["regions"][0]) == {"layer", "module", "experts", "rank", "top_k", "gate_source",
                                         "tokens_per_step"}
    assert set(loaded["changes"][0]) == {"change", "pass", "name", "op", "target", "module", "region", "replaced_by"}
    assert set(loaded["launches"]) == {"estimated", "measured"}
    assert set(loaded["graph"]["after"]["nodes"][0]) == {"id", "label", "kind", "ops", "modules", "members"}


def test_text_shows_regions_gate_hoist_changes_and_launches(report):
    text = render_text(report)
    est = report["launches"]["estimated"]
    assert "Regions (8)" in text and "rewritten" in text
    for module in ADAPTED:
        assert module in text
    assert "gate source: topk (topk) in layers.0.self_attn.q_proj.router; shared by every region" in text
    assert "hoisted (13 nodes" in text and "softmax(softmax)" in text
    assert "sgmm_switch_default(sgmm_switch.default)" in text and "add(add) -> y" in text
    assert f"estimated from the graph: {est['before']} -> {est['after']}" in text


def test_html_is_self_contained(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<link|<script[^>]+src=|@import|url\(http", page)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"] * 2  # SVG namespace only
    assert page.count('<svg class="layer-graph"') == 2 and 'id="regions"' in page


def run_chromium(path, tmp_path):
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get update && apt-get install -y chromium)")
def test_html_renders_in_headless_chromium_without_script_errors(report, tmp_path):
    page = tmp_path / "diff.html"
    page.write_text(render_html(report), encoding="utf-8")
    dom = run_chromium(page, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-rendered="ok"' in body and "data-errors" not in body, body
    table = re.search(r'<table id="regions".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    assert table.count("<tr>") == 8 and "layers.3.self_attn.v_proj" in table
    assert len(re.findall(r'<svg class="layer-graph"', dom)) == 2
    assert "SGMM switch" in dom and "layers.0 adapters: q_proj, v_proj" in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get update && apt-get install -y chromium)")
def test_the_page_check_reports_a_broken_page(report, tmp_path):
    # The in-page check must fail loudly, else the test above proves nothing.
    page = tmp_path / "broken.html"
    page.write_text(render_html(report).replace('id="graph-after"', 'id="graph-after-broken" class="x"', 1)
                    .replace('<svg class="layer-graph" id="graph-after-broken" class="x"', '<svg id="gone"'),
                    encoding="utf-8")
    body = re.search(r"<body[^>]*>", run_chromium(page, tmp_path)).group(0)
    assert 'data-rendered="failed"' in body and "expected 2 pictures, found 1" in body, body


def diff_parser():
    parser = argparse.ArgumentParser(prog="adafuse")
    add_diff_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_demo_model_to_json_file(tmp_path):
    out = tmp_path / "diff.json"
    args = diff_parser().parse_args(["diff", "--out", str(out), "--options", '{"exact": false}'])
    assert args.format is None and args.module is None and args.options == {"exact": False}
    assert args.func(args) == 0
    loaded = json.loads(out.read_text())
    assert loaded["model"] == "demo" and loaded["rewritten"] and len(loaded["regions"]) == 8
    assert loaded["options"] == {"codegen": "eager", "exact": False}
    assert "in place" in loaded["notes"][-1]


def test_cli_rejects_bad_options_and_modules(capsys):
    with pytest.raises(SystemExit):
        diff_parser().parse_args(["diff", "--options", "{not json"])
    with pytest.raises(SystemExit):
        diff_parser().parse_args(["diff", "--format", "pdf"])
    args = diff_parser().parse_args(["diff", "--module", "no_such_pkg_adafuse.models:build"])
    assert args.func(args) == 2
    args = diff_parser().parse_args(["diff", "--module", "adafuse_compile.cli"])
    assert args.func(args) == 2
    assert "pkg.mod:function" in capsys.readouterr().err


USER_MODULE = '''
import torch
from adafuse_compile.cli import DEMO_MODEL, build_demo_model
from adafuse_compile.modeling import TinyLlama

def with_args():
    model = build_demo_model(seed=1)
    model.setup_cache(1)
    return model, (torch.tensor([[7]]), torch.tensor([0]))

def plain():
    return TinyLlama(DEMO_MODEL).init_weights(seed=0)

def hf_llama():
    import adafuse_compile as af
    from adafuse_compile.presets import tiny_hf_model
    model = tiny_hf_model("llama")
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    return model.eval()
'''


def test_cli_user_module_returning_model_and_args(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_models_for_diff.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = diff_parser().parse_args(["diff", "--module", "user_models_for_diff:with_args", "--format", "text"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "adafuse diff: user_models_for_diff:with_args" in text and "Regions (8)" in text


def test_cli_user_model_without_adapters_is_reported_unchanged(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_diff.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "plain.html"
    args = diff_parser().parse_args(["diff", "--module", "user_models_for_diff:plain", "--out", str(out)])
    assert args.func(args) == 0
    page = out.read_text()
    assert "not rewritten" in page and 'data-count="0"' in page
    report = diff_report(capture_step(TinyLlama(DEMO_MODEL).init_weights(seed=0).eval(), decode_args()))
    assert not report["rewritten"] and "no LoRA-MoE" in report["stop_reason"]
    assert report["regions"] == [] and report["changes"] == [] and report["hoisted"] == []
    est = report["launches"]["estimated"]
    assert est["before"] == est["after"] > 0
    assert report["graph"]["before"] == report["graph"]["after"]


@pytest.mark.gpu
def test_launches_measured_with_the_profiler_on_gpu():
    model = build_demo_model().cuda()
    model.setup_cache(1)
    report = diff_report(capture_step(model, tuple(t.cuda() for t in decode_args())))
    measured = report["launches"]["measured"]
    assert report["rewritten"] and measured is not None and measured["device"] != "cpu"
    assert 0 < measured["compiled_kernels"] < measured["eager_kernels"]
    assert 0 < measured["compiled_launch_calls"] < measured["eager_launch_calls"]
    assert "measured on" in render_text(report)


def test_cli_hugging_face_model_gets_input_ids_alone(tmp_path, monkeypatch, capsys):
    """A Hugging Face model from --module: its second positional argument is the attention mask, so
    the one-token step passes input_ids alone (before: input_pos landed in attention_mask and Dynamo
    failed with a 400-line traceback). Its q,v adapters of both layers are found and merged."""
    (tmp_path / "user_models_for_diff.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = diff_parser().parse_args(["diff", "--module", "user_models_for_diff:hf_llama", "--format", "json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewritten"] and report["path"] == "merge" and len(report["regions"]) == 4


def test_a_fallback_path_is_reported_with_its_reason():
    """sgmm_impl="cutlass" on the CPU: the switch cannot be planned, auto takes gather. The report
    says which path rewrote the step and why merge was not taken (before: "NOT rewritten: " and the
    gather pass's success note)."""
    model = build_demo_model()
    model.setup_cache(1)
    report = diff_report(capture_step(model, decode_args(), options={"sgmm_impl": "cutlass"}))
    assert report["rewritten"] and report["path"] == "gather" and report["stop_reason"] is None
    assert any("cannot be planned" in f and "needs a CUDA device" in f for f in report["fallbacks"])
    line = status_line(report)
    assert line.startswith("rewritten: gather path") and "cannot be planned" in line
    assert render_text(report).splitlines()[0].startswith("adafuse diff: model: 1 graph(s), rewritten: gather path")
