"""`python -m bench hf-peer` (or `python -m bench.hf_peer`): transformers' continuous batching in its best
mode, as the peer on Tandem's workload.

Owns the search for that best mode and its measurement, on the workload of bench.gpu_async (a random-weight
model of a real shape, N prompts of P random tokens from `prompts_for`, greedy, EOS ignored):
- attention: every implementation in transformers' attention registry is offered to continuous batching
  (the paged ones first); what the library refuses, or maps onto one already tried, is recorded and left out;
- probe: a grid over attention x `use_cuda_graph` x `default_compile_level` x `use_async_batching` on a short
  version of the workload (the same prompts, `--probe-new` tokens each); each configuration gets its own
  manager, its warm-up (graph capture and compile: `manager.warmup()`, then one untimed run on other prompts,
  both timed apart), then one timed run. Level-0 configurations first, then the compiled ones in the order of
  their level-0 twin's speed, until `--probe-budget` seconds are spent; the rest are recorded as skipped;
- best: the fastest probe configuration on the full workload (`--max-new` tokens each) through the streaming
  manager API (`init_continuous_batching`, `add_requests`, `get_result`, `stop`), stopped after
  `--best-seconds`: tokens and tok/s over that window, or the full run if it ends first.
`ContinuousBatchingConfig` is built only from the keyword arguments its signature takes on the installed
version; the others are recorded as dropped. A configuration that raises is recorded with its error and the
run goes on. The JSON record (appended to `--json` as one more run) is rewritten after every measurement.

    python -m bench hf-peer [--model random:llama-3.1-8b] [--requests 32] [--prompt-len 128]
                            [--probe-new 256] [--max-new 8192] [--best-seconds 150] [--probe-budget 170]
                            [--json docs/bench/h200/hf_peer.json]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import math
import platform
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.gpu_async import prompts_for

WINDOW_NOTE = ("a window cut short favours the peer: its requests' contexts stay shorter than the full run's "
               "average, so each step reads less KV cache than the full run's mean step")


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    attn: str
    use_cuda_graph: bool
    compile_level: int
    use_async: bool

    @property
    def name(self) -> str:
        return (f"{self.attn} graph={'on' if self.use_cuda_graph else 'off'} compile={self.compile_level} "
                f"async={'on' if self.use_async else 'off'}")


@dataclass
class Entry:
    """What one configuration did: its settings, what transformers made of them, warm-up and timed figures."""

    phase: str  # "attention" (offered to CB at all), "probe" or "best"
    attn: str
    use_cuda_graph: bool | None = None
    default_compile_level: int | None = None
    use_async_batching: bool | None = None
    cb_kwargs: dict[str, Any] = field(default_factory=dict)
    dropped_kwargs: list[str] = field(default_factory=list)
    effective_attn: str | None = None
    resolved: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    init_s: float | None = None
    warmup_capture_s: float | None = None
    prewarm_s: float | None = None
    prewarm_shapes: int | None = None
    warmup_run_s: float | None = None
    wall_s: float | None = None
    tokens: int | None = None
    tok_s: float | None = None
    finished_requests: int | None = None
    complete: bool | None = None
    skipped: str | None = None
    error: str | None = None
    note: str | None = None

    def line(self) -> str:
        head = f"[{self.phase}] {self.attn}"
        if self.use_cuda_graph is not None:
            head += (f" graph={self.use_cuda_graph} compile={self.default_compile_level} "
                     f"async={self.use_async_batching}")
        if self.skipped:
            return f"{head}: skipped ({self.skipped})"
        if self.error:
            return f"{head}: ERROR {self.error[:300]}"
        if self.tok_s is None:
            return f"{head}: ok ({self.note or 'accepted'})"
        warm = sum(x or 0.0 for x in (self.init_s, self.warmup_capture_s, self.prewarm_s, self.warmup_run_s))
        r = self.resolved or {}
        compiled = (r.get("varlen_compile_config") or {}).get("mode")
        return (f"{head}: {self.tok_s:.0f} tok/s ({self.tokens} tokens in {self.wall_s:.2f} s, "
                f"{self.finished_requests} finished, warm-up {warm:.1f} s; ran as {self.effective_attn}, "
                f"graphs {r.get('use_cuda_graph')}, async {r.get('use_async_batching')}, varlen compile {compiled})")


@dataclass
class RunOutcome:
    wall_s: float
    tokens: int
    finished: int
    complete: bool
    error: str | None


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def attention_registry() -> list[str]:
    """The names in transformers' global attention registry (where this version keeps it)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return []
    return sorted(ALL_ATTENTION_FUNCTIONS.keys())


def attention_candidates(registry: list[str]) -> list[str]:
    """The names offered to continuous batching: the paged ones (sdpa first), then every other registered name
    and "eager" (CB maps some onto a paged one; those are detected and left out later)."""
    paged = sorted((n for n in registry if n.startswith("paged|")), key=lambda n: ("sdpa" not in n, n))
    rest = sorted((n for n in [*registry, "eager"] if not n.startswith("paged|")), key=lambda n: ("sdpa" not in n, n))
    return list(dict.fromkeys([*paged, *rest]))


def cb_config(**wanted: Any) -> tuple[Any, dict[str, Any], list[str]]:
    """A ContinuousBatchingConfig from the keyword arguments its signature accepts; returns it, those used and
    the names dropped."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    accepted = inspect.signature(ContinuousBatchingConfig).parameters
    used = {k: v for k, v in wanted.items() if k in accepted}
    return ContinuousBatchingConfig(**used), used, sorted(set(wanted) - set(used))


def _resolved(manager: Any) -> dict[str, Any]:
    """What transformers decided for a configuration (after its own resolution of defaults)."""
    cfg = manager.continuous_batching_config
    out: dict[str, Any] = {}
    for key in ("use_cuda_graph", "use_async_batching", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
                "max_blocks_per_request", "q_padding_interval_size", "kv_padding_interval_size", "block_size",
                "page_size", "allow_block_sharing"):
        if hasattr(cfg, key):
            value = getattr(cfg, key)
            out[key] = list(value) if isinstance(value, tuple) else value
    for key in ("varlen_compile_config", "decode_compile_config"):
        value = getattr(cfg, key, None)
        out[key] = None if value is None else {k: v for k, v in value.to_dict().items()
                                               if k in ("mode", "dynamic", "fullgraph", "backend")}
    return out


class Peer:
    """The loaded model and the workload; opens one continuous-batching manager per configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import GenerationConfig

        from worker_svc.models import load

        self.args = args
        self.device = args.device
        t0 = time.perf_counter()
        self.loaded = load(args.model, device=args.device, dtype=getattr(torch, args.dtype), skip_tokenizer=True)
        self.load_s = time.perf_counter() - t0
        self.hf = self.loaded.model
        self.original_attn = self.hf.config._attn_implementation
        self.prompts = prompts_for(args.requests, args.prompt_len)
        self.warm_prompts = prompts_for(args.requests, args.prompt_len, seed=1)  # no prefix shared with the timed
        self.gen = GenerationConfig(max_new_tokens=args.max_new, do_sample=False, eos_token_id=-1)
        page = 256
        self.num_blocks = args.num_blocks if args.num_blocks >= 0 else (
            args.requests * (math.ceil((args.prompt_len + args.max_new) / page) + 1) + 8)

    def hints(self) -> Any:
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints
        except ImportError:
            return None
        return WorkloadHints(max_prompt_length=self.args.prompt_len, max_generated_length=self.args.max_new,
                             num_requests=self.args.requests)

    def kwargs_for(self, s: Setting) -> dict[str, Any]:
        wanted: dict[str, Any] = {"use_cuda_graph": s.use_cuda_graph, "default_compile_level": s.compile_level,
                                  "use_async_batching": s.use_async,
                                  "allow_block_sharing": self.args.block_sharing == "on",
                                  "auto_switch_to_flash": False}  # the implementation under test, not a swap
        if self.num_blocks > 0:
            wanted["num_blocks"] = self.num_blocks
        return wanted

    def open(self, s: Setting, entry: Entry) -> Any:
        """Sets the attention, builds the config and the manager; fills the entry's settings. Raises as it does."""
        self.hf.set_attn_implementation(s.attn)
        cfg, entry.cb_kwargs, entry.dropped_kwargs = cb_config(**self.kwargs_for(s))
        kwargs: dict[str, Any] = {"generation_config": self.gen, "continuous_batching_config": cfg}
        if "workload_hints" in inspect.signature(self.hf.init_continuous_batching).parameters:
            kwargs["workload_hints"] = self.hints()
        t0 = time.perf_counter()
        manager = self.hf.init_continuous_batching(**kwargs)
        entry.init_s = time.perf_counter() - t0
        entry.effective_attn = self.hf.config._attn_implementation
        entry.resolved = _resolved(manager)
        return manager

    def warm(self, manager: Any, entry: Entry, prewarm_s: float = 0.0) -> None:
        """Graph capture / compile (`manager.warmup()`), optionally every KV size of the full run, then one
        untimed run on other prompts. None of it is timed."""
        t0 = time.perf_counter()
        manager.warmup()
        entry.warmup_capture_s = time.perf_counter() - t0
        if prewarm_s > 0:
            entry.prewarm_s, entry.prewarm_shapes = self.prewarm(manager, prewarm_s)
        manager.start()
        t0 = time.perf_counter()
        out = collect(manager, self.warm_prompts, self.args.warmup_new, self.args.warmup_timeout)
        entry.warmup_run_s = time.perf_counter() - t0
        if out.error or not out.complete:
            raise RuntimeError(f"warm-up run: {out.error or 'incomplete'} ({out.finished}/{self.args.requests} "
                               f"finished within {self.args.warmup_timeout:.0f} s)")
        entry.resolved = _resolved(manager)

    def prewarm(self, manager: Any, cap_s: float) -> tuple[float, int]:
        """Captures (and compiles) the varlen path at every padded KV size the full run reaches, through the
        model runner's own warm-up step, so that the timed window does not pay for them; at most `cap_s`.
        Best effort: internal API, absent pieces mean no pre-warm."""
        bp = manager.batch_processor
        runner = getattr(bp, "model_runner", None)
        cfg = manager.continuous_batching_config
        if runner is None or not getattr(runner, "pad_inputs", False) or not hasattr(runner, "run_one_warmup"):
            return 0.0, 0
        interval = int(getattr(cfg, "kv_padding_interval_size", 0) or 0)
        q = self.args.requests
        capacity = getattr(bp.cache, "num_pages", None) or getattr(bp.cache, "max_tokens_read", 0)  # 5.17 / later
        top = min(self.args.requests * (self.args.prompt_len + self.args.max_new), capacity - q)
        if interval <= 0:
            return 0.0, 0
        sizes = [min(k * interval, top) for k in range(1, math.ceil(top / interval) + 1)]
        ios = bp.inputs_and_outputs
        pairs = 2 if hasattr(ios, "swap_io_pairs") else 1
        t0, shapes = time.perf_counter(), 0
        with torch.no_grad():
            for _ in range(pairs):
                for kv in sizes:
                    if time.perf_counter() - t0 > cap_s:
                        break
                    runner.run_one_warmup(model=self.hf, num_q_tokens=q, max_kv_read=kv)
                    shapes += 1
                if pairs == 2:
                    ios.swap_io_pairs()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, shapes

    def close(self, manager: Any | None) -> None:
        if manager is not None:
            try:
                if manager.is_running():
                    manager.stop(block=True, timeout=120, hard_stop=True)
                manager.destroy()
            except Exception:
                traceback.print_exc()
        self.hf.set_attn_implementation(self.original_attn)
        reset_compiler()


def reset_compiler() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # each configuration compiles afresh (inductor's on-disk caches still help)


def collect(manager: Any, prompts: list[list[int]], max_new: int, budget_s: float) -> RunOutcome:
    """Submits the prompts, waits for them or `budget_s`, whichever comes first; on the budget, stops the
    manager hard (it hands back every request's partial output). wall_s ends when the last request finished
    or when the budget ran out; tokens include the one or two steps still in flight at a hard stop."""
    t0 = time.perf_counter()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=max_new)
    results: dict[str, Any] = {}
    end = None
    while len(results) < len(ids):
        if time.perf_counter() - t0 > budget_s:
            end = time.perf_counter()
            break
        r = manager.get_result(timeout=0.05)
        if r is None:
            if not manager.is_running():
                break
            continue
        if r.is_finished():
            results[r.request_id] = r
    end = end or time.perf_counter()
    finished = sum(1 for r in results.values() if r.error is None)
    if len(results) < len(ids):
        if manager.is_running():
            manager.stop(block=True, timeout=120, hard_stop=True)
        while (r := manager.get_result(timeout=0.5)) is not None:
            if r.is_finished():
                results[r.request_id] = r
    tokens = sum(len(r.generated_tokens) for r in results.values())
    complete = finished == len(ids) and tokens == len(ids) * max_new
    fatal = getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)
    errors = {r.error for r in results.values() if r.error} - {None}
    error = _err(fatal) if fatal is not None else None
    if error is None and errors and end - t0 <= budget_s:
        error = "; ".join(sorted(errors))[:500]
    return RunOutcome(end - t0, tokens, finished, complete, error)


def order_grid(candidates: list[str], graphs: list[bool], levels: list[int], asyncs: list[bool],
               speed: dict[tuple[str, bool, bool], float]) -> list[Setting]:
    """Level-0 settings in grid order, then the compiled ones: for each (attention, graph, async) combination in
    the order of its level-0 speed, every compile level asked for."""
    combos = [(a, g, s) for a in candidates for g in graphs for s in asyncs]
    ranked = sorted(combos, key=lambda c: -speed.get(c, -1.0))
    return [Setting(a, g, lvl, s) for lvl in levels if lvl == 0 for a, g, s in combos] + \
        [Setting(a, g, lvl, s) for a, g, s in ranked for lvl in levels if lvl != 0]


def _bools(text: str) -> list[bool]:
    table = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
    return [table[x.strip().lower()] for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench hf-peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--probe-new", type=int, default=256, help="new tokens per request in the probe")
    p.add_argument("--warmup-new", type=int, default=16, help="new tokens per request in each untimed warm-up run")
    p.add_argument("--max-new", type=int, default=8192, help="new tokens per request in the best run")
    p.add_argument("--best-seconds", type=float, default=150.0, help="wall-clock window of the best run")
    p.add_argument("--probe-budget", type=float, default=170.0,
                   help="seconds for the whole probe, warm-ups included; no new configuration starts after it")
    p.add_argument("--config-timeout", type=float, default=90.0, help="cap on one timed probe run (s)")
    p.add_argument("--warmup-timeout", type=float, default=180.0,
                   help="cap on one untimed warm-up run (s; compiling happens there), generous: a compile "
                        "abandoned half-way keeps running in its thread")
    p.add_argument("--deadline", type=float, default=560.0,
                   help="seconds from the start by which the run must end (the device allows 600 per command): "
                        "the pre-warm and the best window shrink to fit")
    p.add_argument("--prewarm-seconds", type=float, default=60.0,
                   help="cap on capturing the full run's KV sizes before the best window (0: none)")
    p.add_argument("--num-blocks", type=int, default=-1,
                   help="KV blocks: -1 sized for the full workload (the default), 0 transformers' own choice "
                        "(most of the free memory)")
    p.add_argument("--block-sharing", default="off", choices=["on", "off"],
                   help="allow_block_sharing (prefix caching); the docs advise off for few short prompts and "
                        "long generations")
    p.add_argument("--attn", default="all", help="comma-separated attention names to offer, or all")
    # Cheap settings first, so a probe budget always yields a figure: on the H200 the first setting
    # tried, graphs and async on, took 82 s to warm up and had not finished its probe run in 90 s.
    p.add_argument("--cuda-graph", default="false,true", help="use_cuda_graph values, in probe order")
    p.add_argument("--compile-levels", default="0,2,3")
    p.add_argument("--async", dest="asyncs", default="false,true", help="use_async_batching values, in probe order")
    p.add_argument("--recompile-limit", type=int, default=64,
                   help="torch._dynamo recompile limit (static-shape compile recompiles per padded KV size)")
    p.add_argument("--json", default="docs/bench/h200/hf_peer.json", help="appended to if it exists")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import transformers

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, args.recompile_limit)
    registry = attention_registry()
    wanted_attn = candidates = attention_candidates(registry)
    if args.attn != "all":
        wanted_attn = [a.strip() for a in args.attn.split(",") if a.strip()]
    graphs, levels, asyncs = _bools(args.cuda_graph), [int(x) for x in args.compile_levels.split(",")], \
        _bools(args.asyncs)
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    argv_used = sys.argv[1:] if argv is None else argv
    record: dict[str, Any] = {
        "command": "python -m bench hf-peer " + shlex.join(argv_used),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()}, no GPU)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": _version("triton"), "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "kernels_installed": importlib.util.find_spec("kernels") is not None,
        "workload": {"model": args.model, "requests": args.requests, "prompt_len": args.prompt_len,
                     "probe_new_tokens": args.probe_new, "warmup_new_tokens": args.warmup_new,
                     "max_new_tokens": args.max_new, "dtype": args.dtype, "greedy": True, "ignore_eos": True,
                     "prompts": "bench.gpu_async.prompts_for(requests, prompt_len) (seed 0); warm-up runs use seed 1"},
        "method": {"api": "init_continuous_batching + add_requests + get_result + stop (not generate_batch, which "
                          "swallows errors and cannot stop early)",
                   "tok_s": "generated tokens / wall from add_requests to the last result (or the window's end)",
                   "probe_budget_s": args.probe_budget, "best_seconds": args.best_seconds,
                   "config_timeout_s": args.config_timeout, "warmup_timeout_s": args.warmup_timeout,
                   "prewarm_seconds": args.prewarm_seconds, "deadline_s": args.deadline,
                   "recompile_limit": args.recompile_limit, "window_note": WINDOW_NOTE},
        "attention": {"registry": registry, "candidates": candidates, "offered": wanted_attn},
        "cb_config_fields": sorted(inspect.signature(ContinuousBatchingConfig).parameters),
        "grid": {"use_cuda_graph": graphs, "default_compile_level": levels, "use_async_batching": asyncs},
        "entries": [], "best": None,
    }
    path = Path(args.json)
    try:
        previous = json.loads(path.read_text())
        runs = previous if isinstance(previous, list) else [previous]
    except (OSError, ValueError):
        runs = []
    entries: list[Entry] = []

    def save(entry: Entry | None = None) -> None:
        """Written after every measurement: a run cut short still leaves what it measured."""
        if entry is not None:
            entries.append(entry)
            print(entry.line(), flush=True)
        record["entries"] = [asdict(e) for e in entries]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([*runs, record], indent=1) + "\n")

    peer = Peer(args)
    record["load_s"] = round(peer.load_s, 2)
    record["workload"]["num_blocks"] = peer.num_blocks if peer.num_blocks > 0 else "transformers' choice"
    save()

    # Attention: which names the model takes at all (a refusal here costs nothing to record).
    usable: list[str] = []
    for name in wanted_attn:
        entry = Entry("attention", name)
        try:
            peer.hf.set_attn_implementation(name)
            entry.effective_attn = peer.hf.config._attn_implementation
            usable.append(name)
        except Exception as e:
            entry.error = _err(e)
        finally:
            peer.hf.set_attn_implementation(peer.original_attn)
        save(entry)

    # Probe.
    t_probe = time.perf_counter()
    speed: dict[tuple[str, bool, bool], float] = {}
    effective_seen: dict[str, str] = {}  # effective implementation -> the name that first reached it
    refused: dict[str, str] = {}  # name -> why every setting of it is left out
    done: set[Setting] = set()
    best: tuple[float, Setting] | None = None
    while True:
        todo = [s for s in order_grid(usable, graphs, levels, asyncs, speed) if s not in done]
        if not todo:
            break
        s = todo[0]
        done.add(s)
        entry = Entry("probe", s.attn, s.use_cuda_graph, s.compile_level, s.use_async, max_new_tokens=args.probe_new)
        if s.attn in refused:
            entry.skipped = refused[s.attn]
            save(entry)
            continue
        if time.perf_counter() - t_probe > args.probe_budget:
            entry.skipped = f"probe budget ({args.probe_budget:.0f} s) spent"
            save(entry)
            continue
        manager = None
        stage = "init"
        try:
            manager = peer.open(s, entry)
            first = effective_seen.setdefault(entry.effective_attn, s.attn)
            if first != s.attn:
                refused[s.attn] = f"continuous batching runs it as {entry.effective_attn}, as it does {first}"
                entry.skipped = refused[s.attn]
                continue
            stage = "warm-up"
            peer.warm(manager, entry)
            stage = "run"
            out = collect(manager, peer.prompts, args.probe_new, args.config_timeout)
            entry.wall_s, entry.tokens, entry.finished_requests, entry.complete = \
                out.wall_s, out.tokens, out.finished, out.complete
            entry.tok_s = out.tokens / out.wall_s if out.wall_s > 0 else None
            entry.error = out.error
            if not out.complete and entry.error is None:
                entry.error = f"incomplete: {out.finished}/{args.requests} finished in {out.wall_s:.1f} s"
            if entry.error is None and entry.tok_s is not None:
                if s.compile_level == 0:
                    speed[(s.attn, s.use_cuda_graph, s.use_async)] = entry.tok_s
                if best is None or entry.tok_s > best[0]:
                    best = (entry.tok_s, s)
        except Exception as e:
            traceback.print_exc()
            entry.error = f"{stage}: {_err(e)}"
            if stage == "init" and entry.effective_attn is None:
                refused[s.attn] = f"refused at init: {_err(e)[:120]} (its first entry has the whole error)"
        finally:
            peer.close(manager)
            save(entry)
    record["probe_s"] = round(time.perf_counter() - t_probe, 1)

    # Best: the fastest probe configuration on the full workload, over a wall-clock window.
    if best is None:
        print("no probe configuration ran; no best run", flush=True)
        save()
        return 1
    s = best[1]
    entry = Entry("best", s.attn, s.use_cuda_graph, s.compile_level, s.use_async, max_new_tokens=args.max_new)
    manager = None
    try:
        manager = peer.open(s, entry)
        left = args.deadline - (time.perf_counter() - t_start)
        peer.warm(manager, entry, prewarm_s=min(args.prewarm_seconds, max(0.0, left - 120.0)))
        left = args.deadline - (time.perf_counter() - t_start) - 20.0  # stop, save, hand back
        window = max(10.0, min(args.best_seconds, left))
        if window < args.best_seconds:
            entry.note = f"window shortened to {window:.0f} s to end by --deadline {args.deadline:.0f} s"
        out = collect(manager, peer.prompts, args.max_new, window)
        entry.wall_s, entry.tokens, entry.finished_requests, entry.complete = \
            out.wall_s, out.tokens, out.finished, out.complete
        entry.tok_s = out.tokens / out.wall_s if out.wall_s > 0 else None
        entry.error = out.error
        shortened = f"{entry.note}; " if entry.note else ""
        if out.complete:
            entry.note = shortened + "full run: every request generated max_new_tokens within the window"
        else:
            entry.note = (f"{shortened}window of {window:.0f} s, stopped before the end ({out.finished}/"
                          f"{args.requests} finished); {WINDOW_NOTE}; tokens include the step(s) in flight at "
                          f"the hard stop")
    except Exception as e:
        traceback.print_exc()
        entry.error = _err(e)
    finally:
        peer.close(manager)
        record["best"] = asdict(entry)
        record["total_s"] = round(time.perf_counter() - t_start, 1)
        save(entry)
    return 0 if entry.error is None else 1


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
