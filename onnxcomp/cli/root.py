"""The root of the command line: the Typer app, its ``--debug``/``--version`` callback, the
consoles, and whether tracebacks were asked for.

The commands are added to :data:`app` in :mod:`onnxcomp.cli` (in the order ``--help`` lists
them); :func:`onnxcomp.cli.entry.main` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from onnxcomp import __version__
from onnxcomp.cli.options import DebugOpt
from onnxcomp.errors import OptionError

console = Console()
err_console = Console(stderr=True)


@dataclass
class _State:
    debug: bool = False


STATE = _State()


def set_debug(debug: bool) -> None:
    """``--debug`` given to the root or to a command: show tracebacks."""
    STATE.debug = STATE.debug or debug


class _Commands(TyperGroup):
    """The root group: a value Typer refuses while parsing a command's options (not one of the
    choices, below a minimum) becomes an :class:`OptionError`, reported in one line like every
    other wrong option."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.BadParameter as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            raise OptionError(f"{exc.format_message()}{where}") from exc


app = typer.Typer(
    name="onnxcomp",
    help="Compress trained ONNX models and prove they still work.",
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: DebugOpt = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)
    ] = False,
) -> None:
    """Compress trained ONNX models and prove they still work."""
    # Imported here, not at the top, so that `onnxcomp --help` does not load onnx and ONNX
    # Runtime (this callback runs before any command, not for the root's --help).
    from onnxcomp.backends.ort import check_runtime_install

    set_debug(debug)
    warning = check_runtime_install()
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if version:
        console.print(f"onnxcomp {__version__}")
        raise typer.Exit()
