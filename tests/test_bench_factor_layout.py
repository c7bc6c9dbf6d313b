"""benchmarks/bench_factor_layout.py in its CPU smoke mode (fp32, eager): every variant is timed and
exact, each layout's own slot write is what makes it exact, and the variants agree with three_op."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_factor_layout.py"
ADAPTER_VARIANTS = ("three_op", "ext_cols", "ext_rows", "shared_a", "ext_rows_shared")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_factor_layout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bfl():
    return _load_script()


SMOKE = ["--device", "cpu", "--sets", "qv,all", "--layers", "2", "--hidden", "96", "--ffn", "200",
         "--rank", "8", "--reps", "2", "--rounds", "1"]


@pytest.fixture(scope="module")
def smoke(bfl, tmp_path_factory):
    out = tmp_path_factory.mktemp("factor_layout") / "f.json"
    return bfl.main([*SMOKE, "--out", str(out)]), out


def test_every_variant_timed_and_exact(bfl, smoke):
    res, out = smoke
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["shape"]["dtype"] == "float32" and res["impl"] == "reference"
    for name, n_linears in (("qv", 2 * 2), ("all", 2 * 7)):
        s = res["sets"][name]
        assert s["linears"] == n_linears
        assert set(s["variants"]) == set(bfl.VARIANTS)
        for vname, e in s["variants"].items():
            assert "error" not in e, (name, vname, e)
            assert e["ms"] > 0 and e["ratio"] > 0
            if vname.startswith("backbone"):
                # no adapter term: its error is the adapter's size, so the check below can see a missing one
                assert e["max_rel_err"] > 0.1, (name, vname)
            else:
                assert e["max_rel_err"] < 1e-5 and e["exact_ok"], (name, vname, e["max_rel_err"])
                assert e["slot_write_ms"] > 0
                assert e["total_overhead_ms"] == pytest.approx(e["slot_write_ms"] + e["overhead_ms"])
        assert set(s["slot_write_ms"]) == set(ADAPTER_VARIANTS)
        assert s["fastest_step"] in ADAPTER_VARIANTS and s["fastest_total"] in ADAPTER_VARIANTS


def test_write_that_misses_the_view_is_caught(bfl, tmp_path, monkeypatch):
    """ext_rows reading its stacked buffer but writing the plain slots must fail the exactness check."""
    def ext_rows_plain_write(groups, make_write):
        step, _ = bfl.ext_rows(groups, make_write)
        lin = bfl._linears(groups)
        return step, make_write([m.a_slot for m in lin], [m.b_slot for m in lin])

    monkeypatch.setattr(bfl, "VARIANTS", {"backbone": bfl.backbone, "ext_rows": ext_rows_plain_write})
    res = bfl.main([*SMOKE, "--sets", "qv", "--out", str(tmp_path / "f.json")])
    assert res["sets"]["qv"]["variants"]["ext_rows"]["exact_ok"] is False


@pytest.mark.parametrize("name,hidden,ffn,rank,top_k", [("all", 96, 200, 8, 2), ("qv", 64, 172, 16, 1)])
def test_variants_agree_with_three_op(bfl, name, hidden, ffn, rank, top_k):
    groups = bfl.make_groups(name, 2, hidden, ffn, 4, rank, top_k, "cpu", torch.float32)
    lin = bfl._linears(groups)
    experts, gates = torch.tensor([2, 0][:top_k]), torch.tensor([0.7, 0.3][:top_k])

    def make_write(a_slots, b_slots):
        return lambda: bfl.fs.write_factor_slots_([m.lora_A for m in lin], [m.lora_B for m in lin], experts,
                                                  gates, bfl.SCALING, a_slots, b_slots, impl="reference")

    step, write = bfl.three_op(groups, make_write)
    write()
    want = step()
    for vname in ADAPTER_VARIANTS[1:]:
        step, write = bfl.VARIANTS[vname](groups, make_write)
        write()
        got = step()
        assert [y.shape for y in got] == [y.shape for y in want], vname
        for y, w in zip(got, want):
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5, msg=vname)
