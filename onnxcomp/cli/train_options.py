"""Options and the shared run of ``finetune`` and ``distill`` (both train a student against an
ONNX teacher: :mod:`onnxcomp.training.job`).

Only Typer is imported at module level (``--help`` stays fast); :func:`run_training` imports
the library (torch among it) when a command runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxcomp.cli.options import DebugOpt, LimitOpt, PreprocessFlags, SessionFlags, choices
from onnxcomp.cli.root import console, err_console, set_debug
from onnxcomp.errors import OptionError

Loss = choices("Loss", "kd", "dkd", "at", "fitnets", "ce")
Device = choices("Device", "auto", "cpu", "cuda")
Recover = choices("Recover", "blocks")
PruneScope = choices("PruneScope", "layer", "global")

TeacherOpt = Annotated[
    Path, typer.Option("--teacher", help="Teacher ONNX model (run in ONNX Runtime).")
]
TrainDataOpt = Annotated[
    Path,
    typer.Option(
        "--data", help="Training data: an ImageFolder tree (labels), image folder, .npy, .npz."
    ),
]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")]


@dataclasses.dataclass(frozen=True)
class TrainFlags:
    """What ``finetune`` and ``distill`` share (after their own student argument)."""

    teacher: TeacherOpt
    data: TrainDataOpt
    output: OutputOpt
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs to train.", min=0)] = 10
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Learning rate. Default for finetune by student kind: float 1e-3 (with "
            "re-inserted BatchNorm), int8 QDQ 5e-5, binarized 1e-2; distill 0.1.",
        ),
    ] = None
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch.", min=1)] = 64
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 5e-4
    loss: Annotated[
        Loss,
        typer.Option(
            "--loss",
            help="kd (Hinton), dkd (decoupled KD), at / fitnets (KD + attention transfer / "
            "FitNets hints on the --feature pairs), ce (labels only).",
        ),
    ] = Loss.kd  # type: ignore[attr-defined]
    temperature: Annotated[float, typer.Option("--temperature", help="KD/DKD temperature.")] = 4.0
    alpha: Annotated[
        float, typer.Option("--alpha", help="KD share against cross-entropy (with labels).")
    ] = 0.9
    feature: Annotated[
        list[str] | None,
        typer.Option(
            "--feature",
            help="student_tensor:teacher_tensor pair for feature losses (repeatable; attention "
            "transfer unless --loss fitnets).",
        ),
    ] = None
    dkd_warmup: Annotated[
        int,
        typer.Option(
            "--dkd-warmup",
            help="Epochs over which the DKD loss ramps up linearly (--loss dkd; 0: none).",
            min=0,
        ),
    ] = 0
    bn_reinsert: Annotated[
        bool,
        typer.Option(
            "--bn-reinsert/--no-bn-reinsert",
            help="Train a float student's BN-folded convs with a re-inserted BatchNorm, folded "
            "back before writing (SGD on folded weights diverges).",
        ),
    ] = True
    scale_lr: Annotated[
        float | None,
        typer.Option(
            "--scale-lr",
            help="Learning rate of int8 QDQ scales (LSQ, log domain: a rate of relative "
            "change, independent of --lr; default 100).",
        ),
    ] = None
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity",
            help="Prune the float student gradually while it trains (Zhu & Gupta's cubic "
            "schedule) until this fraction of its Conv/Gemm/MatMul weights is zero, smallest "
            "|w| first; the output is marked sparse (for pack and later fine-tunes).",
        ),
    ] = None
    sparsity_scope: Annotated[
        PruneScope | None,
        typer.Option(
            "--sparsity-scope",
            help="layer (default): the fraction in every layer; global: one |w| threshold.",
        ),
    ] = None
    sparsity_ramp: Annotated[
        float | None,
        typer.Option(
            "--sparsity-ramp",
            help="Fraction of the training steps over which the sparsity rises (default 0.75; "
            "the rest trains the final masks).",
        ),
    ] = None
    compress_first_layer: Annotated[
        bool,
        typer.Option(
            "--compress-first-layer",
            help="Prune the first layer too with --sparsity (dense by default).",
        ),
    ] = False
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Random crop + flip (--no-augment caches the teacher's outputs).",
        ),
    ] = True
    val: Annotated[
        Path | None, typer.Option("--val", help="Held-out data for the final evaluation.")
    ] = None
    val_limit: Annotated[
        int, typer.Option("--val-limit", help="Held-out samples evaluated.", min=1)
    ] = 2000
    limit: LimitOpt = None
    device: Annotated[Device, typer.Option("--device", help="Torch device.")] = Device.auto  # type: ignore[attr-defined]
    seed: Annotated[int, typer.Option("--seed", help="Seed (shuffle, augmentation).", min=0)] = 0
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option("--checkpoint-dir", help="Write a checkpoint after every epoch here."),
    ] = None
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from --checkpoint-dir's last checkpoint.")
    ] = False
    force: Annotated[bool, typer.Option("--force", help="Allow replacing an input file.")] = False
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the report as JSON here.")
    ] = None
    debug: DebugOpt = False


def features(pairs: list[str] | None) -> tuple[tuple[str, str], ...]:
    found = []
    for pair in pairs or []:
        student, sep, teacher = pair.partition(":")
        if not sep or not student or not teacher:
            raise OptionError(
                f"--feature '{pair}': expected student_tensor:teacher_tensor (node output names)"
            )
        found.append((student, teacher))
    return tuple(found)


def gradual_config(flags: TrainFlags) -> Any:
    """``--sparsity`` and its options (OptionError for options given without it)."""
    from onnxcomp.training.gradual import DEFAULT_RAMP, GradualConfig

    if flags.sparsity is None:
        options = (
            ("--sparsity-scope", flags.sparsity_scope),
            ("--sparsity-ramp", flags.sparsity_ramp),
            ("--compress-first-layer", flags.compress_first_layer or None),
        )
        given = [name for name, value in options if value is not None]
        if given:
            raise OptionError(f"{given[0]} applies to --sparsity S; give --sparsity or drop it")
        return None
    return GradualConfig(
        sparsity=flags.sparsity,
        scope=flags.sparsity_scope.value if flags.sparsity_scope is not None else "layer",
        ramp=flags.sparsity_ramp if flags.sparsity_ramp is not None else DEFAULT_RAMP,
        first_layer=flags.compress_first_layer,
    )


def job_options(
    flags: TrainFlags, session: SessionFlags, default_lr: float | None, recover: str | None = None
) -> Any:
    """Every flag checked (OptionError) before any file is read. ``default_lr`` None: the job
    picks the learning rate by student kind when --lr is not given (finetune)."""
    from onnxcomp.cli.configs import session_config
    from onnxcomp.training.job import DEFAULT_LR, JobOptions
    from onnxcomp.training.losses import DistillationConfig
    from onnxcomp.training.trainer import TrainConfig

    pairs = features(flags.feature)
    sparsity = gradual_config(flags)
    loss = flags.loss.value
    if loss in ("at", "fitnets") and not pairs:
        raise OptionError(f"--loss {loss} needs --feature student_tensor:teacher_tensor pairs")
    if flags.dkd_warmup and loss != "dkd":
        raise OptionError(f"--dkd-warmup applies to --loss dkd, not --loss {loss}")
    distillation = DistillationConfig(
        method="kd" if loss in ("at", "fitnets") else loss,
        temperature=flags.temperature,
        alpha=flags.alpha,
        dkd_warmup=flags.dkd_warmup,
        features=pairs,
        feature_loss="fitnets" if loss == "fitnets" else "at",
    )
    train = None
    if flags.epochs > 0:
        train = TrainConfig(
            epochs=flags.epochs,
            lr=flags.lr if flags.lr is not None else default_lr or DEFAULT_LR["float"],
            batch_size=flags.batch_size,
            weight_decay=flags.weight_decay,
            device=flags.device.value,
            seed=flags.seed,
            checkpoint_dir=flags.checkpoint_dir,
            resume=flags.resume,
            augment=flags.augment,
        )
    elif flags.resume:
        raise OptionError("--resume with --epochs 0: nothing to resume")
    return JobOptions(
        output=flags.output,
        distillation=distillation,
        train=train,
        scale_lr=flags.scale_lr,
        recover=recover,
        session=session_config(session),
        force=flags.force,
        bn_reinsert=flags.bn_reinsert,
        lr_by_kind=flags.lr is None and default_lr is None,
        sparsity=sparsity,
    )


def run_training(
    flags: TrainFlags,
    pre: PreprocessFlags,
    session: SessionFlags,
    student: Any,
    default_lr: float | None,
    recover: str | None = None,
) -> None:
    """Check the flags, run the job with progress bars on stderr, print the report."""
    from onnxcomp.cli.configs import preprocess
    from onnxcomp.training.job import DataSpec, JobHooks, run_job
    from onnxcomp.training.trainer import rich_progress

    set_debug(flags.debug)
    options = job_options(flags, session, default_lr, recover)
    spec = DataSpec(
        path=flags.data,
        preprocess=preprocess(pre),
        limit=flags.limit,
        val=flags.val,
        val_limit=flags.val_limit,
        batch_size=flags.batch_size,
    )
    with rich_progress(err_console) as bar:
        tasks: dict[str, Any] = {}

        def on_task(name: str, total: int | None) -> None:
            tasks["current"] = bar.display.add_task(name, total=total, metrics="")

        def on_advance(n: int) -> None:
            if "current" in tasks:
                bar.display.advance(tasks["current"], n)

        report = run_job(student, flags.teacher, spec, options, JobHooks(bar, on_task, on_advance))
    render_report(report)
    if flags.report:
        flags.report.write_text(json.dumps(report.to_dict(), indent=2, default=str))


def render_report(report: Any) -> None:
    """History, fidelity before/after against the teacher, and what changed."""
    from rich.table import Table

    from onnxcomp.report import pct, render_fidelity

    console.print(f"data: {report.data}", highlight=False)
    if report.history:
        table = Table(title="Training", title_justify="left")
        for column in ("epoch", "loss", "train acc", "lr", "samples", "time"):
            table.add_column(column, justify="right")
        for s in report.history:
            table.add_row(
                str(s.epoch), f"{s.loss:.4f}", pct(s.accuracy), f"{s.lr:.3g}", str(s.samples),
                f"{s.seconds:.1f}s",
            )  # fmt: skip
        console.print(table)
    if report.recovery is not None:
        console.print(f"recovery: {report.recovery}", highlight=False)
    if report.before is not None:
        console.print("[bold]teacher vs the input student[/]")
        render_fidelity(report.before, console, names=("teacher", "input student"))
        console.print("[bold]teacher vs the output[/]")
        render_fidelity(report.after, console, names=("teacher", "output"))
        before, after = report.before.top1_agreement, report.after.top1_agreement
        if before is not None and after is not None:
            console.print(f"top-1 agreement with the teacher: {pct(before)} -> {pct(after)}")
    if report.change is not None:
        change = report.change
        console.print(
            f"output vs the input student: rel err {change.relative_error:.3g}, top-1 agreement "
            f"{pct(change.top1_agreement)}",
            highlight=False,
        )
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {report.output} in {report.seconds:.1f}s", highlight=False)
