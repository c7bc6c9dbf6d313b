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


def _free(lock_path) -> bool:
    """Whether another holder could take the lock now (flock conflicts between open files, also in one process)."""
    import fcntl

    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_held_except_compiles_lets_go_exactly_while_dynamo_compiles(tmp_path, monkeypatch):
    import torch

    lock = tmp_path / "gpu.lock"
    monkeypatch.setenv(gpu_lock.ENV, str(lock))
    seen = {}

    def backend(gm, example_inputs):
        seen["free_while_compiling"] = _free(lock)
        seen["held_while_compiling"] = gpu_lock.held()
        with gpu_lock.timing():  # a measurement inside the compile (the auto policy's calibration)
            seen["free_while_measuring"] = _free(lock)
        seen["free_after_measuring"] = _free(lock)
        return gm.forward

    torch._dynamo.reset()
    with gpu_lock.held_except_compiles():
        assert not _free(lock) and gpu_lock.held()
        fn = torch.compile(lambda x: x * 2 + 1, backend=backend)
        assert fn(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
        assert not _free(lock), "the lock must be taken back when the compile ends"
        torch._dynamo.reset()  # benchmarks reset between compiles; that clears Dynamo's callbacks
        seen.clear()
        fn = torch.compile(lambda x: x * 3, backend=backend)
        assert fn(torch.ones(2)).tolist() == [3.0, 3.0] and seen["free_while_compiling"]
        with gpu_lock.released():
            assert _free(lock)
            with gpu_lock.timing():
                assert not _free(lock)
            assert _free(lock)
        assert not _free(lock)
    assert _free(lock) and not gpu_lock.held()
    assert seen == {"free_while_compiling": True, "held_while_compiling": False,
                    "free_while_measuring": False, "free_after_measuring": True}
