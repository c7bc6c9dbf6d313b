"""benchmarks/profile_generate_host.py on the tiny preset (CPU): it times generate() per token for
each method asked, with the KV cache reused and made per call, and keeps a cProfile table in which
generate()'s own frames appear."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_generate_host.py"


def test_tiny_preset_profiles_backbone_auto_and_hf_default_compile(tmp_path):
    spec = importlib.util.spec_from_file_location("profile_generate_host", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "host.json"
    module.main(["--preset", "tiny", "--targets", "all", "--methods", "backbone,adafuse_auto,backbone_hf_default_compile", "--prompt-len", "12",
                 "--new-tokens", "6", "--reps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    methods = ["backbone", "adafuse_auto", "backbone_hf_default_compile"]
    # each method with generate()'s cache reused across calls, then made anew per call (transformers' default)
    assert [(e["method"], e["hf_cache"]) for e in result["entries"]] == [
        (m, c) for m in methods for c in ("reused", "per-call")]
    result["entries"] = [e for e in result["entries"] if e["hf_cache"] == "reused"]
    hf_default = result["entries"][2]
    assert hf_default["compile_config"]["backend"] == "inductor" and hf_default["compile_config"]["mode"] == "reduce-overhead"
    # generate() compiled with that config, not with the bench's adafuse one: our backend saw no graph
    assert hf_default["adafuse_graphs"] == 0 and result["entries"][1]["adafuse_graphs"] > 0
    assert any("compile_wrapper" in line for line in hf_default["top_cumulative"])  # and the step was compiled
    for e in result["entries"]:
        assert "error" not in e, e.get("error")
        assert len(e["decode_ms_per_token"]) == 1 and e["decode_ms_per_token"][0] > 0
        assert len(e["first_decode_step_ms"]) == len(e["later_steps_ms_per_token"]) == 1
        assert e["later_steps_ms_per_token"][0] > 0
        assert e["cudagraphs_recorded_per_call"] == [None]  # CPU: no CUDA graphs to count
        assert any("generation/utils.py" in line and "(generate)" in line for line in e["top_cumulative"])
        assert any("(_hf_generate)" in line for line in e["top_cumulative"])
