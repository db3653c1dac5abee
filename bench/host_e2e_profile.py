"""Where the scheduler side's time goes: profile capture and area summaries for bench/host_e2e.py.

The scheduler side is one process in old trees (`python -m scheduler_svc`: gRPC, detokenizing and the
engine loop together) and two in trees that have scheduler_svc/core.py: the front end (`python -m
scheduler_svc`: gRPC servicer, tokenizing, detokenizing, stop strings, metrics, the per-token loop
`EngineClient._on_outputs`) and its child, the core (`python -m scheduler_svc.core`: scheduler, KV blocks,
`Engine._on_result` / `_pump` / `_outputs`, the engine link), joined by a PAIR socket (core_link.py).
`Classifier(tree, role)` takes the role ("scheduler" = the one process of an old tree, "front" or "core")
and uses the rules of that layout.

Three sources:
- this file run as a script, `python bench/host_e2e_profile.py --sample OUT --interval-us N -m scheduler_svc
  ARGS`: runs the scheduler module as `-m` would (cwd first on sys.path, so the version's tree is what
  it imports) with a CPU-time sampler installed: SIGUSR1 starts a `setitimer(ITIMER_PROF)` timer, whose
  SIGPROF handler records the main thread's Python stack, so that samples are proportional to the
  process's CPU time (not to wall time); SIGUSR2 stops it and writes the folded stacks to OUT and
  OUT.json (samples, CPU time of the window, Python GC time measured by `gc.callbacks`). C code
  (grpc's Cython core, the tokenizers' Rust, syscalls) is charged to the Python frame that called it;
  a sample taken while the main thread waits in `select` is CPU of another thread (grpc's poller,
  libzmq's I/O thread). The core, which the front end starts itself (`sys.executable -m
  scheduler_svc.core`, environment inherited), gets the same sampler from `core_sitecustomize()`: a
  sitecustomize.py put on the front end's PYTHONPATH that installs it (`install_sampler`) in a process
  whose command line has the argument `scheduler_svc.core`, and in no other, writing where the
  environment variable SAMPLER_ENV says; the worker gets it likewise (`worker_sitecustomize_env`:
  the same file on its PYTHONPATH, WORKER_SAMPLER_ENV), summarised by its own-time frames only
  (`own_time_summary`), since the area rules are the scheduler side's;
- py-spy raw folded stacks (`py-spy record --format raw --threads --full-filenames [--native]`) taken
  from the running scheduler for one measured round. Each sample is given to ONE area (exclusive, so
  the fractions add up to 1): walking the stack from the innermost frame outwards, the first frame of
  the version's own code that a rule names decides (`Scheduler.build_plan`, `Engine._on_result`,
  `IncrementalDetokenizer._advance`, ...; the class-qualified name comes from the tree's own source
  via `ast`, so renamed or new helpers fall to their caller's area); a sample with no such frame
  goes to the innermost library it is in (gRPC's Cython core, pyzmq/libzmq, protobuf, asyncio);
  a sample inside CPython's cyclic garbage collector is "Python GC" wherever it was triggered.
  Inclusive (cumulative) shares of the main entry points are reported beside them.
- a cProfile file (`python -m cProfile -o FILE -m scheduler_svc ...`): own time (tottime) summed per
  area with the same rules applied to each function, plus the cumulative time of the entry points.

The area names group into what the host_e2e report needs: plan building, process_result, the
engine's per-token loop, detokenizing, stop strings, gRPC streaming, admission, ZeroMQ link + wire
codec (the engine link to the worker), core link (front end <-> core: the core's `Engine._outputs`,
`OutputBatch` encode/decode, `EngineClient._recv_loop`), Python GC, event loop, other.
"""

from __future__ import annotations

import ast
import gc
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------- capture


@contextmanager
def py_spy_recording(py_spy: str, pid: int, out: Path, rate: int, native: bool) -> Iterator[None]:
    """py-spy attached to `pid` for the duration of the block; raw folded stacks land in `out`."""
    log_path = out.with_suffix(".log")
    cmd = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--full-filenames",
           "--threads", "--output", str(out), *(["--native"] if native else [])]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "Sampling process" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"py-spy exited at once: {log_path.read_text()[-2000:]}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------------- areas

GROUPS = ("plan building", "process_result", "engine per-token", "detokenizing", "stop strings",
          "gRPC streaming", "admission", "zmq link + wire", "core link", "Python GC", "event loop",
          "other threads", "other")
# On the worker's critical path at pipeline depth 1: from a step's result arriving to the next plan sent
# (in the one scheduler process of an old tree, or in the core of a split one; the front end has none).
CRITICAL = ("plan building", "process_result", "zmq link + wire")
ROLES = ("scheduler", "front", "core")
EVENT_LOOP_C = "gRPC streaming: grpc aio Cython core (C code the event loop runs, no Python frame)"
EVENT_LOOP_PY = "gRPC streaming: asyncio futures/callbacks called from grpc aio's C core"
# The core serves no gRPC: there the same samples are the loop's own C work (asyncio's C tasks and futures)
CORE_LOOP_C = "event loop: C code the loop runs, no Python frame (the core has no gRPC: asyncio's C tasks/futures)"
CORE_LOOP_PY = "event loop: asyncio futures/callbacks called from C callbacks (core)"
MAIN_IDLE = "other threads: CPU of other threads while the main thread waits in select"

# Trees with scheduler_svc/core.py (front end + core): these rules go ahead of RULES (first match wins).
# engine.py now runs in the core: `_on_result` takes a step result (meter, process_result, then `_pump`
# sends the next plan, then `_outputs` builds the token arrays for the front end); the per-token loop is
# the front end's `EngineClient._on_outputs`, admission `EngineClient.submit` (front) + `Engine._on_submit`.
SPLIT_RULES: list[tuple[str, str, str]] = [
    # wire.py's array helpers serve both links here: their caller decides (StepPlan/StepResult, OutputBatch)
    ("proto/tandem/wire.py", r"^(pack_arrays|unpack_arrays|split)$", ""),
    ("scheduler_svc/engine.py", r"\._on_result$", "process_result: Engine._on_result (core: meter, dispatch)"),
    ("scheduler_svc/engine.py", r"\._outputs$", "core link: Engine._outputs (token arrays for the front end)"),
    # Trees whose process_result is split: the rows' Python that waits until the next plan is out.
    ("scheduler_svc/scheduler.py", r"\.(_settle|take_events)$", "core link: Scheduler._settle (rows after the plan)"),
    ("scheduler_svc/engine.py", r"\._on_submit$", "admission: Engine._on_submit (core)"),
    ("scheduler_svc/engine.py", r"\._recv_worker$", "zmq link + wire: Engine._recv_worker"),
    ("scheduler_svc/engine.py", r"\._recv_front$", "core link: Engine._recv_front (core)"),
    ("scheduler_svc/engine.py", r"\.(_on_abort|_on_hello|_on_disconnect|_lose_worker)$|^BusyMeter\.",
     "engine per-token: bookkeeping"),
    ("scheduler_svc/engine_client.py", r"\._on_outputs$", "engine per-token: EngineClient._on_outputs loop"),
    ("scheduler_svc/engine_client.py", r"\._record_finish$", "engine per-token: finish log + metrics"),
    ("scheduler_svc/engine_client.py", r"\.submit$", "admission"),
    ("scheduler_svc/engine_client.py", r"\.(_recv_loop|_dispatch)$", "core link: EngineClient._recv_loop"),
    ("scheduler_svc/engine_client.py", r"", "engine per-token: bookkeeping"),
    ("scheduler_svc/core_link.py", r"^OutputBatch\.encode$", "core link: OutputBatch.encode"),
    ("scheduler_svc/core_link.py", r"^OutputBatch\.decode$", "core link: OutputBatch.decode"),
    ("scheduler_svc/core_link.py", r"", "core link: CoreLink / pyzmq"),
]

# (path inside the tree, regex on the class-qualified function name, area). First match wins; a frame of
# the tree's code that no rule names is transparent: its caller decides.
RULES: list[tuple[str, str, str]] = [
    ("scheduler_svc/scheduler.py", r"\._emit$", "plan building: Scheduler._emit (arrays, StepPlan)"),
    ("scheduler_svc/scheduler.py",
     r"\.(build_plan|_schedule_decodes|_reserve|_fit_chunk|_make_room|_may_sample|_preempt)$",
     "plan building: Scheduler.build_plan (rows, KV blocks)"),
    ("scheduler_svc/scheduler.py", r"\.(process_result|accept_result|_end_row|_finish_reason|_logprobs)$",
     "process_result"),
    ("scheduler_svc/engine.py", r"\._pump$", "plan building: Engine._pump"),
    ("scheduler_svc/engine.py", r"\._on_result$", "engine per-token: Engine._on_result loop"),
    ("scheduler_svc/engine.py", r"\._record_finish$", "engine per-token: finish log + metrics"),
    ("scheduler_svc/engine.py", r"\.(_update_load|_check_idle|stats|_watchdog)$", "engine per-token: bookkeeping"),
    ("scheduler_svc/engine.py", r"\.submit$", "admission"),
    ("scheduler_svc/engine.py", r"\._recv_loop$", "zmq link + wire: Engine._recv_loop"),
    ("scheduler_svc/handle.py", r"\.take$", "gRPC streaming: servicer"),
    ("scheduler_svc/handle.py", r"", "engine per-token: RequestHandle"),
    ("scheduler_svc/metrics.py", r"", "engine per-token: finish log + metrics"),
    ("scheduler_svc/detokenizer.py", r"^StopStringMatcher\.", "stop strings"),
    ("scheduler_svc/detokenizer.py", r"^IncrementalDetokenizer\.", "detokenizing: IncrementalDetokenizer"),
    ("scheduler_svc/detokenizer.py", r"", "detokenizing: OutputText"),
    ("scheduler_svc/tokenizer.py", r"\.(decode|is_special|token_strings)$", "detokenizing: TandemTokenizer.decode"),
    ("scheduler_svc/tokenizer.py", r"", "admission"),
    ("scheduler_svc/validation.py", r"", "admission"),
    ("scheduler_svc/servicer.py", r"\.(_admit|_refuse)$", "admission"),
    ("scheduler_svc/servicer.py", r"", "gRPC streaming: servicer"),
    ("proto/tandem/wire.py", r"^StepPlan\.", "zmq link + wire: plan encode"),
    ("proto/tandem/wire.py", r"^StepResult\.", "zmq link + wire: result decode"),
    ("proto/tandem/wire.py", r"", "zmq link + wire: wire"),
    ("scheduler_svc/link.py", r"", "zmq link + wire: EngineLink / pyzmq"),
]

# Innermost library a sample is in, when no frame of the tree's code claims it: (regex on the frame's file
# or function, area).
LIBRARIES: list[tuple[str, str]] = [
    (r"cygrpc|/grpc/|grpc_", "gRPC streaming: grpc library (aio + C core)"),
    (r"/zmq/|libzmq|pyzmq", "zmq link + wire: EngineLink / pyzmq"),
    (r"google/protobuf|_upb|upb_", "gRPC streaming: protobuf"),
    (r"/tokenizers/", "detokenizing: tokenizers (Rust)"),
    (r"/structlog/|/logging/", "engine per-token: finish log + metrics"),
    (r"/numpy/|_multiarray", "other: numpy"),
    (r"asyncio", "event loop"),
]
STARTUP = re.compile(r"importlib|marshal\.loads|builtins\.(compile|exec|__build_class__)|/re/_|/typing\.py|"
                     r"/inspect\.py|_imp\.|posix\.stat|io\.open_code|BufferedReader|_runtime_protos|from_str")
GC = re.compile(r"^(gc_collect|collect_with_callback|collect_generations|gc_collect_main)")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int

    @property
    def python(self) -> bool:
        return self.file.endswith(".py")


def parse_frame(text: str) -> Frame:
    m = FRAME.match(text)
    if m is None:
        return Frame(text, "", 0)
    return Frame(m["func"], m["file"], int(m["line"] or 0))


@cache
def _functions(path: str) -> list[tuple[int, int, int, str]]:
    """(first line, last line, depth, qualified name) of every def in a source file."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    out: list[tuple[int, int, int, str]] = []

    def walk(node: ast.AST, prefix: str, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child.lineno, child.end_lineno or child.lineno, depth, name))
                walk(child, f"{name}.", depth + 1)
            else:
                walk(child, prefix, depth)

    walk(tree, "", 0)
    return out


def qualname(path: str, line: int, func: str) -> str:
    """Class-qualified name of the innermost def around `line` (decorators count as the def's lines)."""
    best: tuple[int, str] | None = None
    for first, last, depth, name in _functions(path):
        if first <= line <= last and (best is None or depth > best[0]):
            best = (depth, name)
    return best[1] if best is not None else func


def is_split(tree: Path) -> bool:
    """Whether the tree's scheduler side is two processes (front end + core): scheduler_svc/core.py, or
    scheduler_svc/core/__main__.py in trees grouped into core/ and frontend/ packages."""
    return (tree / "scheduler_svc" / "core.py").is_file() or (tree / "scheduler_svc" / "core" / "__main__.py").is_file()


# Trees grouped into scheduler_svc/core/ and scheduler_svc/frontend/: their paths, as the rules spell them
# (the flat layout's), so that one set of rules serves every tree.
GROUPED_PATHS = {"scheduler_svc/core/__main__.py": "scheduler_svc/core.py",
                 "scheduler_svc/frontend/admission.py": "scheduler_svc/frontend.py"}


def flat_path(rel: str) -> str:
    """A grouped tree's relative path in the flat layout (scheduler_svc/core/engine.py -> scheduler_svc/engine.py)."""
    if rel in GROUPED_PATHS:
        return GROUPED_PATHS[rel]
    for pkg in ("scheduler_svc/core/", "scheduler_svc/frontend/"):
        if rel.startswith(pkg):
            return "scheduler_svc/" + rel[len(pkg):]
    return rel


class Classifier:
    """Turns frames of one version's tree into areas; `role`: "scheduler" (an old tree's one process),
    "front" or "core" (a split tree's two)."""

    def __init__(self, tree: Path, role: str = "scheduler") -> None:
        assert role in ROLES, role
        self.root = str(tree.resolve()) + "/"
        self.role = role
        rules = (SPLIT_RULES if is_split(tree) else []) + RULES
        self.rules = [(path, re.compile(rx), area) for path, rx, area in rules]
        libraries = list(LIBRARIES)
        if role == "front":  # the front end's only ZeroMQ socket is the core link
            libraries.insert(0, (r"/zmq/|libzmq|pyzmq", "core link: CoreLink / pyzmq"))
        elif role == "core":  # two sockets here: the engine link and the core link
            libraries.insert(0, (r"/zmq/|libzmq|pyzmq", "zmq link + wire: pyzmq (either link)"))
        self.libraries = [(re.compile(rx), area) for rx, area in libraries]

    def relpath(self, frame: Frame) -> str | None:
        if frame.python and frame.file.startswith(self.root):
            return flat_path(frame.file[len(self.root):])
        return None

    def project_area(self, frame: Frame) -> tuple[str | None, str | None]:
        """(area, qualified name) of a frame of the tree's code; (None, None) for any other frame."""
        rel = self.relpath(frame)
        if rel is None:
            return None, None
        name = qualname(frame.file, frame.line, frame.func) if frame.line else frame.func
        for path, rx, area in self.rules:
            if rel == path and rx.search(name):
                return area, f"{rel}:{name}"
        return "", f"{rel}:{name}"  # ours, but transparent

    def library_area(self, frame: Frame) -> str | None:
        text = f"{frame.file} {frame.func}"
        for rx, area in self.libraries:
            if rx.search(text):
                return area
        return None

    def classify(self, frames: list[Frame], python_only: bool = False) -> tuple[str, list[str]]:
        """(area, the tree's qualified names on the stack, outermost first) of one sample (root first).
        `python_only`: the stacks have no native frames (sampler, py-spy without --native), so a sample
        whose innermost frame is the event loop running a callback is C code that callback ran."""
        if python_only and frames:
            leaf = frames[-1]
            if leaf.func == "on_gc" and leaf.file.endswith("host_e2e_profile.py"):
                return "Python GC", []  # a SIGPROF during a collection runs when it ends: in the gc callback
            if leaf.func == "select" and leaf.file.endswith("selectors.py"):
                return MAIN_IDLE, []
            if leaf.func == "_run" and leaf.file.endswith("asyncio/events.py"):
                return (CORE_LOOP_C if self.role == "core" else EVENT_LOOP_C), []
        names: list[str] = []
        area: str | None = None
        library: str | None = None
        first_ours: str | None = None
        for frame in reversed(frames):
            if GC.match(frame.func):
                area = area or "Python GC"
            got, name = self.project_area(frame)
            if name is not None:
                names.append(name)
                first_ours = first_ours or name
                if got and area is None:
                    area = got
            elif library is None and area is None and first_ours is None:
                library = self.library_area(frame)
        names.reverse()
        if area is None and library == "event loop" and python_only:
            # asyncio's own Python code called straight from a callback with no Python frame (C): grpc aio's
            # Cython core creating and resolving its futures
            runs = [i for i, f in enumerate(frames) if f.func == "_run" and f.file.endswith("asyncio/events.py")]
            if runs and all("/asyncio/" in f.file for f in frames[runs[-1] + 1:]):
                area = CORE_LOOP_PY if self.role == "core" else EVENT_LOOP_PY
        if area is None:
            area = library or (f"other: {first_ours.split(':')[0]}" if first_ours else "other")
        return area, names


def group_of(area: str) -> str:
    head = area.split(":", 1)[0]
    return head if head in GROUPS else "other"


# ---------------------------------------------------------------------------------------------- py-spy


def summarize_stacks(path: Path, tree: Path, sched_cpu_s: float, steps: int, rate: float,
                     thread_cpu_s: dict[str, float], python_only: bool, weighting: str,
                     role: str = "scheduler") -> dict[str, Any]:
    """Exclusive areas (fractions of all samples), groups, inclusive entry points, per-thread split, of one
    process (`role`); `sched_cpu_s` is that process's CPU time over the profiled rounds."""
    c = Classifier(tree, role)
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    area_leaves: dict[str, Counter[str]] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        thread = parts[0] if parts[0].startswith("thread (") else ""
        frames = [parse_frame(p) for p in (parts[1:] if thread else parts)]
        area, names = c.classify(frames, python_only)
        if thread and "MainThread" not in thread:
            # grpc.aio's poller (Cython around epoll + eventfd); any other Python thread by its name
            area = "gRPC streaming: grpc poller thread" if "_poll_wrapper" in thread else f"other: thread {thread}"
        total += n
        areas[area] += n
        threads[re.sub(r"^thread \(\d+\): ", "", thread) or "?"] += n
        for name in dict.fromkeys(names):
            inclusive[name] += n
        if frames:
            leaf = f"{frames[-1].func} ({Path(frames[-1].file).name}:{frames[-1].line})"
            leaves[leaf] += n
            area_leaves.setdefault(area, Counter())[leaf] += n
    if not total:
        return {"error": f"no samples in {path}"}
    groups: Counter[str] = Counter()
    for area, n in areas.items():
        groups[group_of(area)] += n
    ms_per_step = 1000 * sched_cpu_s / steps if steps else 0.0

    def share(n: int) -> dict[str, float]:
        return {"fraction": round(n / total, 4), "ms_per_step": round(ms_per_step * n / total, 3)}

    critical = sum(groups[g] for g in CRITICAL)
    return {
        "role": role,
        "samples": total,
        "sampled_s": round(total / rate, 3),
        "sched_cpu_s": sched_cpu_s,
        "coverage": round(total / rate / sched_cpu_s, 3) if sched_cpu_s else None,
        "weighting": weighting,
        "note": f"exclusive: each sample in one area; ms_per_step = fraction x the profiled rounds' CPU ms per "
                f"step of this process ({role})",
        "groups": {g: share(groups[g]) for g in GROUPS if groups[g]},
        # the front end of a split tree plans nothing: no such path through it
        **({} if role == "front" else {"critical_path_depth1": {**share(critical), "groups": list(CRITICAL)}}),
        "areas": {a: share(n) for a, n in areas.most_common()},
        "inclusive_top": {name: round(n / total, 4) for name, n in inclusive.most_common(30)},
        "threads_samples": dict(threads.most_common()),
        "threads_cpu_s": thread_cpu_s,
        "leaves_top": {k: round(n / total, 4) for k, n in leaves.most_common(20)},
        "area_leaves_top": {a: {k: round(n / total, 4) for k, n in c.most_common(6)}
                            for a, c in sorted(area_leaves.items(), key=lambda kv: -areas[kv[0]])},
    }


# -------------------------------------------------------------------------------------------- cProfile


def summarize_cprofile(path: Path, tree: Path, role: str = "scheduler") -> dict[str, Any]:
    """Own time per area (each function by the same rules, no call context) and entry points' cumulative."""
    import pstats

    c = Classifier(tree, role)
    stats = pstats.Stats(str(path)).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    areas: Counter[str] = Counter()
    cumulative: dict[str, float] = {}
    total = 0.0
    idle = 0.0
    for (file, line, func), (_cc, _nc, tt, ct, _callers) in stats.items():
        frame = Frame(func, file, line)
        if file == "~" and re.search(r"select\.epoll|'poll'|select\.select", func):
            idle += tt  # the event loop waiting: not work
            continue
        if GC.match(func):
            area = "Python GC"
        elif STARTUP.search(f"{file} {func}"):
            area = "other: start-up (imports, compiling)"
        elif file == "~" and "_contextvars.Context" in func:
            area = CORE_LOOP_C if role == "core" else EVENT_LOOP_C  # Handle._run's C callback, minus its Python
        else:
            area, name = c.project_area(frame)
            if name is not None:
                short = name.split(":", 1)[1]
                if re.search(r"(build_plan|process_result|_on_result|_on_outputs|GenerateStream|_emit|_advance)$",
                             short) or \
                        short in ("OutputText.push", "StopStringMatcher.push", "TandemTokenizer.decode"):
                    cumulative[name] = round(cumulative.get(name, 0.0) + ct, 4)
                area = area or f"other: {name.split(':')[0]}"
            else:
                area = c.library_area(frame) or ("event loop" if "select" in func or "epoll" in func else "other")
        areas[area] += tt
        total += tt
    groups: Counter[str] = Counter()
    for area, t in areas.items():
        groups[group_of(area)] += t
    return {
        "total_tottime_s": round(total, 3),
        "note": "cProfile own times, wall clock per call (with cProfile's per-call overhead), over the "
                "scheduler's whole life (start-up, warm-up, the round); the event loop's waiting is left out",
        "epoll_wait_s_left_out": round(idle, 3),
        "weighting": "cProfile own time (wall clock), whole scheduler life",
        "groups": {g: round(groups[g] / total, 4) for g in GROUPS if groups[g]},
        "areas": {a: round(t / total, 4) for a, t in areas.most_common()},
        "cumulative_s": dict(sorted(cumulative.items(), key=lambda kv: -kv[1])),
    }


def summarize_py_spy(path: Path, tree: Path, sched_cpu_s: float, steps: int, rate: int,
                     thread_cpu_s: dict[str, float], native: bool, role: str = "scheduler") -> dict[str, Any]:
    return summarize_stacks(path, tree, sched_cpu_s, steps, rate, thread_cpu_s, not native,
                            "py-spy: wall-clock samples of non-idle Python threads (its idle test is unreliable "
                            "here: see coverage), not CPU", role)


def summarize_sampler(path: Path, tree: Path, steps: int, thread_cpu_s: dict[str, float],
                      role: str = "scheduler") -> dict[str, Any]:
    meta = json.loads(path.with_suffix(".json").read_text())
    out = summarize_stacks(path, tree, meta["cpu_s"], steps, 1e6 / meta["interval_us"], thread_cpu_s, True,
                           "CPU time: SIGPROF from setitimer(ITIMER_PROF), main thread's Python stack", role)
    if "error" in out:  # no samples (a round shorter than the timer's tick): said, not a KeyError below
        return {**out, "samples": 0, "live_imports": meta.get("modules", {})}
    # ITIMER_PROF fires on the kernel's tick (CONFIG_HZ): fewer samples than asked, still in proportion to CPU
    out["effective_rate_hz"] = round(out["samples"] / meta["cpu_s"], 1) if meta["cpu_s"] else None
    out["coverage"] = None
    gc_frac = meta["gc_s"] / meta["cpu_s"] if meta["cpu_s"] else 0.0
    out["python_gc_measured"] = {
        "gc_s": meta["gc_s"], "collections": meta["gc_collections"], "fraction_of_cpu": round(gc_frac, 4),
        "ms_per_step": round(1000 * meta["gc_s"] / steps, 3) if steps else None,
        "note": "time inside CPython's cyclic GC (gc.callbacks); the samples charge it to the code whose "
                "allocation set it off, so it is inside the areas above, not beside them"}
    out["live_imports"] = meta.get("modules", {})
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    if "error" in summary:
        return f"(no profile: {summary['error']})"
    lines = [f"weighting: {summary.get('weighting', '?')}; samples {summary.get('samples')}", "",
             "| area | share | ms/step |", "| --- | ---: | ---: |"]
    for g, v in summary["groups"].items():
        frac, ms = (v["fraction"], v["ms_per_step"]) if isinstance(v, dict) else (v, None)
        lines.append(f"| **{g}** | {100 * frac:.1f}% | {'-' if ms is None else f'{ms:.2f}'} |")
        for a, w in summary["areas"].items():
            if group_of(a) == g and a != g:
                f2, m2 = (w["fraction"], w["ms_per_step"]) if isinstance(w, dict) else (w, None)
                lines.append(f"| &nbsp;&nbsp;{a} | {100 * f2:.1f}% | {'-' if m2 is None else f'{m2:.2f}'} |")
    crit = summary.get("critical_path_depth1")
    if crit:
        lines.append(f"| *result in -> next plan out ({' + '.join(crit['groups'])})* | {100 * crit['fraction']:.1f}% | "
                     f"{crit['ms_per_step']:.2f} |")
    gcm = summary.get("python_gc_measured")
    if gcm:
        lines.append(f"| *of all the above: inside Python GC (measured)* | {100 * gcm['fraction_of_cpu']:.1f}% | "
                     f"{gcm['ms_per_step']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the CPU sampler

SAMPLER_ENV = "TANDEM_BENCH_CORE_SAMPLER"  # "OUT INTERVAL_US": the core's sampler, set by core_sitecustomize
WORKER_SAMPLER_ENV = "TANDEM_BENCH_WORKER_SAMPLER"  # the same for the worker (worker_sitecustomize_env)
LIVE_MODULES = ("__main__", "scheduler_svc", "scheduler_svc.engine", "scheduler_svc.engine_client",
                "scheduler_svc.core", "scheduler_svc.scheduler", "scheduler_svc.core.engine",
                "scheduler_svc.frontend.engine_client", "scheduler_svc.core.scheduler", "tandem", "tandem.wire")

SITECUSTOMIZE = """\
# Written by bench/host_e2e.py: the CPU sampler of bench/host_e2e_profile.py in the scheduler's core, and in
# the worker when its variable is set; in no other process.
import os as _os


def _tandem_bench_core_sampler():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            args = f.read().split(b"\\0")
    except OSError:
        return
    spec = ""
    for env, module in (({env!r}, b"scheduler_svc.core"), ({worker_env!r}, b"worker_svc")):
        if module in args:
            spec = _os.environ.get(env, "")
    if not spec:
        return
    import importlib.util
    import sys
    from pathlib import Path
    m = importlib.util.spec_from_file_location("_tandem_bench_sampler", {module!r})
    mod = importlib.util.module_from_spec(m)
    sys.modules[m.name] = mod  # dataclasses look their module up there
    m.loader.exec_module(mod)
    out, interval_us = spec.rsplit(" ", 1)
    mod.install_sampler(Path(out), int(interval_us))


_tandem_bench_core_sampler()
"""


def core_sitecustomize(directory: Path, out: Path, interval_us: int, pythonpath: str) -> dict[str, str]:
    """Writes DIRECTORY/sitecustomize.py; returns the front end's environment additions (`pythonpath` with
    DIRECTORY at its end, still ahead of site-packages; SAMPLER_ENV), which its core inherits. Processes
    without the argument `scheduler_svc.core` load it and do nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    text = SITECUSTOMIZE.format(env=SAMPLER_ENV, worker_env=WORKER_SAMPLER_ENV, module=str(Path(__file__).resolve()))
    (directory / "sitecustomize.py").write_text(text)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, str(directory)])),
            SAMPLER_ENV: f"{out} {interval_us}"}


def worker_sitecustomize_env(directory: Path, out: Path, interval_us: int, pythonpath: str) -> dict[str, str]:
    """The worker's environment additions for the same sitecustomize.py (written by core_sitecustomize)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, str(directory)])),
            WORKER_SAMPLER_ENV: f"{out} {interval_us}"}


def own_time_summary(path: Path, steps: int, top: int = 25) -> dict[str, Any]:
    """Folded stacks of a process no area rules cover (the worker): samples per innermost frame and per
    frame anywhere on the stack (inclusive), as shares and ms per step of the sampled CPU time."""
    meta = json.loads(path.with_suffix(".json").read_text())
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f"{fr.func} ({fr.file})" for fr in map(parse_frame, stack.split(";"))]  # lines dropped
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    ms = 1000 * meta["cpu_s"] / steps if steps else 0.0

    def table(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "fraction": round(k / total, 4), "ms_per_step": round(ms * k / total, 3)}
                for f, k in c.most_common(top)] if total else []

    return {"samples": total, "cpu_s": meta["cpu_s"], "cpu_ms_per_step": round(ms, 3), "steps": steps,
            "own": table(own), "inclusive": table(incl)}


def install_sampler(out: Path, interval_us: int) -> None:
    """The CPU-time sampler in this process: SIGUSR1 starts it, SIGUSR2 writes OUT and OUT.json."""
    counts: Counter[str] = Counter()
    state: dict[str, Any] = {"on": False, "gc_t0": 0.0, "gc_s": 0.0, "gcs": Counter(), "cpu0": 0.0}

    def on_prof(_signum: int, frame: Any) -> None:
        stack = []
        while frame is not None:
            stack.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
            frame = frame.f_back
        counts[";".join(reversed(stack))] += 1

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if not state["on"]:
            return
        if phase == "start":
            state["gc_t0"] = time.thread_time()
        else:
            state["gc_s"] += time.thread_time() - state["gc_t0"]
            state["gcs"][str(info.get("generation"))] += 1

    def start(_signum: int, _frame: Any) -> None:
        counts.clear()
        state.update(on=True, gc_s=0.0, gcs=Counter(), cpu0=time.process_time())
        signal.setitimer(signal.ITIMER_PROF, interval_us / 1e6, interval_us / 1e6)

    def stop(_signum: int, _frame: Any) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        state["on"] = False
        out.write_text("".join(f"{stack} {n}\n" for stack, n in counts.items()))
        mods = {m: getattr(sys.modules.get(m), "__file__", None) for m in LIVE_MODULES}
        meta = {"interval_us": interval_us, "samples": sum(counts.values()), "cpu_s": time.process_time() -
                state["cpu0"], "gc_s": state["gc_s"], "gc_collections": dict(state["gcs"]), "modules": mods}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, out.with_suffix(".json"))

    signal.signal(signal.SIGPROF, on_prof)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    gc.callbacks.append(on_gc)


def _sampler_main(argv: list[str]) -> None:
    """`--sample OUT --interval-us N -m MODULE ARGS...`: MODULE as `python -m` runs it, sampled on signal."""
    if len(argv) < 6 or argv[0] != "--sample" or argv[2] != "--interval-us" or argv[4] != "-m":
        raise SystemExit("usage: host_e2e_profile.py --sample OUT --interval-us N -m MODULE [ARGS...]")
    out, interval_us, module, rest = Path(argv[1]), int(argv[3]), argv[5], argv[6:]
    install_sampler(out, interval_us)
    sys.argv = [module, *rest]
    sys.path[0] = os.getcwd()  # as `python -m`: the working directory (the version's tree), not bench/
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _sampler_main(sys.argv[1:])
