"""Where the host's serial chain goes, part by part: every function between a step's result and the
next step's launch, timed inclusive, over the real Scheduler driving an in-process worker Engine
(bench/inprocess.py) at steady decode.

The chain across the processes is: the worker encodes step N's result, the core decodes it,
`accept_result` (`process_result` in older trees), `build_plan` and the plan's encode; the worker
decodes the plan and `Engine.launch` runs its checks, loads an I/O slot and issues the step. In one
process the link's sockets are
missing, so each plan and result here also goes through its wire encode and decode (timed as
`plan_encode`, `plan_decode`, `result_encode`, `result_decode`), which is what the link adds
besides ZeroMQ itself. Every part is wrapped with a perf_counter pair (about 0.3 us each, counted
in the part); `launch` is the whole of Engine.launch, its sub-parts are inside it, so sub-parts do
not add up to it exactly (the rest is launch's own lines). `take_events` (the rows settled once the
next step is launched) and `collect` are off the chain. Each figure is per steady decode step: the
difference between a run of `--new-tokens` and one of a quarter as many, over the steps between them.

    python -m bench.launch_parts --model random:smollm2-135m --rows 1024 256 [--new-tokens 256] [--json F]
    python -m bench.launch_parts --trees OLD_CHECKOUT . ...   # before/after in one invocation

On CPU (`--device cpu`, a one-layer tiny model by default) `launch` includes the forward.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.inprocess import greedy_requests, run_requests
from bench.records import cpu_header, write_record

# (part name, module, dotted attribute): wrapped in place, and where another module imported the
# function by name, there too (see _patch).
PARTS: list[tuple[str, str, str]] = [
    ("process_result", "scheduler_svc.core.scheduler", "Scheduler.process_result"),  # trees before the split
    ("accept_result", "scheduler_svc.core.scheduler", "Scheduler.accept_result"),  # on the chain
    ("take_events", "scheduler_svc.core.scheduler", "Scheduler.take_events"),  # after the next launch
    ("build_plan", "scheduler_svc.core.scheduler", "Scheduler.build_plan"),
    ("launch", "worker_svc.runner", "Engine.launch"),
    ("launch.check", "worker_svc.runner", "Engine._check"),
    ("launch.check.validate", "tandem.wire", "StepPlan.validate"),
    ("launch.check.rows_check", "worker_svc.row_state", "RowState._check"),
    ("launch.check.rows_apply", "worker_svc.row_state", "RowState._apply"),
    ("launch.check.penalty_check", "worker_svc.penalties", "PenaltyState.check"),
    ("launch.hints", "worker_svc.runner", "SamplingHints.of"),
    ("launch.penalty_stage", "worker_svc.penalties", "PenaltyState.stage"),
    ("launch.penalty_flags", "worker_svc.penalties", "PenaltyState.flags"),
    ("launch.row_layout", "worker_svc.attention", "row_layout"),
    ("launch.pad_decode", "worker_svc.graphs.cuda_graphs", "pad_decode_batch"),
    ("launch.slot_load", "worker_svc.io_slots", "IOSlot.load"),
    ("launch.graph_replay", "worker_svc.graphs.cuda_graphs", "DecodeGraphs.replay"),
    ("launch.clock_begin", "worker_svc.step_clock", "StepClock.begin"),
    ("launch.finish", "worker_svc.runner", "Engine._finish"),
    ("collect", "worker_svc.runner", "Engine.collect"),
]
WIRE_PARTS = ("plan_encode", "plan_decode", "result_encode", "result_decode")


class Timers:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms
        self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.ms.clear()
        self.calls.clear()


def _resolve(module: str, dotted: str) -> tuple[object, str, object]:
    owner = importlib.import_module(module)
    *path, attr = dotted.split(".")
    for p in path:
        owner = getattr(owner, p)
    return owner, attr, owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)


def _timed(name: str, fn, timers: Timers):
    clock = time.perf_counter

    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.add(name, 1000 * (clock() - t0))

    return wrapper


@contextlib.contextmanager
def _patch(timers: Timers) -> Iterator[None]:
    """Wraps every part; a plain function is also replaced where worker_svc.runner imported it."""
    runner = importlib.import_module("worker_svc.runner")
    undo: list[tuple[object, str, object]] = []
    try:
        for name, module, dotted in PARTS:
            try:
                owner, attr, orig = _resolve(module, dotted)
            except (AttributeError, KeyError):
                continue  # an older tree without this function: its part reads as absent
            wrapped = orig
            if isinstance(orig, staticmethod):
                wrapped = staticmethod(_timed(name, orig.__func__, timers))
            elif isinstance(orig, classmethod):
                wrapped = classmethod(_timed(name, orig.__func__, timers))
            else:
                wrapped = _timed(name, orig, timers)
            undo.append((owner, attr, orig))
            setattr(owner, attr, wrapped)
            if not isinstance(owner, type) and getattr(runner, attr, None) is orig:
                undo.append((runner, attr, orig))
                setattr(runner, attr, wrapped)
        yield
    finally:
        for owner, attr, orig in reversed(undo):
            setattr(owner, attr, orig)


def _wire_roundtrip(engine, timers: Timers) -> contextlib.AbstractContextManager:
    """Sends each plan and result through its wire encode and decode, as the link would."""
    from tandem import wire

    clock = time.perf_counter
    launch, collect = engine.launch, engine.collect

    def over_wire(message, kind: str):
        """`message` encoded and decoded again (its parts timed as `<kind>_encode` / `_decode`)."""
        t0 = clock()
        frames = message.encode()
        t1 = clock()
        frames = [bytes(f) if isinstance(f, memoryview) else f for f in frames]  # what arrives from a socket
        t2 = clock()
        _kind, header, arrays = wire.split(frames)
        decoded = type(message).decode(header, arrays)
        timers.add(f"{kind}_decode", 1000 * (clock() - t2))
        timers.add(f"{kind}_encode", 1000 * (t1 - t0))
        return decoded

    def launch_over_wire(plan):
        return launch(over_wire(plan, "plan"))

    def collect_over_wire():
        return over_wire(collect(), "result")

    @contextlib.contextmanager
    def cm():
        engine.launch, engine.collect = launch_over_wire, collect_over_wire
        try:
            yield
        finally:
            del engine.launch, engine.collect

    return cm()


def build_engine(model: str, device: str, rows: int, prompt_len: int, new_tokens: int):
    from bench.gpu_async import engine_sizes
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    blocks, max_num_tokens = engine_sizes(rows, prompt_len, new_tokens)
    if device == "cpu" and model == "tiny":
        from bench.host_parts import tiny_cpu_engine

        return tiny_cpu_engine(rows, blocks, max_num_tokens)
    loaded = load(model, device=device, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    if device.startswith("cuda"):
        from worker_svc import fusion

        fusion.apply(loaded.model)
    return Engine(loaded, EngineConfig(num_blocks=blocks, max_num_rows=rows, max_num_tokens=max_num_tokens), device)


def _run(engine, prompts, new_tokens: int, rounds: int) -> tuple[object, Timers]:
    """Best round (least wall time) of `rounds`: its loop stats and part timers."""
    best = None
    for _ in range(rounds):
        timers = Timers()
        with _patch(timers), _wire_roundtrip(engine, timers):
            stats = run_requests(engine, greedy_requests(prompts, new_tokens), 2)
        if best is None or stats.wall_s < best[0].wall_s:
            best = (stats, timers)
    return best


def measure(engine, rows: int, prompt_len: int, new_tokens: int, vocab: int, rounds: int) -> dict:
    """The parts per steady decode step: a run of `new_tokens` minus one of a quarter as many, per
    step of the difference, so that admission and prefill (the same in both) drop out."""
    from bench.gpu_async import prompts_for

    prompts = [[t % vocab for t in p] for p in prompts_for(rows, prompt_len)]
    run_requests(engine, greedy_requests(prompts, 4), 2)  # warm-up
    short, long = _run(engine, prompts, max(2, new_tokens // 4), rounds), _run(engine, prompts, new_tokens, rounds)
    steps = long[0].steps - short[0].steps
    assert steps > 0, "the longer run took no more steps"
    names = sorted(long[1].ms)
    wall = long[0].wall_s - short[0].wall_s
    entry = {
        "rows": rows, "steps": steps, "steps_long": long[0].steps, "steps_short": short[0].steps,
        "new_tokens": [max(2, new_tokens // 4), new_tokens], "wall_s": round(wall, 4),
        "ms_per_step": round(1000 * wall / steps, 4), "busy_ratio_long": round(long[0].busy_ratio, 4),
        "parts_ms_per_step": {k: round((long[1].ms[k] - short[1].ms.get(k, 0.0)) / steps, 4) for k in names},
        "calls_per_step": {k: round((long[1].calls[k] - short[1].calls.get(k, 0)) / steps, 3) for k in names},
    }
    p = entry["parts_ms_per_step"]
    chain = ("result_encode", "result_decode", "process_result", "accept_result", "build_plan", "plan_encode",
             "plan_decode", "launch")
    entry["serial_chain_ms"] = round(sum(p.get(k, 0.0) for k in chain), 4)
    # The chain's timed host parts alone: launch's own sub-parts in place of the whole launch, which on
    # CPU also runs the forward (so this is the figure two trees compare by on a machine without a GPU).
    launch_parts = sum(v for k, v in p.items() if k.startswith("launch.") and k.count(".") == 1)
    entry["host_chain_parts_ms"] = round(sum(p.get(k, 0.0) for k in chain if k != "launch") + launch_parts, 4)
    return entry


def _measure_here(args: argparse.Namespace, model: str) -> list[dict]:
    entries = []
    for rows in args.rows:
        engine = build_engine(model, args.device, rows, args.prompt_len, args.new_tokens)
        e = measure(engine, rows, args.prompt_len, args.new_tokens, engine.loaded.vocab_size, args.rounds)
        e["model"], e["device"] = model, args.device
        entries.append(e)
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return entries


def _measure_tree(tree: Path, argv: list[str]) -> list[dict]:
    """This file's measurement with `tree`'s code, in a child process (`python -P`, the tree first on
    its path): the code versions meet in one invocation, on one machine, one after the other."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "entries.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "proto"),
                                                            os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), *argv, "--child-out", str(out)],
                       env=env, check=True)
        return json.loads(out.read_text())


def _print(e: dict) -> None:
    print(f"{e.get('tree', '.')}: rows {e['rows']}: {e['ms_per_step']} ms/step (steady decode), "
          f"busy {e['busy_ratio_long']}, serial chain {e['serial_chain_ms']} ms, its timed host parts "
          f"{e['host_chain_parts_ms']} ms")
    for k, v in e["parts_ms_per_step"].items():
        print(f"  {k:28s} {v:8.4f} ms/step  ({e['calls_per_step'][k]} calls)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.launch_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:smollm2-135m", help="a model spec; 'tiny' with --device cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 512, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trees", nargs="+", default=None,
                   help="source trees to measure, each in a child process, in this order (an older checkout "
                   "first for a before/after); default: this tree, in this process")
    p.add_argument("--json", default=None)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model = args.model if args.device != "cpu" or args.model != "random:smollm2-135m" else "tiny"
    if args.child_out:
        import bench

        here = Path(bench.__file__).resolve().parent.parent
        Path(args.child_out).write_text(json.dumps([{**e, "tree": str(here)} for e in _measure_here(args, model)]))
        return 0
    if args.trees:
        child_argv = _without(_without(argv, "--trees", len(args.trees)), "--json", 1)
        entries = [e for tree in args.trees for e in _measure_tree(Path(tree).resolve(), child_argv)]
    else:
        entries = _measure_here(args, model)
    for e in entries:
        _print(e)
    if args.json:
        header = cpu_header("bench.launch_parts", argv)
        if args.device.startswith("cuda"):
            header["gpu"], header["torch"] = torch.cuda.get_device_name(), torch.__version__
        write_record(args.json, {**header, "entries": entries})
    return 0


def _without(argv: list[str], flag: str, nargs: int) -> list[str]:
    """`argv` less `flag` and the `nargs` values after it."""
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + nargs:]


if __name__ == "__main__":
    raise SystemExit(main())
