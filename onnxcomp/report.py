"""Rich renderings of what onnxcomp measured: per-pass records, fidelity, and the model
summary of ``inspect``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxcomp.converter.base import PassRecord
from onnxcomp.converter.verify import Fidelity
from onnxcomp.core.analysis import ModelSummary
from onnxcomp.core.units import format_bytes, format_count


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


def _shape_text(shape: list[int | str] | tuple[int, ...] | None) -> str:
    """A shape as escaped rich markup, e.g. ``[batch, 3, 224, 224]``."""
    return "-" if shape is None else escape("[" + ", ".join(str(d) for d in shape) + "]")


def _overview_table(summary: ModelSummary) -> Table:
    table = Table(title="Model", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    opsets = ", ".join(f"{domain} {version}" for domain, version in summary.opsets.items())
    table.add_row("path", escape(summary.path or "-"))
    table.add_row("file size", format_bytes(summary.file_bytes))
    table.add_row("IR version", str(summary.ir_version))
    table.add_row("opsets", escape(opsets))
    table.add_row("producer", escape(summary.producer or "-"))
    table.add_row("nodes", str(summary.num_nodes))
    table.add_row(
        "parameters",
        f"{format_count(summary.parameters)} ({summary.parameters:,}), "
        f"{format_bytes(summary.parameter_bytes)}",
    )
    table.add_row(
        f"MACs (batch {summary.batch})",
        f"{format_count(summary.total_macs)} ({summary.total_macs:,})",
    )
    if summary.unknown_shape_layers:
        table.add_row("uncounted layers", str(len(summary.unknown_shape_layers)))
    return table


def _io_table(summary: ModelSummary) -> Table:
    table = Table(title="Inputs and outputs")
    for column in ("kind", "name", "dtype", "shape"):
        table.add_column(column)
    for kind, infos in (("input", summary.inputs), ("output", summary.outputs)):
        for info in infos:
            table.add_row(kind, escape(info.name), info.dtype, _shape_text(info.shape))
    return table


def _histogram_table(summary: ModelSummary) -> Table:
    table = Table(title="Op histogram")
    table.add_column("op")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    total = max(summary.num_nodes, 1)
    for op, count in summary.op_histogram.items():
        table.add_row(escape(op), str(count), f"{100 * count / total:.1f}%")
    return table


def _layers_table(summary: ModelSummary, top: int) -> Table:
    ranked = sorted(summary.layers, key=lambda layer: -layer.macs)[:top]
    table = Table(title=f"Top {len(ranked)} of {len(summary.layers)} layers by MACs")
    table.add_column("node", overflow="fold", ratio=1)  # long exporter names wrap, not cut
    for column in ("op", "output", "weight"):
        table.add_column(column, no_wrap=True)
    table.add_column("MACs", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    total = max(summary.total_macs, 1)
    for layer in ranked:
        table.add_row(
            escape(layer.node),
            layer.op_type,
            _shape_text(layer.output_shape),
            _shape_text(layer.weight_shape),
            format_count(layer.macs),
            f"{100 * layer.macs / total:.1f}%",
        )
    return table


def render_summary(summary: ModelSummary, console: Console, top: int = 20) -> None:
    """Print the summary as rich tables: overview, I/O, op histogram and top-N layers."""
    console.print(_overview_table(summary))
    console.print(_io_table(summary))
    console.print(_histogram_table(summary))
    if summary.layers:
        console.print(_layers_table(summary, top))
    if summary.unknown_shape_layers:
        names = escape(", ".join(summary.unknown_shape_layers[:10]))
        more = len(summary.unknown_shape_layers) - 10
        suffix = f" and {more} more" if more > 0 else ""
        console.print(
            f"[yellow]MACs not counted (unknown shapes) for {len(summary.unknown_shape_layers)} "
            f"layer(s): {names}{suffix}[/yellow]",
            highlight=False,
        )
    for note in summary.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
