"""Rank-aware console output: print0, warnings, and the shared rich console."""

from __future__ import annotations

import os
import sys

from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args: object, **kwargs: object) -> None:
    """Print on rank 0 only (torchrun sets RANK)."""
    if rank() == 0:
        console.print(*args, **kwargs)


def warn(msg: str) -> None:
    if rank() == 0:
        err_console.print(f"[yellow]warning:[/yellow] {msg}")


def is_interactive() -> bool:
    return sys.stdout.isatty() and not os.environ.get("CI")
