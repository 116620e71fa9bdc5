"""Rich renderings of what onnxcomp measured: per-pass records and fidelity."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from onnxcomp.converter.base import PassRecord
from onnxcomp.converter.verify import Fidelity


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _what_changed(record: PassRecord, max_lines: int = 40) -> str:
    """The summary, then one line per change (the first ``max_lines``)."""
    lines = [record.summary, *(c for c in record.changes if c != record.summary)]
    if len(lines) > max_lines + 1:
        lines = [*lines[: max_lines + 1], f"... and {len(lines) - max_lines - 1} more"]
    return "\n".join(lines)


def render_passes(records: Sequence[PassRecord], console: Console, max_skipped: int = 10) -> None:
    table = Table(title="Passes", title_justify="left")
    table.add_column("pass")
    table.add_column("lossless")
    table.add_column("nodes", justify="right")
    table.add_column("what changed")
    table.add_column("time", justify="right")
    for record in records:
        table.add_row(
            record.name,
            "yes" if record.lossless else "no",
            f"{record.nodes_before} -> {record.nodes_after}" if record.nodes_before else "",
            _what_changed(record),
            f"{record.seconds:.2f}s",
        )
    console.print(table)
    for record in records:
        if not record.skipped:
            continue
        console.print(f"[bold]{record.name}[/] left {len(record.skipped)} place(s) alone:")
        for skipped in record.skipped[:max_skipped]:
            console.print(f"  - {skipped.node}: {skipped.reason}")
        if len(record.skipped) > max_skipped:
            console.print(f"  ... and {len(record.skipped) - max_skipped} more (see --report)")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_fidelity(
    fidelity: Fidelity, console: Console, names: tuple[str, str] = ("original", "converted")
) -> None:
    table = Table(
        title=f"Fidelity on {fidelity.source} ({fidelity.samples} samples)",
        caption="rel err: max abs error / max |original output|",
        title_justify="left",
    )
    for column in ("output", "max abs err", "mean abs err", "rel err", "cosine", "top-1 agree"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in fidelity.outputs:
        table.add_row(
            out.name,
            f"{out.max_abs_error:.3g}",
            f"{out.mean_abs_error:.3g}",
            f"{out.relative_error:.3g}",
            f"{out.cosine:.6f}",
            pct(out.top1_agreement),
        )
    console.print(table)
    render_accuracy(console, fidelity.reference_accuracy, fidelity.candidate_accuracy, names)
    for note in fidelity.notes:
        console.print(f"note: {note}")


def render_accuracy(
    console: Console, reference: float | None, candidate: float | None, names: tuple[str, str]
) -> None:
    """One line: both accuracies and the difference in points (nothing without labels)."""
    if reference is None or candidate is None:
        return
    delta = 100 * (candidate - reference)
    console.print(
        f"accuracy: {names[0]} {pct(reference)}, {names[1]} {pct(candidate)} ({delta:+.2f} points)"
    )
