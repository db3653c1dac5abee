"""Command-line flags with environment-variable equivalents, shared by every Tandem entry point.

Rule: flag `--foo-bar` reads its default from `TANDEM_FOO_BAR`; the flag given on the command line
wins. Compose files and containers set the environment; people type flags.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any


def env_name(flag: str) -> str:
    return "TANDEM_" + flag.lstrip("-").replace("-", "_").upper()


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to TANDEM_* environment variables."""

    def add_argument(self, *names: str, **kw: Any):  # type: ignore[override]
        long = next((n for n in names if n.startswith("--")), None)
        if long is not None and kw.get("action") not in ("help", "version"):
            var = env_name(long)
            if var in os.environ:
                raw = os.environ[var]
                action = kw.get("action")
                if action == "store_true" or action is argparse.BooleanOptionalAction:
                    kw["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif action == "append" or kw.get("nargs") in ("*", "+"):
                    kw["default"] = [s for s in raw.split(",") if s]
                else:
                    conv = kw.get("type", str)
                    kw["default"] = conv(raw)
            kw["help"] = (kw.get("help") or "") + f" [env {var}]"
        return super().add_argument(*names, **kw)


def default_engine_address() -> str:
    """ipc:// socket in a per-user 0700 directory: only this user's processes can reach the link."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{os.path.join(base, f'tandem-{os.getuid()}', 'engine.sock')}"


def prepare_ipc_address(address: str) -> None:
    """Creates the 0700 directory an ipc:// address lives in (no-op for tcp://)."""
    if not address.startswith("ipc://"):
        return
    directory = os.path.dirname(address[len("ipc://"):])
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
