"""What does one steady-state decode step cost the HOST, before and after the new step protocol?

Measures, per (rows, context) and code version, the host work of one decode step outside the
forward, in four timed parts:
- `plan_ms`: `Scheduler.build_plan()` (scheduler process);
- `encode_ms`: `plan.encode()` into ZeroMQ frames;
- `link_ms`: a real ZeroMQ send + receive, scheduler-side ROUTER to worker-side DEALER over
  `ipc://` in a temp dir (two zmq contexts, i.e. two I/O threads, in one process; copy=False both
  ways, as the links do), then `wire.split` + `StepPlan.decode`;
- `load_ms`: the worker's plan loading as `Engine.launch` does it on the host for a decode step
  that CUDA graphs replay. before: `engine.check_plan`, `pad_decode_plan` to the graph row bucket
  and the full block-table width, `IOSlot.load`; after: `engine.check_plan` (checks the plan and
  applies it to the row slots), `pad_decode_batch` to the row bucket (no table: the graph reads
  the persistent one), `IOSlot.load`, and the step's new block-table cells set. On CPU the bulk
  copy is a host memcpy; on CUDA an async DMA: `load_copy_ms` times that copy alone, untimed in
  the sum, so it can be subtracted.
`host_ms_per_step` is the median over the measured steps of the four parts' sum; the parts are
medians too. Untimed after each step: a faked StepResult (the same non-EOS token for every row,
requests ignore EOS and have max_new_tokens up to the 131072 context, so nobody finishes) goes
into `process_result`, so the next plan is again a decode one token further on.

The model is `random:<config.json>`: the `llama-3.1-8b` preset (rope_type llama3, vocabulary,
max_position_embeddings 131072) narrowed to 1 layer, hidden 64, 2 heads, 1 KV head of head_dim 4,
bf16, so the worker's Engine builds on CPU and its KV cache (256 B per 16-token block) holds
rows x ceil(context/16) blocks for the whole grid (2.1M blocks, 0.5 GiB at 1024 x 32K). One Engine
per child process, sized for the largest rows and context, serves every configuration; the
scheduler is fresh per configuration. Steady state is reached by STATE SURGERY, not by prefilling
(32M prompt tokens through the per-token Python code and a CPU forward are far too slow): `rows` requests with
`context`-token prompts are registered RUNNING with the blocks of `context - 1` tokens allocated
and `num_computed = context - 1`, so `num_to_compute == 1` and the first plan decodes the last
prompt token at kv_len `context` (bench/plan_cost_before.py documents it line by line). The new
protocol keeps each request's state in the worker's row slots, so for `after` the surgery also fills
the engine's RowState and device block table as the admitting plans would have, and asserts that
both sides' state digests agree.

Two code versions run in the same invocation, each in its own child process (`python -P` this file
`--child`, PYTHONPATH=<tree>:<tree>/proto first, asserted in the child):
- `before`: `--before-ref` (default f31f37b), checked out by `git worktree add --detach` into a
  temp dir and removed at the end; driver `measure_before` in bench/plan_cost_before.py;
- `after`: `--after-tree` (default: this working tree); driver `measure_after` below.
Children run torch with one thread (`--torch-threads`): see child_main. The parts run back to back
in one thread, so on a busy machine they include its scheduling noise (each entry records the load
average before it). A configuration runs `--warmup` unmeasured steps, then `--steps` measured ones,
fewer (at least `--min-steps`) once the measured steps have taken `--budget-s`: `steps` records how
many.

    python -m bench.plan_cost [--rows 64 256 1024] [--contexts 1024 8192 32768] [--steps 20]
        [--codes before after] [--before-ref f31f37b] [--after-tree DIR] [--json docs/bench/plan_cost.json]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODES = ("before", "after")
PARTS = ("plan_ms", "encode_ms", "link_ms", "load_ms")
PROJECT_PACKAGES = ("scheduler_svc", "worker_svc", "tandem")
MODEL_MAX_CONTEXT = 131072  # max_position_embeddings of the llama-3.1-8b preset

# One measured step: the four PARTS in ms, "plan_bytes" (frames on the wire), optional extras
# (e.g. "load_copy_ms") that the summary reports as medians, outside the sum.
StepFn = Callable[[], dict[str, float]]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Grid:
    """The configurations of one run and what the shared Engine must hold for all of them."""

    rows: tuple[int, ...]
    contexts: tuple[int, ...]
    steps: int
    warmup: int
    min_steps: int
    budget_s: float
    block_size: int = 16
    dtype: str = "bfloat16"
    preset: str = "llama-3.1-8b"  # rope parameters, vocabulary and max_position_embeddings from it
    model_overrides: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4,
    })
    model_max_context: int = MODEL_MAX_CONTEXT

    @property
    def max_rows(self) -> int:
        return max(self.rows)

    @property
    def blocks_per_row(self) -> int:
        """Blocks a row can reach: the largest context plus one token per step, warm-up included."""
        return cdiv(max(self.contexts) + self.warmup + self.steps + 1, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.max_rows * self.blocks_per_row


class Link:
    """The engine link in one process: a ROUTER bound on ipc:// (scheduler) and a DEALER connected
    to it (worker), each in its own zmq context, with the socket options the real links set."""

    def __init__(self) -> None:
        import zmq

        self._zmq = zmq
        self._dir = tempfile.TemporaryDirectory(prefix="plan_cost_link.")
        address = f"ipc://{self._dir.name}/engine.sock"
        self._contexts = [zmq.Context(), zmq.Context()]
        self.router = self._contexts[0].socket(zmq.ROUTER)
        self.dealer = self._contexts[1].socket(zmq.DEALER)
        for sock in (self.router, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 256 << 20)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(address)
        self.dealer.connect(address)
        self.dealer.send(b"HELLO")  # the ROUTER learns the worker's routing id from its first message
        self._peer = self.router.recv_multipart()[0]

    def send(self, frames: list) -> None:
        """Scheduler -> worker, as scheduler_svc.core.link.EngineLink.send does it."""
        self.router.send_multipart([self._peer, *frames], flags=self._zmq.NOBLOCK, copy=False)

    def recv(self) -> list:
        """The worker's next message, as worker_svc.link.WorkerLink.recv returns it."""
        return self.dealer.recv_multipart(copy=False)

    def close(self) -> None:
        for sock in (self.router, self.dealer):
            sock.close(linger=0)
        for ctx in self._contexts:
            ctx.term()
        self._dir.cleanup()


# ---- drivers -------------------------------------------------------------------------------------

def _before_driver() -> Any:
    """bench/plan_cost_before.py, loaded from next to this file (a child's `bench` package may be
    another tree's)."""
    path = Path(__file__).with_name("plan_cost_before.py")
    spec = importlib.util.spec_from_file_location("plan_cost_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AFTER_TOKEN = 1000  # every prompt token and every faked sample: inside the vocabulary, not EOS


def _after_engine(grid: Grid) -> Any:
    """The worker Engine of the code under test: built as the before driver builds it (Engine's
    constructor is the same in both versions), from this tree's modules."""
    return _before_driver().build_engine(grid)


def _after_scheduler(engine: Any, rows: int, context: int) -> Any:
    """A Scheduler (depth 1) with `rows` requests decoding at `context` tokens, and the engine's row
    slots holding the same requests: the before driver's state surgery, on both sides, since the new
    protocol keeps the state in the worker. Checked: both sides' state digests agree."""
    from tandem import wire

    from bench.decode_state import occupy_rows
    from scheduler_svc.core.request import Request, RequestStatus, SamplingParams
    from scheduler_svc.core.scheduler import Scheduler, SchedulerLimits

    kv = engine.cache.cfg
    max_context = engine.loaded.max_context
    engine.reset_rows()
    sched = Scheduler(SchedulerLimits(
        num_blocks=kv.num_blocks, block_size=kv.block_size, max_num_tokens=engine.limits.max_num_tokens,
        max_num_rows=rows, max_blocks_per_row=cdiv(max_context, kv.block_size), max_context=max_context,
        max_waiting=rows, pipeline_depth=1, num_slots=engine.limits.max_num_rows,
    ))
    eos = frozenset(engine.loaded.eos_token_ids)
    assert AFTER_TOKEN not in eos and AFTER_TOKEN < engine.loaded.vocab_size
    prompt = [AFTER_TOKEN] * context
    now = time.monotonic()
    for i in range(rows):
        req = Request(req_id=f"req-{i}", prompt_ids=prompt, max_new_tokens=max_context - context,
                      sampling=SamplingParams(temperature=0.0, seed=i), eos_token_ids=eos, ignore_eos=True,
                      client_id=f"{i:032x}")
        req.status = RequestStatus.RUNNING
        req.block_ids = sched.blocks.allocate(sched.blocks.blocks_for(context - 1))
        req.first_scheduled_time = now
        s = sched.rows.admit(req)
        sched.rows.computed[s] = context - 1
        sched.rows.num_blocks[s] = len(req.block_ids)
        sched._requests[req.req_id] = req
        sched._running[req.req_id] = req
        # The worker's side: what the plan that admitted it and its prefill would have left.
        occupy_rows(engine, [s], [req.block_ids], [context - 1])
    sched.check_integrity()
    assert all(r.num_to_compute == 1 for r in sched._running.values())
    assert sched.rows.digest() == engine.rows.digest(), "the surgery left the two sides apart"
    assert isinstance(wire.PROTOCOL_VERSION, int) and wire.PROTOCOL_VERSION >= 2
    return sched


def measure_after(rows: int, context: int, grid: Grid, link: Link) -> StepFn:
    """The `after` driver: sets up `rows` requests decoding at `context` tokens on the code under
    test and returns a function that runs ONE steady-state step and returns
    {"plan_ms", "encode_ms", "link_ms", "load_ms", "plan_bytes", optional extras} (the steady state
    must survive any number of calls: the function feeds its own faked result back, untimed).

    The worker's loading is what `Engine.launch` does on the host for a graphed decode step: check and
    apply the plan to the row slots (`check_plan`), pad the batch to the graph's row bucket, load the
    I/O slot, and set the step's new block-table cells (on CUDA a small scatter on the compute
    stream; here on the CPU tensor)."""
    from tandem import wire
    from tandem.wire import StepPlan, StepResult

    from worker_svc.graphs.cuda_graphs import decode_layout, pad_decode_batch, row_buckets

    engine = _after_engine(grid)
    sched = _after_scheduler(engine, rows, context)
    width = engine.limits.max_blocks_per_row
    bucket = next(b for b in row_buckets(engine.limits.max_num_rows) if b >= rows)
    layout = decode_layout(bucket, width)
    sampled = np.full(rows, AFTER_TOKEN, np.int32)
    logprob = np.zeros(rows, np.float32)
    clock = time.perf_counter

    def step() -> dict[str, float]:
        t0 = clock()
        built = sched.build_plan()
        t1 = clock()
        assert built is not None
        plan = built[0]
        frames = plan.encode()
        t2 = clock()
        link.send(frames)
        kind, header, arrays = wire.split(link.recv())
        assert kind == wire.KIND_PLAN
        got = StepPlan.decode(header, arrays)
        t3 = clock()
        batch = engine.check_plan(got)
        slot = engine.slots[got.step_id % 2]
        inputs = slot.load(pad_decode_batch(batch, bucket), layout)
        if batch.append_slots.size:
            engine.block_table.index_put_((inputs.append_slots.long(), inputs.append_cols.long()),
                                          inputs.append_blocks)
        t4 = clock()
        slot.in_use = False
        nbytes = slot._in.end("append_blocks", batch.append_slots.size)
        c0 = clock()
        slot.dev_in[:nbytes].copy_(slot.host_in[:nbytes])
        copy_ms = 1000 * (clock() - c0)
        assert plan.num_rows == plan.num_tokens == rows and int(batch.kv_lens[0]) > context - 1
        sched.process_result(StepResult(step_id=plan.step_id, sampled=sampled, logprob=logprob))
        return {"plan_ms": 1000 * (t1 - t0), "encode_ms": 1000 * (t2 - t1), "link_ms": 1000 * (t3 - t2),
                "load_ms": 1000 * (t4 - t3), "plan_bytes": float(sum(memoryview(f).nbytes for f in frames)),
                "load_copy_ms": copy_ms, "kv_len": float(batch.kv_lens[0])}

    return step


def run_steps(step: StepFn, grid: Grid, steps: int) -> tuple[list[dict[str, float]], list[float]]:
    """Warm-up steps (their wall times returned), then up to `steps` measured ones, stopping after
    `grid.min_steps` once the measured steps have taken `grid.budget_s`."""
    warm = []
    for _ in range(grid.warmup):
        t0 = time.perf_counter()
        step()
        warm.append(1000 * (time.perf_counter() - t0))
    out: list[dict[str, float]] = []
    t0 = time.perf_counter()
    while len(out) < steps:
        out.append(step())
        if len(out) >= grid.min_steps and time.perf_counter() - t0 > grid.budget_s:
            break
    return out, warm


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    host = [sum(s[p] for p in PARTS) for s in samples]
    out: dict[str, float] = {"host_ms_per_step": statistics.median(host), "host_ms_min": min(host),
                             "host_ms_max": max(host)}
    for key in samples[0]:
        value = statistics.median(s[key] for s in samples)
        out[key] = int(value) if key in ("plan_bytes", "kv_len") else value
    return out


def drive(code: str, rows: int, context: int, steps: int, *, grid: Grid, link: Link) -> dict[str, Any]:
    """One configuration on one code version (inside that version's child): setup, warm-up, steps."""
    if code == "before":
        measure = _before_driver().measure_before
    elif code == "after":
        measure = measure_after
    else:
        raise ValueError(f"unknown code version {code!r}; one of {CODES}")
    gc.collect()
    t0 = time.perf_counter()
    step = measure(rows, context, grid, link)
    setup_s = time.perf_counter() - t0
    gc.collect()
    samples, warm = run_steps(step, grid, steps)
    del step
    gc.collect()
    return {"code": code, "rows": rows, "context": context, **summarize(samples), "steps": len(samples),
            "steps_requested": steps, "warmup_steps": len(warm), "warmup_ms": [round(w, 3) for w in warm],
            "setup_s": round(setup_s, 3)}


# ---- child process -------------------------------------------------------------------------------

def _check_imports(tree: Path) -> dict[str, str]:
    """Imports the project packages and asserts they come from `tree` (PYTHONPATH first)."""
    files = {}
    for name in PROJECT_PACKAGES:
        module = importlib.import_module(name)
        file = Path(module.__file__ or "").resolve()
        assert file.is_relative_to(tree), f"{name} imported from {file}, not from {tree}"
        files[name] = str(file)
    return files


def child_main(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    files = _check_imports(tree)
    grid = grid_from(args)
    import torch
    import zmq

    # One thread: IOSlot.load's bulk copy (a DMA on CUDA) is then a plain memcpy here, and never waits
    # at an OpenMP barrier for a second thread that a busy 2-core machine has not scheduled (5-7 ms).
    torch.set_num_threads(args.torch_threads)
    out_path = Path(args.out)
    result: dict[str, Any] = {"code": args.child, "tree": str(tree), "modules": files, "pid": os.getpid(),
                              "torch": torch.__version__, "numpy": np.__version__, "pyzmq": zmq.__version__,
                              "torch_threads": torch.get_num_threads(), "entries": []}
    link = Link()
    try:
        for rows in grid.rows:
            for context in grid.contexts:
                load = os.getloadavg()[0]
                entry = drive(args.child, rows, context, grid.steps, grid=grid, link=link)
                entry["loadavg_1min_before"] = round(load, 2)
                result["entries"].append(entry)
                print(f"[{args.child}] {_row(entry)}", flush=True)
                out_path.write_text(json.dumps(result))  # after each configuration: partial runs keep theirs
    finally:
        link.close()
    return 0


# ---- parent --------------------------------------------------------------------------------------

def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu or platform.processor(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_at_start": os.getloadavg(), "python": platform.python_version()}


def _run_child(code: str, tree: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "proto"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(args.torch_threads)
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", code, "--tree", str(tree),
           "--out", str(out), "--rows", *map(str, args.rows), "--contexts", *map(str, args.contexts),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--min-steps", str(args.min_steps),
           "--budget-s", str(args.budget_s), "--torch-threads", str(args.torch_threads)]
    print(f"== {code}: {tree}", flush=True)
    proc = subprocess.run(cmd, cwd=tree, env=env)
    result = json.loads(out.read_text()) if out.is_file() else {"entries": []}
    if proc.returncode != 0:
        print(f"== {code}: child exited with status {proc.returncode} after {len(result['entries'])} "
              f"configurations", file=sys.stderr, flush=True)
    result["returncode"] = proc.returncode
    return result


def _row(e: dict[str, Any]) -> str:
    return (f"{e['code']:<7}{e['rows']:>6}{e['context']:>8}{e['host_ms_per_step']:>10.3f}{e['plan_ms']:>10.3f}"
            f"{e['encode_ms']:>10.3f}{e['link_ms']:>10.3f}{e['load_ms']:>10.3f}{e['plan_bytes'] / 1024:>11.1f}"
            f"{e['steps']:>6}")


def print_table(entries: list[dict[str, Any]]) -> None:
    print(f"{'code':<7}{'rows':>6}{'context':>8}{'host_ms':>10}{'plan_ms':>10}{'encode_ms':>10}{'link_ms':>10}"
          f"{'load_ms':>10}{'plan_KiB':>11}{'steps':>6}")
    for e in entries:
        print(_row(e))
    by = {(e["code"], e["rows"], e["context"]): e for e in entries}
    pairs = [(k[1], k[2]) for k in by if k[0] == "before" and ("after", k[1], k[2]) in by]
    if pairs:
        print(f"\n{'rows':>6}{'context':>8}{'before_ms':>11}{'after_ms':>10}{'before/after':>14}")
        for rows, context in pairs:
            b, a = by["before", rows, context]["host_ms_per_step"], by["after", rows, context]["host_ms_per_step"]
            print(f"{rows:>6}{context:>8}{b:>11.3f}{a:>10.3f}{b / a:>14.2f}")


def grid_from(args: argparse.Namespace) -> Grid:
    return Grid(rows=tuple(args.rows), contexts=tuple(args.contexts), steps=args.steps, warmup=args.warmup,
                min_steps=min(args.min_steps, args.steps), budget_s=args.budget_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.plan_cost", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--steps", type=int, default=20, help="measured steps per configuration (at most)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    p.add_argument("--min-steps", type=int, default=5, help="measured steps kept even past --budget-s")
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="measured time per configuration after which it stops at --min-steps or more")
    p.add_argument("--torch-threads", type=int, default=1, help="torch (OpenMP) threads in the children")
    p.add_argument("--codes", nargs="+", choices=CODES, default=list(CODES))
    p.add_argument("--before-ref", default="f31f37b", help="git ref of the `before` code")
    p.add_argument("--after-tree", default=str(ROOT), help="source tree of the `after` code (default: this one)")
    p.add_argument("--json", default=None, help="write {meta, entries} here")
    p.add_argument("--child", choices=CODES, help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.rows) < 1 or min(args.contexts) < 2 or args.steps < 1 or args.warmup < 0:
        p.error("rows >= 1, contexts >= 2, steps >= 1, warmup >= 0")
    if max(args.contexts) + args.warmup + args.steps >= MODEL_MAX_CONTEXT:
        p.error(f"the largest context plus the steps must stay below the model's {MODEL_MAX_CONTEXT}-token context")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    grid = grid_from(args)
    started = datetime.now(UTC)
    meta: dict[str, Any] = {
        "command": "python -m bench.plan_cost " + shlex.join(sys.argv[1:] if argv is None else argv),
        "started": started.isoformat(timespec="seconds"), "machine": _machine(),
        "commit": _git("rev-parse", "HEAD"), "worktree_dirty": bool(_git("status", "--porcelain")),
        "before_ref": args.before_ref, "after_tree": str(Path(args.after_tree).resolve()),
        "settings": {**asdict(grid), "num_blocks": grid.num_blocks, "blocks_per_row": grid.blocks_per_row,
                     "pipeline_depth": 1, "torch_threads": args.torch_threads,
                     "link": "ZeroMQ ROUTER -> DEALER over ipc://, one process, two zmq contexts"},
    }
    children: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="plan_cost."))
    worktree = tmp / "before"
    try:
        for code in args.codes:
            if code == "before":
                meta["before_commit"] = _git("rev-parse", f"{args.before_ref}^{{commit}}")
                _git("worktree", "add", "--detach", str(worktree), meta["before_commit"])
                tree = worktree
            else:
                tree = Path(args.after_tree).resolve()
                meta["after_commit"] = _git("rev-parse", "HEAD", cwd=tree)
                meta["after_tree_dirty"] = bool(_git("status", "--porcelain", cwd=tree))
            child = _run_child(code, tree, args, tmp / f"{code}.json")
            entries.extend(child.pop("entries"))
            children[code] = child
    finally:
        if worktree.exists():
            _git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(tmp, ignore_errors=True)
    meta["children"] = children
    meta["wall_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    print()
    print_table(entries)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "entries": entries}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(c["returncode"] == 0 for c in children.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
