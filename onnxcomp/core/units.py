"""Counts and sizes as people read them in reports."""

from __future__ import annotations


def format_count(value: int) -> str:
    """1234 -> '1.23 K', 5_600_000 -> '5.60 M'; below 1000 as is."""
    for scale, unit in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)


def format_bytes(value: int | None) -> str:
    """Bytes in B/KB/MB/GB (powers of 1024)."""
    if value is None:
        return "-"
    for scale, unit in ((1024**3, "GB"), (1024**2, "MB"), (1024, "KB")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"
