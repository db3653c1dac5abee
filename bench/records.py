"""What the benchmarks share in their reports: a table cell that may be missing, and the JSON record."""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def fmt(value: float | None, spec: str) -> str:
    """A table cell: `value` formatted, or "-" where there is none."""
    return "-" if value is None else format(value, spec)


def cpu_header(prog: str, argv: list[str] | None) -> dict[str, Any]:
    """A CPU benchmark's record header: the command as run, when, on what machine."""
    return {"command": f"python -m {prog} " + " ".join(sys.argv[1:] if argv is None else argv),
            "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine()}


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Writes a benchmark's JSON record (folders made as needed) and says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path
