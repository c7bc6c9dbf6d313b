"""benchmarks/profile_generate_host.py on the tiny preset (CPU): it times generate() per token for
each method asked, with the KV cache reused and made per call, and keeps a cProfile table in which
generate()'s own frames appear."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_generate_host.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_generate_host", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_busy_share_counts_overlapping_kernels_once_over_the_later_half():
    share = _script().gpu_busy_share
    # Timeline 0..100 us, later half 50..100: 0-45 is not counted, 40-52 only from 50; 40-52, 50-60
    # and 55-70 overlap into one busy run 50-70 (20 us), then 80-90 and 99-100 (11 us).
    kernels = [(0, 45), (40, 52), (55, 70), (50, 60), (80, 90), (99, 100)]
    assert share(kernels) == (20 + 11) / 50
    assert share([(0, 10), (10, 20)], from_share=0.0) == 1.0  # back to back: no idle time
    assert share([(0, 10), (30, 40)], from_share=0.0) == 0.5
    assert share([]) is None


def test_idle_gaps_are_split_by_length_over_the_later_half():
    gaps = _script().idle_by_gap
    # later half of 0..2000 us: 1000..2000. Busy runs there: 1000-1010, 1012-1100 (2 us gap), 1110-1200 (10 us),
    # 1300-1400 (100 us), 2000-2000 is empty; 1400 -> 1990 (590 us) -> 1990-2000.
    kernels = [(0, 10), (995, 1010), (1012, 1100), (1110, 1150), (1140, 1200), (1300, 1400), (1990, 2000)]
    by = gaps(kernels)
    assert by == {"0-5us": (2, 1), "5-50us": (10, 1), "50-500us": (100, 1), "500-infus": (590, 1)}
    assert gaps([]) is None


def test_tiny_preset_profiles_backbone_auto_and_hf_default_compile(tmp_path):
    module = _script()
    out = tmp_path / "host.json"
    module.main(["--preset", "tiny", "--targets", "all", "--methods", "backbone,adafuse_auto,backbone_hf_default_compile", "--prompt-len", "12",
                 "--new-tokens", "6", "--reps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    methods = ["backbone", "adafuse_auto", "backbone_hf_default_compile"]
    # each method with generate()'s cache reused across calls, then made anew per call (transformers' default),
    # each of those with a host sync per step and with the deferred stop check
    assert [(e["method"], e["hf_cache"], e["hf_stop_check"]) for e in result["entries"]] == [
        (m, c, s) for m in methods for c in ("reused", "per-call") for s in ("per-step", "deferred")]
    assert all(e["tokens_equal_across_stop_checks"] for e in result["entries"])
    # deferral is CUDA's (and transformers' own on MPS): on the CPU both run per step
    assert {e["hf_stop_check_effective"].split(" (")[0] for e in result["entries"]} == {"per step"}
    result["entries"] = [e for e in result["entries"] if e["hf_cache"] == "reused" and e["hf_stop_check"] == "deferred"]
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
        assert e["kernel_timeline"] is None  # CPU: no GPU timeline to split
        assert any("generation/utils.py" in line and "(generate)" in line for line in e["top_cumulative"])
        # Python 3.12's cProfile (sys.monitoring) under Dynamo's frame hook loses the frames above a
        # compiled step for adafuse's entries (seen with torch 2.11: eval_frame on top, no caller)
        if e["method"] != "adafuse_auto" or sys.version_info < (3, 12):
            assert any("(_hf_generate)" in line for line in e["top_cumulative"])
