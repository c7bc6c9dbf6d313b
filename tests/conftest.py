"""Shared test setup: GPU tests are marked `gpu` and skipped where no CUDA device exists."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
