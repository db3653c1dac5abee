"""Logging for both processes: structlog in front, the standard library (and grpc's Python loggers)
rendered by the same processors.

Owns one decision: JSON lines when stderr is not a terminal (containers, files, log shippers), a
coloured console renderer when it is; `TANDEM_LOG_FORMAT=json|console` overrides. Every line carries
`timestamp` (UTC, ISO 8601), `level`, `logger`, `process` (scheduler | worker) and whatever is
bound in the calling task's context (the scheduler binds `request_id` per RPC), so one grep for a
request id finds its lines in both processes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def configure(level: str = "INFO", process: str = "", fmt: str | None = None) -> None:
    fmt = (fmt or os.environ.get("TANDEM_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")).lower()

    def add_process(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        if process:
            event.setdefault("process", process)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_process,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Standard-library records (ours and grpc's) get the same fields; %-args are merged first.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    # The console renderer prints tracebacks itself; JSON wants them as a string field.
                    *([] if fmt == "console" else [structlog.processors.format_exc_info]), renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
