"""``onnxcomp convert``: run the compression passes, verify, save."""

from __future__ import annotations

import json

from onnxcomp.cli.convert_options import ConvertFlags
from onnxcomp.cli.options import flags_command
from onnxcomp.cli.progress import progress_bar
from onnxcomp.cli.root import console, set_debug


@flags_command(ConvertFlags)
def convert(flags: ConvertFlags) -> None:
    """Run the compression passes, verify the result against the original, save it."""
    # Imported here so that --help does not load onnx and ONNX Runtime.
    from onnxcomp.cli.convert_configs import convert_job
    from onnxcomp.converter.convert import ConvertHooks
    from onnxcomp.converter.convert import convert as run_convert
    from onnxcomp.report import human_bytes, render_fidelity, render_passes

    set_debug(flags.debug)
    job = convert_job(flags)  # every option checked before the model is read
    with progress_bar("passes") as bar:
        hooks = ConvertHooks(bar.start_pass, bar.restart, bar.advance)
        result = run_convert(
            flags.model,
            job.output,
            job.pipeline,
            job.verify,
            job.session,
            force=flags.force,
            hooks=hooks,
            calibration=job.calibration,
            sparse_initializers=job.sparse_initializers,
        )
    render_passes(result.records, console)
    if result.fidelity is not None:
        render_fidelity(result.fidelity, console)
    else:
        console.print("[yellow]verification skipped (--no-verify)[/]")
    for note in result.notes:
        if result.fidelity is None or note not in result.fidelity.notes:
            console.print(f"note: {note}")
    console.print(
        f"wrote {result.output_path}: {human_bytes(result.output_bytes)} "
        f"(was {human_bytes(result.input_bytes)}) in {result.seconds:.1f}s"
    )
    if flags.report:
        flags.report.write_text(json.dumps(result.to_dict(), indent=2))
