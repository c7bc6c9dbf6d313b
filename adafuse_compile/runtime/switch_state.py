"""Runtime state of a compiled model's weight switching, shared by all its compiled graphs.

The merge path rewrites adapted backbone weights in place every decode step. Every other graph
of the same model (prefill, batch > 1) computes the unmerged adapter term and so must see the
backbone weights: it restores them first. The previous step's experts and gates live in static
device buffers so the unmerge stays right under CUDA-graph replay.

Two modes:
- exact: M = W0 + delta_t, written into a separate device buffer M per adapted weight, which
  the compiled decode step's linears read instead of W. The model's own weights (W0) are only
  read, never written: state_dict(), named_parameters(), torch.save(model) and every other view
  of the model see the backbone at every moment, and there is zero drift. Costs one copy of the
  adapted weights in device memory (the same bytes per switch as merging into W).
- in place (the paper's, for when that copy does not fit): W += delta_t - delta_{t-1}. In
  bf16/fp16 every switch rounds W, so it drifts; every `resync_every` switches the weights are
  restored exactly from a pristine copy in (pinned) host memory and the current experts
  re-merged from zero. The interval and the bound it keeps are measured by
  benchmarks/bench_drift.py (docs/weights.md).

Integrity rules (tests/test_weight_integrity.py): in place, a model's weights are merged only
while its compiled decode steps run; state_dict(), eager calls, train(), leaving generate()
(also by an exception or KeyboardInterrupt) restore them. One SwitchState owns a set of weights
at a time: a second model sharing those weights restores the first before it merges, and a
model in the middle of a decode used from a second thread fails with a clear error instead of
corrupting the first (in both modes: the step's buffers and previous experts are per model).
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

# Switches between exact resyncs in place. Measured on CPU with the reference kernel
# (benchmarks/results/drift_cpu_small.json: 256x256 weights std 0.02, N=8, r=64, top-2): against
# ONE fresh switch to the same experts, in-place drift reaches 2.9e-3 (23 ulp of mean |W|) after
# 64 switches in bf16 and 4.1e-2 (330 ulp) after 10,000; fp16 4.3e-4 (27 ulp) and 6.5e-3 (420 ulp).
# Resyncing every 64 switches kept it at or below 2.9e-3 / 4.3e-4 (about 27 ulp) up to 10,000.
# On the H200 at Llama-2-7B q,v shapes (64 x 4096x4096): at most 4.4e-3 bf16 / 6.1e-4 fp16 (40 ulp)
# with resync 64, against 7.2e-2 / 8.7e-3 after 10,000 without (benchmarks/results/drift_h200_*.json).
DEFAULT_RESYNC_EVERY = 64

# Which SwitchState last merged into a weight is kept on the weight itself (weakly), so any model
# sharing that weight, compiled or not, can find and restore it.
_OWNER_ATTR = "_adafuse_owner"
_owner_lock = threading.Lock()

# The SwitchStates whose experts sit in their weights in place right now, process-wide (weakly).
# While there are none, a model's check before every forward for another model's in-place merge into
# its weights (GateChannel.open -> restore_in_place) has nothing to find and skips its walk over every
# adapted weight (224 at the 7B shape, all seven linears; 15 us per forward on this project's CPU
# machine, 0.5 us skipped): host time that generate() adds to every token whenever it waits for each
# step. A leaf lock: nothing else is acquired while it is held.
_merged_in_place: "weakref.WeakSet[SwitchState]" = weakref.WeakSet()
_merged_in_place_lock = threading.Lock()


def any_merged_in_place() -> bool:
    """Whether any SwitchState (of any model) has merged its experts into its weights in place."""
    return len(_merged_in_place) > 0


def _no_owner() -> None:
    return None


class _OwnerRef:
    """A weak reference to the owning SwitchState that pickles as None: a saved model (torch.save of
    the whole module, which pickles Parameter attributes) carries no compiled runtime state."""

    __slots__ = ("ref",)

    def __init__(self, owner: "SwitchState"):
        self.ref = weakref.ref(owner)

    def __call__(self) -> "SwitchState | None":
        return self.ref()

    def __reduce__(self):
        return _no_owner, ()


def merged_owners(weights: list[Tensor]) -> list["SwitchState"]:
    """SwitchStates whose merged experts currently sit in any of `weights`."""
    owners: list[SwitchState] = []
    for w in weights:
        ref = getattr(w, _OWNER_ATTR, None)
        owner = ref() if ref is not None else None
        if owner is not None and owner.merged and all(o is not owner for o in owners):
            owners.append(owner)
    return owners


class _Readers:
    """The exact-mode SwitchStates that read a weight as W0 (weakly); pickles as an empty set."""

    __slots__ = ("states", "__weakref__")

    def __init__(self):
        self.states = weakref.WeakSet()

    def __reduce__(self):
        return _Readers, ()


_READERS_ATTR = "_adafuse_readers"


class ConcurrentUseError(RuntimeError):
    """A model whose weights are merged was used from another thread."""


class ReplacedWeightsError(RuntimeError):
    """An in-place compiled decode step was given backbone weights other than the ones it switches."""


REPLACED_WEIGHTS = ("the model's backbone weights are not the Parameters it was injected with (replaced since, e.g. "
                    "by load_state_dict(assign=True)), so its switch state would restore the old ones; load new "
                    "weights in place (load_state_dict without assign=True) to keep the merge path")


# The version counter a weight had when a SwitchState last wrote (or copied) its pristine values:
# a different counter when a decode starts means the user changed the weight since (an optimizer
# step, load_state_dict, copy_), so the in-place mode's host copy of W0 is taken again. Kept on the
# weight, so that two models sharing a backbone do not take each other's restores for changes.
_PRISTINE_VERSION_ATTR = "_adafuse_pristine_version"


def _mark_pristine(weights: list[Tensor]) -> None:
    for w in weights:
        setattr(w, _PRISTINE_VERSION_ATTR, w._version)


def _host_copy(w: Tensor) -> Tensor:
    """W0 in (pinned, for CUDA) host memory, for the in-place mode's exact resync and restore."""
    return w.detach().to("cpu", copy=True).pin_memory() if w.device.type == "cuda" else w.detach().clone()


def _layout(weights: list[Tensor]) -> list[tuple]:
    return [(id(w), w.dtype, w.device, tuple(w.shape)) for w in weights]


class SwitchState:
    def __init__(self, weights: list[Tensor], top_k: int, exact: bool, resync_every: int | None = None):
        for other in merged_owners(weights):  # a model sharing these weights: copy W0, not its merge
            if not other.exact:
                other.restore()
        device = weights[0].device
        self.weights = weights
        self.exact = exact
        self.prev_experts = torch.zeros(top_k, dtype=torch.int64, device=device)
        self.prev_gates = torch.zeros(top_k, dtype=torch.float32, device=device)
        # Exact mode: the buffers the switch writes and the decode step reads (W stays W0).
        # In place: W0 taken now, while the weights are pristine, into pinned host memory for the
        # periodic exact resync.
        if exact:
            self.merged_buffers = {id(w): w.detach().clone() for w in weights}
            self.host_pristine = {}
            for w in weights:  # so an in-place model sharing them can see it is being read
                readers = getattr(w, _READERS_ATTR, None)
                if readers is None:
                    readers = _Readers()
                    setattr(w, _READERS_ATTR, readers)
                readers.states.add(self)
        else:
            self.merged_buffers = {}
            self.host_pristine = {id(w): _host_copy(w) for w in weights}
            _mark_pristine(weights)
        self.layout = _layout(weights)  # a weight converted since (model.to(dtype)) needs a new state
        self.resync_every = DEFAULT_RESYNC_EVERY if resync_every is None else resync_every
        self.merged = False
        self.switches = 0  # merged steps since the last exact write of the weights
        self.total_switches = 0
        self.owner_thread: int | None = None
        self.owns_weights = False  # True while no other model has merged into these weights since
        self._lock = threading.Lock()

    @property
    def buffer_bytes(self) -> int:
        """Device memory of exact mode's separate merged buffers (0 in place)."""
        return sum(t.numel() * t.element_size() for t in self.merged_buffers.values())

    def holds(self, weights: list[Tensor]) -> bool:
        """Whether these are still the weights this state switches (not Parameters put in their
        place since, e.g. by load_state_dict(assign=True))."""
        mine = self.merged_buffers if self.exact else self.host_pristine
        return all(id(w) in mine for w in weights)

    def switch_operands(self, weights: list[Tensor]) -> tuple[list[Tensor], list[Tensor] | None]:
        """(what the switch writes and the linears read, the pristine source or None) for `weights`:
        exact: (the merged buffers, W itself as W0); in place: (W, None)."""
        if self.exact:
            return [self.merged_buffers[id(w)] for w in weights], weights
        return weights, None

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self.merged and self.owner_thread not in (None, me):
            raise ConcurrentUseError(
                "this AdaFuse-compiled model is in the middle of a merged decode on another thread: its backbone "
                "weights hold that thread's experts. Use one model per thread (or finish the other thread's "
                "generate() / call adafuse_compile.restore(model) there first)."
            )

    @torch.no_grad()
    def before_merge_step(self) -> None:
        """Called before every compiled decode step that switches weights."""
        with self._lock:
            self._check_thread()
            if not self.owns_weights:  # per-weight work only when another model took them (not per token)
                self._take_weights()
            if not self.exact and not self.merged:  # a decode starts: W is W0, unless the user changed it
                self._retake_changed_pristine()
            if not self.exact and self.resync_every and self.switches >= self.resync_every:
                self._write_pristine()
            self.merged = True  # set before the step: a failure inside still leaves a restorable state
            if not self.exact:
                with _merged_in_place_lock:
                    _merged_in_place.add(self)
            self.owner_thread = threading.get_ident()
            self.switches += 1
            self.total_switches += 1

    def _take_weights(self) -> None:
        me = threading.get_ident()
        if not self.exact:  # about to write weights that an exact model on another thread may be reading
            for w in self.weights:
                readers = getattr(w, _READERS_ATTR, None)
                for other in list(readers.states) if readers is not None else ():
                    if other.merged and other.owner_thread not in (None, me):
                        raise ConcurrentUseError(
                            "another AdaFuse-compiled model sharing these backbone weights is in the middle of a "
                            "decode on another thread; this model's in-place switching would change the weights "
                            "it reads. Give each thread its own backbone, compile this one with exact=True, or "
                            "finish the other thread's decode first.")
        with _owner_lock:
            for w in self.weights:
                ref = getattr(w, _OWNER_ATTR, None)
                other = ref() if ref is not None else None
                if other is not None and other is not self:
                    if other.merged and not other.exact:
                        other.restore()  # another model merged into these weights in place: undo it first
                    other.owns_weights = False
            me = _OwnerRef(self)
            for w in self.weights:
                setattr(w, _OWNER_ATTR, me)
            self.owns_weights = True

    @torch.no_grad()
    def _retake_changed_pristine(self) -> None:
        """Take the host copy of W0 again for every weight the user changed since this model (or
        one sharing the weights) last wrote or copied its pristine values: the next restore must
        put back the new backbone, not the one seen at compile time."""
        changed = [w for w in self.weights if w._version != getattr(w, _PRISTINE_VERSION_ATTR, None)]
        for w in changed:
            self.host_pristine[id(w)] = _host_copy(w)
        _mark_pristine(changed)

    @torch.no_grad()
    def _write_pristine(self) -> None:
        """W = W0 exactly, and forget the previous experts (the next switch merges from zero).
        Exact mode never wrote W: nothing to copy."""
        if not self.exact:
            for w in self.weights:  # streamed weight by weight from pinned host memory
                w.copy_(self.host_pristine[id(w)], non_blocking=True)
            _mark_pristine(self.weights)
        self.prev_gates.zero_()
        self.switches = 0

    @torch.no_grad()
    def restore(self) -> None:
        """End a decode: in place, put the backbone weights back (before an unmerged graph runs, or
        when leaving decode); in both modes, release the model to other threads."""
        with self._lock:
            if not self.merged:
                return
            self._check_thread()
            # In place, exactly from the host copy: the in-place mode's drift ends here.
            self._write_pristine()
            self.merged = False
            with _merged_in_place_lock:
                _merged_in_place.discard(self)
            self.owner_thread = None


def adapted_weight_bytes(weights: list[Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in weights)


def choose_exact(weights: list[Tensor], exact: bool | None, memory_fraction: float) -> tuple[bool, str]:
    """Exact mode unless told otherwise or its merged buffers would take too much free device memory."""
    need = adapted_weight_bytes(weights)
    if exact is not None:
        return exact, "exact" if exact else "in place (exact=False)"
    device = weights[0].device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > memory_fraction * free:
            return False, (f"in place: exact mode's merged buffers ({need / 2**30:.2f} GiB) exceed "
                           f"pristine_memory_fraction={memory_fraction} of free GPU memory ({free / 2**30:.2f} GiB)")
    return True, f"exact, merged buffers {need / 2**20:.1f} MiB (the model's weights are never written)"


def switch_state_for(channel, top_k: int, exact: bool | None, memory_fraction: float = 0.5,
                     resync_every: int | None = None) -> tuple[SwitchState, str]:
    """The model's SwitchState (created on its first merge graph), and how its mode was chosen."""
    state = channel.switch_state
    if state is not None and state.layout != _layout(list(channel.adapted_weights)):
        # the weights were converted or moved since (model.to(dtype)): buffers and host copy are stale
        state.restore()
        state = None
    if state is None or (exact is not None and state.exact != exact):
        # A recompile with another `exact` gets its own state; graphs compiled earlier keep theirs,
        # and the weight-owner tracking makes the two restore each other before either merges.
        if state is not None:
            state.restore()
        weights = list(channel.adapted_weights)
        chosen, why = choose_exact(weights, exact, memory_fraction)
        channel.switch_state = SwitchState(weights, top_k, chosen, resync_every)
        channel.switch_states.append(channel.switch_state)
        return channel.switch_state, why
    return state, "exact" if state.exact else "in place"


def restore(model) -> None:
    """Put a compiled model's adapted weights back to the backbone's (no-op if nothing is merged).

    Graphs of the model that compute the adapter term unmerged (prefill, batch > 1) do this
    themselves before they run, and so do eager calls, state_dict(), train() and the end of
    generate(); call it before using the weights any other way after your own decode loop.
    """
    from ..modeling.inject import gate_channel

    gate_channel(model).restore()  # whichever state merged last, also one of an earlier compile


class decoding:
    """Context manager for your own decode loop over a compiled model: whatever happens inside
    (return, exception, KeyboardInterrupt), the backbone weights are restored on exit.

        with adafuse_compile.decoding(model):
            for step in range(n):
                logits = compiled(tokens, pos)
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        restore(self.model)
