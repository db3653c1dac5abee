"""How long the GPU computed during a step, also when the host issued the step's kernels slower than
the GPU ran them.

Two events per step on the compute stream, `start` and `done`, measure the step's span. Inside a
replayed CUDA graph the GPU cannot starve (one launch holds every kernel), but an eager forward, a
piecewise graph's attention calls, or a constrained step's deferred tail is issued launch by launch:
when the host is slower than the device, the GPU waits inside the span, and a profiler's kernel
timeline shows it idle (bench/busy_check.py measured 96 % busy from the span against 5 % from the
kernels, eager, SmolLM2 shape). So a step is cut into units at the points where the host's issue
can fall behind (after each piecewise segment and attention call; in an eager forward after every
attention kernel and decoder layer, and every leaf module or, with op units, every aten op that may
launch a kernel; between a constrained step's forward and its tail). At the end of each unit's issue
the host records a marker on an otherwise idle side stream, which fires at once, so its timestamp
is the moment the host finished issuing the unit; and an event on the compute stream, which fires
when the GPU finished it. A unit counts as busy only from the later of (the previous unit's end, its
own issue end) to its own end: with the host ahead, that is the unit's whole device time; with the
host behind, only what ran after the last launch reached the GPU. The figure is therefore a lower
bound that is exact when the host keeps ahead (the asynchronous loop's steady state, and any graph
replay), and it never calls a starved GPU busy.

On CPU every op is synchronous (the host cannot fall behind a device it is): the span is the step's
compute time, and no units are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# How finely an eager forward is cut: after every aten op ("op"), after every leaf module and layer
# ("leaf"), after every decoder layer ("layer"). Finer is closer to the kernels, and costs host time.
BusyUnits = Literal["op", "leaf", "layer"]
BUSY_UNITS: tuple[str, ...] = get_args(BusyUnits)
# Ring capacity per decoder layer for op units (a Llama layer issues about 40 non-view aten ops);
# past it a unit runs on into the next boundary (a lower figure, never a wrong one).
OP_UNITS_PER_LAYER = 96


def busy_ms(ends: Sequence[float], issued: Sequence[float]) -> float:
    """Busy time of a step from unit times in ms after its start: `ends[i]` when the GPU finished unit
    i, `issued[i]` when the host had issued it. Unit i counts from max(ends[i-1], issued[i]) (the
    step's start for i = 0) to ends[i], when positive."""
    assert len(ends) == len(issued)
    total, prev = 0.0, 0.0
    for end, iss in zip(ends, issued, strict=True):
        total += max(0.0, end - max(prev, iss))
        prev = max(prev, end)
    return total


class StepUnits:
    """One step's unit events (taken from a ring slot: the events are reused every few steps)."""

    def __init__(self, clock: StepClock, pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> None:
        self.clock = clock
        self._pairs = pairs
        self.used = 0

    def boundary(self) -> None:
        """The host has issued the unit so far: marker on the side stream, end on the compute stream.
        Past the ring slot's capacity the unit simply runs on into the next boundary."""
        if self.used >= len(self._pairs):
            return
        marker, end = self._pairs[self.used]
        marker.record(self.clock.marker_stream)
        end.record(self.clock.compute_stream)
        self.used += 1

    def close(self, done: torch.cuda.Event) -> None:
        """The last unit ends at `done` (recorded by the caller right after this)."""
        if self.used >= len(self._pairs):
            self.used -= 1  # the last pair becomes the step's end
        marker, _ = self._pairs[self.used]
        marker.record(self.clock.marker_stream)
        self._done = done

    def busy_ms(self, start: torch.cuda.Event) -> float:
        """After `done` completed: the step's busy time (see the module docstring)."""
        ends = [start.elapsed_time(end) for _, end in self._pairs[: self.used]]
        ends.append(start.elapsed_time(self._done))
        issued = [start.elapsed_time(marker) for marker, _ in self._pairs[: self.used + 1]]
        return busy_ms(ends, issued)


class StepClock:
    """Ring of unit events (as many slots as the runner's timing ring) and the side stream markers
    are recorded on; `hook_layers` cuts an eager forward at its decoder layers."""

    def __init__(self, compute_stream: torch.cuda.Stream, ring: int, max_units: int) -> None:
        self.compute_stream = compute_stream
        self.marker_stream = torch.cuda.Stream()
        self._ring = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for _ in range(max_units)] for _ in range(ring)]
        self.current: StepUnits | None = None  # the step an eager forward's layer hooks cut (else None)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def begin(self, index: int) -> StepUnits:
        return StepUnits(self, self._ring[index % len(self._ring)])

    def cut(self, units: StepUnits, ops: bool) -> _Cut:
        """`with clock.cut(units, ops):` around an eager forward: its hooks cut it into `units`, and with
        `ops` every aten op it issues does as well (OpBoundaries)."""
        return _Cut(self, units, ops)

    def hook_layers(self, layers: Sequence[torch.nn.Module], leaves: bool = True) -> None:
        """A boundary after each leaf module (projection, norm, activation...) of each layer, and after
        the layer, of an eager forward run while `current` is set (the runner sets it around eager
        forwards only: never while graphs are captured or replayed). Per leaf, not per layer: with the
        host behind, a unit counts only what ran after its last launch, so a layer-sized unit lost the
        GEMMs the GPU ran while the host was still issuing the layer (the 8B shape's eager steps read
        8.8% busy against the profiler's 26.6%, docs/benchmarks.md); a leaf is one GEMM or a few
        small kernels."""
        def after(_module: torch.nn.Module, _args: object, _out: object) -> None:
            if self.current is not None:
                self.current.boundary()

        for layer in layers:
            for leaf in leaf_modules(layer) if leaves else ():
                self._hooks.append(leaf.register_forward_hook(after))
            self._hooks.append(layer.register_forward_hook(after))

    def unhook(self) -> None:
        """Removes the hooks (an engine dropped while its model lives on, e.g. in a benchmark)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


class OpBoundaries(TorchDispatchMode):
    """A boundary of `units` after every aten op that is not a view (views launch nothing), entered
    by `StepClock.cut` around one eager forward. Leaf units lose, with the host behind, every kernel
    of a unit but its last: an unfused RMSNorm is seven aten ops, RoPE about ten, and the residual
    adds and the MLP's product fall into the next leaf's unit (on the 8B shape's eager steps leaf
    units read 4.7-5.5 points under the profiler, op units 1.2 over, docs/benchmarks.md). A Python
    dispatch mode is seen by every op, so it costs host time per op: an eager step took 1.8-2.4x as
    long, so op units are a diagnostic."""

    def __init__(self, units: StepUnits) -> None:
        super().__init__()
        self.units = units

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.units.boundary()
        return out


class _Cut:
    """The context `StepClock.cut` returns: sets `current` (and enters OpBoundaries) for one forward."""

    def __init__(self, clock: StepClock, units: StepUnits, ops: bool) -> None:
        self.clock, self.units = clock, units
        self.mode = OpBoundaries(units) if ops else None

    def __enter__(self) -> None:
        self.clock.current = self.units
        if self.mode is not None:
            self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            if self.mode is not None:
                self.mode.__exit__(*exc)
        finally:
            self.clock.current = None


def leaf_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of `module` with no children of their own, in registration order."""
    return [m for m in module.modules() if m is not module and next(m.children(), None) is None]


def units_per_forward(layers: Sequence[torch.nn.Module], units: BusyUnits = "leaf") -> int:
    """Boundaries an eager forward records: through `hook_layers` every leaf (with "leaf") and layer,
    two attention kernels per layer, and with "op" up to OP_UNITS_PER_LAYER aten ops per layer (op
    units hook no leaves: the ops already end there, and an empty unit still counts its own
    recording's few microseconds)."""
    assert units in BUSY_UNITS, units
    hooks = sum((len(leaf_modules(layer)) if units == "leaf" else 0) + 1 for layer in layers)
    return hooks + 2 * len(layers) + (OP_UNITS_PER_LAYER * len(layers) if units == "op" else 0)


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (`model.model.layers`), or none."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []

