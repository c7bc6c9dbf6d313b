"""Shared test setup: GPU tests are marked `gpu` and skipped where no CUDA device exists; the
Triton kernels' CPU tests run under Triton's interpreter, which is turned on here and only here."""
import os

import pytest
import torch

# Triton decides whether a kernel is interpreted when the kernel is decorated (its module's import),
# for the whole process. Without a GPU the kernels run only interpreted, so the interpreter is turned
# on here, before any test module imports a kernel. With a GPU it must stay off: an interpreted
# kernel cannot run on CUDA tensors. (Test modules used to turn it on at their import; collecting the
# whole tests/ folder on the H200 then made every GPU test's Triton kernel interpreted: 102 failures
# and a segfault, 2026-12-04.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_configure(config):
    """Triton 3.6 and older (torch 2.11's) cannot interpret with numpy 2.4 or newer: every
    interpreted kernel fails with "only 0-dimensional arrays can be converted to Python scalars"
    (its scalar arguments are 1-element arrays; seen with Triton 3.6.0 and numpy 2.4.6 / 2.5.5, fine
    with numpy 2.3.5; Triton 3.9 is fine with either). Say so once, with the fix, instead of ~400
    failures that do not name it."""
    if not _interpreted():
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    from packaging.version import Version

    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (the CPU tests of the Triton kernels) fails with numpy "
            f"{numpy.__version__}: install numpy<2.4 (pip install 'numpy<2.4'), or a torch whose Triton is 3.7 "
            "or newer")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    elif _interpreted():
        skip_gpu = pytest.mark.skip(reason="TRITON_INTERPRET is set: Triton kernels would run interpreted, "
                                           "which fails on CUDA tensors; unset it to run the GPU tests")
    else:
        skip_gpu = None
    skip_interpreter = pytest.mark.skip(reason="runs Triton kernels on CPU tensors, under Triton's interpreter "
                                               "(TRITON_INTERPRET=1, set by this conftest where no GPU exists)")
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if "triton_interpreter" in item.keywords and not _interpreted():
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _gpu_alone(request):
    """A GPU test holds the benchmarks' GPU lock ($ADAFUSE_GPU_LOCK, adafuse_compile/gpu_lock.py)
    for its whole run except while Dynamo compiles, so that tests can run next to timed benchmarks
    without disturbing them. Without $ADAFUSE_GPU_LOCK: nothing."""
    if "gpu" not in request.keywords:
        yield
        return
    from adafuse_compile import gpu_lock

    with gpu_lock.held_except_compiles():
        yield


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and the backend's compilation records emptied before and after the test, so
    that each test compiles (and counts compilations) on its own."""
    from adafuse_compile import backend

    torch._dynamo.reset()
    backend.last_compilations.clear()
    yield
    torch._dynamo.reset()
