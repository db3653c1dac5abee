"""End-to-end CPU benchmark: Tandem through gRPC against transformers on the same prompts, in one run.

Owns the workload of the issue's performance item (N chat-templated prompts x M new tokens, greedy, on
the embedded SmolLM2-135M-Instruct) and the five measurements made on it, one after another so that
they never share the cores:

- Tandem async (scheduler `--pipeline-depth 2`) and Tandem sync (depth 1): a real scheduler + worker
  pair (`client.local_server.TandemServer`), all requests sent at once with `AsyncTandemClient`;
- transformers continuous batching (`model.generate_batch`), `use_async_batching` off and on;
- transformers `model.generate` on the prompts as one left-padded batch.

Each is measured after a warm-up on the same prompts: the measured round runs R times (`--repeats`, on the
same running server or loaded model), each round timed alone, checked to produce exactly M tokens per
request and compared token for token with padded `generate`. The headline is the median round, with the
fastest and slowest beside it. Prints a markdown table and writes a JSON record.

    python -m bench.cpu_e2e [--num-requests 16] [--max-new-tokens 64] [--repeats 3] [--json docs/bench/cpu_e2e.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from bench.records import fmt, write_record
from client import AsyncTandemClient
from client.local_server import TandemServer

MODEL = "smollm2-135m-instruct"

# Varied on purpose: prompt lengths spread over ~2x so that prefill rows differ in size, as in real traffic.
QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Explain in simple words what a computer program is.",
    "Give me a short recipe for pancakes with milk, eggs and flour.",
    "What is the difference between weather and climate?",
    "Write a haiku about the sea.",
    "Which planet is known as the red planet, and why does it look red from Earth?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What does a bee do?",
    "List four ways to save water at home, and say which one saves the most.",
    "How do plants make their food?",
    "Translate 'good morning, how are you today?' into Spanish.",
    "Tell me a fun fact about octopuses.",
    "If a train leaves at 3 pm and travels for 2 hours and 30 minutes, when does it arrive?",
)


R = TypeVar("R")


@dataclass
class Round(Generic[R]):
    """One measured call: `start` is its `time.perf_counter()` at the call, `result` what it returned."""

    start: float
    wall_s: float
    result: R


def timed_rounds(run: Callable[[], R], repeats: int, settle: Callable[[], object] | None = None) -> list[Round[R]]:
    """Calls `run` `repeats` times and times each call alone; `settle`, if given, runs untimed before each."""
    rounds = []
    for _ in range(repeats):
        if settle is not None:
            settle()
        t0 = time.perf_counter()
        result = run()
        rounds.append(Round(t0, time.perf_counter() - t0, result))
    return rounds


@dataclass
class Entry:
    """One measured engine/mode. `outputs` holds each round's generated ids and stays out of the JSON."""

    name: str
    wall_s: float | None = None  # median over the measured rounds
    walls_s: list[float] = field(default_factory=list)  # every measured round, in order
    output_tok_s: float | None = None  # output tokens of a round / median wall
    output_tok_s_min: float | None = None  # slowest round
    output_tok_s_max: float | None = None  # fastest round
    mean_ttft_s: float | None = None  # median over the rounds of each round's mean TTFT
    busy_ratio: float | None = None
    tokens_ok: bool = False  # every round produced exactly M tokens for each of the N requests
    same_as_generate: int | None = None  # requests whose tokens equal padded `generate`'s exactly, worst round
    same_as_generate_rounds: list[int] | None = None  # the same, per round
    error: str | None = None
    note: str = ""
    load_avg_before: float | None = None  # 1-min load average: other work on the shared cores skews the numbers
    required: bool = True  # False: a mode the engine may not support here; its failure is reported, not fatal
    outputs: list[list[list[int]]] = field(default_factory=list, repr=False)

    def finish(self, rounds: list[Round[R]], read: Callable[[Round[R]], tuple[list[list[int]], float | None]],
               num_requests: int, max_new_tokens: int) -> None:
        """Records `rounds`; `read` gives one round's per-request output ids and its mean TTFT (or None)."""
        read_rounds = [read(r) for r in rounds]
        self.outputs = [outputs for outputs, _ in read_rounds]
        self.walls_s = [r.wall_s for r in rounds]
        self.wall_s = statistics.median(self.walls_s)
        tokens = [sum(map(len, outputs)) for outputs in self.outputs]
        self.output_tok_s = statistics.median(tokens) / self.wall_s
        tok_s = [t / w for t, w in zip(tokens, self.walls_s, strict=True)]
        self.output_tok_s_min, self.output_tok_s_max = min(tok_s), max(tok_s)
        ttfts = [ttft for _, ttft in read_rounds if ttft is not None]
        self.mean_ttft_s = statistics.median(ttfts) if ttfts else None
        wrong = [
            f"round {i + 1}: got {len(outputs)} outputs of {sorted({len(o) for o in outputs})}"
            for i, outputs in enumerate(self.outputs)
            if len(outputs) != num_requests or any(len(o) != max_new_tokens for o in outputs)
        ]
        self.tokens_ok = not wrong
        if wrong:
            self.error = f"expected {num_requests} x {max_new_tokens} tokens; " + "; ".join(wrong)

    def compare(self, reference: list[list[int]]) -> None:
        """Counts, per round, the requests whose tokens equal `reference`'s exactly."""
        self.same_as_generate_rounds = [sum(a == b for a, b in zip(outputs, reference, strict=False))
                                        for outputs in self.outputs]
        self.same_as_generate = min(self.same_as_generate_rounds)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "outputs"}


def build_prompts(num_requests: int) -> list[list[int]]:
    """Chat-templated questions tokenized by the embedded model's own tokenizer (generation prompt added)."""
    from transformers import AutoTokenizer

    from worker_svc.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    prompts = []
    for i in range(num_requests):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            question += f" (variant {i // len(QUESTIONS)})"  # keep prompts distinct past the fixed list
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        # The template already carries its special tokens; adding them again would double BOS on some models.
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    return prompts


# ---------------------------------------------------------------------------------------------- Tandem


async def _connect(address: str) -> AsyncTandemClient:
    return AsyncTandemClient(address, timeout=900)  # inside the loop: the channel binds to the running loop


async def _tandem_round(client: AsyncTandemClient, prompts: list[list[int]], n: int) -> list[Any]:
    return await asyncio.gather(*(
        client.generate(token_ids=p, max_new_tokens=n, temperature=0, ignore_eos=True) for p in prompts
    ))


def run_tandem(name: str, depth: int, prompts: list[list[int]], max_new_tokens: int, warmup_new_tokens: int,
               repeats: int, worker_args: list[str]) -> Entry:
    entry = Entry(name)
    server = TandemServer(model=MODEL, scheduler_args=["--pipeline-depth", str(depth)], worker_args=worker_args)
    try:
        server.start()
        # One loop and one client for warm-up and all rounds, so channel setup is not part of any wall time.
        with asyncio.Runner() as loop:
            client = loop.run(_connect(server.address))
            try:
                loop.run(_tandem_round(client, prompts, warmup_new_tokens))
                rounds = timed_rounds(lambda: loop.run(_tandem_round(client, prompts, max_new_tokens)), repeats,
                                      settle=server.wait_idle)
            finally:
                loop.run(client.close())
        entry.finish(rounds, lambda r: ([list(x.token_ids) for x in r.result],
                                        sum(x.timings.ttft_s for x in r.result) / len(r.result)),
                     len(prompts), max_new_tokens)
        entry.busy_ratio = server.stats().worker_busy_ratio
        entry.note = ("TTFT: server-side, from request accepted; busy ratio: whole worker session incl. warm-up "
                      "and every round")
    except Exception as e:  # a broken server must not hide the other measurements
        entry.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        server.stop()
    return entry


# ----------------------------------------------------------------------------------------- transformers


def run_generate_batch(model: Any, prompts: list[list[int]], max_new_tokens: int, warmup_new_tokens: int,
                       repeats: int, use_async_batching: bool) -> Entry:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Async batching is documented for accelerators; tried anyway, its absence on CPU is not a failure.
    entry = Entry(f"transformers generate_batch (use_async_batching={use_async_batching})",
                  required=not use_async_batching)

    def batch(n: int) -> Callable[[], dict[str, Any]]:
        # eos_token_id=-1 is what continuous batching itself uses for "no EOS"; None would fall back to the
        # model config's EOS and let requests stop early.
        gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1)
        page = 256
        blocks_per_request = math.ceil((max(map(len, prompts)) + n) / page)
        # Sized for the workload: left to itself, the cache takes 90% of host RAM on CPU.
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=len(prompts) * blocks_per_request + 4,
                                      use_async_batching=use_async_batching)
        return lambda: model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb,
                                            record_timestamps=True, progress_bar=False)

    def read(r: Round[dict[str, Any]]) -> tuple[list[list[int]], float | None]:
        results = list(r.result.values())  # generate_batch returns them in input order
        ttfts = [x.timestamps[0] - x.created_time for x in results if x.timestamps]
        return [list(x.generated_tokens) for x in results], sum(ttfts) / len(ttfts) if ttfts else None

    try:
        warm = batch(warmup_new_tokens)()
        if len(warm) != len(prompts):
            raise RuntimeError(f"warm-up returned {len(warm)}/{len(prompts)} results (see the log above)")
        entry.finish(timed_rounds(batch(max_new_tokens), repeats), read, len(prompts), max_new_tokens)
        entry.note = "TTFT: first token timestamp - request created (in process)"
    except Exception as e:
        entry.error = f"{type(e).__name__}: {e}"
        if entry.required:
            traceback.print_exc()
    return entry


def _first_token_clock() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        """`generate` puts the prompt first, then each step's tokens: the second put is the first token."""

        def __init__(self) -> None:
            self.puts = 0
            self.first_token_at: float | None = None

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first_token_at = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstTokenClock()


def run_padded_generate(model: Any, pad_token_id: int, prompts: list[list[int]], max_new_tokens: int,
                        warmup_new_tokens: int, repeats: int) -> Entry:
    import torch

    entry = Entry("transformers generate (one left-padded batch)")
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1

    def once(n: int) -> tuple[Any, Any]:
        clock = _first_token_clock()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id, streamer=clock)
        return out, clock

    def read(r: Round[tuple[Any, Any]]) -> tuple[list[list[int]], float | None]:
        out, clock = r.result
        return out[:, width:].tolist(), None if clock.first_token_at is None else clock.first_token_at - r.start

    try:
        once(warmup_new_tokens)
        entry.finish(timed_rounds(lambda: once(max_new_tokens), repeats), read, len(prompts), max_new_tokens)
        entry.note = "TTFT: one prefill of the whole padded batch (same for every request)"
    except Exception as e:
        entry.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return entry


# ------------------------------------------------------------------------------------------------ report



def markdown_table(entries: list[Entry], num_requests: int) -> str:
    lines = [
        "| engine / mode | median wall s | median tok/s | range tok/s | mean TTFT s | worker busy "
        "| same tokens as `generate` |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        if e.error and e.wall_s is None:
            lines.append(f"| {e.name} | failed: {e.error.splitlines()[0][:120]} | | | | | |")
            continue
        same = "-"
        if e.same_as_generate_rounds:
            lo, hi = min(e.same_as_generate_rounds), max(e.same_as_generate_rounds)
            same = f"{lo}/{num_requests}" if lo == hi else f"{lo}..{hi}/{num_requests}"
        flag = "" if e.tokens_ok else " (token count wrong)"
        lines.append(
            f"| {e.name}{flag} | {fmt(e.wall_s, '.2f')} | {fmt(e.output_tok_s, '.1f')} | "
            f"{fmt(e.output_tok_s_min, '.1f')}..{fmt(e.output_tok_s_max, '.1f')} | "
            f"{fmt(e.mean_ttft_s, '.3f')} | {fmt(e.busy_ratio, '.2f')} | {same} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_num_threads": torch.get_num_threads(),  # left at torch's default, in this process and the worker
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _measured(key: str, run: Callable[[], Entry]) -> Entry:
    load = os.getloadavg()[0]
    print(f"running {key} (load average {load:.2f}) ...", flush=True)
    entry = run()
    entry.load_avg_before = load
    if entry.error and not entry.required:
        print(f"{key}: {entry.error}", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--warmup-new-tokens", type=int, default=8,
                   help="New tokens per request in each engine's warm-up round (same prompts).")
    p.add_argument("--repeats", type=int, default=3,
                   help="Measured rounds per engine after its warm-up; the table reports the median and range.")
    p.add_argument("--worker-args", default="", help="Extra worker_svc flags for both Tandem servers (one string).")
    p.add_argument("--json", default="docs/bench/cpu_e2e.json", help="Where to write the JSON record.")
    p.add_argument("--engines", default="tandem-async,tandem-sync,cb-sync,cb-async,generate",
                   help="Comma-separated subset to run (for smoke tests; the record wants all five).")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    engines = set(args.engines.split(","))
    n, m, w, r = args.num_requests, args.max_new_tokens, args.warmup_new_tokens, args.repeats

    prompts = build_prompts(n)
    print(f"{n} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, {m} new tokens each, "
          f"{r} measured rounds per engine", flush=True)
    worker_args = shlex.split(args.worker_args)

    entries: list[Entry] = []
    # Servers run one at a time and are stopped before the next measurement: the CPU has few cores.
    runners: list[tuple[str, Callable[[], Entry]]] = [
        ("tandem-async", lambda: run_tandem("Tandem async (depth 2)", 2, prompts, m, w, r, worker_args)),
        ("tandem-sync", lambda: run_tandem("Tandem sync (depth 1)", 1, prompts, m, w, r, worker_args)),
    ]
    for key, run in runners:
        if key in engines:
            entries.append(_measured(key, run))

    hf_keys = {"cb-sync", "cb-async", "generate"} & engines
    reference: Entry | None = None
    attn = None
    if hf_keys:
        from worker_svc.models import load

        loaded = load(MODEL)  # float32 on CPU, the same converted weights the worker serves
        model = loaded.model
        attn = model.config._attn_implementation
        pad = loaded.eos_token_ids[0] if model.generation_config.pad_token_id is None \
            else model.generation_config.pad_token_id
        for key, flag in (("cb-sync", False), ("cb-async", True)):
            if key in engines:
                entries.append(_measured(key, lambda f=flag: run_generate_batch(model, prompts, m, w, r, f)))
        if "generate" in engines:
            reference = _measured("generate", lambda: run_padded_generate(model, pad, prompts, m, w, r))
            entries.append(reference)

    if reference is not None and reference.outputs:
        for e in entries:
            if e.outputs:
                e.compare(reference.outputs[0])  # padded `generate`'s own later rounds are checked against it too

    table = markdown_table(entries, n)
    print()
    print(table)
    record = {
        "command": " ".join(["python", "-m", "bench.cpu_e2e", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "workload": {"model": MODEL, "num_requests": n, "max_new_tokens": m, "warmup_new_tokens": w,
                     "repeats": r, "greedy": True, "prompt_lengths": [len(q) for q in prompts],
                     "tandem_worker_args": worker_args, "hf_attn_implementation": attn},
        "entries": [e.to_json() for e in entries],
        "table_markdown": table,
    }
    write_record(args.json, record)
    return 1 if any(e.error for e in entries if e.required) else 0


if __name__ == "__main__":
    sys.exit(main())
