"""The console-script entry point, and the one place that turns errors into exit codes.

An :class:`~onnxcomp.errors.OnnxcompError` (bad input, a wrong option: its subclass
:class:`~onnxcomp.errors.OptionError`, a failed verification) is printed as one line and exits
with 2; any other exception is an internal error, one line and exit 1. ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

from rich.markup import escape

from onnxcomp.cli.root import STATE, app, err_console
from onnxcomp.errors import OnnxcompError


def _one_line(label: str, message: str) -> None:
    # escaped: a message may hold brackets ("pip install 'onnxcomp[torch]'") Rich would eat
    err_console.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line for bad input (exit 2); tracebacks only with --debug."""
    STATE.debug = False
    try:
        app(args=argv, prog_name="onnxcomp")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OnnxcompError as exc:
        if STATE.debug:
            raise
        _one_line("error", str(exc))
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:
        if STATE.debug:
            raise
        _one_line(
            "internal error",
            f"{type(exc).__name__}: {exc} (run again with --debug for the traceback)",
        )
        return 1
    return 0
