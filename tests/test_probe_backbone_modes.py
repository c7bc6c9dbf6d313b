"""benchmarks/probe_backbone_modes.py on the tiny preset (CPU): one process's record of the
compiled backbone's and auto's decode times, with the fields a fast and a slow process are
compared on (the GPU-only kernel tables and clocks are null here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_preset_records_backbone_and_auto(tmp_path):
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_backbone_modes.py"), "--label", "t",
                    "--device", "cpu", "--preset", "tiny", "--targets", "qv", "--batch", "2", "--steps", "3", "--cpu-burn", "2",
                    "--out", str(out)], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["label"] == "t" and result["gpu"] == "cpu"
    for key, paths in (("backbone_b1", []), ("backbone_b2", []), ("auto_qv_b1", ["merge"])):
        entry = result[key]
        assert entry["ms"] > 0 and len(entry["repeats"]) == 3, key
        assert entry["paths"] == paths, key  # auto was rewritten; the backbone has nothing to rewrite
        assert entry["cpu_busy"]["processes"] == 2 and entry["cpu_busy"]["ms"] > 0, key
        assert entry["kernels_no_graphs"] is None and entry["gpu_after"] is None  # GPU only
    assert "auto_qv_b2" not in result  # --auto-batch 0
    assert isinstance(result["best_configs"], dict)
