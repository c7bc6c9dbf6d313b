import subprocess
import sys


def test_demo_runs_and_reports():
    out = subprocess.run([sys.executable, "-m", "adafuse_compile", "demo", "--tokens", "12"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Injected pre-gated LoRA-MoE" in text and "ms/token" in text
    assert "Router ran 12 times for 12 steps" in text
