"""Scheduler-side CPU time per engine step at 1024 concurrent gRPC streams, two code versions in one run.

What it measures: the whole CPU time (user + system, all threads) of the scheduler side per engine step
and per generated token, while N (default 1024) GenerateStream RPCs run at once against a real
scheduler + worker pair on this CPU machine. The scheduler side is whatever `python -m scheduler_svc`
runs as:
- one process in older trees (`before`, f31f37b): planning, result processing, detokenizing, stop
  strings, gRPC streaming and the ZeroMQ link in one event loop;
- two processes in trees with scheduler_svc/core.py (63d89ac and later): the front end (`python -m
  scheduler_svc`: gRPC servicer, tokenizing, detokenizing, stop strings, metrics, the per-token loop
  `EngineClient._on_outputs`) and its child, the core (`python -m scheduler_svc.core`, started by the
  front end: scheduler, KV blocks, `Engine._on_result` / `_pump` / `_outputs`, the engine link the
  worker connects to), over a private PAIR socket (scheduler_svc/core_link.py). The core is found as
  the child of the scheduler process (/proc/<pid>/task/*/children) whose command line has the
  argument `scheduler_svc.core`; a split tree whose core is not found fails.
The headline, scheduler-side CPU ms per step, is front end + core (the one process of `before`), so
the two versions compare as the same work. For a split tree the front end's and the core's shares are
reported apart: the core's CPU per step is what now sits on the worker's (on a GPU machine: the
GPU's) critical path, from a step's result to the next plan; the front end runs beside it, and when it
lags behind, the core keeps the worker fed and the front end merges the backlog of tokens into fewer
stream messages (which is why messages are counted against tokens).

The same workload runs on two code versions, one after the other:

- `before`: a git ref (`--before-ref`, default f31f37b) checked out with `git worktree add --detach`
  into a temporary directory (removed afterwards);
- `after`: the current working tree, copied (tracked and untracked, not ignored files) into a
  temporary directory at start-up so that edits made while the benchmark runs cannot mix versions
  (`--live-after` runs the working tree in place instead); its HEAD, dirty files and a hash of its
  diff against HEAD go into the record.

How: each version's scheduler and worker are started as separate processes with that tree as their
working directory and `PYTHONPATH=<tree>:<tree>/proto` ahead of the editable install (the core
inherits the scheduler's cwd and environment), sized for the N rows (`--max-num-rows`,
`--max-num-tokens`, `--num-blocks`, `--max-waiting`), serving a tiny random Llama
(`random:<config.json>` written here: hidden 64, 2 layers, a vocabulary of SmolLM2's first 8192 ids;
random models borrow the whole SmolLM2 tokenizer, which the scheduler decodes with) so that a step's
forward stays short while every row still costs the scheduler its full per-token work. One warm-up
round of N streams (a few tokens each) goes first; then each measured round sends N streams at once
(seeded random prompts of `--prompt-len` token ids, `--max-new-tokens` tokens, ignore_eos,
temperature 0) from this process (the current tree's stubs: the public API is the same) over a few
gRPC connections. Around each round it reads utime + stime of the scheduler (front end), its core, the
worker and this client from /proc/<pid>/stat (per thread too, from /proc/<pid>/task), the engine's
step count from GetStats (`steps`: step results the engine received; a split tree's front end asks
its core), and counts the stream messages and tokens the client received.

CPU pinning (with two or more CPUs; `--no-pin` leaves placement to the OS): the whole scheduler side
on the first CPU, the worker (one torch thread per CPU it gets) and this client on the others. The
scheduler process is started with that CPU set (set on this thread just before the fork), so every
thread and child it starts, the core included, inherits it; once the core is found its threads' CPU
sets are checked and, if they differ, set (recorded as `core_pinning`). On this 2-CPU machine the front
end and the core therefore share CPU 0: their CPU times are each one's own work, but wall time and
worker busy ratio are those of a scheduler side confined to one core (a real deployment gives the
core a CPU of its own).

Reported per version: scheduler-side CPU ms per step (front end + core; the headline), for a split
tree the front end's and the core's ms per step, scheduler-side CPU us per generated token, steps,
wall time, tokens, stream messages (tokens per message), worker CPU and busy ratio, client CPU, and
the busiest threads of each process.

How the import tree is verified (all recorded; a mismatch fails that version):
1. before any server starts, a probe `python -c "import scheduler_svc, worker_svc, client, tandem,
   tandem.wire, tandem.v1.api_pb2 (and scheduler_svc.core / engine_client where the tree has them);
   print(their __file__)"` runs with exactly the servers' command environment (same interpreter, cwd and
   PYTHONPATH); every path must lie inside that version's tree;
2. when py-spy is installed, `py-spy dump --full-filenames` of the running scheduler, core and worker
   lists the source files of their live frames (<tree>/scheduler_svc/__main__.py,
   <tree>/scheduler_svc/core.py, <tree>/worker_svc/loop.py, ...), which must lie inside the tree too;
3. the profiled processes (`--profile`, sampler) report `sys.modules[...].__file__` of scheduler_svc,
   its engine / engine_client / core, tandem and tandem.wire from inside themselves; they must be the
   tree's.

`--profile` adds a breakdown of where the scheduler side's time goes, from rounds that are reported
apart and never mixed into the CPU-per-step numbers above (bench/host_e2e_profile.py does the capture
and the areas: plan building, process_result, the per-token loop, detokenizing, stop strings, gRPC
streaming, admission, ZeroMQ engine link + wire codec, the core link, Python GC, event loop, other
threads):
- `--profiler sampler` (default): a second server per version whose scheduler is started through
  bench/host_e2e_profile.py, which runs `scheduler_svc` as `-m` does (its tree first on sys.path) with a
  CPU-time sampler (SIGPROF from `setitimer(ITIMER_PROF)`, so samples follow CPU time, not wall time;
  GC time measured by `gc.callbacks`), switched on by SIGUSR1 and off by SIGUSR2 around
  `--profile-rounds` rounds after the warm-up. C code (grpc's Cython core, tokenizers' Rust, syscalls)
  is charged to its Python caller: a sample whose innermost frame is the event loop running a callback
  is grpc aio's Cython core (the only C callbacks there that run no Python code; py-spy's native
  frames show them as cygrpc). A split tree's core is sampled too, with its own breakdown: the front
  end starts it itself (`sys.executable -m scheduler_svc.core`), so a sitecustomize.py on the front
  end's PYTHONPATH (written here, bench/host_e2e_profile.py `core_sitecustomize`) installs the same
  sampler in the process whose argv has `scheduler_svc.core`, and both get the signals;
- `--profiler py-spy`: `py-spy record --native` attached to the measured server's scheduler (and core)
  for one more round (native frames: sendmsg, gc, cygrpc visible); its samples are wall-clock ones
  (its idle detection keeps threads that wait in epoll), so its shares weigh waiting too;
- `--profiler cprofile`: a second server whose scheduler runs under `python -m cProfile -o FILE -m
  scheduler_svc` for its whole life (written on SIGTERM: the scheduler drains, `main` returns, cProfile
  dumps); own time per area, wall clock, with cProfile's own per-call overhead. The front end only:
  a split tree's core runs unprofiled (its CPU time is still measured).

    python -m bench.host_e2e [--before-ref f31f37b] [--rows 1024] [--max-new-tokens 48] [--repeats 2]
                             [--profile] [--json docs/bench/host_e2e.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.host_e2e_profile import is_split
from bench.records import fmt, write_record

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A tiny Llama: small hidden size so that the forward of 1024 rows stays short on two cores. Its vocabulary
# is the first 8192 ids of SmolLM2's (the tokenizer random models borrow, all 49152 ids of it, is what the
# scheduler decodes with): sampled ids are real, common tokens, and the worker's logits and sampling over
# 1024 rows stay cheap (the full 49152 made each step ~4x slower on the worker, not on the scheduler).
TINY_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 8192,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
}
FIRST_ORDINARY_TOKEN = 17  # SmolLM2's ids 0..16 are special tokens: prompts avoid them


# ---------------------------------------------------------------------------------------------- trees


@dataclass
class Tree:
    """One code version: where its files are and what they are."""

    code: str  # "before" | "after"
    path: Path
    describe: dict[str, Any] = field(default_factory=dict)
    imports: dict[str, str] = field(default_factory=dict)  # module -> __file__, from the probe

    def env(self) -> dict[str, str]:
        """The environment of every process of this version: its tree first on the path."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONHOME")}
        parts = [str(self.path), str(self.path / "proto")]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"
        return env


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def add_worktree(ref: str, parent: Path, code: str = "before") -> Tree:
    path = parent / code
    _git("worktree", "add", "--detach", str(path), ref)
    sha = _git("rev-parse", "HEAD", cwd=path).strip()
    subject = _git("log", "-1", "--format=%s", cwd=path).strip()
    return Tree(code, path, {"source": "git worktree", "ref": ref, "commit": sha, "subject": subject[:200]})


def remove_worktree(tree: Tree) -> None:
    try:
        _git("worktree", "remove", "--force", str(tree.path))
    except subprocess.CalledProcessError as exc:
        print(f"git worktree remove failed ({exc.stderr.strip()}); pruning", file=sys.stderr)
        shutil.rmtree(tree.path, ignore_errors=True)
        _git("worktree", "prune")


def working_tree_facts() -> dict[str, Any]:
    head = _git("rev-parse", "HEAD").strip()
    dirty = [line for line in _git("status", "--porcelain").splitlines() if line.strip()]
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True).stdout
    return {"head": head, "dirty": dirty[:200], "num_dirty": len(dirty),
            "diff_vs_head_sha256": hashlib.sha256(diff).hexdigest() if diff else None}


def snapshot_working_tree(parent: Path) -> Tree:
    """Copies the working tree's tracked and untracked (not ignored) files, as they are now."""
    facts = working_tree_facts()
    path = parent / "after"
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, names):
        src = REPO / name
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        dst = path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return Tree("after", path, {"source": str(REPO), "snapshot": True, **facts})


PROBE = """
import importlib, json, sys
import scheduler_svc, worker_svc, client, tandem, tandem.wire, tandem.v1.api_pb2
mods = ["scheduler_svc", "worker_svc", "client", "tandem", "tandem.wire", "tandem.v1.api_pb2"]
for m in sys.argv[1:]:
    importlib.import_module(m)
    mods.append(m)
print(json.dumps({m: sys.modules[m].__file__ for m in mods}))
"""
# Probed too where the tree has them (split trees). Chosen by the tree's files, not by find_spec: the editable
# install's finder would find the working tree's scheduler_svc/core.py for a tree that has none. The engine module is
# scheduler_svc/engine.py in flat trees, scheduler_svc/core/engine.py in trees grouped into core/ and frontend/.
SPLIT_MODULES = {"scheduler_svc.engine": "scheduler_svc/engine.py", "scheduler_svc.core.engine":
                 "scheduler_svc/core/engine.py",
                 "scheduler_svc.core": "scheduler_svc/core.py", "scheduler_svc.engine_client":
                 "scheduler_svc/engine_client.py", "scheduler_svc.core_link": "scheduler_svc/core_link.py",
                 "scheduler_svc.core.__main__": "scheduler_svc/core/__main__.py",
                 "scheduler_svc.frontend.engine_client": "scheduler_svc/frontend/engine_client.py",
                 "scheduler_svc.core.core_link": "scheduler_svc/core/core_link.py",
                 "tandem.v1.core_pb2": "proto/tandem/v1/core_pb2.py"}


def probe_imports(tree: Tree) -> None:
    """Runs the import probe in the servers' environment; raises unless every module is the tree's."""
    extra = [m for m, f in SPLIT_MODULES.items() if (tree.path / f).is_file()]
    out = subprocess.run([sys.executable, "-c", PROBE, *extra], cwd=tree.path, env=tree.env(), capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"import probe failed in {tree.path}:\n{out.stderr[-3000:]}")
    tree.imports = json.loads(out.stdout.strip().splitlines()[-1])
    root = str(tree.path.resolve()) + os.sep
    wrong = {m: f for m, f in tree.imports.items() if not str(Path(f).resolve()).startswith(root)}
    if wrong:
        raise RuntimeError(f"{tree.code}: modules imported from outside {tree.path}: {wrong}")


# ------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a whole process (every thread, live or ended), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_s(pid: int) -> dict[str, float]:
    """utime + stime per live thread, keyed "tid:name"."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
            fields = tail.split()
            out[f"{tid}:{head.split('(', 1)[1]}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def child_pids(pid: int) -> list[int]:
    """Live children of a process (those any of its threads started)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(set(out))


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def find_core(scheduler_pid: int) -> int | None:
    """The scheduler's core: its child whose command line has the argument `scheduler_svc.core`."""
    cores = [c for c in child_pids(scheduler_pid) if "scheduler_svc.core" in cmdline(c)]
    if len(cores) > 1:
        raise RuntimeError(f"scheduler {scheduler_pid} has {len(cores)} core processes: {cores}")
    return cores[0] if cores else None


def pin_pid(pid: int, cpus: list[int]) -> None:
    """Every live thread of another process onto `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, OSError):
            continue


def pin_process(cpus: list[int]) -> None:
    """Every thread of this process onto `cpus` (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, OSError):
            continue


def allowed_cpus(pid: int) -> list[str]:
    """The distinct CPU sets (Cpus_allowed_list) of a process's threads."""
    sets = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        sets.update(re.findall(r"^Cpus_allowed_list:\s*(\S+)", status, re.M))
    return sorted(sets)


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def find_py_spy() -> str | None:
    venv = Path(sys.executable).parent / "py-spy"
    return str(venv) if venv.is_file() else shutil.which("py-spy")


@dataclass
class Settings:
    rows: int
    prompt_len: tuple[int, int]
    max_new_tokens: int
    warmup_new_tokens: int
    repeats: int
    seed: int
    channels: int
    pipeline_depth: int
    max_num_tokens: int
    num_blocks: int
    block_size: int
    stop: list[str]
    model_config: dict[str, Any]
    extra_scheduler_args: list[str]
    extra_worker_args: list[str]
    # CPU pinning: the scheduler alone on `scheduler_cpus`, the worker (with as many torch threads as it
    # has CPUs) and this client on `other_cpus`; empty = no pinning.
    scheduler_cpus: list[int] = field(default_factory=list)
    other_cpus: list[int] = field(default_factory=list)

    def scheduler_args(self) -> list[str]:
        return ["--pipeline-depth", str(self.pipeline_depth), "--max-waiting", str(2 * self.rows + 64),
                "--max-num-rows", str(self.rows), "--max-num-tokens", str(self.max_num_tokens),
                "--max-concurrent-rpcs", str(4 * self.rows + 64), "--log-level", "WARNING",
                *self.extra_scheduler_args]

    def worker_args(self) -> list[str]:
        return ["--device", "cpu", "--max-num-rows", str(self.rows), "--max-num-tokens", str(self.max_num_tokens),
                "--num-blocks", str(self.num_blocks), "--block-size", str(self.block_size), "--log-level",
                "WARNING", *self.extra_worker_args]


class Server:
    """One version's scheduler + worker, started from its tree; `scheduler_prefix` wraps the scheduler
    (e.g. `-m cProfile -o FILE`)."""

    def __init__(self, tree: Tree, workdir: Path, model: str, settings: Settings,
                 scheduler_prefix: list[str] | None = None, tag: str = "",
                 scheduler_env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None) -> None:
        self.tree, self.model, self.settings = tree, model, settings
        self.split = is_split(tree.path)  # front end + core
        self.scheduler_env = scheduler_env or {}
        self.worker_env = worker_env or {}
        self.core_pid: int | None = None
        self.core_pinning: str | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tree.code}{tag}-", dir=workdir))
        os.chmod(self.dir, 0o700)
        self.address = f"127.0.0.1:{free_port()}"
        self.engine_address = f"ipc://{self.dir}/engine.sock"
        self.prefix = scheduler_prefix or []
        self.scheduler: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._logs: list[Any] = []

    def _spawn(self, name: str, argv: list[str], cpus: list[int], env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        self._logs.append(log)
        # The child inherits this thread's CPU set at fork, before it starts any thread of its own.
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            return subprocess.Popen([sys.executable, *argv], cwd=self.tree.path, env={**self.tree.env(), **(env or {})},
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            if cpus:
                pin_process(self.settings.other_cpus or cpus)

    def start(self, timeout: float = 600.0) -> None:
        s = self.settings
        # The scheduler's CPU set is inherited by every thread and process it starts: its core too.
        self.scheduler = self._spawn("scheduler", [
            *self.prefix, "-m", "scheduler_svc", "--address", self.address, "--engine-address", self.engine_address,
            *s.scheduler_args()], s.scheduler_cpus, self.scheduler_env)
        threads = {"OMP_NUM_THREADS": str(len(s.other_cpus))} if s.other_cpus else {}
        self.worker = self._spawn("worker", [
            "-m", "worker_svc", "--model", self.model, "--engine-address", self.engine_address,
            *s.worker_args()], s.other_cpus, {**threads, **self.worker_env})
        self.wait_serving(timeout)
        if self.split:
            self.core_pid = find_core(self.scheduler_pid)  # SERVING: the worker is connected to the core
            if self.core_pid is None:
                raise RuntimeError(f"{self.tree.code}: no scheduler_svc.core child of the scheduler "
                                   f"{self.scheduler_pid}\n{self.logs()}")
            if s.scheduler_cpus:
                want = [",".join(map(str, s.scheduler_cpus))] if len(s.scheduler_cpus) == 1 else None
                got = allowed_cpus(self.core_pid)
                if want is not None and got == want:
                    self.core_pinning = f"inherited from the scheduler process (CPUs {got})"
                else:
                    pin_pid(self.core_pid, s.scheduler_cpus)
                    self.core_pinning = (f"set after start (had {got}, now {allowed_cpus(self.core_pid)}; "
                                         f"threads it starts later inherit it)")

    def wait_serving(self, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                self.check_alive()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.tree.code}: not SERVING after {timeout:.0f} s\n{self.logs()}")
                time.sleep(0.25)

    def check_alive(self) -> None:
        for name, proc in (("scheduler", self.scheduler), ("worker", self.worker)):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.tree.code} {name} exited with {proc.returncode}\n{self.logs()}")
        if self.core_pid is not None and self.core_pid not in child_pids(self.scheduler_pid):
            raise RuntimeError(f"{self.tree.code} core {self.core_pid} is gone\n{self.logs()}")

    @property
    def scheduler_pid(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.pid

    @property
    def worker_pid(self) -> int:
        assert self.worker is not None
        return self.worker.pid

    def logs(self, tail: int = 4000) -> str:
        out = []
        for f in self._logs:
            f.flush()
            out.append(f"--- {Path(f.name).name} ---\n" + Path(f.name).read_text(errors="replace")[-tail:])
        return "\n".join(out)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM both (the worker first), as `tandem serve` does; the scheduler drains and exits 0."""
        for proc in (self.worker, self.scheduler):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.worker, self.scheduler):
            if proc is not None:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # The scheduler stops its core; one that outlived it (reparented) is ended here, by its pid.
        if self.core_pid is not None and "scheduler_svc.core" in cmdline(self.core_pid):
            deadline = time.monotonic() + 10
            while "scheduler_svc.core" in cmdline(self.core_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if "scheduler_svc.core" in cmdline(self.core_pid):
                print(f"{self.tree.code}: core {self.core_pid} outlived its scheduler; killing it", file=sys.stderr)
                try:
                    os.kill(self.core_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for f in self._logs:
            f.close()


def verify_live_imports(server: Server, py_spy: str | None) -> dict[str, Any]:
    """py-spy dump of the running processes: the source files of their live frames must be the tree's."""
    if py_spy is None:
        return {"checked": False, "why": "py-spy not installed"}
    root = str(server.tree.path.resolve())
    report: dict[str, Any] = {"checked": True}
    procs = [("scheduler", server.scheduler_pid, "scheduler_svc"), ("worker", server.worker_pid, "worker_svc")]
    if server.core_pid is not None:
        procs.insert(1, ("core", server.core_pid, "scheduler_svc"))
    for name, pid, pkg in procs:
        out = subprocess.run([py_spy, "dump", "--full-filenames", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=60)
        files = sorted(set(re.findall(r"\(([^()\s]+\.py):\d+\)", out.stdout)))
        ours = [f for f in files if f"/{pkg}/" in f or "/tandem/" in f]
        outside = [f for f in ours if not str(Path(f).resolve()).startswith(root)]
        report[name] = {"project_files_in_stack": ours, "outside_tree": outside}
        if out.returncode != 0:
            report[name]["error"] = out.stderr.strip()[-500:]
        elif outside:
            raise RuntimeError(f"{server.tree.code} {name} runs code from outside {root}: {outside}")
    return report


# ---------------------------------------------------------------------------------------------- client


def make_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@dataclass
class RoundResult:
    wall_s: float
    tokens: int
    messages: int
    errors: list[str]
    ttft_s: list[float]


async def stream_round(stubs: list[Any], prompts: list[list[int]], max_new_tokens: int, stop: list[str],
                       timeout: float) -> RoundResult:
    """All prompts as GenerateStream RPCs at once; counts tokens and messages as they arrive."""
    from tandem.v1 import api_pb2

    async def one(i: int, prompt: list[int]) -> tuple[int, int, float, str | None]:
        req = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=prompt), max_new_tokens=max_new_tokens,
                                      temperature=0.0, ignore_eos=True, stop=stop, request_id=f"b{i}")
        tokens = messages = 0
        first = 0.0
        t0 = time.perf_counter()
        try:
            async for resp in stubs[i % len(stubs)].GenerateStream(req, timeout=timeout):
                if not messages:
                    first = time.perf_counter() - t0
                messages += 1
                tokens += len(resp.token_ids)
        except Exception as exc:  # grpc.aio.AioRpcError: one failed stream must not hide the rest
            return tokens, messages, first, f"{type(exc).__name__}: {str(exc)[:300]}"
        return tokens, messages, first, None

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    errors = [e for *_, e in results if e is not None]
    return RoundResult(wall, sum(r[0] for r in results), sum(r[1] for r in results), errors[:5] + (
        [f"... {len(errors) - 5} more"] if len(errors) > 5 else []), [r[2] for r in results])


async def get_stats(stub: Any) -> Any:
    from tandem.v1 import api_pb2

    return await stub.GetStats(api_pb2.GetStatsRequest(), timeout=30)


async def wait_idle(stub: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        st = await get_stats(stub)
        if (st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_free == st.kv_blocks_total) or \
                time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------------------------- measure


@dataclass
class Measured:
    """One measured round of one version."""

    wall_s: float
    steps: int
    tokens: int
    messages: int
    sched_cpu_s: float  # the scheduler side: front end + core (the one process of an unsplit tree)
    front_cpu_s: float  # the scheduler process itself (`python -m scheduler_svc`)
    core_cpu_s: float | None  # its child `python -m scheduler_svc.core`; None: no core in this tree
    worker_cpu_s: float
    client_cpu_s: float
    busy_ratio_session: float
    sched_threads_cpu_s: dict[str, float]  # the scheduler process's threads
    core_threads_cpu_s: dict[str, float]
    mean_ttft_s: float
    errors: list[str]
    load_avg_1m: float

    @property
    def sched_cpu_ms_per_step(self) -> float:
        return 1000 * self.sched_cpu_s / self.steps if self.steps else float("nan")

    @property
    def front_cpu_ms_per_step(self) -> float:
        return 1000 * self.front_cpu_s / self.steps if self.steps else float("nan")

    @property
    def core_cpu_ms_per_step(self) -> float | None:
        if self.core_cpu_s is None:
            return None
        return 1000 * self.core_cpu_s / self.steps if self.steps else float("nan")

    def line(self) -> str:
        split = "" if self.core_cpu_s is None else \
            f" (front end {self.front_cpu_ms_per_step:.2f} + core {self.core_cpu_ms_per_step:.2f})"
        return f"{self.sched_cpu_ms_per_step:.2f} ms scheduler-side CPU/step{split}"


@dataclass
class Entry:
    code: str
    rows: int
    tree: dict[str, Any] = field(default_factory=dict)
    imports_probe: dict[str, str] = field(default_factory=dict)
    imports_live: dict[str, Any] = field(default_factory=dict)
    pipeline_depth: int | None = None
    cpus_allowed: dict[str, list[str]] = field(default_factory=dict)  # per process, its threads' CPU sets
    split: bool = False  # the scheduler side is front end + core
    core_pinning: str | None = None
    # headline: median over the measured rounds; sched_* = the whole scheduler side (front end + core)
    sched_cpu_ms_per_step: float | None = None
    front_cpu_ms_per_step: float | None = None  # the scheduler process alone (split trees)
    core_cpu_ms_per_step: float | None = None  # the core alone: on the worker's critical path
    sched_cpu_us_per_token: float | None = None
    front_cpu_us_per_token: float | None = None
    core_cpu_us_per_token: float | None = None
    sched_cpu_s: float | None = None
    front_cpu_s: float | None = None
    core_cpu_s: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    tokens: int | None = None
    messages: int | None = None
    tokens_per_message: float | None = None
    worker_cpu_s: float | None = None
    worker_cpu_ms_per_step: float | None = None
    worker_busy_ratio: float | None = None
    client_cpu_s: float | None = None
    sched_share_of_wall: float | None = None  # scheduler-side CPU s / wall s: 1.0 = one core all the time
    front_share_of_wall: float | None = None
    core_share_of_wall: float | None = None
    top_sched_threads_cpu_s: dict[str, float] = field(default_factory=dict)  # the scheduler process's
    top_core_threads_cpu_s: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    error: str | None = None

    def finish(self, rounds: list[Measured]) -> None:
        self.rounds = [{**asdict(r), "sched_cpu_ms_per_step": r.sched_cpu_ms_per_step,
                        "front_cpu_ms_per_step": r.front_cpu_ms_per_step,
                        "core_cpu_ms_per_step": r.core_cpu_ms_per_step} for r in rounds]
        ok = [r for r in rounds if r.steps > 0]
        if not ok:
            return

        def med(values: list[float]) -> float:
            return float(statistics.median(values))

        self.sched_cpu_ms_per_step = round(med([r.sched_cpu_ms_per_step for r in ok]), 3)
        self.sched_cpu_us_per_token = round(med([1e6 * r.sched_cpu_s / max(1, r.tokens) for r in ok]), 2)
        self.sched_cpu_s = round(med([r.sched_cpu_s for r in ok]), 3)
        self.front_cpu_ms_per_step = round(med([r.front_cpu_ms_per_step for r in ok]), 3)
        self.front_cpu_us_per_token = round(med([1e6 * r.front_cpu_s / max(1, r.tokens) for r in ok]), 2)
        self.front_cpu_s = round(med([r.front_cpu_s for r in ok]), 3)
        self.front_share_of_wall = round(med([r.front_cpu_s / r.wall_s for r in ok]), 3)
        cores = [r for r in ok if r.core_cpu_s is not None]
        if cores:
            self.core_cpu_ms_per_step = round(med([1000 * r.core_cpu_s / r.steps for r in cores]), 3)
            self.core_cpu_us_per_token = round(med([1e6 * r.core_cpu_s / max(1, r.tokens) for r in cores]), 2)
            self.core_cpu_s = round(med([r.core_cpu_s for r in cores]), 3)
            self.core_share_of_wall = round(med([r.core_cpu_s / r.wall_s for r in cores]), 3)
        self.steps = int(med([r.steps for r in ok]))
        self.wall_s = round(med([r.wall_s for r in ok]), 3)
        self.tokens = int(med([r.tokens for r in ok]))
        self.messages = int(med([r.messages for r in ok]))
        self.tokens_per_message = round(self.tokens / self.messages, 3) if self.messages else None
        self.worker_cpu_s = round(med([r.worker_cpu_s for r in ok]), 3)
        self.worker_cpu_ms_per_step = round(med([1000 * r.worker_cpu_s / r.steps for r in ok]), 3)
        self.worker_busy_ratio = round(ok[-1].busy_ratio_session, 4)
        self.client_cpu_s = round(med([r.client_cpu_s for r in ok]), 3)
        self.sched_share_of_wall = round(med([r.sched_cpu_s / r.wall_s for r in ok]), 3)
        mid = ok[len(ok) // 2]
        self.top_sched_threads_cpu_s = dict(sorted(mid.sched_threads_cpu_s.items(), key=lambda kv: -kv[1])[:6])
        self.top_core_threads_cpu_s = dict(sorted(mid.core_threads_cpu_s.items(), key=lambda kv: -kv[1])[:6])


async def measured_round(server: Server, stubs: list[Any], stats_stub: Any, prompts: list[list[int]],
                         s: Settings) -> Measured:
    before = await wait_idle(stats_stub)
    load = os.getloadavg()[0]
    sp, wp, cp = server.scheduler_pid, server.worker_pid, server.core_pid
    threads0 = thread_cpu_s(sp)
    core_threads0 = thread_cpu_s(cp) if cp is not None else {}
    c0, s0, w0 = self_cpu_s(), proc_cpu_s(sp), proc_cpu_s(wp)
    k0 = proc_cpu_s(cp) if cp is not None else 0.0
    res = await stream_round(stubs, prompts, s.max_new_tokens, s.stop, timeout=900)
    s1, w1, c1 = proc_cpu_s(sp), proc_cpu_s(wp), self_cpu_s()
    k1 = proc_cpu_s(cp) if cp is not None else 0.0
    threads1 = thread_cpu_s(sp)
    core_threads1 = thread_cpu_s(cp) if cp is not None else {}
    after = await wait_idle(stats_stub)

    def delta(t0: dict[str, float], t1: dict[str, float]) -> dict[str, float]:
        return {k: round(v - t0.get(k, 0.0), 3) for k, v in t1.items() if v - t0.get(k, 0.0) > 0}

    front, core = s1 - s0, (k1 - k0 if cp is not None else None)
    return Measured(
        wall_s=round(res.wall_s, 4), steps=int(after.steps - before.steps), tokens=res.tokens,
        messages=res.messages, sched_cpu_s=round(front + (core or 0.0), 3), front_cpu_s=round(front, 3),
        core_cpu_s=None if core is None else round(core, 3), worker_cpu_s=round(w1 - w0, 3),
        client_cpu_s=round(c1 - c0, 3), busy_ratio_session=after.worker_busy_ratio,
        sched_threads_cpu_s=delta(threads0, threads1), core_threads_cpu_s=delta(core_threads0, core_threads1),
        mean_ttft_s=round(statistics.fmean(res.ttft_s), 4), errors=res.errors, load_avg_1m=load)


@asynccontextmanager
async def clients(address: str, n: int) -> AsyncIterator[tuple[list[Any], Any]]:
    """Yields (stream stubs over `n` separate connections, a stats stub); inside the event loop."""
    import grpc
    from tandem.v1 import api_pb2_grpc

    # Separate subchannel pools: each channel gets its own connection, as separate clients would.
    chans = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(n + 1)]
    try:
        yield [api_pb2_grpc.TandemStub(c) for c in chans[:n]], api_pb2_grpc.TandemStub(chans[n])
    finally:
        for c in chans:
            await c.close()


async def run_rounds(server: Server, prompts: list[list[int]], s: Settings, repeats: int,
                     profile_hook: Any = None) -> tuple[list[Measured], int, Any]:
    """Warm-up, then `repeats` measured rounds; `profile_hook` (async, given the server) wraps one more
    round whose numbers come back apart."""
    from tandem.v1 import api_pb2

    async with clients(server.address, s.channels) as (stubs, stats_stub):
        info = await stats_stub.GetModelInfo(api_pb2.GetModelInfoRequest(), timeout=30)
        warm = await stream_round(stubs, prompts, s.warmup_new_tokens, s.stop, timeout=900)
        if warm.errors:
            server.check_alive()  # a process that died says why (its log) rather than the RPCs' UNAVAILABLE
            raise RuntimeError(f"warm-up failed: {warm.errors}")
        rounds = []
        for i in range(repeats):
            m = await measured_round(server, stubs, stats_stub, prompts, s)
            print(f"  {server.tree.code} round {i + 1}: {m.line()}, {m.steps} steps, {m.tokens} tokens in "
                  f"{m.messages} messages, {m.wall_s:.2f} s wall, worker {m.worker_cpu_s:.2f} s CPU, "
                  f"load {m.load_avg_1m:.2f}" + (f", ERRORS {m.errors}" if m.errors else ""), flush=True)
            rounds.append(m)
        profiled = None
        if profile_hook is not None:
            profiled = await profile_hook(lambda: measured_round(server, stubs, stats_stub, prompts, s))
        return rounds, info.pipeline_depth, profiled


def run_version(tree: Tree, workdir: Path, model: str, prompts: list[list[int]], s: Settings,
                profiler: str | None, native: bool, rate: int, py_spy: str | None, profile_rounds: int) -> Entry:
    from bench import host_e2e_profile as prof

    entry = Entry(tree.code, s.rows, tree=tree.describe, split=is_split(tree.path))
    server = None
    try:
        probe_imports(tree)
        entry.imports_probe = tree.imports
        server = Server(tree, workdir, model, s)
        print(f"starting {tree.code} ({tree.path}) ...", flush=True)
        server.start()
        entry.core_pinning = server.core_pinning
        if server.core_pid is not None:
            print(f"  {tree.code}: scheduler {server.scheduler_pid}, core {server.core_pid} "
                  f"({server.core_pinning or 'not pinned'})", flush=True)
        entry.imports_live = verify_live_imports(server, py_spy)

        hook = None
        if profiler == "py-spy":
            assert py_spy is not None

            async def hook(round_fn: Any) -> dict[str, Any]:
                out = server.dir / "scheduler.pyspy.txt"
                core_out = server.dir / "core.pyspy.txt"
                with prof.py_spy_recording(py_spy, server.scheduler_pid, out, rate, native):
                    if server.core_pid is None:
                        m = await round_fn()
                    else:
                        with prof.py_spy_recording(py_spy, server.core_pid, core_out, rate, native):
                            m = await round_fn()
                print(f"  {tree.code} profiled round: {m.line()} (py-spy attached), {m.steps} steps", flush=True)
                role = "front" if server.core_pid is not None else "scheduler"
                got = {"round": asdict(m), "sched_cpu_ms_per_step": m.sched_cpu_ms_per_step,
                       "summary": prof.summarize_py_spy(out, tree.path, m.front_cpu_s, m.steps, rate,
                                                        m.sched_threads_cpu_s, native, role)}
                if m.core_cpu_s is not None:
                    got["core_summary"] = prof.summarize_py_spy(core_out, tree.path, m.core_cpu_s, m.steps, rate,
                                                                m.core_threads_cpu_s, native, "core")
                return got

        rounds, depth, profiled = asyncio.run(run_rounds(server, prompts, s, s.repeats, hook))
        entry.cpus_allowed = {"scheduler": allowed_cpus(server.scheduler_pid),
                              "worker": allowed_cpus(server.worker_pid), "client": allowed_cpus(os.getpid())}
        if server.core_pid is not None:
            entry.cpus_allowed["core"] = allowed_cpus(server.core_pid)
        entry.pipeline_depth = depth
        entry.finish(rounds)
        if profiled is not None:
            entry.profile = {"profiler": "py-spy", "rate_hz": rate, "native": native, **profiled}
        errors = [e for r in rounds for e in r.errors]
        if errors:
            entry.error = f"stream errors: {errors[:3]}"
    except Exception as exc:
        entry.error = f"{type(exc).__name__}: {exc}"[:4000]
        traceback.print_exc()
    finally:
        if server is not None:
            server.stop()
    if profiler == "cprofile" and entry.error is None:
        entry.profile = run_cprofile(tree, workdir, model, prompts, s)
    if profiler == "sampler" and entry.error is None:
        try:
            entry.profile = run_sampler(tree, workdir, model, prompts, s, rate, profile_rounds)
        except Exception as exc:
            entry.profile = {"profiler": "sampler", "error": f"{type(exc).__name__}: {exc}"[:4000]}
            traceback.print_exc()
    return entry


def run_sampler(tree: Tree, workdir: Path, model: str, prompts: list[list[int]], s: Settings, rate: int,
                rounds: int) -> dict[str, Any]:
    """A separate server whose scheduler runs under the CPU-time sampler (bench/host_e2e_profile.py), sampled
    for `rounds` measured rounds after the warm-up (SIGUSR1 before each round, SIGUSR2 after it)."""
    from bench import host_e2e_profile as prof

    interval_us = max(100, 1_000_000 // rate)
    split = is_split(tree.path)
    # per process: (name, where its sampler writes, role for the areas)
    procs = [("scheduler", workdir / f"{tree.code}.sampler.txt", "front" if split else "scheduler")]
    scheduler_env: dict[str, str] = {}
    worker_env: dict[str, str] = {}
    if split:
        site = workdir / f"{tree.code}-core-sitecustomize"
        procs.append(("core", workdir / f"{tree.code}.core.sampler.txt", "core"))
        scheduler_env = prof.core_sitecustomize(site, procs[1][1], interval_us, tree.env()["PYTHONPATH"])
        # The worker too (its own-time frames only: the area rules are the scheduler side's): on a GPU its
        # host work (plan in, launch, results out) is on the critical path beside the core's.
        procs.append(("worker", workdir / f"{tree.code}.worker.sampler.txt", "worker"))
        worker_env = prof.worker_sitecustomize_env(site, procs[2][1], interval_us, tree.env()["PYTHONPATH"])
    server = Server(tree, workdir, model, s, tag="-sampler", scheduler_env=scheduler_env, worker_env=worker_env,
                    scheduler_prefix=[
        str(Path(prof.__file__).resolve()), "--sample", str(procs[0][1]), "--interval-us", str(interval_us)])
    stacks: dict[str, dict[str, int]] = {name: {} for name, _, _ in procs}
    metas: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in procs}
    measured: list[Measured] = []

    def pids() -> list[int]:
        return [server.scheduler_pid] + ([server.core_pid, server.worker_pid] if server.core_pid is not None else [])

    async def hook(round_fn: Any) -> None:
        for i in range(rounds):
            for _, out, _ in procs:
                out.with_suffix(".json").unlink(missing_ok=True)
            for pid in pids():
                os.kill(pid, signal.SIGUSR1)
            await asyncio.sleep(0.2)  # the idle processes take the signal at once; let them settle
            m = await round_fn()
            for pid in pids():
                os.kill(pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            for name, out, _ in procs:
                meta = out.with_suffix(".json")
                while not meta.is_file():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the {name}'s sampler wrote no profile")
                    await asyncio.sleep(0.05)
                metas[name].append(json.loads(meta.read_text()))
                for line in out.read_text().splitlines():
                    stack, _, n = line.rpartition(" ")
                    stacks[name][stack] = stacks[name].get(stack, 0) + int(n)
            measured.append(m)
            print(f"  {tree.code} sampled round {i + 1}: {m.line()}, "
                  + ", ".join(f"{name} {metas[name][-1]['samples']} samples" for name, _, _ in procs), flush=True)

    try:
        print(f"starting {tree.code} with the CPU sampler{' (front end and core)' if split else ''} ...", flush=True)
        server.start()
        asyncio.run(run_rounds(server, prompts, s, 0, hook))
    finally:
        server.stop()
    steps = sum(m.steps for m in measured)
    summaries: dict[str, Any] = {}
    for name, out, role in procs:
        merged = out.with_suffix(".merged.txt")
        merged.write_text("".join(f"{k} {v}\n" for k, v in stacks[name].items()))
        ms = metas[name]
        merged.with_suffix(".json").write_text(json.dumps({
            "interval_us": interval_us, "samples": sum(x["samples"] for x in ms),
            "cpu_s": sum(x["cpu_s"] for x in ms), "gc_s": sum(x["gc_s"] for x in ms),
            "gc_collections": [x["gc_collections"] for x in ms], "modules": ms[-1]["modules"]}))
        if role == "worker":
            summaries[name] = prof.own_time_summary(merged, steps)
            continue
        threads: dict[str, float] = {}
        for m in measured:
            for k, v in (m.core_threads_cpu_s if name == "core" else m.sched_threads_cpu_s).items():
                threads[k] = round(threads.get(k, 0.0) + v, 3)
        summary = prof.summarize_sampler(merged, tree.path, steps, threads, role)
        outside = [f for f in summary["live_imports"].values()
                   if f and not str(Path(f).resolve()).startswith(str(tree.path.resolve()))]
        if outside:
            raise RuntimeError(f"sampled {name} imported code from outside {tree.path}: {outside}")
        summaries[name] = summary
    got: dict[str, Any] = {
        "profiler": "sampler", "interval_us": interval_us, "rounds": [asdict(m) for m in measured],
        "sched_cpu_ms_per_step": round(1000 * sum(m.sched_cpu_s for m in measured) / max(1, steps), 3),
        "front_cpu_ms_per_step": round(1000 * sum(m.front_cpu_s for m in measured) / max(1, steps), 3),
        "summary": summaries["scheduler"]}
    if split:
        got["core_cpu_ms_per_step"] = round(1000 * sum(m.core_cpu_s or 0.0 for m in measured) / max(1, steps), 3)
        got["core_summary"] = summaries["core"]
        got["worker_summary"] = summaries["worker"]
        got["core_sampler"] = "sitecustomize.py on the front end's PYTHONPATH (bench/host_e2e_profile.py " \
                              "core_sitecustomize), the same SIGPROF sampler installed in the core only; " \
                              "the worker's from the same file (worker_sitecustomize_env)"
    return got


def run_cprofile(tree: Tree, workdir: Path, model: str, prompts: list[list[int]], s: Settings) -> dict[str, Any]:
    """A separate server whose scheduler runs under cProfile for its whole life: warm-up + one round."""
    from bench import host_e2e_profile as prof

    out = workdir / f"{tree.code}.cprofile"
    server = Server(tree, workdir, model, s, scheduler_prefix=["-m", "cProfile", "-o", str(out)], tag="-cprofile")
    try:
        server.start()
        _, _, profiled = asyncio.run(run_rounds(server, prompts, s, 0, lambda round_fn: round_fn()))
    finally:
        server.stop()  # SIGTERM: the scheduler drains and returns from main, cProfile writes `out`
    if not out.is_file():
        return {"profiler": "cprofile", "error": f"no profile written\n{server.logs()}"}
    role = "front" if is_split(tree.path) else "scheduler"
    return {"profiler": "cprofile", "scope": "whole scheduler lifetime (start-up, warm-up, one round)"
            + ("; the front end only: the core runs unprofiled" if role == "front" else ""),
            "round": asdict(profiled), "summary": prof.summarize_cprofile(out, tree.path, role)}


# ---------------------------------------------------------------------------------------------- report



TABLE_NOTE = ("sched-side = the whole scheduler side: front end + core in a split tree, the one scheduler process "
              "otherwise. core = `python -m scheduler_svc.core`, whose CPU per step is what sits on the worker's "
              "(GPU's) critical path; the front end (gRPC, detokenizing, stop strings) runs beside it. Here both "
              "share CPU 0, the worker and the client CPU 1.")


def markdown(entries: list[Entry]) -> str:
    lines = ["| code | sched-side CPU ms/step | front end ms/step | core ms/step (critical path) | "
             "sched-side CPU us/token | steps | wall s | tokens | msgs | tokens/msg | sched-side CPU s | "
             "worker CPU ms/step | worker busy | client CPU s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in entries:
        if e.sched_cpu_ms_per_step is None:
            lines.append(f"| {e.code} | failed: {(e.error or '?').splitlines()[0][:150]} |" + " |" * 12)
            continue
        split = e.core_cpu_ms_per_step is not None
        front = fmt(e.front_cpu_ms_per_step, ".2f") if split else "(one process)"
        lines.append(
            f"| {e.code} | {e.sched_cpu_ms_per_step:.2f} | {front} | {fmt(e.core_cpu_ms_per_step, '.2f')} | "
            f"{fmt(e.sched_cpu_us_per_token, '.1f')} | {e.steps} | {fmt(e.wall_s, '.2f')} | {e.tokens} | "
            f"{e.messages} | {fmt(e.tokens_per_message, '.2f')} | {fmt(e.sched_cpu_s, '.2f')} | "
            f"{fmt(e.worker_cpu_ms_per_step, '.1f')} | {fmt(e.worker_busy_ratio, '.2f')} | "
            f"{fmt(e.client_cpu_s, '.2f')} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "platform": platform.platform(), "clk_tck": CLK_TCK}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--before-ref", default="f31f37b", help="git ref of the `before` code (a worktree of it).")
    p.add_argument("--live-after", action="store_true",
                   help="Run `after` in the working tree itself instead of a snapshot copy of it.")
    p.add_argument("--after-ref", default="",
                   help="Run `after` from a worktree of this git ref instead of the working tree (e.g. HEAD "
                        "while the working tree is mid-edit).")
    p.add_argument("--codes", default="before,after", help="Which versions to run, in order.")
    p.add_argument("--rows", type=int, default=1024, help="Concurrent streams (and --max-num-rows).")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--warmup-new-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="Measured rounds per version (median reported).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=4, help="gRPC connections the streams are spread over.")
    p.add_argument("--pipeline-depth", type=int, default=0, choices=(0, 1, 2, 3), help="0 = the server's auto.")
    p.add_argument("--max-num-tokens", type=int, default=4096, help="Tokens per step (prefill chunking).")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--stop", nargs="*", default=[], help="Stop strings every request carries (default none).")
    p.add_argument("--model-config", default="", help="A llama config.json instead of the built-in tiny one.")
    p.add_argument("--scheduler-args", default="", help="Extra scheduler flags (one string), both versions.")
    p.add_argument("--worker-args", default="", help="Extra worker flags (one string), both versions.")
    p.add_argument("--profile", action="store_true", help="One more round per version, scheduler profiled.")
    p.add_argument("--profiler", choices=("sampler", "py-spy", "cprofile"), default="sampler",
                   help="sampler: CPU-time sampling in the scheduler (a separate server); py-spy: attached to the "
                        "measured server for one more round (wall-clock samples); cprofile: a separate server "
                        "under cProfile for its whole life.")
    p.add_argument("--profile-rate", type=int, default=1000, help="Samples per (CPU) second.")
    p.add_argument("--profile-rounds", type=int, default=2, help="Rounds the sampler profiles.")
    p.add_argument("--no-native", action="store_true", help="py-spy without native frames.")
    p.add_argument("--no-pin", action="store_true",
                   help="Leave CPU placement to the OS (default: the scheduler alone on one CPU, the worker and "
                        "the client on the others, the worker with one torch thread per CPU it has).")
    p.add_argument("--keep", action="store_true", help="Keep the temporary directory (logs, profiles).")
    p.add_argument("--json", default="docs/bench/host_e2e.json")
    args = p.parse_args(argv)
    import shlex

    py_spy = find_py_spy()
    profiler: str | None = None
    if args.profile:
        profiler = args.profiler
        if profiler == "py-spy" and py_spy is None:
            p.error("--profiler py-spy: py-spy is not installed (pip install py-spy)")

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    config = json.loads(Path(args.model_config).read_text()) if args.model_config else dict(TINY_CONFIG)
    max_len = args.prompt_len[1] + args.max_new_tokens
    blocks_per_row = -(-max_len // args.block_size)
    s = Settings(
        rows=args.rows, prompt_len=tuple(args.prompt_len), max_new_tokens=args.max_new_tokens,
        warmup_new_tokens=args.warmup_new_tokens, repeats=args.repeats, seed=args.seed, channels=args.channels,
        pipeline_depth=args.pipeline_depth, max_num_tokens=max(args.max_num_tokens, args.rows),
        num_blocks=args.rows * blocks_per_row + 2 * blocks_per_row + 64, block_size=args.block_size,
        stop=list(args.stop), model_config=config, extra_scheduler_args=shlex.split(args.scheduler_args),
        extra_worker_args=shlex.split(args.worker_args), scheduler_cpus=cpus[:1] if pin else [],
        other_cpus=cpus[1:] if pin else [])
    prompts = make_prompts(s.rows, s.prompt_len, int(config["vocab_size"]), s.seed)

    workdir = Path(tempfile.mkdtemp(prefix="tandem-host-e2e-"))
    model_file = workdir / "tiny-config.json"
    model_file.write_text(json.dumps(config))
    model = f"random:{model_file}"
    started = datetime.now(UTC).isoformat(timespec="seconds")
    entries: list[Entry] = []
    worktrees: list[Tree] = []
    try:
        codes = [c.strip() for c in args.codes.split(",") if c.strip()]
        trees: dict[str, Tree] = {}
        if "before" in codes:
            trees["before"] = add_worktree(args.before_ref, workdir)
            worktrees.append(trees["before"])
        if "after" in codes and args.after_ref:
            trees["after"] = add_worktree(args.after_ref, workdir, "after")
            worktrees.append(trees["after"])
        elif "after" in codes:
            trees["after"] = Tree("after", REPO, {"source": str(REPO), "snapshot": False, **working_tree_facts()}) \
                if args.live_after else snapshot_working_tree(workdir)
        for code in codes:
            load = os.getloadavg()[0]
            print(f"{code}: load average {load:.2f}", flush=True)
            entries.append(run_version(trees[code], workdir, model, prompts, s, profiler, not args.no_native,
                                       args.profile_rate, py_spy, args.profile_rounds))
    finally:
        if pin:
            pin_process(cpus)
        for tree in worktrees:
            remove_worktree(tree)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = markdown(entries)
    print()
    print(table)
    print(f"\n{TABLE_NOTE}")
    if profiler is not None:
        from bench import host_e2e_profile as prof

        for e in entries:
            if e.profile and "summary" in e.profile:
                who = "the front end's (python -m scheduler_svc)" if e.split else "the scheduler's"
                print(f"\n{e.code}: where {who} time goes ({e.profile['profiler']})")
                print(prof.summary_markdown(e.profile["summary"]))
            if e.profile and "worker_summary" in e.profile:
                w = e.profile["worker_summary"]
                print(f"\n{e.code}: the worker's own time, innermost frames ({w['cpu_ms_per_step']} ms CPU a step, "
                      f"{w['samples']} samples)")
                for row in w["own"][:15]:
                    print(f"  {100 * row['fraction']:5.1f}%  {row['ms_per_step']:6.3f} ms  {row['frame']}")
            if e.profile and "core_summary" in e.profile:
                print(f"\n{e.code}: where the core's (python -m scheduler_svc.core) time goes "
                      f"({e.profile['profiler']}; on the critical path)")
                print(prof.summary_markdown(e.profile["core_summary"]))
            elif e.split and e.profile:
                print(f"\n{e.code}: the core was not profiled ({e.profile['profiler']}); its CPU time is in the "
                      f"table")
    record = {
        "meta": {
            "command": " ".join(["python", "-m", "bench.host_e2e", *(sys.argv[1:] if argv is None else argv)]),
            "date_utc": started, "machine": machine(),
            "settings": {**asdict(s), "scheduler_args": s.scheduler_args(), "worker_args": s.worker_args(),
                         "model": "random:<tiny-config.json> (model_config)", "temperature": 0.0,
                         "ignore_eos": True, "prompt_tokens_total": sum(map(len, prompts))},
            "metric": "sched_cpu_ms_per_step = scheduler-side utime+stime (all threads, /proc/<pid>/stat): the "
                      "scheduler process (front end) + its child python -m scheduler_svc.core (core) where the tree "
                      "has one, over a measured round / engine steps in it (GetStats.steps delta); median over "
                      "rounds. front_cpu_ms_per_step and core_cpu_ms_per_step: the two processes apart; the core's "
                      "is on the worker's critical path, the front end runs beside it.",
            "table_note": TABLE_NOTE,
            "profiler": profiler,
            "core_profile": {"sampler": "sampled too (sitecustomize.py on the front end's PYTHONPATH installs the "
                                        "same CPU sampler in the core)",
                             "py-spy": "py-spy attached to the core too", "cprofile": "not profiled (CPU time "
                             "only)"}.get(profiler or "", None),
            "pinning": {"scheduler_side_cpus": s.scheduler_cpus, "worker_and_client_cpus": s.other_cpus,
                        "worker_OMP_NUM_THREADS": len(s.other_cpus) or None,
                        "how": "os.sched_setaffinity on this thread just before forking each server process "
                               "(restored right after): the scheduler process and every thread and child it starts "
                               "(the core) inherit CPU set scheduler_side_cpus; the core's threads are checked "
                               "once it is found (entries[].core_pinning) and set if they differ; the worker and "
                               "this client on worker_and_client_cpus; per-process CPU sets at the end of the "
                               "measured rounds in entries[].cpus_allowed"} if pin else None,
            "load_avg_at_end": os.getloadavg(),
        },
        "entries": [asdict(e) for e in entries],
        "table_markdown": table,
    }
    write_record(args.json, record)
    return 1 if any(e.error for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
