"""The sm_90a SGMM CUDA source compiles with nvcc on a CPU-only machine (nothing runs).

A grouped-GEMM unit takes about 25 s of nvcc alone on a 2-core CPU machine (variant 8, the
slowest, about 1.5x that). `pytest -q` (the CI command) runs the `slow` tests too: the pack
kernel and registry, the two default variants (inplace's in bf16, pristine's in fp16) and one
unmeasured variant (9, bf16), about 3 minutes on the CI machine (each compile there takes about a
minute). ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1 compiles every variant in both dtypes (about 9 minutes
with two pytest processes on 2 cores).
"""
import os
import re
import shutil
import subprocess

import pytest

from adafuse_compile.cutlass_kernels import build
from adafuse_compile.cutlass_kernels.cutlass_sgmm import DEFAULT_VARIANT

NVCC = shutil.which("nvcc")
INCLUDES = build.cutlass_include_dirs()
ALL_VARIANTS = os.environ.get("ADAFUSE_COMPILE_ALL_SGMM_VARIANTS") == "1"
# Compiled in the default run: the pingpong schedule with the StagesC override covers both
# template paths the unmeasured variants added (pingpong kernel, hand-staged epilogue).
REPRESENTATIVE = "pingpong_64x128x64_e64x128_sc4"

needs_nvcc = pytest.mark.skipif(
    NVCC is None or INCLUDES is None,
    reason="nvcc not installed" if NVCC is None else "nvidia-cutlass wheel (headers) not installed")


def _registry() -> tuple[list[tuple[int, str]], int]:
    """(id, name) of each ADAFUSE_SGMM_VARIANTS entry in sgmm_sm90.cu, and its variant count."""
    text = build.CU_SOURCE.read_text()
    entries = [(int(i), n) for i, n in re.findall(r"^\s*X\((\d+),\s*(\w+),", text, flags=re.M)]
    count = int(re.search(r"#define ADAFUSE_SGMM_NUM_VARIANTS (\d+)", text).group(1))
    return entries, count


VARIANTS, VARIANT_COUNT = _registry()


def _nvcc(tmp_path, *defines):
    out = tmp_path / "sgmm.o"
    cmd = [NVCC, *build.nvcc_flags(INCLUDES), *defines, "-c", str(build.CU_SOURCE), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.stat().st_size > 0


def _gemm_defines(dtype: str, variant: int) -> list[str]:
    return ["-DADAFUSE_SGMM_GEMM_TU", f"-DADAFUSE_SGMM_DTYPE={build.DTYPE_CODES[dtype]}",
            f"-DADAFUSE_SGMM_VARIANT={variant}"]


def test_variant_registry_matches_build():
    ids = [i for i, _ in VARIANTS]
    names = [n for _, n in VARIANTS]
    assert ids == list(range(VARIANT_COUNT))
    assert build.NUM_VARIANTS == VARIANT_COUNT
    assert len(set(names)) == len(names)
    assert set(build.BUILD_VARIANTS) <= set(ids)
    assert REPRESENTATIVE in names
    # The measured defaults keep their ids when variants are appended.
    assert names[DEFAULT_VARIANT["inplace"]] == "coop_128x128x64_e128x64"
    assert names[DEFAULT_VARIANT["pristine"]] == "coop_128x128x64_e128x128"


@needs_nvcc
def test_pack_kernel_and_registry_compile(tmp_path):
    _nvcc(tmp_path)


def _all_or(default: list, every: list) -> list:
    """The default run's parameters, or every combination with ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1."""
    return every if ALL_VARIANTS else default


# Each default variant once and each dtype once (the dtype only changes the template's element type;
# each compile takes about a minute of CI), every combination with ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1.
@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("dtype,mode", _all_or([("bf16", "inplace"), ("fp16", "pristine")],
                                               [(d, m) for d in ("bf16", "fp16") for m in ("inplace", "pristine")]))
def test_default_grouped_gemm_compiles(tmp_path, dtype, mode):
    _nvcc(tmp_path, *_gemm_defines(dtype, DEFAULT_VARIANT[mode]))


_OTHER = [
    pytest.param(v, id=f"{v}-{name}", marks=[] if name == REPRESENTATIVE or ALL_VARIANTS else [
        pytest.mark.skip(reason="set ADAFUSE_COMPILE_ALL_SGMM_VARIANTS=1 to compile it")])
    for v, name in VARIANTS if v not in DEFAULT_VARIANT.values()
]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("variant", _OTHER)
@pytest.mark.parametrize("dtype", _all_or(["bf16"], ["bf16", "fp16"]))
def test_grouped_gemm_variant_compiles(tmp_path, dtype, variant):
    _nvcc(tmp_path, *_gemm_defines(dtype, variant))
