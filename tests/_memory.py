"""Peak resident memory of this process (Linux /proc): for the tests' memory bounds and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

HAS_PROC = Path("/proc/self/clear_refs").exists()  # the kernel's resettable high-water mark


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the high-water mark to the current resident set; returns that resident set in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def peak_above_start(fn: Callable[[], T]) -> tuple[int, T]:
    """(peak resident bytes above the starting point while ``fn`` runs, its result)."""
    start = reset_peak()
    result = fn()
    return status_bytes("VmHWM") - start, result
