import subprocess
import sys

import pytest


def test_demo_compiles_decodes_and_matches_eager():
    out = subprocess.run([sys.executable, "-m", "adafuse_compile", "demo", "--tokens", "12"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())  # rich wraps long lines
    assert "Injected pre-gated LoRA-MoE" in text and "ms/token" in text
    assert "Router ran 12 times for 12 steps" in text
    assert "Compiled vs eager: tokens identical" in text
    assert "rewrite_switch: 8 adapter branches -> 1 switching call" in text
    assert "this step has 16 tokens" in text  # the prefill graph took the exact unmerged path



@pytest.mark.parametrize("argv,message", [
    (["demo", "--tokens", "1"], "need --tokens >= 2"),
    (["demo", "--prompt-len", "300"], "<= 256"),
    (["bench", "--preset", "tiny", "--out", "{tmp}/x.md"], "give a .json path"),
    (["bench", "--preset", "tiny", "--out", "{tmp}/d.json"], "is a directory"),
    (["bench", "--preset", "tiny", "--prompts", "0"], "prompts must be >= 1"),
    (["bench", "--preset", "tiny", "--methods", ","], "names no method"),
    (["bench", "--preset", "tiny", "--hf-config", "{tmp}/none.json"], "not a readable JSON file"),
    (["bench", "--preset", "tiny", "--hf-config", "{tmp}/list.json"], "is a JSON object"),
    (["diff", "--options", '{"bogus": 1}'], "unknown adafuse option"),
    (["diff", "--out", "{tmp}/nodir/d.json"], "not a file in an existing directory"),
    (["export", "onnx", "--out", "{tmp}/afile/x"], "Not a directory"),
])
def test_bad_command_lines_are_one_line_errors_with_status_2(tmp_path, capsys, argv, message):
    """What users mistype: one line naming the problem, exit status 2, no traceback, no file left."""
    from adafuse_compile.cli import main

    (tmp_path / "afile").write_text("")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "d.json").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
