"""gpu_lock: benchmark processes sharing one GPU never time at once."""
import multiprocessing
import time

from adafuse_compile import gpu_lock


def _hold(lock_path: str, hold_s: float, queue) -> None:
    import os

    os.environ[gpu_lock.ENV] = lock_path
    with gpu_lock.timing():
        start = time.time()
        time.sleep(hold_s)
        queue.put((start, time.time()))


def test_timed_sections_of_processes_sharing_the_lock_never_overlap(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "gpu.lock"), 0.4, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    spans = sorted(queue.get(timeout=5) for _ in procs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, f"two timed sections overlapped: {spans}"


def test_without_the_variable_timing_is_a_no_op(monkeypatch):
    monkeypatch.delenv(gpu_lock.ENV, raising=False)
    before = gpu_lock.waited_s
    with gpu_lock.timing():
        pass
    assert gpu_lock.shared() is None and gpu_lock.waited_s == before
