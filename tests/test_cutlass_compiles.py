"""The sm_90a SGMM CUDA source compiles with nvcc on a CPU-only machine (nothing runs)."""
import shutil
import subprocess

import pytest

from adafuse_compile.cutlass_kernels import build
from adafuse_compile.cutlass_kernels.cutlass_sgmm import DEFAULT_VARIANT

NVCC = shutil.which("nvcc")
INCLUDES = build.cutlass_include_dirs()

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not installed"),
    pytest.mark.skipif(INCLUDES is None, reason="nvidia-cutlass wheel (headers) not installed"),
]


def _nvcc(tmp_path, *defines):
    out = tmp_path / "sgmm.o"
    cmd = [NVCC, *build.nvcc_flags(INCLUDES), *defines, "-c", str(build.CU_SOURCE), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.stat().st_size > 0


def test_pack_kernel_and_registry_compile(tmp_path):
    _nvcc(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_default_grouped_gemm_compiles(tmp_path, dtype, mode):
    _nvcc(tmp_path, "-DADAFUSE_SGMM_GEMM_TU", f"-DADAFUSE_SGMM_DTYPE={build.DTYPE_CODES[dtype]}",
          f"-DADAFUSE_SGMM_VARIANT={DEFAULT_VARIANT[mode]}")
