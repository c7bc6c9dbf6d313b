"""CPU smoke runs of benchmarks/bench_decode.py (every phase runs, every path matches eager) and
benchmarks/profile_paths.py (every path and shape is profiled against the backbone)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_decode_cpu_smoke(tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--device", "cpu", "--preset", "tiny",
                    "--steps", "3", "--prefill-len", "16", "--batches", "2", "--paths", "merge-exact,factor,gather,auto",
                    "--multi-paths", "auto,gather-slots", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert not [k for k in res if k.endswith("_error")], res
    assert res["skipped"] == []
    bf16_own_err = res["eager_bf16_vs_fp32_max_rel_logit_err"]
    for path, compiled in (("merge-exact", "merge"), ("factor", "factor"), ("gather", "gather")):
        assert res[f"adafuse_{path}_paths_compiled"] == [compiled]
        assert res[f"adafuse_{path}_ms"] > 0
        assert res[f"adafuse_{path}_vs_fp32_max_rel_logit_err"] <= 1.5 * bf16_own_err + 1e-3
    assert res["adafuse_auto_path_decisions"][0]["path"] in ("merge", "factor", "gather")
    assert res["adafuse_auto_b2_paths_compiled"] == ["gather"]  # multi-token steps: the gather path
    # every timed graph is also checked against eager (a wrong path is listed, not just timed)
    assert "wrong_results" not in res, res["wrong_results"]
    for key in ("adafuse_auto_b2", "adafuse_auto_prefill", "adafuse_gather-slots_b2", "adafuse_gather-slots_prefill"):
        assert res[f"{key}_max_rel_logit_err_vs_eager"] <= 3 * bf16_own_err + 1e-3
    assert res["adafuse_auto_prefill_paths_compiled"] == ["gather"]
    for key in ("backbone_compiled_ms", "backbone_b2_compiled_ms", "adafuse_auto_b2_ms",
                "backbone_prefill_tokens_per_s", "adafuse_auto_prefill_tokens_per_s",
                "adafuse_gather-slots_b2_ms", "adafuse_gather-slots_prefill_tokens_per_s",
                # the naive pre-gated model's torch.compile at every shape (the "faster than naive")
                "naive_torch_compile_ms", "naive_torch_compile_b2_ms", "naive_torch_compile_prefill_tokens_per_s"):
        assert res[key] > 0
    assert res["naive_torch_compile_b2_x_backbone_b2"] > 0 and res["adafuse_auto_prefill_x_backbone"] > 0
    assert len(res["backbone_compiled_ms_repeats"]) == 3 and min(res["backbone_compiled_ms_repeats"]) > 0
    # prefill in both protocols, one synchronized prompt at a time and five queued, each with its ratio
    assert len(res["adafuse_auto_prefill_tokens_per_s_repeats"]) == 5
    for key in ("backbone_prefill", "adafuse_auto_prefill", "naive_torch_compile_prefill"):
        assert res[f"{key}_back_to_back_tokens_per_s"] > 0
    assert res["adafuse_auto_prefill_back_to_back_x_backbone"] == pytest.approx(
        res["adafuse_auto_prefill_back_to_back_tokens_per_s"] / res["backbone_prefill_back_to_back_tokens_per_s"], abs=2e-3)


def test_profile_paths_cpu_smoke(tmp_path):
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_paths.py"), "--device", "cpu", "--preset", "tiny",
                    "--layers", "1", "--paths", "gather,factor", "--shapes", "b1,p16", "--steps", "2",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    runs = json.loads(out.read_text())["runs"]
    # factor serves one-token steps only; gather every shape; each against the backbone of its shape
    assert set(runs) == {"backbone_b1", "backbone_p16", "gather_b1", "gather_p16", "factor_b1"}
    for name, entry in runs.items():
        assert "error" not in entry, entry
        assert entry["wall_ms"] > 0 and entry["kernels"]["us_per_step"] > 0
        if not name.startswith("backbone"):
            assert entry["paths_compiled"] == [name.split("_")[0]]
            assert "extra_wall_ms_per_layer" in entry and entry["extra_kernel_us_per_layer_by_category"]


def test_bench_decode_naive_phases_limits_the_naive_compiles(tmp_path):
    """--naive-phases: the naive model is compiled only in the phases named (a slice of the GPU run
    that leaves out shapes measured elsewhere)."""
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--device", "cpu", "--preset", "tiny",
                    "--steps", "2", "--phases", "batch", "--batches", "2", "--paths", "", "--multi-paths", "",
                    "--naive-phases", "b1", "--out", str(out)], check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["backbone_b2_compiled_ms"] > 0
    assert not [k for k in res if k.startswith("naive_torch_compile")], res


def test_bench_decode_layerwise_routing_cpu_smoke(tmp_path):
    """--routing layerwise: a router in every adapted linear; gather and auto compile the gather
    path at every shape and match eager; the merging paths are refused up front."""
    out = tmp_path / "decode.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--device", "cpu", "--preset", "tiny",
              "--routing", "layerwise", "--out", str(out)]
    subprocess.run([*script, "--steps", "2", "--prefill-len", "16", "--batches", "2", "--targets", "all"],
                   check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert not [k for k in res if k.endswith("_error")], res
    assert "wrong_results" not in res, res["wrong_results"]
    assert res["routing"] == "layerwise"
    bf16_own_err = res["eager_bf16_vs_fp32_max_rel_logit_err"]
    for path in ("gather", "auto"):
        assert res[f"adafuse_{path}_paths_compiled"] == ["gather"]
        assert res[f"adafuse_{path}_vs_fp32_max_rel_logit_err"] <= 1.5 * bf16_own_err + 1e-3
    assert res["adafuse_auto_b2_paths_compiled"] == ["gather"] and res["adafuse_auto_prefill_paths_compiled"] == ["gather"]
    assert res["naive_torch_compile_ms"] > 0 and res["naive_torch_compile_b2_ms"] > 0
    refused = subprocess.run([*script, "--prefill-len", "16", "--paths", "merge-exact,gather"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "merge-exact" in refused.stderr and "one router" in refused.stderr
