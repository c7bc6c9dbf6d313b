"""`adafuse bench`: the tiny preset end to end on the CPU (schema, every method accounted for,
outputs written, adafuse tokens = pre-gated eager tokens), plus the pieces it is built from."""
import argparse
import json
import time

import pytest
import torch

from adafuse_compile import bench, settings
from adafuse_compile.bench_cli import add_bench_parser

RESULT_KEYS = {"loop", "method", "label", "kind", "status", "reason", "traceback", "compile", "decode_ms_per_token",
               "prefill_ms", "warmup_s", "peak_memory_bytes", "tokens_sha1", "reference_method",
               "tokens_match_reference", "adafuse_paths", "summary"}
SUMMARY_KEYS = {"decode_ms_median", "decode_ms_p90", "decode_ms_mean", "prefill_ms_median", "tokens_per_s",
                "x_backbone", "overhead_pct", "memory_overhead_pct", "param_overhead_pct", "flop_overhead_pct"}
ENV_KEYS = {"device", "gpu", "driver", "cuda", "torch", "transformers", "python", "platform", "adafuse_compile",
            "cpu_threads", "git_commit", "available_paths", "date"}


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
    assert set(r) == {"schema", "env", "config", "prompt_lengths", "analytics", "results", "wall_s"}
    assert set(r["env"]) == ENV_KEYS and r["env"]["device"] == "cpu" and r["env"]["cpu_threads"] == 1
    cfg = r["config"]
    assert cfg["preset"] == "tiny" and cfg["dtype"] == "float32" and cfg["loops"] == ["hf", "own"]
    assert cfg["prompt_distribution"]["kind"] == "lognormal"
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
        assert all(t > 0 for t in e["decode_ms_per_token"] + e["prefill_ms"])
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
        assert got[(loop, "backbone")]["tokens_sha1"] == got[(loop, "backbone_eager")]["tokens_sha1"]
        # the adapters change what is generated (B is not zero): the comparison above is not vacuous
        assert ref != got[(loop, "backbone_eager")]["tokens_sha1"]


def test_markdown_table_and_png_written(tiny_run):
    _, _, out = tiny_run
    md = out.with_suffix(".md").read_text()
    assert "| Method | ms/token (median) |" in md and "Overhead vs backbone" in md and "Memory overhead" in md
    assert "## Hugging Face generate()" in md and "## own decode loop" in md
    for m in bench.METHODS:
        assert m.label in md
    assert "[codegen eager]" in md  # the tiny preset's compiled methods say how they were generated
    assert "1.00 (reference)" in md and "unavailable" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
