"""`python -m scheduler_svc.core`: the scheduler's core process (scheduler, KV blocks, engine link).

The front end (the scheduler process proper: gRPC, tokenizing, detokenizing, stop strings, metrics)
starts this process and talks to it over a private PAIR socket (core_link.py); the worker connects
to the engine link this process binds. Split so that planning never waits behind per-stream work:
measured at 1024 concurrent streams on 2 cores (docs/benchmarks.md), the front end's work was about
42 ms per step against 2.6 ms for the core's, longer than a GPU decode step at that batch. Its
configuration arrives as one JSON argument (no pickle); it exits when its parent does, and on
SIGTERM/SIGINT. Never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from tandem.logs import configure as configure_logging

from scheduler_svc.core.core_link import CoreLink
from scheduler_svc.core.engine import Engine, EngineConfig
from scheduler_svc.core.link import EngineLink

log = logging.getLogger("tandem.core")

PARENT_POLL_S = 0.5
INSTANCE_TOKEN_ENV = "TANDEM_INSTANCE_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc.core", description=__doc__.split("\n\n")[0])
    p.add_argument("--front-address", required=True, help="The front end's PAIR socket (ipc://).")
    p.add_argument("--engine-address", required=True, help="Where the worker connects (bound here).")
    p.add_argument("--engine-config", default="{}", help="EngineConfig fields as a JSON object.")
    p.add_argument("--link-curve-secret", default="")
    p.add_argument("--link-curve-clients", default="")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    config = EngineConfig(**json.loads(args.engine_config))
    try:
        link = EngineLink(args.engine_address, args.link_curve_secret, args.link_curve_clients)
    except Exception as exc:  # an address in use, bad keys: the front end sees us exit and says why
        log.error("cannot bind the engine link %s: %s", args.engine_address, exc)
        return 2
    front = CoreLink(args.front_address, bind=False)
    # From the environment, not the command line (which `ps` shows): the scheduler process sets it.
    engine = Engine(link, front, config, instance_token=os.environ.get(INSTANCE_TOKEN_ENV, ""))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def orphaned() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_POLL_S)
        log.error("the front end went away; exiting")

    tasks = [asyncio.ensure_future(t) for t in (engine.run(), stop.wait(), orphaned())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    code = 0
    if tasks[0] in done and tasks[0].exception() is not None:
        log.error("engine loop died", exc_info=tasks[0].exception())
        code = 1
    elif tasks[2] in done:
        code = 1
    bye = engine.close(bye=tasks[1] in done)  # SIGTERM/SIGINT: an orderly stop
    link.close(linger_ms=500 if bye else 0)
    front.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "scheduler")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
