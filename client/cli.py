"""The `tandem` command line: generate / info / health / tokenize against a server, and `serve`.

Owns argument parsing (every `--foo-bar` flag also reads TANDEM_FOO_BAR, via EnvArgumentParser),
output formatting and exit codes: 0 success, 1 a failed RPC (printed as `error: CODE: message`),
2 a usage error, 130 interrupted. `serve` builds the scheduler/worker command lines and hands them to
`client.serve.Supervisor`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

import grpc
from tandem import exit_codes
from tandem.envargs import EnvArgumentParser, default_engine_address, prepare_ipc_address

from .connection_args import address_arg, connection_args, connection_kwargs
from .local_server import free_port
from .serve import ChildSpec, Supervisor
from .sync_client import DEFAULT_ADDRESS, TandemClient
from .targets import Target, parse_target, replica_targets
from .types import StreamChunk, TandemError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_HEALTH_TIMEOUT_S = 5.0
# Polling a server that is still starting: without a cap, gRPC's reconnect backoff grows to minutes.
POLL_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _json_dump(obj: Any, out: TextIO) -> None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    out.flush()


def _print_error(err: TandemError) -> None:
    print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)
    if err.retry_delay is not None:
        print(f"  retry after {err.retry_delay:g} s", file=sys.stderr)


def _summary(finish_reason: str, matched: str | int | None, usage: Any, timings: Any) -> str:
    finish = finish_reason if matched is None else f"{finish_reason} ({matched!r})"
    return (
        f"[finish: {finish} | tokens: {usage.prompt_tokens} prompt"
        + (f" ({usage.cached_tokens} cached)" if getattr(usage, "cached_tokens", 0) else "")
        + f", {usage.completion_tokens} completion"
        f" | queue {timings.queue_s:.3f} s, ttft {timings.ttft_s:.3f} s, total {timings.total_s:.3f} s]"
    )


def _client_args(p: argparse.ArgumentParser) -> None:
    address_arg(p, DEFAULT_ADDRESS)
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    connection_args(p)


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text; '-' reads it from stdin")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--system", default=None, help="system message (implies --chat)")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None


def bench_arguments(p: argparse.ArgumentParser) -> None:
    from client.bench.cli import add_arguments

    add_arguments(p)


def _logit_bias(text: str) -> tuple[int, float]:
    """TOKEN=BIAS, e.g. 50256=-100."""
    tok, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(tok), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN=BIAS (e.g. 2=-100), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = EnvArgumentParser(prog="tandem", description="Tandem LLM inference server: client and launcher.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a completion", description="Generate a completion.")
    _prompt_args(g)
    g.add_argument("--token-ids", type=_token_ids, default=None, help="prompt as token ids, e.g. '1,2,3'")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=None, help="stop token (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="return logprobs with this many alternatives")
    g.add_argument("--request-id", default=None)
    g.add_argument("--cache-salt", default=None,
                   help="requests with different salts never share the server's prefix-cache blocks")
    g.add_argument("--n", type=int, default=None, help="samples of the prompt (1 to 16), sharing its prefill")
    g.add_argument("--repetition-penalty", type=float, default=None, help="transformers' (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's, in [-2, 2]")
    g.add_argument("--logit-bias", type=_logit_bias, action="append", default=None, metavar="TOKEN=BIAS",
                   help="add BIAS (in [-100, 100]) to token id TOKEN's logit (repeatable)")
    g.add_argument("--min-tokens", type=int, default=None, help="no EOS or stop token before this many tokens")
    # Structured output: at most one of these (the server refuses constraints when it has no engine).
    g.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                   help="the output follows this JSON Schema (JSON text starting with '{', or a file holding it)")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", default=None, help="the whole output matches this regular expression")
    g.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    g.add_argument("--grammar", default=None, metavar="FILE", help="the output follows the grammar in FILE")
    g.add_argument("--grammar-syntax", choices=("ebnf", "lark"), default="ebnf",
                   help="the syntax of --grammar: EBNF (GBNF, start rule `root`) or Lark (start rule `start`)")
    g.add_argument("--json", action="store_true", help="print JSON (one object per chunk with --stream)")
    _client_args(g)
    g.set_defaults(func=cmd_generate, subparser=g)

    i = sub.add_parser("info", help="show the served model", description="Show the served model.")
    i.add_argument("--json", action="store_true")
    _client_args(i)
    i.set_defaults(func=cmd_info, subparser=i)

    h = sub.add_parser(
        "health",
        help="check whether the server is serving",
        description="Print SERVING, NOT_SERVING or UNREACHABLE; exit 0 only when SERVING. With several replicas "
        "(or a dns: name, resolved now) each is checked on its own and printed as `ADDRESS STATUS`; exit 0 only "
        "when every one serves (--any: when one does).",
    )
    h.add_argument(
        "--wait", type=float, default=None, metavar="SECONDS", help="poll until serving, at most this long"
    )
    h.add_argument("--any", action="store_true", help="several replicas: exit 0 when at least one is SERVING")
    _client_args(h)
    h.set_defaults(func=cmd_health, subparser=h)

    t = sub.add_parser("tokenize", help="tokenize text as generate would", description="Tokenize a prompt.")
    _prompt_args(t)
    t.add_argument("--json", action="store_true")
    _client_args(t)
    t.set_defaults(func=cmd_tokenize, subparser=t)

    s = sub.add_parser(
        "serve",
        help="run the scheduler and the worker on this host",
        description="Run the scheduler and the worker as two supervised child processes. Flags the user "
        "sets are forwarded under the same names; unset ones are left to the children's own defaults.",
    )
    sg = s.add_argument_group("scheduler")
    sg.add_argument("--address", default=None, help=f"gRPC listen address (default {DEFAULT_ADDRESS})")
    sg.add_argument(
        "--pipeline-depth", type=int, choices=(0, 1, 2, 3), default=None,
        help="1 = sync, 2 = async, 3 = async with one plan more queued at the worker, 0 = auto (default: 2 on "
        "a CUDA worker, 1 on a CPU worker)"
    )
    sg.add_argument("--sync", action="store_true", help="same as --pipeline-depth 1")
    sg.add_argument("--max-waiting", type=int, default=None, help="queued requests before RESOURCE_EXHAUSTED")
    sg.add_argument("--default-max-new-tokens", type=int, default=None)
    sg.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: off)")
    sg.add_argument("--metrics-host", default=None, help="interface of the metrics endpoint (default localhost)")
    sg.add_argument("--http-port", type=int, default=None,
                    help="also serve the OpenAI-compatible HTTP API on this port (default: off)")
    sg.add_argument("--http-host", default=None, help="interface of the HTTP API (default localhost)")
    sg.add_argument("--stream-interval", type=int, default=None,
                    help="tokens per stream message, first token and end at once (default 1)")
    sg.add_argument("--no-prefix-caching", action="store_const", const=True, default=None,
                    help="compute every prompt in full (default: shared prefixes are computed once)")
    sg.add_argument("--worker-reconnect-timeout", type=float, default=None,
                    help="seconds the requests of a lost worker wait for its replacement (default 60; 0 = fail them)")
    both = s.add_argument_group("scheduler and worker")
    both.add_argument(
        "--engine-address", default=None, help=f"scheduler<->worker link (default {default_engine_address()})"
    )
    both.add_argument("--log-level", default=None)
    wg = s.add_argument_group("worker")
    wg.add_argument("--model", default=None, help=f"model to serve (default {DEFAULT_MODEL})")
    wg.add_argument("--device", default=None)
    wg.add_argument("--dtype", default=None)
    wg.add_argument("--block-size", type=int, default=None)
    wg.add_argument("--num-blocks", type=int, default=None)
    wg.add_argument("--kv-cache-memory-gb", type=float, default=None)
    wg.add_argument("--max-num-tokens", type=int, default=None)
    wg.add_argument("--max-num-rows", type=int, default=None)
    wg.add_argument("--max-context", type=int, default=None)
    wg.add_argument("--seed", type=int, default=None)
    wg.add_argument("--tensor-parallel-size", type=int, default=None,
                    help="split the model over N worker ranks (one process each; NCCL on CUDA, gloo on CPU)")
    wg.add_argument("--skip-tokenizer", action="store_const", const=True, default=None,
                    help="load no tokenizer: serve token ids only (text, chat and stop strings are refused)")
    wg.add_argument("--allow-pickle-weights", action="store_const", const=True, default=None,
                    help="load a model directory's .bin (pickle) weights when it has no safetensors")
    sg.add_argument("--drain-timeout", type=float, default=None,
                    help="on SIGTERM, seconds requests in flight get to finish (default 30)")
    s.add_argument("--grace", type=float, default=None,
                   help="seconds the children get to exit before SIGKILL (default: drain timeout + 10)")
    s.set_defaults(func=cmd_serve, subparser=s)

    b = sub.add_parser(
        "bench",
        help="load-test a server (vllm bench serve's flags, over gRPC streams)",
        description="Send a workload on an arrival schedule and report TTFT, TPOT, ITL, E2EL, throughput "
        "and goodput with vLLM's definitions. See docs/bench.md.",
    )
    bench_arguments(b)
    b.set_defaults(func=cmd_bench, subparser=b)
    return parser


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from client.bench.cli import main as bench_main

    return bench_main(args)


def _messages(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict[str, str]] | None:
    if not (args.chat or args.system is not None):
        return None
    if args.prompt is None:
        parser.error("--chat needs a prompt")
    msgs = [{"role": "system", "content": args.system}] if args.system is not None else []
    return msgs + [{"role": "user", "content": args.prompt}]


def _read_prompt(args: argparse.Namespace) -> None:
    if args.prompt == "-":
        args.prompt = sys.stdin.read()


def _read_text(path: str, flag: str, parser: argparse.ArgumentParser) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        parser.error(f"{flag}: cannot read {path!r}: {e.strerror}")


def _constraint_kwargs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--json-schema / --json-object / --regex / --choice / --grammar as generate's keyword arguments."""
    given = [flag for flag, value in (("--json-schema", args.json_schema), ("--json-object", args.json_object or None),
                                      ("--regex", args.regex), ("--choice", args.choice),
                                      ("--grammar", args.grammar)) if value is not None]
    if len(given) > 1:
        parser.error(f"give at most one constraint, not {' and '.join(given)}")
    if args.json_schema is not None:
        text = args.json_schema
        schema = text if text.lstrip().startswith("{") else _read_text(text, "--json-schema", parser)
        return {"json_schema": schema}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice is not None:
        return {"choice": args.choice}
    if args.grammar is not None:
        return {"grammar": _read_text(args.grammar, "--grammar", parser), "grammar_syntax": args.grammar_syntax}
    return {}


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _read_prompt(args)
    if args.prompt is None and args.token_ids is None:
        parser.error("give a PROMPT (or '-' for stdin) or --token-ids")
    if args.prompt is not None and args.token_ids is not None:
        parser.error("give either a PROMPT or --token-ids, not both")
    if args.token_ids is not None and (args.chat or args.system is not None):
        parser.error("--chat/--system need a text PROMPT, not --token-ids")
    messages = _messages(args, parser)
    kwargs: dict[str, Any] = dict(
        prompt=None if messages is not None else args.prompt,
        token_ids=args.token_ids,
        messages=messages,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        request_id=args.request_id,
        cache_salt=args.cache_salt,
        n=args.n,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=dict(args.logit_bias) if args.logit_bias else None,
        min_tokens=args.min_tokens,
        **_constraint_kwargs(args, parser),
    )
    if args.n is not None and args.n > 1 and args.stream and not args.json:
        parser.error("--n > 1 with --stream needs --json (the samples' chunks interleave, each with its index)")
    with TandemClient(args.address, timeout=args.timeout, **connection_kwargs(args)) as client:
        try:
            if not args.stream:
                result = client.generate(**kwargs)
                if args.json:
                    _json_dump(result, sys.stdout)
                elif result.choices:
                    for choice in result.choices:
                        print(f"--- sample {choice.index} ---\n{choice.text}", flush=True)
                        print(_summary(choice.finish_reason, choice.matched_stop, choice.usage, choice.timings),
                              file=sys.stderr)
                else:
                    print(result.text, flush=True)
                    print(
                        _summary(result.finish_reason, result.matched_stop, result.usage, result.timings),
                        file=sys.stderr,
                    )
                return 0
            with client.generate_stream(**kwargs) as stream:
                last: StreamChunk | None = None
                for chunk in stream:
                    last = chunk
                    if args.json:
                        _json_dump(chunk, sys.stdout)
                    elif chunk.text:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
            if not args.json:
                print(flush=True)
                if last is not None and last.completion is not None:
                    c = last.completion
                    print(_summary(c.finish_reason, c.matched_stop, c.usage, c.timings), file=sys.stderr)
            return 0
        except TandemError as e:
            if args.stream and not args.json:
                print(flush=True)  # end the partial line before the error
            _print_error(e)
            return 1


def cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    with TandemClient(args.address, timeout=args.timeout, **connection_kwargs(args)) as client:
        try:
            info = client.model_info()
        except TandemError as e:
            _print_error(e)
            return 1
    if args.json:
        _json_dump(info, sys.stdout)
    else:
        for key, value in dataclasses.asdict(info).items():
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            print(f"{key}: {value}")
    return 0


def _health_once(client: TandemClient, timeout: float) -> tuple[str, TandemError | None]:
    try:
        return client.health_status(timeout=timeout), None
    except TandemError as e:
        return "UNREACHABLE", e


def _replica_client(replica: Target, args: argparse.Namespace) -> TandemClient:
    # One server per client: each replica's own status, not the one grpc's balancer happens to pick.
    name = [("grpc.ssl_target_name_override", replica.tls_name)] if replica.tls_name else []
    return TandemClient(replica.target, options=[*POLL_CHANNEL_OPTIONS, *name], **connection_kwargs(args))


def cmd_health(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    per_call = args.timeout if args.timeout is not None else DEFAULT_HEALTH_TIMEOUT_S
    target = parse_target(args.address)
    if not target.balanced:
        with TandemClient(args.address, options=POLL_CHANNEL_OPTIONS, **connection_kwargs(args)) as client:
            status, err = _health_once(client, per_call)
            if args.wait is not None:
                deadline = time.monotonic() + args.wait
                while status != "SERVING" and (left := deadline - time.monotonic()) > 0:
                    time.sleep(min(0.25, left))
                    status, err = _health_once(client, max(0.05, min(per_call, deadline - time.monotonic())))
        print(status, flush=True)
        if err is not None and err.code not in UNREACHABLE_CODES:
            _print_error(err)
        return 0 if status == "SERVING" else 1
    return _health_replicas(target, args, per_call)


def _health_replicas(target: Target, args: argparse.Namespace, per_call: float) -> int:
    deadline = time.monotonic() + (args.wait or 0.0)
    clients: dict[str, TandemClient] = {}
    try:
        while True:
            try:
                replicas = replica_targets(target)  # a dns: name again each round: pods come and go
            except ValueError as e:
                replicas, unresolved = [], str(e)
            else:
                unresolved = ""
            results: dict[str, tuple[str, TandemError | None]] = {}
            for r in replicas:
                if r.target not in clients:
                    clients[r.target] = _replica_client(r, args)
                left = deadline - time.monotonic()
                results[r.target] = _health_once(clients[r.target],
                                                 per_call if args.wait is None else max(0.05, min(per_call, left)))
            serving = sum(status == "SERVING" for status, _ in results.values())
            ok = serving > 0 if args.any else bool(results) and serving == len(results)
            if ok or args.wait is None or time.monotonic() >= deadline:
                break
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    finally:
        for c in clients.values():
            c.close()
    if unresolved:
        print(f"{target.target} UNREACHABLE ({unresolved})", flush=True)
    for address, (status, err) in results.items():
        print(f"{address} {status}", flush=True)
        if err is not None and err.code not in UNREACHABLE_CODES:
            _print_error(err)
    return 0 if ok else 1


def cmd_tokenize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _read_prompt(args)
    if args.prompt is None:
        parser.error("give a PROMPT (or '-' for stdin)")
    messages = _messages(args, parser)
    with TandemClient(args.address, timeout=args.timeout, **connection_kwargs(args)) as client:
        try:
            result = client.tokenize(None if messages is not None else args.prompt, messages=messages)
        except TandemError as e:
            _print_error(e)
            return 1
    if args.json:
        _json_dump(result, sys.stdout)
    else:
        tokens = result.tokens if len(result.tokens) == len(result.token_ids) else [""] * len(result)
        for tid, tok in zip(result.token_ids, tokens, strict=True):
            print(f"{tid}\t{tok!r}")
        print(f"[{len(result)} tokens]", file=sys.stderr)
    return 0


# (dest, flag) pairs forwarded to each child when the user set them.
SCHEDULER_FLAGS = [
    ("address", "--address"),
    ("engine_address", "--engine-address"),
    ("pipeline_depth", "--pipeline-depth"),
    ("max_waiting", "--max-waiting"),
    ("default_max_new_tokens", "--default-max-new-tokens"),
    ("drain_timeout", "--drain-timeout"),
    ("metrics_port", "--metrics-port"),
    ("metrics_host", "--metrics-host"),
    ("http_port", "--http-port"),
    ("http_host", "--http-host"),
    ("no_prefix_caching", "--no-prefix-caching"),
    ("stream_interval", "--stream-interval"),
    ("worker_reconnect_timeout", "--worker-reconnect-timeout"),
    ("log_level", "--log-level"),
]
WORKER_FLAGS = [
    ("model", "--model"),
    ("engine_address", "--engine-address"),
    ("device", "--device"),
    ("dtype", "--dtype"),
    ("block_size", "--block-size"),
    ("num_blocks", "--num-blocks"),
    ("kv_cache_memory_gb", "--kv-cache-memory-gb"),
    ("max_num_tokens", "--max-num-tokens"),
    ("max_num_rows", "--max-num-rows"),
    ("max_context", "--max-context"),
    ("seed", "--seed"),
    ("tensor_parallel_size", "--tensor-parallel-size"),
    ("skip_tokenizer", "--skip-tokenizer"),
    ("allow_pickle_weights", "--allow-pickle-weights"),
    ("log_level", "--log-level"),
]


def _forward(args: argparse.Namespace, flags: list[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for dest, flag in flags:
        value = getattr(args, dest)
        if dest == "pipeline_depth" and args.sync:
            value = 1  # forwarded as the depth, which the scheduler reads whatever its --sync spelling
        if value is True:  # a switch
            out.append(flag)
        elif value is not None:
            out += [flag, str(value)]
    return out


def serve_commands(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The scheduler's and the worker's command lines for parsed `tandem serve` arguments."""
    return (
        [sys.executable, "-m", "scheduler_svc", *_forward(args, SCHEDULER_FLAGS)],
        [sys.executable, "-m", "worker_svc", *_forward(args, WORKER_FLAGS)],
    )


def _tandem_command() -> str:
    """How the user can type `tandem`: bare when it is on PATH, else the venv's path (after `make run`)."""
    ours = os.path.join(os.path.dirname(sys.executable), "tandem")
    found = shutil.which("tandem")
    if found and os.path.realpath(found) == os.path.realpath(ours):
        return "tandem"
    return os.path.relpath(ours) if os.path.exists(ours) else "tandem"


def _announce_when_serving(sup: Supervisor, address: str, out: TextIO, http_url: str = "") -> None:
    hint = "" if address == DEFAULT_ADDRESS else f" --address {address}"
    with TandemClient(address, options=POLL_CHANNEL_OPTIONS) as client:
        while not sup.stopping.is_set():
            status, _ = _health_once(client, 1.0)
            if status == "SERVING":
                print(
                    f"Tandem is serving on {address} — try: "
                    f'{_tandem_command()} generate "What is the capital of France?" --chat{hint}',
                    file=out,
                    flush=True,
                )
                if http_url:
                    print(f"OpenAI-compatible API on {http_url} — try: curl {http_url}/models", file=out, flush=True)
                return
            sup.stopping.wait(0.5)


def worker_group(worker: list[str], env: dict[str, str], size: int) -> list[ChildSpec]:
    """The worker's processes: one, or one per tensor-parallel rank with torchrun's variables (a
    rendezvous on a free local port), supervised as a group that restarts as one."""
    spec = {"restart": True, "fatal_codes": (exit_codes.LOAD_ERROR,), "stay_down_codes": (exit_codes.REPLACED,)}
    if size <= 1:
        return [ChildSpec("worker", worker, env=env, **spec)]
    port = free_port()
    ranks = []
    for rank in range(size):
        rank_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                    "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size)}
        ranks.append(ChildSpec(f"worker rank {rank}", worker, env=rank_env, group="worker", **spec))
    return ranks


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.sync and args.pipeline_depth in (2, 3):
        parser.error(f"--sync contradicts --pipeline-depth {args.pipeline_depth}")
    address = args.address or DEFAULT_ADDRESS
    private = None
    if args.engine_address is None:
        # Each instance its own link: two `tandem serve` on one host (two models, two GPUs) can never
        # hand one's restarting worker to the other's scheduler.
        base = os.path.dirname(default_engine_address()[len("ipc://"):])
        prepare_ipc_address(f"ipc://{base}/x")
        private = tempfile.mkdtemp(prefix="serve-", dir=base)
        args.engine_address = f"ipc://{private}/engine.sock"
    # The scheduler creates it too; doing it first means the worker never waits on a missing directory.
    prepare_ipc_address(args.engine_address)
    scheduler, worker = serve_commands(args)
    # The instance token: the scheduler serves only a worker that presents it, so no other instance's
    # worker can ever join this one. Through the environment, which `ps` does not show; one the user
    # set (to add workers of their own) is kept.
    env = {**os.environ, "TANDEM_INSTANCE_TOKEN": os.environ.get("TANDEM_INSTANCE_TOKEN") or secrets.token_hex(16)}
    sup = Supervisor(
        # A dead worker is restarted and the scheduler takes it back; a dead scheduler ends `serve`.
        [ChildSpec("scheduler", scheduler, env=env), *worker_group(worker, env, args.tensor_parallel_size or 1)],
        grace_s=args.grace if args.grace is not None else (args.drain_timeout or 30.0) + 10.0,
        name="tandem serve",
    )

    def on_started(s: Supervisor) -> None:
        http_url = f"http://{args.http_host or 'localhost'}:{args.http_port}/v1" if args.http_port else ""
        threading.Thread(target=_announce_when_serving, args=(s, address, sys.stdout, http_url), daemon=True).start()

    try:
        return sup.run(on_started)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Usage errors of a subcommand are reported by that subcommand's parser (its usage line).
    sub_parser: argparse.ArgumentParser = args.subparser
    try:
        return args.func(args, sub_parser)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ValueError as e:
        # Client-side argument checks (e.g. a value out of a proto field's range) are usage errors.
        sub_parser.error(str(e))
        return 2  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
