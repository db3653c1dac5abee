"""`python -m scheduler_svc`: the CPU scheduler process (gRPC API, optional OpenAI-compatible HTTP API, engine
link). Never imports torch."""

from __future__ import annotations

import asyncio
import os
import sys

from tandem.envargs import EnvArgumentParser, default_engine_address
from tandem.logs import configure as configure_logging

from scheduler_svc.core.engine import EngineConfig
from scheduler_svc.core.link import refuse_live_ipc
from scheduler_svc.frontend.auth import check_bind, load_keys
from scheduler_svc.frontend.server import SchedulerServer, ServerConfig
from scheduler_svc.frontend.validation import RequestLimits


def parse_args(argv: list[str] | None = None):
    p = EnvArgumentParser(prog="python -m scheduler_svc", description="Tandem scheduler process (CPU).")
    p.add_argument("--address", default="localhost:50051", help="gRPC listen address.")
    p.add_argument("--engine-address", default=default_engine_address(),
                   help="ZeroMQ address the worker connects to (ipc:// or tcp://).")
    p.add_argument("--pipeline-depth", type=int, choices=(0, 1, 2, 3), default=0,
                   help="Steps in flight: 2 = asynchronous (run ahead with carry-over), 1 = synchronous, "
                        "3 = one plan more queued at the worker (the core's and the worker's host work each "
                        "get a device step), 0 = auto (2 for a CUDA worker, 1 for a CPU worker).")
    p.add_argument("--sync", action="store_true", help="Same as --pipeline-depth 1.")
    p.add_argument("--max-waiting", type=int, default=256, help="Waiting-queue bound (RESOURCE_EXHAUSTED past it).")
    p.add_argument("--max-num-rows", type=int, default=0, help="Cap on requests per step (0 = worker's).")
    p.add_argument("--max-num-tokens", type=int, default=0, help="Cap on tokens per step (0 = worker's).")
    p.add_argument("--default-max-new-tokens", type=int, default=256,
                   help="max_new_tokens when a request gives none (capped by the context).")
    p.add_argument("--max-stop-strings", type=int, default=16)
    p.add_argument("--max-stop-length", type=int, default=256)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="Tokens per stream message: a stream sends once this many accumulated (its first token "
                        "and its end at once); larger values cost the front end less under many streams.")
    p.add_argument("--max-grammar-bytes", type=int, default=64 << 10,
                   help="Largest structured-output constraint (JSON schema, regex, choices, grammar) in bytes "
                        "(INVALID_ARGUMENT past it).")
    p.add_argument("--debug-placeholders", action="store_true",
                   help="Send carry-over placeholders as a sentinel (not 0); a worker started with the same "
                        "flag asserts on the device that none survives carry-over.")
    p.add_argument("--debug-check-state", action="store_true",
                   help="After every step, check that the worker's row slots (context lengths, block tables) agree "
                        "with the scheduler's: the worker returns a digest, a mismatch ends the session INTERNAL.")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="Compute every prompt in full (default: full KV blocks of a prefix already computed are "
                        "shared by the requests that start with it).")
    p.add_argument("--step-trace", default="",
                   help="Append one JSON line per request submitted, step planned and result received to this "
                        "file (the core's view of the schedule, for diagnosis; off by default).")
    p.add_argument("--worker-reconnect-timeout", type=float, default=60.0,
                   help="When the worker is lost, the requests it held (and new ones, up to --max-waiting) wait this "
                        "long for a worker to connect, then resume where they were (recomputed; greedy and seeded "
                        "ones give the same tokens); past it they end UNAVAILABLE. 0 = fail them at once.")
    p.add_argument("--step-timeout", type=float, default=60.0,
                   help="Watchdog: a worker returning no step result for this long while steps are in flight is "
                        "treated as dead (0 = off).")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="On SIGTERM/SIGINT: seconds requests in flight get to finish before they end UNAVAILABLE.")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 = off).")
    p.add_argument("--metrics-host", default="localhost",
                   help="Interface of the metrics endpoint (0.0.0.0 for a scraper on another host).")
    p.add_argument("--http-port", type=int, default=0,
                   help="Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                        "/health, /tokenize) on this port (0 = off), with the same API keys, TLS and limits as gRPC.")
    p.add_argument("--http-host", default="localhost",
                   help="Interface of the HTTP API; one reachable beyond this host needs API keys or --insecure, "
                        "as the gRPC address does.")
    p.add_argument("--link-curve-secret", default="",
                   help="CURVE secret key file (NAME.key_secret) for a tcp:// engine link: encrypted, workers "
                        "authenticated (`python -m tandem.linkkeys DIR` creates keys).")
    p.add_argument("--link-curve-clients", default="",
                   help="Directory of the public key files (NAME.key) of the workers allowed to connect.")
    p.add_argument("--instance-token", default="",
                   help="Serve only workers that present this secret (tandem serve hands one to its scheduler "
                        "and worker through the environment; prefer it to the flag, which `ps` shows).")
    p.add_argument("--api-keys-file", default=None, help="Bearer tokens clients must send, one per line.")
    p.add_argument("--api-keys", default=None, help="Bearer tokens, comma-separated (prefer the file or the "
                                                    "TANDEM_API_KEYS environment variable: argv is visible to all).")
    p.add_argument("--health-without-auth", action="store_true", help="Health checks need no token.")
    p.add_argument("--insecure", action="store_true",
                   help="Serve a non-loopback address without authentication anyway.")
    p.add_argument("--tls-cert", default="", help="PEM certificate chain: serve TLS.")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert.")
    p.add_argument("--tls-client-ca", default="", help="PEM CA bundle: require client certificates (mutual TLS).")
    p.add_argument("--max-concurrent-rpcs", type=int, default=0,
                   help="RPCs served at once (0 = no cap); more get RESOURCE_EXHAUSTED.")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.stream_interval < 1:
        p.error(f"--stream-interval must be at least 1 (got {args.stream_interval})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "scheduler")
    try:
        keys = load_keys(args.api_keys_file, args.api_keys)
        check_bind(args.address, bool(keys), args.insecure)
        if args.http_port:
            host = f"[{args.http_host}]" if ":" in args.http_host else args.http_host
            check_bind(f"{host}:{args.http_port}", bool(keys), args.insecure)
        if args.link_curve_secret and not args.link_curve_clients:
            raise ValueError("--link-curve-secret needs --link-curve-clients (the workers' public keys)")
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            raise ValueError("--tls-cert and --tls-key go together; --tls-client-ca needs them")
        refuse_live_ipc(args.engine_address)  # never take over another live scheduler's link
    except (ValueError, OSError) as exc:
        print(f"scheduler: {exc}", file=sys.stderr)
        return 2
    if args.instance_token:
        os.environ["TANDEM_INSTANCE_TOKEN"] = args.instance_token  # the core process reads it (core/__main__.py)
    config = ServerConfig(
        address=args.address,
        engine_address=args.engine_address,
        link_curve_secret=args.link_curve_secret,
        link_curve_clients=args.link_curve_clients,
        drain_timeout_s=args.drain_timeout,
        api_keys=tuple(keys),
        health_without_auth=args.health_without_auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        http_host=args.http_host,
        engine=EngineConfig(
            pipeline_depth=1 if args.sync else args.pipeline_depth,
            max_waiting=args.max_waiting,
            step_timeout_s=args.step_timeout,
            max_num_rows=args.max_num_rows,
            max_num_tokens=args.max_num_tokens,
            debug_placeholders=args.debug_placeholders,
            debug_check_state=args.debug_check_state,
            prefix_caching=not args.no_prefix_caching,
            step_trace=args.step_trace,
            worker_reconnect_timeout_s=args.worker_reconnect_timeout,
        ),
        log_level=args.log_level,
        limits=RequestLimits(
            default_max_new_tokens=args.default_max_new_tokens,
            max_stop_strings=args.max_stop_strings,
            max_stop_length=args.max_stop_length,
            max_logprobs=args.max_logprobs,
            max_grammar_bytes=args.max_grammar_bytes,
            stream_interval=args.stream_interval,
        ),
    )

    async def run() -> None:
        await SchedulerServer(config).serve_forever()

    try:
        asyncio.run(run())
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
