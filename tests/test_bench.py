"""`adafuse bench`: the tiny preset end to end on the CPU (schema, every method accounted for,
outputs written, adafuse tokens = pre-gated eager tokens), the time budgets and partial outputs,
plus the pieces it is built from."""
import argparse
import json
import time

import pytest
import torch

from adafuse_compile import bench, settings
from adafuse_compile.bench_cli import add_bench_parser

RESULT_KEYS = {"loop", "method", "label", "kind", "status", "reason", "traceback", "compile", "decode_ms_per_token",
               "first_decode_step_ms", "cudagraphs_recorded_while_timed", "generate_calls_with_deferred_stop_check",
               "prefill_ms", "warmup_s", "peak_memory_bytes", "tokens_sha1", "tokens", "reference_method",
               "tokens_match_reference", "tokens_first_difference", "adafuse_paths", "summary", "prompts_asked", "prompts_served",
               "truncated_by_budget", "measure_s", "start_s", "method_s"}
TOP_KEYS = {"schema", "env", "config", "prompt_lengths", "analytics", "results", "pending", "wall_s"}
SUMMARY_KEYS = {"decode_ms_median", "decode_ms_p90", "decode_ms_mean", "prefill_ms_median", "tokens_per_s",
                "x_backbone", "overhead_pct", "memory_overhead_pct", "param_overhead_pct", "flop_overhead_pct"}
ENV_KEYS = {"device", "gpu", "driver", "cuda", "torch", "transformers", "python", "platform", "adafuse_compile",
            "cpu_threads", "git_commit", "git_dirty", "source_digest", "available_paths", "date", "gpu_shared_with_lock"}


def parse(argv):
    parser = argparse.ArgumentParser(prog="adafuse")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    args = parse(["--preset", "tiny", "--out", str(out), "--no-progress"])
    t0 = time.perf_counter()
    rc = args.func(args)
    return rc, time.perf_counter() - t0, out


def test_tiny_preset_runs_under_two_minutes(tiny_run):
    rc, seconds, out = tiny_run
    assert rc == 0
    assert seconds < 120, f"adafuse bench --preset tiny took {seconds:.0f} s"
    assert out.exists()


def test_tiny_json_schema(tiny_run):
    _, _, out = tiny_run
    r = json.loads(out.read_text())
    assert r["schema"] == bench.SCHEMA
    assert set(r) == TOP_KEYS and r["pending"] == []
    assert set(r["env"]) == ENV_KEYS and r["env"]["device"] == "cpu" and r["env"]["cpu_threads"] == 1
    cfg = r["config"]
    assert cfg["preset"] == "tiny" and cfg["dtype"] == "float32" and cfg["loops"] == ["hf", "own"]
    assert cfg["prompt_distribution"]["kind"] == "lognormal"
    assert cfg["prefill"] == "compiled" and cfg["method_budget_s"] is None and cfg["budget_s"] is None
    assert cfg["hf_cache"] == "reused"
    assert cfg["run_order"] == list(bench.RUN_ORDER)
    assert len(r["prompt_lengths"]) == cfg["prompts"] == bench.PRESETS["tiny"].prompts
    assert r["prompt_lengths"] == bench.prompt_lengths(cfg["prompts"], cfg["seed"], bench.PRESETS["tiny"].max_prompt_len)
    assert set(r["analytics"]["kinds"]) == {m.kind for m in bench.METHODS} | {"adafuse_unmerged"}
    for e in r["results"]:
        assert set(e) == RESULT_KEYS, e["method"]


def test_every_method_has_numbers_or_says_why_not(tiny_run):
    _, _, out = tiny_run
    r = json.loads(out.read_text())
    n_prompts, new = r["config"]["prompts"], r["config"]["new_tokens"]
    got = {(e["loop"], e["method"]): e for e in r["results"]}
    assert set(got) == {(loop, m.name) for loop in ("hf", "own") for m in bench.METHODS}
    for (loop, name), e in got.items():
        method = bench.METHOD_BY_NAME[name]
        expect_unavailable = method.gpu_only or (method.path is not None and method.path not in settings.AVAILABLE_PATHS)
        if expect_unavailable:
            assert e["status"] == "unavailable", (loop, name, e["status"], e["reason"])
            assert e["reason"] and e["decode_ms_per_token"] is None
            continue
        assert e["status"] == "ok", (loop, name, e["reason"], e["traceback"])
        assert len(e["decode_ms_per_token"]) == len(e["prefill_ms"]) == len(e["tokens_sha1"]) == n_prompts
        assert e["prompts_served"] == e["prompts_asked"] == n_prompts and e["truncated_by_budget"] is False
        assert e["measure_s"] > 0 and e["method_s"] >= e["measure_s"] and e["start_s"] >= 0
        assert all(t > 0 for t in e["decode_ms_per_token"] + e["prefill_ms"])
        # the first decode step of each prompt, timed on its own; CUDA-graph recordings: GPU only
        assert len(e["first_decode_step_ms"]) == n_prompts and all(t > 0 for t in e["first_decode_step_ms"])
        assert e["cudagraphs_recorded_while_timed"] is None
        # every timed generate() call decided how to stop; on the CPU none defers (CUDA only)
        assert e["generate_calls_with_deferred_stop_check"] == (f"0/{n_prompts}" if loop == "hf" else None)
        s = e["summary"]
        assert set(s) == SUMMARY_KEYS
        assert s["decode_ms_median"] <= s["decode_ms_p90"]
        assert s["x_backbone"] > 0 and s["param_overhead_pct"] >= 0 and s["flop_overhead_pct"] >= 0
        assert e["peak_memory_bytes"] is None and s["memory_overhead_pct"] is None  # CPU: no GPU memory counter
        assert new >= 2
    for loop in ("hf", "own"):
        assert got[(loop, "backbone")]["summary"]["x_backbone"] == 1.0
        assert got[(loop, "backbone")]["summary"]["param_overhead_pct"] == 0
        # the adafuse backend rewrote the decode step (one switching call) in the merge methods
        assert "merge" in got[(loop, "adafuse_merge_reference")]["adafuse_paths"]
        if got[(loop, "adafuse_gather")]["status"] == "ok":
            assert "gather" in got[(loop, "adafuse_gather")]["adafuse_paths"]
            assert len(got[(loop, "adafuse_gather")]["adafuse_paths"]) > 1  # compiled prefill: prefill graphs too


def test_adafuse_tokens_equal_pregated_eager_tokens(tiny_run):
    _, _, out = tiny_run
    r = json.loads(out.read_text())
    got = {(e["loop"], e["method"]): e for e in r["results"]}
    for loop in ("hf", "own"):
        ref = got[(loop, "pregated_eager")]["tokens_sha1"]
        names = ["simple_merge", "pregated_inductor"] + [  # every adafuse method that ran (gather/factor once available)
            m.name for m in bench.METHODS if m.name.startswith("adafuse") and got[(loop, m.name)]["status"] == "ok"]
        assert {"adafuse_merge_reference", "adafuse_auto"} <= set(names)
        for name in names:
            assert got[(loop, name)]["tokens_sha1"] == ref, (loop, name)
            assert got[(loop, name)]["tokens_match_reference"] == 1.0
            assert got[(loop, name)]["tokens"] == got[(loop, "pregated_eager")]["tokens"]
            assert set(got[(loop, name)]["tokens_first_difference"]) == {None}
        assert got[(loop, "backbone")]["tokens_sha1"] == got[(loop, "backbone_eager")]["tokens_sha1"]
        # the adapters change what is generated (B is not zero): the comparison above is not vacuous
        assert ref != got[(loop, "backbone_eager")]["tokens_sha1"]


def test_markdown_table_and_png_written(tiny_run):
    _, _, out = tiny_run
    md = out.with_suffix(".md").read_text()
    assert "| Method | Prompts | ms/token (median) |" in md and "Overhead vs backbone" in md and "Memory overhead" in md
    assert "| 3/3 |" in md and "/3 (budget)" not in md and "Not the full" not in md  # no budget: the whole protocol
    assert "## Hugging Face generate()" in md and "## own decode loop" in md
    for m in bench.METHODS:  # a compiled method's label names its code generator, not Inductor, on the tiny preset
        assert m.label.replace(" (Inductor)", "") in md
    assert "[codegen eager]" in md  # the tiny preset's compiled methods say how they were generated
    assert "(Inductor) [codegen eager]" not in md
    assert "1.00 (reference)" in md and "unavailable" in md
    assert "generate()'s KV cache reused" in md
    first = [line for line in md.splitlines() if line.startswith("First decode step of a prompt, median: ")]
    assert len(first) == 2 and "backbone, compiled (reference) " in first[0]  # one per loop
    assert "recorded while timed" not in md  # CPU: no CUDA graphs to count
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_diagnostics_name_gpu_recordings():
    entries = [{"label": "adafuse auto", "method": "adafuse_auto", "first_decode_step_ms": [9.0, 120.0, 8.0],
                "cudagraphs_recorded_while_timed": 2},
               {"label": "backbone", "method": "backbone", "first_decode_step_ms": None}]
    assert bench._step_diagnostics(entries) == [
        "First decode step of a prompt, median: adafuse auto 9.00 ms (2 CUDA graphs recorded while timed).", ""]


# Time budgets, run order, partial outputs, eager prefill ------------------------------------------

def test_method_budget_truncates_and_says_so(tmp_path):
    out = tmp_path / "budget.json"
    args = parse(["--preset", "tiny", "--loop", "own", "--prompts", "3", "--new-tokens", "3", "--method-budget-s", "0",
                  "--methods", "pregated_eager,backbone_eager,simple_merge", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0  # no backbone asked for: no reference to miss
    r = json.loads(out.read_text())
    assert set(r) == TOP_KEYS and r["pending"] == [] and r["schema"] == bench.SCHEMA
    assert r["config"]["method_budget_s"] == 0 and r["config"]["budget_s"] is None
    assert r["config"]["run_order"] == ["pregated_eager", "backbone_eager", "simple_merge"]
    assert [e["method"] for e in r["results"]] == r["config"]["run_order"]  # run in the order asked
    for e in r["results"]:
        assert set(e) == RESULT_KEYS
        assert e["status"] == "ok" and e["truncated_by_budget"] is True, (e["method"], e["reason"])
        assert e["prompts_asked"] == 3 and e["prompts_served"] == 1  # at least one prompt, then the budget
        assert len(e["decode_ms_per_token"]) == len(e["prefill_ms"]) == len(e["tokens_sha1"]) == 1
        assert e["summary"]["decode_ms_median"] > 0 and e["measure_s"] > 0
    got = {e["method"]: e for e in r["results"]}
    assert got["simple_merge"]["tokens_match_reference"] == 1.0  # over the one prompt both served
    md = out.with_suffix(".md").read_text()
    assert "3 prompts asked x 3 new tokens" in md and "**Not the full 3-prompt protocol**" in md
    assert "3 method(s) stopped early by their budget" in md
    row = [line for line in md.splitlines() if line.startswith("| pre-gated LoRA-MoE, eager |")]
    assert len(row) == 1 and row[0].startswith("| pre-gated LoRA-MoE, eager | 1/3 (budget) |")
    # the table keeps the paper's order, whatever order the methods ran in
    assert md.index("| backbone, eager |") < md.index("| pre-gated LoRA-MoE, eager |") < md.index("| simple merge")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_global_budget_skips_the_rest_and_records_it(monkeypatch):
    clock = [0.0]  # each method takes 100 s of this clock; the budget allows starts before 150 s
    monkeypatch.setattr(bench, "_now", lambda: clock[0])
    real = bench.run_method

    def run_method(*args, **kwargs):
        entry = real(*args, **kwargs)
        clock[0] += 100.0
        return entry

    monkeypatch.setattr(bench, "run_method", run_method)
    snapshots = []
    r = bench.run_bench(bench.BenchConfig(preset="tiny", loop="own", prompts=1, new_tokens=3, progress=False,
                                          budget_s=150, methods=("backbone_eager", "pregated_eager", "simple_merge")),
                        checkpoint=lambda partial: snapshots.append(json.loads(json.dumps(partial))))
    assert set(r) == TOP_KEYS and r["pending"] == [] and r["config"]["budget_s"] == 150
    got = {e["method"]: e for e in r["results"]}
    assert got["backbone_eager"]["status"] == got["pregated_eager"]["status"] == "ok"
    assert (got["backbone_eager"]["start_s"], got["pregated_eager"]["start_s"]) == (0.0, 100.0)
    skipped = got["simple_merge"]
    assert set(skipped) == RESULT_KEYS
    assert skipped["status"] == "skipped" and "global time budget" in skipped["reason"]
    assert "200.0 s of budget_s=150 s" in skipped["reason"]
    assert skipped["summary"] is None and skipped["decode_ms_per_token"] is None
    assert skipped["prompts_served"] is None and skipped["truncated_by_budget"] is False
    # one checkpoint before the first method and one after each, listing what had not run yet
    assert [snap["pending"] for snap in snapshots] == [
        ["own:backbone_eager", "own:pregated_eager", "own:simple_merge"], ["own:pregated_eager", "own:simple_merge"],
        ["own:simple_merge"], []]
    assert [len(snap["results"]) for snap in snapshots] == [0, 1, 2, 3]
    md = bench.markdown_table(r)
    assert "| simple merge (paper Table 6) | | skipped: global time budget" in md
    assert "0 method(s) stopped early by their budget" in md and "1 skipped by the global budget" in md
    assert "no method started after 150 s of the run" in md


def test_a_killed_run_leaves_the_finished_methods_on_disk(tmp_path, monkeypatch):
    real = bench.run_method

    def run_method(method, *args, **kwargs):
        if method.name == "simple_merge":
            raise KeyboardInterrupt  # the run dies in the middle of this method, as under `timeout`
        return real(method, *args, **kwargs)

    monkeypatch.setattr(bench, "run_method", run_method)
    out = tmp_path / "partial.json"
    args = parse(["--preset", "tiny", "--loop", "own", "--prompts", "1", "--new-tokens", "3",
                  "--methods", "pregated_eager,simple_merge,backbone_eager", "--out", str(out), "--no-progress"])
    with pytest.raises(KeyboardInterrupt):
        args.func(args)
    r = json.loads(out.read_text())
    assert set(r) == TOP_KEYS
    assert [(e["method"], e["status"]) for e in r["results"]] == [("pregated_eager", "ok")]
    assert r["results"][0]["summary"]["decode_ms_median"] > 0
    assert r["pending"] == ["own:simple_merge", "own:backbone_eager"]
    md = out.with_suffix(".md").read_text()
    assert "**Partial result**" in md and "not run yet: own:simple_merge, own:backbone_eager" in md
    assert "| pre-gated LoRA-MoE, eager | 1/1 |" in md


def test_eager_prefill_compiles_only_the_decode_step():
    r = bench.run_bench(bench.BenchConfig(preset="tiny", prompts=2, new_tokens=4, progress=False, prefill="eager",
                                          methods=("pregated_eager", "adafuse_gather", "pregated_inductor")))
    assert r["config"]["prefill"] == "eager"
    got = {(e["loop"], e["method"]): e for e in r["results"]}
    for loop in ("hf", "own"):
        gather = got[(loop, "adafuse_gather")]
        assert gather["status"] == "ok", (loop, gather["reason"], gather["traceback"])
        assert gather["adafuse_paths"] == ["gather"], loop  # one graph, the decode step (the backend did compile it)
        assert gather["compile"]["prefill"] == "eager"
        ref = got[(loop, "pregated_eager")]["tokens_sha1"]
        for name in ("adafuse_gather", "pregated_inductor"):
            assert got[(loop, name)]["status"] == "ok", (loop, name, got[(loop, name)]["reason"])
            assert got[(loop, name)]["tokens_sha1"] == ref, (loop, name)
    assert "prefill eager (only the decode step is compiled)" in bench.markdown_table(r)


@pytest.mark.parametrize("hf_cache", ["reused", "per-call"])
def test_generate_decodes_into_one_cache_unless_asked_per_call(hf_cache, monkeypatch):
    """hf_cache="reused": every prompt's generate() hands the compiled decode step the same KV-cache
    tensors (under CUDA graphs a new address is a new recording, inside the timed first step);
    "per-call" shows what transformers does by itself. Same tokens either way: the reset clears the
    previous prompt."""
    from adafuse_compile import backend

    calls = []  # per compiled-graph call: {placeholder name: data_ptr} of the KV-cache inputs
    codegen = backend._codegen

    def recording_codegen(gm, example_inputs, settings, extra=()):
        compiled = codegen(gm, example_inputs, settings, extra)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

        def run(*args):
            calls.append({n: a.data_ptr() for n, a in zip(names, args)
                          if "cache" in n and isinstance(a, torch.Tensor)})
            return compiled(*args)
        return run

    monkeypatch.setattr(backend, "_codegen", recording_codegen)
    r = bench.run_bench(bench.BenchConfig(preset="tiny", loop="hf", prompts=3, new_tokens=4, progress=False,
                                          prefill="eager", hf_cache=hf_cache,
                                          methods=("pregated_eager", "adafuse_gather")))
    got = {e["method"]: e for e in r["results"]}
    assert got["adafuse_gather"]["status"] == "ok", got["adafuse_gather"]["traceback"]
    assert got["adafuse_gather"]["tokens_sha1"] == got["pregated_eager"]["tokens_sha1"]
    assert r["config"]["hf_cache"] == hf_cache
    timed = calls[-3 * 3:]  # 3 prompts x 3 decode steps, after the warm-up's
    assert timed and all(timed[0].keys() == c.keys() for c in timed) and len(timed[0]) >= 2  # keys, values, ...
    addresses = {name: {c[name] for c in timed} for name in timed[0]}
    if hf_cache == "reused":
        assert all(len(a) == 1 for a in addresses.values()), addresses
    else:
        assert any(len(a) > 1 for a in addresses.values()), addresses


def test_the_reused_cache_is_made_before_the_prompt_and_marked_static():
    """Made lazily, a compiled prompt would make its tensors under tracing, unmarked (transformers
    skips mark_static_address there), and CUDA graphs would not know the decode step's cache."""
    from adafuse_compile.presets import tiny_hf_model

    model = tiny_hf_model("llama")  # the backbone alone: adafuse's kept cache all the same
    model.generation_config.pad_token_id = 0
    bench.generate_cache(model, "reused", 32)
    model.compile(backend="adafuse", options={"codegen": "eager"})  # the prompt compiled too
    with torch.no_grad():
        for n in (5, 7):
            model.generate(torch.randint(3, 100, (1, n)), max_new_tokens=3, do_sample=False)
    kept = model._prepare_static_cache._kept
    assert kept is not None
    cache = kept[2]
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert tensors and all(hasattr(t, "_dynamo_static_input_type") for t in tensors)
    assert all(t.shape[0] == 1 and t.shape[2] == 32 and t.dtype == torch.float32 for t in tensors)


def test_mola_compiled_compiles_each_decoder_layer_separately(tmp_path, monkeypatch):
    """Regional compilation: every Dynamo graph holds one decoder layer's experts (a whole-model graph holds
    all layers'), the own loop's layers share their graphs, generate()'s get their own, tokens = eager."""
    from torch._dynamo.backends import registry

    layers = 3  # HF: 3 graphs per layer, past Dynamo's default limit of 8 per code object
    cfg = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    index_adds = []  # per graph Dynamo compiled: MoLALinear's index_add_ calls (one per expert and adapted linear)

    def counting(gm, example_inputs):
        index_adds.append(sum(n.op == "call_method" and n.target == "index_add_" for n in gm.graph.nodes))
        return gm.forward

    registry.lookup_backend("eager")  # registered first, so that the lazy registration cannot replace ours
    monkeypatch.setitem(registry._COMPILER_FNS, "eager", counting)  # the tiny protocol's codegen eager
    per_layer = len(bench.TARGETS["qv"]) * bench.PRESETS["tiny"].num_experts
    graphs = {}
    for loop, prefill in (("hf", "compiled"), ("own", "compiled"), ("own", "eager")):
        index_adds.clear()
        r = bench.run_bench(bench.BenchConfig(hf_config=str(path), loop=loop, prompts=2, new_tokens=3, prefill=prefill,
                                              progress=False, methods=("mola_eager", "mola_compiled")))
        got = {e["method"]: e for e in r["results"]}
        e = got["mola_compiled"]
        assert e["status"] == "ok", (loop, prefill, e["reason"], e["traceback"])
        assert e["tokens_sha1"] == got["mola_eager"]["tokens_sha1"] and e["tokens_match_reference"] == 1.0
        assert "(regional)" in e["label"]
        assert "regional: each decoder layer compiled separately" in e["compile"]["compiler"]
        assert index_adds and all(n == per_layer for n in index_adds), (loop, index_adds)  # whole model: 3x
        assert e["compile"]["graphs"] == len(index_adds)
        graphs[loop, prefill] = len(index_adds)
    # own loop: one set of graphs for all layers (prefill at the first length, decode, dynamic-length prefill)
    assert graphs["own", "compiled"] <= 3
    assert graphs["own", "eager"] == 1  # the prompt ran with the compiled layers bypassed: the decode step only
    # generate(): Dynamo specializes on the int layer_idx; every layer compiled (none fell back to eager)
    assert graphs["hf", "compiled"] % layers == 0 and graphs["hf", "compiled"] > 8


def test_first_difference_of_two_runs_is_found():
    assert bench._first_difference("5 6 7", "5 6 7") is None
    assert bench._first_difference("5 6 7", "5 9 7") == 1
    assert bench._first_difference("5 6", "5 6 7") == 2  # one run stopped early: it parts where it ends


def test_tokens_that_part_from_the_reference_are_counted_and_shown(tiny_run):
    """A real tiny result, one method's tokens edited: the match share, the first difference and the table."""
    _, _, out = tiny_run
    r = json.loads(out.read_text())
    got = {(e["loop"], e["method"]): e for e in r["results"]}
    run, ref = got[("own", "adafuse_auto")], got[("own", "pregated_eager")]
    assert len(run["tokens"]) >= 2 and all(len(t.split()) == r["config"]["new_tokens"] for t in run["tokens"])
    ids = run["tokens"][1].split()
    ids[2] = str(int(ids[2]) + 1)  # the second prompt parts from the reference at its third new token
    run["tokens"][1] = " ".join(ids)
    bench.summarize(r)
    assert run["tokens_first_difference"][:2] == [None, 2]
    assert run["tokens_match_reference"] == pytest.approx(1 - 1 / len(run["tokens"]))
    own_table = bench.markdown_table(r).split("## own decode loop")[1]  # both loops have a row of this label
    row = next(line for line in own_table.splitlines() if line.startswith(f"| {run['label']} |"))
    assert row.rstrip(" |").endswith("(first difference at token 2)")
    ref["tokens"] = ref["tokens"][:1]  # a reference that served fewer prompts: compared over those only
    bench.summarize(r)
    assert run["tokens_first_difference"] == [None] and run["tokens_match_reference"] == 1.0


def test_budget_and_prefill_options_are_validated():
    args = parse(["--method-budget-s", "12.5", "--budget-s", "450", "--prefill", "eager",
                  "--methods", "adafuse_gather,backbone"])
    from adafuse_compile.bench_cli import config_from_args

    cfg = config_from_args(args)
    assert (cfg.method_budget_s, cfg.budget_s, cfg.prefill, cfg.methods) == (12.5, 450.0, "eager",
                                                                              ("adafuse_gather", "backbone"))
    with pytest.raises(ValueError, match="method_budget_s must be >= 0"):
        bench.BenchConfig(method_budget_s=-1)
    with pytest.raises(ValueError, match="budget_s must be >= 0"):
        bench.BenchConfig(budget_s=float("nan"))
    with pytest.raises(ValueError, match="prefill="):
        bench.BenchConfig(prefill="lazy")
    with pytest.raises(ValueError, match="hf_cache='shared' is not one of reused, per-call"):
        bench.BenchConfig(hf_cache="shared")
    assert config_from_args(parse([])).hf_cache == "reused"
    assert config_from_args(parse(["--hf-cache", "per-call"])).hf_cache == "per-call"
    with pytest.raises(ValueError, match="twice"):
        bench.BenchConfig(methods=("backbone", "backbone"))
    assert sorted(bench.RUN_ORDER) == sorted(m.name for m in bench.METHODS)
    assert bench.RUN_ORDER[0] == "backbone" and bench.RUN_ORDER[-1] == "mola_compiled"


# Pieces --------------------------------------------------------------------------------------------

def test_prompt_lengths_are_seeded_clipped_and_sharegpt_like():
    a = bench.prompt_lengths(2000, seed=0)
    assert a == bench.prompt_lengths(2000, seed=0) and a != bench.prompt_lengths(2000, seed=1)
    assert min(a) >= 4 and max(a) <= 1024
    s = sorted(a)
    assert 80 <= s[1000] <= 115  # median near 96
    assert 130 <= sum(a) / len(a) <= 190  # mean near 158 (clipping trims the tail a little)
    assert max(bench.prompt_lengths(50, seed=0, max_len=48)) <= 48


def test_analytics_match_hand_counts_for_llama2_7b_qv():
    spec = bench.resolve(bench.BenchConfig(preset="llama2-7b", device="cpu", targets="qv"))
    a = bench.analytics(spec, mean_context=300.0)
    assert a["backbone_params"] == 6_738_415_616  # Llama-2-7B
    # q and v of 32 layers, 8 experts of rank 64: 32 * 2 * 8 * 64 * (4096 + 4096), plus one router 8 x 4096
    expert = 32 * 2 * 8 * 64 * 8192
    assert a["kinds"]["pregated"]["params"] == expert + 8 * 4096
    assert a["kinds"]["layerwise"]["params"] == expert + 64 * 8 * 4096
    unmerged = 64 * 2 * 2 * 64 * 8192
    assert a["kinds"]["pregated"]["flops_per_token"] == 2 * 8 * 4096 + unmerged
    merge = 64 * 2 * 4096 * 4096 * 128
    assert a["kinds"]["adafuse_merge"]["flops_per_token"] == 2 * 8 * 4096 + merge
    assert a["kinds"]["simple_merge"]["flops_per_token"] == 2 * 8 * 4096 + 2 * merge
    assert 3.9 < a["kinds"]["pregated"]["param_overhead_pct"] < 4.1


def test_unavailable_paths_are_read_at_run_time(monkeypatch):
    spec = bench.resolve(bench.BenchConfig(preset="tiny"))
    gather = bench.METHOD_BY_NAME["adafuse_gather"]
    monkeypatch.setattr(settings, "AVAILABLE_PATHS", ("merge", "auto"))
    assert "not available" in bench.unavailable_reason(gather, spec)
    monkeypatch.setattr(settings, "AVAILABLE_PATHS", ("merge", "auto", "gather"))
    assert bench.unavailable_reason(gather, spec) is None
    assert "needs a CUDA device" in bench.unavailable_reason(bench.METHOD_BY_NAME["adafuse_merge_cutlass"], spec)


def test_a_failing_method_is_recorded_and_the_run_goes_on(monkeypatch):
    real = bench._adapt

    def adapt(model, method, spec):
        if method.name == "pregated_eager":
            raise RuntimeError("injected failure")
        return real(model, method, spec)

    monkeypatch.setattr(bench, "_adapt", adapt)
    r = bench.run_bench(bench.BenchConfig(preset="tiny", loop="own", prompts=1, new_tokens=3, progress=False,
                                          methods=("backbone_eager", "pregated_eager", "simple_merge")))
    status = {e["method"]: e for e in r["results"]}
    assert status["pregated_eager"]["status"] == "failed"
    assert "injected failure" in status["pregated_eager"]["reason"] and status["pregated_eager"]["traceback"]
    assert status["backbone_eager"]["status"] == status["simple_merge"]["status"] == "ok"
    assert "failed: RuntimeError: injected failure" in bench.markdown_table(r)


def test_user_hf_config_and_cli_options(tmp_path):
    cfg = dict(model_type="mistral", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    args = parse(["--hf-config", str(path), "--targets", "all", "--loop", "both", "--prompts", "2",
                  "--new-tokens", "3", "--methods", "backbone_eager,pregated_eager,simple_merge",
                  "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert args.func(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["config"]["family"] == "mistral" and r["config"]["model"]["hidden_size"] == 32
    assert r["config"]["target_modules"] == list(bench.TARGETS["all"])
    assert [(e["loop"], e["method"], e["status"]) for e in r["results"]] == [
        (loop, m, "ok") for loop in ("hf", "own") for m in ("backbone_eager", "pregated_eager", "simple_merge")]
    assert all(len(e["decode_ms_per_token"]) == 2 for e in r["results"])


def test_qwen2_config_runs_generate_and_marks_the_own_loop_unavailable(tmp_path):
    cfg = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = bench.run_bench(bench.BenchConfig(hf_config=str(path), prompts=1, new_tokens=3, progress=False,
                                          methods=("backbone_eager", "pregated_eager")))
    status = {(e["loop"], e["method"]): e for e in r["results"]}
    assert status[("hf", "pregated_eager")]["status"] == "ok"
    assert status[("own", "pregated_eager")]["status"] == "unavailable"
    assert "no q/k/v bias" in status[("own", "pregated_eager")]["reason"]


def test_gpu_presets_refuse_to_run_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        bench.resolve(bench.BenchConfig(preset="llama2-7b"))
    with pytest.raises(ValueError, match="unknown methods"):
        bench.BenchConfig(methods=("nope",))


def test_source_digest_names_the_code_that_ran(tmp_path):
    """The digest covers every source file by path and content: equal trees give equal digests, one
    changed byte or a moved file another, and bytecode caches do not count."""
    from adafuse_compile.bench import source_digest

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "k.cu").write_text("// kernel\n")
    first = source_digest(tmp_path / "pkg")
    assert len(first) == 16 and first == source_digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.py").write_text("ignored")
    assert source_digest(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path / "pkg") != first
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "k.cu").rename(tmp_path / "pkg" / "k.cu")
    assert source_digest(tmp_path / "pkg") != first
