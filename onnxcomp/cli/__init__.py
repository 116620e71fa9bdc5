"""The ``onnxcomp`` command line (Typer for arguments, Rich for tables and progress).

- :mod:`~onnxcomp.cli.root`: the Typer app, ``--debug``/``--version``, the consoles.
- :mod:`~onnxcomp.cli.entry`: :func:`main`, the one place errors become one line and an exit code.
- :mod:`~onnxcomp.cli.options`: option groups shared by the commands (data, session, ...).
- :mod:`~onnxcomp.cli.configs`: those groups turned into typed configs.
- one module per command; ``convert``'s options in :mod:`~onnxcomp.cli.convert_options`, its
  configs built (and checked) in :mod:`~onnxcomp.cli.convert_configs`.
- :mod:`~onnxcomp.cli.progress`: the Rich progress bar.

``onnxcomp --help`` must stay fast, so the command modules import only Typer and Rich at module
level; each command function imports the library modules it runs (onnx, ONNX Runtime, torch) at
its top. That is the only reason for those function-level imports.
"""

from __future__ import annotations

from onnxcomp.cli import (
    bench,
    compare,
    convert,
    debug,
    deploy,
    distill,
    export,
    finetune,
    inspect,
    pack,
)
from onnxcomp.cli.entry import main
from onnxcomp.cli.root import app

# The commands, in the order --help lists them.
for _command in (
    inspect.inspect,
    convert.convert,
    compare.compare,
    debug.debug,
    bench.bench,
    deploy.deploy,
    export.export,
    finetune.finetune,
    distill.distill,
    pack.pack,
    pack.unpack,
):
    app.command()(_command)

__all__ = ["app", "main"]
