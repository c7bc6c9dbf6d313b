"""The test suite's Triton interpreter switch (tests/conftest.py): on a machine with a GPU, no test
module may turn the interpreter on for the process, or every GPU test after it runs its Triton
kernels interpreted (on the H200, 2026-12-04: 102 failures and a segfault). Checked in a pytest
subprocess whose plugin makes torch report a CUDA device before the conftest is imported."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_GPU_PLUGIN = """
import os

import torch

torch.cuda.is_available = lambda: True  # as on the device machine; loaded (-p) before the conftest


def pytest_collection_finish(session):
    print(f"TRITON_INTERPRET after collection: {os.environ.get('TRITON_INTERPRET')!r}")
"""


def _pytest_on_a_fake_gpu_machine(tmp_path, args, interpret=None):
    (tmp_path / "fake_gpu_plugin.py").write_text(textwrap.dedent(FAKE_GPU_PLUGIN))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_gpu_plugin", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_collecting_every_test_module_on_a_gpu_machine_leaves_the_interpreter_off(tmp_path):
    # What `pytest -m gpu tests` does on the device: every module is imported, GPU tests are kept.
    r = _pytest_on_a_fake_gpu_machine(tmp_path, ["--collect-only", "-q", "-m", "gpu", "tests"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TRITON_INTERPRET after collection: None" in r.stdout, r.stdout[-3000:]


def test_gpu_tests_are_skipped_with_the_reason_when_the_interpreter_is_set_on_a_gpu_machine(tmp_path):
    r = _pytest_on_a_fake_gpu_machine(tmp_path, ["-q", "-rs", "-m", "gpu", "tests/test_generate_gpu.py"],
                                      interpret="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # every one skipped: none run, none failed
    summary = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in [\d.]+s", summary), summary
    assert "TRITON_INTERPRET is set" in r.stdout and "unset it" in r.stdout
