"""The `auto` policy: cost model ordering, calibration cache, options, and the path a compiled decode takes."""
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.runtime import cost_model as cm
from adafuse_compile.settings import AdaFuseOptionsError, BackendSettings

TINY = af.TinyLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_seq_len=128)
MERGE_FAVOURING = {"launch_s": 1e-3, "copy_bytes_per_s": 1e12, "sgmm_fraction": 1.0}  # launches dominate
GATHER_FAVOURING = {"launch_s": 1e-12, "copy_bytes_per_s": 1e6, "sgmm_fraction": 0.5}  # bytes dominate


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cm, "_process_costs", {})
    torch._dynamo.reset()
    backend.last_compilations.clear()
    yield
    torch._dynamo.reset()


def llama_step(targets=("q", "v"), tokens=1, exact=True, layers=32, hidden=4096, ffn=11008):
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
              "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    # Groups sharing an input, per layer: q/k/v (x), o, gate/up (h), down.
    per_layer = [sum(t in g for t in targets) for g in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))]
    return cm.StepShape(tokens=tokens, linears=tuple(shapes[t] for _ in range(layers) for t in targets),
                        groups=tuple(m for _ in range(layers) for m in per_layer if m), rank=64, top_k=2,
                        num_experts=8, dtype_bytes=2, exact=exact)


# The model ------------------------------------------------------------------------------------------

def test_merge_estimate_matches_the_measured_7b_qv_decode():
    # benchmarks/results/decode_llama2-7b_qv_h200.json: merge exact 6.32 ms/token, backbone 4.98 ms.
    measured = 6.317187 - 4.983387
    est = cm.merge_extra_s(llama_step(), cm.DEFAULT_COSTS) * 1e3
    assert abs(est - measured) / measured < 0.05
    # The bytes are the ones sgmm_h200.json counted for CUTLASS pristine q,v (4429185024).
    step = llama_step()
    assert sum(2 * o * i + 2 * 64 * (o + i) for o, i in step.linears) * 2 == 4429185024


def test_high_launch_cost_favours_merge_and_low_bandwidth_favours_gather():
    for targets in (("q", "v"), ("q", "k", "v", "o", "gate", "up", "down")):
        step = llama_step(targets)
        slow_launch = cm.Costs(copy_bytes_per_s=4e12, launch_s=1e-4, sgmm_fraction=0.8)
        assert cm.choose_path(step, slow_launch).path == "merge"
        slow_bytes = cm.Costs(copy_bytes_per_s=1e11, launch_s=1e-9, sgmm_fraction=0.8)
        assert cm.choose_path(step, slow_bytes).path == "gather"


@pytest.mark.parametrize("targets, result", [(("q", "v"), "qv"), (("q", "k", "v", "o", "gate", "up", "down"), "all")])
def test_estimates_rank_the_paths_as_the_h200_measured_them(targets, result):
    """The 7B batch-1 decode on the H200: the cost model with that GPU's calibration orders the three
    paths as measured, so auto takes the fastest one there."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"decode_llama2-7b_{result}_kv512_h200.json"
    res = json.loads(path.read_text())
    measured = {p: res[f"adafuse_{name}_ms"] - res["backbone_compiled_ms"]
                for p, name in (("merge", "merge-exact"), ("factor", "factor"), ("gather", "gather"))}
    calibrated = cm.Costs(copy_bytes_per_s=4171776522750.89, launch_s=3.819925151765346e-06, sgmm_fraction=0.78)
    if "adafuse_auto_path_decisions" in res:  # the q,v run recorded the costs it calibrated
        recorded = res["adafuse_auto_path_decisions"][0]["costs"]
        assert (recorded["copy_bytes_per_s"], recorded["launch_s"]) == (calibrated.copy_bytes_per_s, calibrated.launch_s)
    step = llama_step(targets)
    estimated = {p: cm.ESTIMATES[p](step, calibrated) for p in measured}
    assert sorted(measured, key=measured.get) == sorted(estimated, key=estimated.get)
    assert cm.choose_path(step, calibrated).path == min(measured, key=measured.get) == "gather"
    for p in measured:  # within 30% of each measured overhead
        assert estimated[p] * 1e3 == pytest.approx(measured[p], rel=0.3)


def test_estimates_grow_with_what_they_count():
    step, costs = llama_step(), cm.DEFAULT_COSTS
    in_place = dataclasses.replace(step, exact=False)
    assert cm.merge_extra_s(in_place, costs) > cm.merge_extra_s(step, costs)  # also unmerges k experts
    more_launch = dataclasses.replace(costs, launch_s=2 * costs.launch_s)
    # factor launches 2 per linear + 1; merge 2 in all: doubling launch_s adds that many launch_s
    n = len(step.linears)
    added = cm.factor_extra_s(step, more_launch) - cm.factor_extra_s(step, costs)
    assert added == pytest.approx((2 * n + 1) * costs.launch_s)
    assert cm.merge_extra_s(step, more_launch) - cm.merge_extra_s(step, costs) == pytest.approx(2 * costs.launch_s)


@pytest.mark.parametrize("tokens", [2, 17, 512, None])
def test_multi_token_steps_never_merge(tokens):
    step = llama_step(tokens=tokens)
    for costs in (cm.DEFAULT_COSTS, cm.Costs(launch_s=1.0), cm.Costs(copy_bytes_per_s=1.0)):
        decision = cm.choose_path(step, costs)
        assert decision.path == "gather"
        assert decision.estimates["merge"] is None and decision.estimates["factor"] is None
        assert "would be wrong for the other tokens" in decision.reason


def test_gather_factor_bytes_are_bounded_by_the_experts():
    costs = cm.Costs(launch_s=1e-12)
    few, many = cm.gather_extra_s(llama_step(tokens=4096), costs), cm.gather_extra_s(llama_step(tokens=8192), costs)
    activations = sum(4096 * (o + i) for o, i in llama_step().linears) * 2 / costs.copy_bytes_per_s
    assert many - few == pytest.approx(activations)  # all 8 experts read once either way; only x and y grow


# Calibration and its cache --------------------------------------------------------------------------

def test_cache_round_trip(tmp_path):
    assert cm.cache_path() == tmp_path / "adafuse_compile" / "costs.json"
    costs = cm.Costs(copy_bytes_per_s=3.1e12, launch_s=2.5e-6, sgmm_fraction=0.7)
    cm.save_cached("GPU X|torch 1|cuda 2", costs)
    cm.save_cached("GPU Y|torch 1|cuda 2", cm.DEFAULT_COSTS)
    loaded = cm.load_cached("GPU X|torch 1|cuda 2")
    assert (loaded.copy_bytes_per_s, loaded.launch_s, loaded.sgmm_fraction) == (3.1e12, 2.5e-6, 0.7)
    assert "cached calibration" in loaded.source
    assert cm.load_cached("GPU Z|torch 1|cuda 2") is None
    assert set(json.loads(cm.cache_path().read_text())) == {"GPU X|torch 1|cuda 2", "GPU Y|torch 1|cuda 2"}
    cm.cache_path().write_text("not json")
    assert cm.load_cached("GPU X|torch 1|cuda 2") is None  # a broken cache is ignored, never fatal


@pytest.fixture
def fake_gpu(monkeypatch):
    """calibrate on a pretend CUDA device: measure() counts its calls instead of timing."""
    calls = []

    def measure(device):
        calls.append(device)
        return cm.Costs(copy_bytes_per_s=2e12, launch_s=3e-6, source="calibrated on this GPU (test)")

    monkeypatch.setattr(cm, "measure", measure)
    monkeypatch.setattr(cm, "device_key", lambda device: "Fake GPU|torch t|cuda c")
    monkeypatch.setattr(cm, "_capturing", lambda: False)
    return calls


def test_calibrates_once_per_process_then_loads_the_cache(fake_gpu, monkeypatch):
    gpu = torch.device("cuda", 0)
    first = cm.calibrate(gpu)
    assert first.launch_s == 3e-6 and len(fake_gpu) == 1
    assert cm.calibrate(gpu) is first and len(fake_gpu) == 1  # once per process
    monkeypatch.setattr(cm, "_process_costs", {})  # a new process
    again = cm.calibrate(gpu)
    assert len(fake_gpu) == 1 and "cached calibration" in again.source and again.launch_s == 3e-6


def test_no_calibration_on_cpu_when_disabled_capturing_or_failing(fake_gpu, monkeypatch, caplog):
    gpu = torch.device("cuda", 0)
    with caplog.at_level(logging.INFO, logger="adafuse_compile"):
        assert cm.calibrate(torch.device("cpu")) is cm.DEFAULT_COSTS
        assert "no CUDA device" in caplog.text
        assert cm.calibrate(gpu, enabled=False) is cm.DEFAULT_COSTS
        monkeypatch.setenv(cm.CALIBRATE_ENV, "0")
        assert cm.calibrate(gpu) is cm.DEFAULT_COSTS
        monkeypatch.delenv(cm.CALIBRATE_ENV)
        monkeypatch.setattr(cm, "_capturing", lambda: True)
        assert cm.calibrate(gpu) is cm.DEFAULT_COSTS and "capture" in caplog.text
        assert not fake_gpu and not cm._process_costs  # nothing measured, nothing remembered
        monkeypatch.setattr(cm, "_capturing", lambda: False)

        def broken(device):
            raise RuntimeError("no graphs here")

        monkeypatch.setattr(cm, "measure", broken)
        assert cm.calibrate(gpu) is cm.DEFAULT_COSTS
        assert "calibration failed (RuntimeError: no graphs here)" in caplog.text


def test_calibrates_inside_a_backend_where_torch_says_it_is_compiling(fake_gpu, monkeypatch):
    """From torch 2.13 torch.compiler.is_compiling() is True inside every backend, where the auto
    policy calibrates: that must not stop the measurement (it runs on a thread of its own)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    costs = cm.calibrate(torch.device("cuda", 0))
    assert len(fake_gpu) == 1 and costs.launch_s == 3e-6
    assert cm.load_cached("Fake GPU|torch t|cuda c") is not None  # and written to the cache


def test_unusable_calibrations_are_never_used_or_kept(fake_gpu, monkeypatch, caplog):
    """A cached entry with a zero or NaN parameter is ignored with a warning naming the file and
    measured again; a measurement with one is a failed calibration (defaults), not cached; a cache
    file that is JSON but not a table is replaced; ADAFUSE_CALIBRATE also takes false/no/off."""
    gpu, key = torch.device("cuda", 0), "Fake GPU|torch t|cuda c"
    for bad in (0.0, float("nan")):
        cm.cache_path().parent.mkdir(parents=True, exist_ok=True)
        cm.cache_path().write_text(json.dumps({key: {"copy_bytes_per_s": bad, "launch_s": 1e-6, "sgmm_fraction": 0.5}}))
        monkeypatch.setattr(cm, "_process_costs", {})
        with caplog.at_level(logging.WARNING, logger="adafuse_compile"):
            costs = cm.calibrate(gpu)
        assert costs.copy_bytes_per_s == 2e12 and "ignoring the cached calibration" in caplog.text
        assert str(cm.cache_path()) in caplog.text
    calls = len(fake_gpu)
    monkeypatch.setattr(cm, "measure", lambda device: cm.Costs(copy_bytes_per_s=0.0, launch_s=1e-6))
    cm.cache_path().write_text("[1, 2]")
    monkeypatch.setattr(cm, "_process_costs", {})
    with caplog.at_level(logging.WARNING, logger="adafuse_compile"):
        assert cm.calibrate(gpu) is cm.DEFAULT_COSTS
    assert "calibration failed (ValueError: copy_bytes_per_s = 0.0 is not a positive finite number)" in caplog.text
    assert json.loads(cm.cache_path().read_text()) == [1, 2]  # nothing unusable written
    cm.save_cached(key, cm.DEFAULT_COSTS)
    assert set(json.loads(cm.cache_path().read_text())) == {key}  # the non-table file replaced
    assert not list(cm.cache_path().parent.glob("*.tmp"))
    for off in ("false", "No", "OFF"):
        monkeypatch.setenv(cm.CALIBRATE_ENV, off)
        monkeypatch.setattr(cm, "_process_costs", {})
        assert cm.calibrate(gpu) is cm.DEFAULT_COSTS
    assert len(fake_gpu) == calls


def test_the_cache_follows_adafuse_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAFUSE_CACHE", str(tmp_path / "mine"))
    assert cm.cache_path() == tmp_path / "mine" / "costs.json"


def test_nothing_is_measured_at_import():
    import subprocess
    import sys

    code = ("import adafuse_compile.backend, adafuse_compile.runtime.cost_model as cm; "
            "assert cm._process_costs == {}; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# Options --------------------------------------------------------------------------------------------

def test_options_are_validated_with_the_valid_ones_listed():
    with pytest.raises(AdaFuseOptionsError, match=r"unknown auto_costs key\(s\) \['launch'\]; valid keys: "
                                                  r"\['copy_bytes_per_s', 'launch_s', 'sgmm_fraction'\]"):
        BackendSettings.from_compile_args({"auto_costs": {"launch": 1e-6}})
    with pytest.raises(AdaFuseOptionsError, match=r"auto_costs\['sgmm_fraction'\] must be in \(0, 1\]"):
        BackendSettings.from_compile_args({"auto_costs": {"sgmm_fraction": 1.5}})
    with pytest.raises(AdaFuseOptionsError, match=r"auto_costs\['launch_s'\] must be a positive finite number"):
        BackendSettings.from_compile_args({"auto_costs": {"launch_s": -1}})
    with pytest.raises(AdaFuseOptionsError, match="auto_costs must be a dict over"):
        BackendSettings.from_compile_args({"auto_costs": 3})
    with pytest.raises(AdaFuseOptionsError, match="calibrate must be True or False"):
        BackendSettings.from_compile_args({"calibrate": "no"})
    with pytest.raises(AdaFuseOptionsError, match="auto_costs"):  # not a sequence of pairs
        BackendSettings.from_compile_args({"auto_costs": (("launch_s",),)})
    with pytest.raises(AdaFuseOptionsError, match=r"auto_costs\['launch_s'\] must be a positive finite number"):
        BackendSettings.from_compile_args({"auto_costs": {"launch_s": 10**400}})  # beyond a float
    import numpy as np

    assert BackendSettings.from_compile_args({"auto_costs": {"launch_s": np.float32(3e-6)}}).auto_costs
    settings = BackendSettings.from_compile_args({"auto_costs": {"launch_s": 2e-6, "copy_bytes_per_s": 1e12}})
    assert settings.auto_costs == (("copy_bytes_per_s", 1e12), ("launch_s", 2e-6))
    hash(settings)  # still a frozen, hashable value


# The compiled model --------------------------------------------------------------------------------

def adapted_tiny():
    model = af.TinyLlama(TINY).init_weights(std=0.08, seed=3)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal",
                                      target_modules=("q_proj", "v_proj")))
    return model.eval()


def decode_with(options):
    model = adapted_tiny()
    prompt = torch.randint(0, TINY.vocab_size, (1, 7), generator=torch.Generator().manual_seed(11))
    model.setup_cache(1)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 8)
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", **options})
    tokens, logits = af.greedy_decode(compiled, prompt, 8)
    af.restore(model)
    assert torch.equal(tokens, ref_tokens)
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() <= 1e-4
    return backend.last_compilations


@pytest.mark.parametrize("costs, expected", [(MERGE_FAVOURING, "merge"), (GATHER_FAVOURING, "gather")])
def test_auto_decode_takes_the_estimated_faster_path(costs, expected):
    records = decode_with({"path": "auto", "auto_costs": costs})
    decode = [r for r in records if r["regions"] and r["regions"][0]["tokens_per_step"] == 1]
    prefill = [r for r in records if r["regions"] and r["regions"][0]["tokens_per_step"] == 7]
    assert len(decode) == 1 and len(prefill) == 1
    decision = decode[0]["path_decision"]
    est = decision["estimates_ms"]
    assert decision["path"] == min(("merge", "factor", "gather"), key=est.__getitem__) == expected == decode[0]["path"]
    assert decision["costs"]["launch_s"] == costs["launch_s"] and "overridden" in decision["costs"]["source"]
    notes = " ".join(decode[0]["notes"])
    assert f"auto policy: {expected}" in notes and "merge +" in notes and "factor +" in notes and "gather +" in notes
    if expected == "gather":
        assert "rewrite_switch: the auto policy chose gather: no merge" in notes
    else:
        assert "1 switching call" in notes
    assert "factor" not in {r["path"] for r in records}
    if expected == "gather":
        assert "merge" not in {r["path"] for r in records}
    # The prefill gathers, and its record says why.
    assert prefill[0]["path"] == "gather" and prefill[0]["path_decision"]["path"] == "gather"
    assert prefill[0]["path_decision"]["estimates_ms"]["merge"] is None


def test_auto_with_defaults_on_cpu_merges_the_tiny_model():
    # Tiny shapes: 13 small launches (factor) cost more than 2 (merge) at the H200 defaults.
    records = decode_with({})
    decode = [r for r in records if r["path_decision"] and r["path_decision"]["estimates_ms"]["merge"] is not None]
    assert len(decode) == 1 and decode[0]["path"] == "merge"
    assert decode[0]["path_decision"]["costs"]["source"] == cm.DEFAULT_COSTS.source


@pytest.mark.parametrize("path", ["merge", "factor"])
def test_an_explicit_path_overrides_auto(path):
    opposite = GATHER_FAVOURING if path == "merge" else MERGE_FAVOURING
    records = decode_with({"path": path, "auto_costs": opposite})
    assert path in {r["path"] for r in records}
    assert all(r["path_decision"] is None for r in records)  # the policy was never asked
