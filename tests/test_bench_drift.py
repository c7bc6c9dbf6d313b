"""benchmarks/bench_drift.py --model on the CPU: the model-level drift the weight-integrity docs quote."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_drift_direct_switches(tmp_path):
    out = tmp_path / "drift.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_drift.py"), "--device", "cpu", "--model",
                    "--skip-weights", "--between", "switch", "--dtypes", "bf16", "--counts", "1,200",
                    "--resync", "16", "--out", str(out)], check=True, capture_output=True, timeout=300)
    runs = {r["mode"]: r for r in json.loads(out.read_text())["model"]["runs"]}
    exact = [c["logit_max_rel_err"] for c in runs["exact"]["checkpoints"]]
    inplace = [c["logit_max_rel_err"] for c in runs["inplace"]["checkpoints"]]
    resync = [c["logit_max_rel_err"] for c in runs["inplace_resync"]["checkpoints"]]
    assert exact[0] == exact[1]  # exact mode: the 200th switch is the first one again, bit for bit
    assert inplace[0] == exact[0]  # one switch from pristine weights is the same in both modes
    assert inplace[1] > exact[1]  # 200 in-place bf16 switches drift
    assert resync[1] < inplace[1]
    assert runs["inplace_resync"]["resync_ms"] > 0 and runs["inplace_resync"]["resync_ms_per_token"] > 0
