"""Shared benchmark pieces: the matmul peak, peak RSS, and result tables."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

from chatforge.core.io import UserError


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0,
                device: str = "cpu") -> float:
    """Sustained FLOP/s of square GEMMs (2*n^3 per matmul): the ceiling MFU is measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def bf16_supported(device: str = "cpu") -> bool:
    try:
        x = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
        x @ x
        return True
    except RuntimeError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    from chatforge.core.log import console

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def wait_until_up(proc: Any, url: str, timeout_s: float, what: str, output: Callable[[], str]) -> Any:
    """Poll `url` until it answers 200; a clear error with the tail of `output()` if `proc` exits or times out."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited ({proc.returncode}): {output()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise UserError(f"{what} did not come up within {timeout_s:g} s")
