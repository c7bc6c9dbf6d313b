"""The `auto` policy's cost model: the extra time each path adds to one compiled step over the
plain backbone, from the bytes it moves and the kernels it launches.

    merge   (T == 1)  one SGMM switch: read W0 (exact) or W (in place), write W, read the gathered
                      factors, at `sgmm_fraction` of copy bandwidth; 2 launches (CUTLASS pack +
                      grouped GEMM; Triton does 1, the difference is noise)
    factor  (T == 1)  one slot-write launch moving k*r*(in+out) elements per linear in and out,
                      then per linear two small GEMVs (x -> a_slot -> b_slot) reading the slots
    gather  (any T)   per group of linears sharing an input: one shrink launch and one expand launch
                      per 8 linears (triton_gather.py), reading the distinct experts' factors the
                      step's tokens select (at most N experts) plus the activations

    extra(path) = bytes(path) / (copy_bytes_per_s [* sgmm_fraction for the switch]) + launches(path) * launch_s

The pointwise add of a delta onto its linear's output is not counted (Inductor fuses it into a
neighbouring kernel, or its cost is inside the launch_s measured for the small GEMVs).

Three parameters, `Costs`. Their defaults and where they come from (H200, this repo):

- copy_bytes_per_s = 4.26e12: benchmarks/results/sgmm_h200.json "copy": an 8 GiB
  device-to-device copy, best of eager copy_ / a mul kernel, 4262 GB/s (4279 GB/s re-measured
  after the run). Measured.
- sgmm_fraction = 0.82: benchmarks/results/probe_sgmm_gemm_h200_run4_default.json and _run5.json
  (2026-12-04): the whole CUTLASS pristine switch with the plan's timed GEMM choice reached 80-86%
  of copy bandwidth for q,v (64 weights 4096x4096) and 82-83% for all seven linears, in place
  61-70%. Measured. (The merge overheads quoted below were measured with the earlier kernel, 78%.)
- launch_s = 5.5e-6: an ESTIMATE, derived, not measured directly: DESIGN.md section 4's factor
  probe measured the three-op form y = W x + B(A x) (slots already written, Inductor + CUDA
  graph) at 1.15x (q,v) and 1.51x (all seven) of the compiled 7B backbone (4.98 ms,
  decode_llama2-7b_qv_h200.json): +0.75 ms over 128 small GEMVs and +2.54 ms over 448, minus
  their bytes, is 5.6 and 5.3 us per GEMV. It is the cost of one small dependent kernel inside a
  CUDA graph beyond its bytes, which is what `measure` times on the user's GPU: 3.8 us there on
  the H200 (and 4.17e12 B/s copy), decode_llama2-7b_qv_kv512_h200.json's recorded decision.

Sanity check against the measured 7B q,v decode (adafuse merge exact 6.32 ms/token against the
compiled backbone's 4.98 ms: +1.33 ms): the merge estimate is 4.43 GB / (0.78 * 4.26 TB/s)
+ 2 launches = 1.34 ms.

`calibrate(device)` measures once per process per device (a 256 MiB copy for the bandwidth,
a CUDA graph of 128 small GEMVs for launch_s, on a helper thread; ran inside the H200 7B
benchmark's first auto compile, its time not recorded separately), caches the result as JSON under
$XDG_CACHE_HOME/adafuse_compile/costs.json (default ~/.cache/...) keyed by GPU name, torch
version and CUDA version, and loads it on the next run. On a CPU, with ADAFUSE_CALIBRATE=0, or
when measuring fails, it returns the defaults above and logs why. Nothing is measured at import.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import gpu_lock

log = logging.getLogger("adafuse_compile")

COST_PARAMETERS = ("copy_bytes_per_s", "launch_s", "sgmm_fraction")
CALIBRATE_ENV = "ADAFUSE_CALIBRATE"  # "0": never measure or read the cache; the documented defaults
EXPAND_MODULES_PER_LAUNCH = 8  # triton_gather.py: one expand launch serves up to 8 linears
SWITCH_LAUNCHES = 2  # CUTLASS: pack + grouped GEMM (benchmarks/results/decode_llama2-7b_qv_h200.json profile)
FACTOR_LAUNCHES_PER_LINEAR = 2  # h = a_slot x; delta = b_slot h


@dataclass(frozen=True)
class Costs:
    """The model's parameters, and where they came from."""

    copy_bytes_per_s: float = 4.26e12
    launch_s: float = 5.5e-6
    sgmm_fraction: float = 0.82
    source: str = "documented H200 defaults (launch_s an estimate)"

    def with_overrides(self, overrides: dict) -> "Costs":
        if not overrides:
            return self
        return dataclasses.replace(self, **overrides, source=f"{self.source}, overridden: {sorted(overrides)}")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_COSTS = Costs()


def _bad_value(key: str, value) -> str | None:
    """Why `value` cannot be cost parameter `key` (None: it can)."""
    try:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) \
            and float(value) > 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok or (key == "sgmm_fraction" and float(value) > 1):
        return "in (0, 1]" if key == "sgmm_fraction" else "a positive finite number"
    return None


def validate_overrides(overrides) -> None:
    """Raise ValueError (listing the valid keys) unless `overrides` maps cost parameters to positive numbers."""
    if not isinstance(overrides, dict):
        raise ValueError(f"auto_costs must be a dict over {list(COST_PARAMETERS)}, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(COST_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown auto_costs key(s) {unknown}; valid keys: {list(COST_PARAMETERS)}")
    for key, value in overrides.items():
        bound = _bad_value(key, value)
        if bound is not None:
            raise ValueError(f"auto_costs[{key!r}] must be {bound}, got {value!r}")


def checked(costs: "Costs") -> "Costs":
    """`costs` if every parameter is usable (positive, finite; sgmm_fraction at most 1), else ValueError."""
    for key in COST_PARAMETERS:
        bound = _bad_value(key, getattr(costs, key))
        if bound is not None:
            raise ValueError(f"{key} = {getattr(costs, key)!r} is not {bound}")
    return costs


# The step ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepShape:
    """What the model needs to know about one compiled step's adapted linears."""

    tokens: int | None  # tokens per step (None: dynamic)
    linears: tuple[tuple[int, int], ...]  # (out, in) per adapted linear
    groups: tuple[int, ...]  # linears per group sharing an input (the gather path's calls)
    rank: int
    top_k: int
    num_experts: int
    dtype_bytes: int
    exact: bool = True  # merge from a pristine copy (read W0) rather than in place


def merge_extra_s(step: StepShape, costs: Costs) -> float | None:
    """The SGMM switch; None unless the step has one token (merging is per token)."""
    if step.tokens != 1:
        return None
    k, r, e = step.top_k, step.rank, step.dtype_bytes
    factor_reads = (1 if step.exact else 2) * k  # in place also unmerges the previous k experts
    elems = sum(2 * o * i + factor_reads * r * (o + i) for o, i in step.linears)
    return elems * e / (costs.copy_bytes_per_s * costs.sgmm_fraction) + SWITCH_LAUNCHES * costs.launch_s


def factor_extra_s(step: StepShape, costs: Costs) -> float | None:
    """One slot-write launch plus two small GEMVs per linear; None unless one token."""
    if step.tokens != 1:
        return None
    k, r, e = step.top_k, step.rank, step.dtype_bytes
    slot_elems = sum(k * r * (o + i) for o, i in step.linears)
    write = 2 * slot_elems * e / costs.copy_bytes_per_s + costs.launch_s  # read the experts, write the slots
    products = slot_elems * e / costs.copy_bytes_per_s + FACTOR_LAUNCHES_PER_LINEAR * len(step.linears) * costs.launch_s
    return write + products


def gather_extra_s(step: StepShape, costs: Costs) -> float | None:
    """Shrink + expand launches per input group, and the selected experts' factors; None if T is dynamic."""
    if step.tokens is None:
        return None
    t, r, e = step.tokens, step.rank, step.dtype_bytes
    experts = min(step.num_experts, t * step.top_k)  # distinct experts the step's tokens can touch
    elems = sum(experts * r * (o + i) + t * (o + i) for o, i in step.linears)
    launches = sum(1 + math.ceil(m / EXPAND_MODULES_PER_LAUNCH) for m in step.groups)
    return elems * e / costs.copy_bytes_per_s + launches * costs.launch_s


ESTIMATES = {"merge": merge_extra_s, "factor": factor_extra_s, "gather": gather_extra_s}
# One-token steps take the fastest estimate of all three. Measured on the H200 (bf16, Llama-2-7B
# shape, KV 512, benchmarks/results/decode_llama2-7b_{qv,all}_kv512_h200.json), extra ms/token
# over the compiled backbone (5.02 ms), against this model's estimates with the calibrated costs:
#   q,v        merge +1.34 (est 1.37)  factor +0.76 (est 0.59)  gather +0.37 (est 0.28)
#   all seven  merge +8.23 (est 8.17)  factor +2.60 (est 2.18)  gather +1.36 (est 1.13)
# The ranking holds in both. In this model gather never costs more than factor at T == 1 (it reads
# the same k experts' factors in place, with fewer launches and no slot write), so auto does not
# pick factor; the explicit path="factor" stays for comparison.
DECODE_CANDIDATES = ("merge", "factor", "gather")


@dataclass(frozen=True)
class Decision:
    """The path `auto` chose for one step, the estimates (seconds) it chose by, and why."""

    path: str
    estimates: dict = field(default_factory=dict)  # path -> extra seconds over the backbone (None: not valid)
    reason: str = ""
    costs: Costs | None = None

    def describe(self) -> dict:
        return {"path": self.path, "reason": self.reason,
                "estimates_ms": {p: (None if s is None else round(s * 1e3, 4)) for p, s in self.estimates.items()},
                "costs": self.costs.describe() if self.costs else None}


def choose_path(step: StepShape, costs: Costs) -> Decision:
    estimates = {name: fn(step, costs) for name, fn in ESTIMATES.items()}
    if step.tokens != 1:
        count = step.tokens if step.tokens is not None else "a dynamic number of"
        return Decision("gather", estimates, (
            f"{count} tokens per step (prefill or batch > 1): merging one token's experts into W, or writing them "
            f"into the slots, would be wrong for the other tokens; gather"), costs)
    best = min(DECODE_CANDIDATES, key=lambda p: estimates[p])
    others = " and ".join(p for p in DECODE_CANDIDATES if p != best)
    return Decision(best, estimates, (
        f"one-token decode: {best} estimated faster than {others} over the backbone; costs: {costs.source}"), costs)


# Calibration ------------------------------------------------------------------------------------

_process_costs: dict[str, Costs] = {}  # device key -> Costs, so a process measures each device once


def cache_path() -> Path:
    """ADAFUSE_CACHE (the kernels' build cache too), else XDG_CACHE_HOME or ~/.cache, /adafuse_compile."""
    root = os.environ.get("ADAFUSE_CACHE")
    if root:
        return Path(root) / "costs.json"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "adafuse_compile" / "costs.json"


def device_key(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|cuda {torch.version.cuda}"


def load_cached(key: str) -> Costs | None:
    """This device's entry of the cache file, if there is a usable one (a broken file or entry is
    measured again and overwritten; an entry with unusable values says so)."""
    try:
        entry = json.loads(cache_path().read_text())[key]
        costs = Costs(**{p: float(entry[p]) for p in COST_PARAMETERS}, source=f"cached calibration ({cache_path()})")
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None
    try:
        return checked(costs)
    except ValueError as exc:
        log.warning("adafuse: ignoring the cached calibration for %s in %s (%s); measuring again", key, cache_path(), exc)
        return None


def save_cached(key: str, costs: Costs) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        if not isinstance(table, dict):  # valid JSON but not ours: start over
            table = {}
        table[key] = {p: getattr(costs, p) for p in COST_PARAMETERS} | {"measured_at": time.time()}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.info("adafuse: could not cache the calibration at %s: %s", path, exc)


def cuda_elapsed_s(fn, reps: int) -> float:
    """Seconds per call of `fn` over `reps` calls on the current stream, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def cuda_elapsed_after_idle_s(fn, reps: int, idle_cycles: int) -> float:
    """Median seconds of one call of `fn` over `reps` calls on the current stream, each timed
    alone by CUDA events after the stream idles `idle_cycles` GPU cycles (a sleep kernel).

    Why: calls back to back can hold the GPU at its power cap, where the SM clock drops (an H100
    at 700 W: 1380-1470 MHz against 1965-1980), and a kernel's speed there need not be its speed
    where a model runs it, between other work at the top clock (docs/kernels.md, session 27-28)."""
    if reps < 1:
        raise ValueError(f"cuda_elapsed_after_idle_s: reps must be at least 1, got {reps}")
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for start, end in marks:
        torch.cuda._sleep(idle_cycles)
        start.record()
        fn()
        end.record()
    marks[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in marks) / 1e3


def measure(device: torch.device) -> Costs:
    """Copy bandwidth and the small-kernel cost inside a CUDA graph, on `device`.

    launch_s is timed on what the factor path launches: a chain of 1 x 4096 -> 128 -> 4096 bf16
    GEMVs captured in one CUDA graph, per kernel, less its bytes at the measured bandwidth.
    """
    with torch.cuda.device(device):
        src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB each way, past the L2
        dst = torch.empty_like(src)
        dst.copy_(src)
        copy_s = cuda_elapsed_s(lambda: dst.copy_(src), 10)
        bandwidth = 2 * src.numel() / copy_s
        del src, dst
        # Constants, not random: calibration must not advance the user's RNG. y stays 1.
        a = torch.full((128, 4096), 1 / 4096, dtype=torch.bfloat16, device=device)
        b = torch.full((4096, 128), 1 / 128, dtype=torch.bfloat16, device=device)
        x = torch.ones(1, 4096, dtype=torch.bfloat16, device=device)
        pairs = 64
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up cuBLAS off the capture
            y = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls during this capture neither fail it nor fail
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            y = x
            for _ in range(pairs):
                y = torch.nn.functional.linear(torch.nn.functional.linear(y, a), b)
        graph.replay()
        per_kernel = cuda_elapsed_s(graph.replay, 10) / (2 * pairs)
        kernel_bytes = a.numel() * a.element_size()  # each GEMV reads one 128 x 4096 factor
        launch = max(per_kernel - kernel_bytes / bandwidth, 1e-7)
        del graph
    return Costs(copy_bytes_per_s=bandwidth, launch_s=launch, sgmm_fraction=DEFAULT_COSTS.sgmm_fraction,
                 source="calibrated on this GPU (sgmm_fraction: H200 default)")


def _on_helper_thread(fn, device: torch.device) -> Costs:
    """Measure on a fresh thread: none of the compiling thread's modes (fake tensors, grad, an
    Inductor CUDA-graph pool routing its allocations, see cutlass_kernels/plan_cache.py) apply."""

    def run() -> Costs:
        with torch.no_grad():
            return fn(device)  # plain floats, read after an event synchronize

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a CPU-only build of torch
        return False


def calibrate(device: torch.device, enabled: bool = True) -> Costs:
    """The cost parameters for `device`: calibrated (once per process, cached on disk) or the defaults.

    Call at compile time only: never inside a CUDA-graph capture (it then returns the cache or
    the defaults) and never at import.
    """
    device = torch.device(device)
    if device.type != "cuda":
        log.info("adafuse: auto policy on %s: no CUDA device to calibrate; documented H200 defaults", device)
        return DEFAULT_COSTS
    if not enabled or os.environ.get(CALIBRATE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("adafuse: auto policy calibration disabled (calibrate=False or %s=0); documented H200 defaults",
                 CALIBRATE_ENV)
        return DEFAULT_COSTS
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    key = device_key(device)
    if key in _process_costs:
        return _process_costs[key]
    costs = load_cached(key)
    if costs is None:
        # (Not torch.compiler.is_compiling(): from torch 2.13 it is True inside every backend, where
        # this runs, and the measurement runs on a thread of its own anyway.)
        if _capturing():
            log.info("adafuse: auto policy inside a CUDA-graph capture: not calibrating; documented H200 defaults")
            return DEFAULT_COSTS
        try:
            t0 = time.perf_counter()
            with gpu_lock.timing():  # a measurement: alone on the GPU when benchmarks share it
                costs = checked(_on_helper_thread(measure, device))
            log.info("adafuse: auto policy calibrated %s in %.2f s: %.0f GB/s copy, %.2f us per small kernel",
                     key, time.perf_counter() - t0, costs.copy_bytes_per_s / 1e9, costs.launch_s * 1e6)
            save_cached(key, costs)
        except Exception as exc:  # a failed measurement must not fail the compile
            log.warning("adafuse: auto policy calibration failed (%s: %s); documented H200 defaults",
                        type(exc).__name__, exc)
            costs = DEFAULT_COSTS
    _process_costs[key] = costs
    return costs
