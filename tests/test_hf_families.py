"""More Hugging Face families on the CPU (benchmarks/check_hf_families.py): each with adapters on its
own linear names, compiled generate() equal to eager, the weights unchanged, no fallback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from adafuse_compile.presets import OTHER_HF_FAMILIES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("routing", ["pregated", "layerwise"])
def test_every_other_family_compiles_and_matches_eager(tmp_path, routing):
    out = tmp_path / "families.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_hf_families.py"), "--routing", routing,
                    "--out", str(out)], check=True, capture_output=True, timeout=900)
    rows = {r["family"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(OTHER_HF_FAMILIES)
    failed = {f: {k: r.get(k) for k in ("error", "tokens_equal", "max_rel_logit_err", "adafuse_warnings", "graphs")}
              for f, r in rows.items() if not r["ok"]}
    assert not failed, failed
    for family, row in rows.items():
        paths = [g["path"] for g in row["graphs"]]
        if routing == "layerwise":  # no merge ahead of a router per linear: every graph gathers
            assert set(paths) == {"gather"} and len(paths) >= 2, (family, row["graphs"])
        else:  # prefill gathers, the one-token decode step merges (sliding-window families compile it twice)
            assert paths[:2] == ["gather", "merge"], (family, row["graphs"])
    if routing == "pregated":
        # Phi-3 registers o_proj first but calls qkv_proj first: the router goes where the forward starts
        assert rows["phi3"]["router_at"] == "model.layers.0.self_attn.qkv_proj"
