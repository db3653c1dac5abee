"""What the benchmarks share in their reports: a table cell that may be missing, and the JSON record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fmt(value: float | None, spec: str) -> str:
    """A table cell: `value` formatted, or "-" where there is none."""
    return "-" if value is None else format(value, spec)


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Writes a benchmark's JSON record (folders made as needed) and says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path
