"""benchmarks/export_llama2_7b.py (issue 7's H200 run) with its small preset on the CPU: every phase runs
and the JSON holds what the device run is read for. Also: OnnxDecoder(device="cuda") refuses, naming the
reason, where ONNX Runtime has no CUDA provider."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from adafuse_compile.export import ExportError, OnnxDecoder

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "export_llama2_7b.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("export_llama2_7b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_script")
    out = tmp / "export_small.json"
    export_dir = tmp / "exported"
    res = _load_script().main(["--preset", "small", "--device", "cpu", "--threads", "1", "--out", str(out),
                               "--export-dir", str(export_dir), "--keep-export"])
    return res, out, export_dir


def test_small_preset_runs_every_phase_and_matches_pytorch(small_run):
    res, out, _ = small_run
    assert json.loads(out.read_text()) == res
    assert res["phases_done"] == ["build", "reference", "export", "check", "ort_session", "ort_decode", "done"]
    exp = res["export"]
    # q_proj and v_proj of 2 layers are switched: graph inputs, never initializers.
    assert exp["switched_weight_inputs"] == exp["switched_in_manifest"] == 4
    assert exp["switched_also_initializer"] == 0
    assert exp["total_bytes"] == sum(exp["files"].values()) > exp["graph_bytes"] > 0
    assert {"prologue.onnx", "step.onnx", "adapters.safetensors", "manifest.json"} <= set(exp["files"])
    assert set(res["export_timings_s"]) >= {"prologue_trace", "prologue_save", "step_trace", "step_save",
                                            "adapters_save"}
    assert res["export_s"] > 0
    assert res["checker"]["full_check_passed"] is True
    assert res["tensorrt_facts"]["ok"] is True
    d = res["ort_decode"]
    assert len(d["steps"]) == d["steps_planned"] == len(res["prompt"]) + res["new_tokens"] - 1
    assert "stopped_early" not in d
    assert len(d["rel_logit_err"]) == res["new_tokens"]
    assert d["max_rel_logit_err"] <= 1e-4  # fp32 on both sides: measured about 1e-6
    assert d["greedy_agreement"] == 1.0
    assert d["routing_changed"], "the experts never changed: the comparison would not catch a missing switch"
    assert d["ms_per_step_median"] > 0 and d["switch_ms_median"] >= 0
    assert res["ort_provider"] == ["CPUExecutionProvider"]


def test_gpu_iobinding_outcome_is_recorded_with_its_reason(small_run):
    res, _, _ = small_run
    g = res["gpu_iobinding"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert g["run"] is False
        assert "CUDAExecutionProvider" in g["reason"] and "onnxruntime-gpu" in g["reason"]
    else:
        assert "run" in g and ("reason" in g or "tokens_match_reference" in g)


def test_onnx_decoder_cuda_refuses_without_cuda_provider(small_run, monkeypatch):
    _, _, export_dir = small_run
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ExportError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        OnnxDecoder(export_dir, device="cuda")


@pytest.mark.parametrize("min_ort_s", [45.0, -1e9])
def test_time_budget_cuts_onnx_runtime_but_keeps_the_export_results(tmp_path, min_ort_s):
    out = tmp_path / "cut.json"
    res = _load_script().main(["--preset", "small", "--device", "cpu", "--threads", "1", "--budget-s", "0",
                               "--min-ort-s", str(min_ort_s), "--out", str(out)])
    assert res["checker"]["full_check_passed"] is True and res["export"]["switched_weight_inputs"] == 4
    assert res["export_dir_deleted"] is True and res["phases_done"][-1] == "done"
    if min_ort_s > 0:  # no time left for the session: skipped, and said so
        assert "ort_decode" not in res and "ONNX Runtime decode skipped" in res["notes"][0]
    else:  # the session loads, and the step loop stops before its first step
        d = res["ort_decode"]
        assert d["steps"] == [] and d["stopped_early"].startswith("time budget: 0 of")
