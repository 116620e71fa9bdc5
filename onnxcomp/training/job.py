"""The finetune / distill job: an ONNX student trained against an ONNX teacher, written back.

`run_job(student, teacher, data, options)`:

1. Refuses a bad output path (as convert does), reads the teacher file once (the onnx-ir
   model serves ONNX Runtime, block-wise recovery and binarized latent weights), runs it in ONNX
   Runtime (`OnnxTeacher`, with its tapped tensors for feature losses; outputs cached by sample
   when the data is not augmented) and loads the training data with its input names.
2. Loads the student: an ``.onnx`` file, or a callable that writes one (the CLI exports a
   ``module:function`` torch model with ``onnxcomp.export``; that module is a sibling
   technique, so the wiring is the CLI's). `import_onnx` makes it trainable; an op it cannot
   train is its one-line error. `check_compatible` refuses different output shapes/classes.
3. Refuses what cannot train before any work: ``--loss ce`` without labels (KD-only runs are
   allowed and noted), ``--epochs 0`` without ``--recover``.
4. Optionally `recover_blocks` (``--recover blocks``: block-wise reconstruction, before any
   epoch). A float student (no QDQ or binarized weights) then gets its BN-folded Convs
   re-parameterised with a train-mode BatchNorm (`reparam.reinsert_batchnorm`, statistics
   from the first `REINSERT_SAMPLES` training samples; ``bn_reinsert``, on by default): SGD on
   folded weights diverges. Then `train` with the objective from `DistillationConfig`. A QDQ
   student's LSQ steps (``module.quants``) get their own parameter group: ``scale_lr`` and no
   weight decay. With ``sparsity`` (``--sparsity S``) the student's prunable weights are
   pruned gradually during training (`gradual.py`: masks attached before the re-insertion,
   updated by the trainer's ``on_step``; a quantized or k-means-shared student is refused),
   and the written model carries the ``onnxcomp.sparsity`` mark.
5. The re-inserted BatchNorms are folded back into the same Conv weights and biases, and
   `export_onnx()` writes the trained values back into the student's graph; the result is
   saved into a temporary folder beside the output (`staged_save`), checked with onnx.checker,
   checked in ONNX Runtime against the trained module's eval-mode outputs when BatchNorm was
   folded back (relative error at most `FOLD_TOLERANCE`), compared in ONNX Runtime with the
   teacher and with the input student, and only then renamed into place. Under ``torchrun``
   every process trains (the trainer's DDP) and rank 0 alone writes and verifies.

Learning rate: without ``--lr``, finetune takes `DEFAULT_LR` by student kind (``lr_by_kind``):
float 1e-3 (with re-inserted BatchNorm; KD on the thinet-pruned ResNet-56, batch 64, cosine:
512 images x 2 epochs, epoch losses 1.24 -> 0.83 at 1e-3, 1.33 -> 0.91 at 3e-3, 2.04 -> 2.31
at 1e-2 (top-1 agreement with the teacher on 1,000 test images 88.7 % before: 88.4, 88.2,
83.1); 1,024 images x 3 epochs, 1.30 -> 0.70 at 1e-3 (agreement 88.9) and 1.47 -> 0.87 at
3e-3 (87.3); without re-insertion 1e-3 reached NaN within 4 steps),
int8 QDQ 5e-5 with the LSQ steps at SCALE_LR 100 (BENCHMARKS.md "int8 QAT", 2,048 images x 1
epoch, agreement with fp32: ResNet-20 98.15 % at 5e-5 / 98.50 % at 2e-4, ResNet-56 98.55 % at
5e-5 / 95.60 % at 2e-4: 2e-4 with learned steps broke ResNet-56; 2e-3 diverged), binarized 1e-2
(what BENCHMARKS.md "Binarization" trained BinaryConnect latent weights with).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.backends.ort import SessionConfig, create_session
from onnxcomp.backends.ort import run as ort_run
from onnxcomp.converter.verify import Fidelity, VerifyOptions, verify_files
from onnxcomp.core.io import check_model, check_output_path, load_model, staged_save
from onnxcomp.data import Preprocess
from onnxcomp.errors import OnnxcompError, OptionError
from onnxcomp.training.constraints import apply_weight_constraints
from onnxcomp.training.data import TrainingData, load_training_data
from onnxcomp.training.fake_quant import BinaryWeight, init_latent_from
from onnxcomp.training.gradual import (
    GradualConfig,
    GradualPruner,
    attach_gradual_pruning,
    mark_sparsity,
    sparsity_note,
)
from onnxcomp.training.importer import OnnxModule, import_onnx
from onnxcomp.training.losses import DistillationConfig
from onnxcomp.training.reparam import fold_batchnorm, reinsert_batchnorm, weight_scales
from onnxcomp.training.teacher import OnnxTeacher, check_compatible
from onnxcomp.training.trainer import EpochStats, TrainConfig, TrainProgress, train

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - the importer above raises first
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from None

RECOVER_MODES = ("blocks",)
# LSQ steps learn at this rate unless --scale-lr is given. The steps are learned in the log
# domain (fake_quant.py), so this is a rate of relative change, independent of --lr: its
# gradients are ~1e-6..1e-4 on ResNet-20 with KD (benchmarks/training_qat.py measured 1 and 100;
# 100 agreed best with fp32).
SCALE_LR = 100.0
# --lr by student kind when not given (finetune; see the module docstring for the evidence).
DEFAULT_LR = {"float": 1e-3, "int8": 5e-5, "binary": 1e-2}
# Training samples whose conv outputs give the re-inserted BatchNorms their statistics.
REINSERT_SAMPLES = 256
# Written model vs the trained module in eval mode (max abs error / max |trained|).
FOLD_TOLERANCE = 1e-4


@dataclass(frozen=True)
class StudentSpec:
    """What a student built from code must look like: the teacher's input and output names,
    and one sample's input shape (batch 1) per input."""

    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]


StudentSource = str | Path | Callable[[StudentSpec, Path], Path]


@dataclass(frozen=True)
class DataSpec:
    """The training data (``--data``), its preprocessing, ``--limit``, and the held-out data
    (``--val``, at most ``val_limit`` samples; without it the training data, noted)."""

    path: Path
    preprocess: Preprocess | None = None
    limit: int | None = None
    val: Path | None = None
    val_limit: int | None = 2000
    batch_size: int = 64


@dataclass(frozen=True)
class JobOptions:
    """The job's flags, checked when built (OptionError naming the flag)."""

    output: Path
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    # None: --epochs 0 (recovery only)
    train: TrainConfig | None = field(default_factory=TrainConfig)
    scale_lr: float | None = None
    recover: str | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    force: bool = False
    verify: bool = True
    bn_reinsert: bool = True
    lr_by_kind: bool = False  # --lr not given: DEFAULT_LR by student kind
    sparsity: GradualConfig | None = None  # --sparsity: gradual magnitude pruning

    def __post_init__(self) -> None:
        if self.recover is not None and self.recover not in RECOVER_MODES:
            raise OptionError(f"--recover {self.recover!r}: choose {', '.join(RECOVER_MODES)}")
        if self.train is None and self.recover is None:
            raise OptionError("--epochs 0 trains nothing; give --epochs N or --recover blocks")
        if self.scale_lr is not None and not (np.isfinite(self.scale_lr) and self.scale_lr > 0):
            raise OptionError(f"--scale-lr must be a number above 0, got {self.scale_lr!r}")
        if self.sparsity is not None and self.train is None:
            raise OptionError("--sparsity prunes gradually while training: give --epochs N")

    def step_lr(self) -> float:
        """The LSQ steps' learning rate."""
        return SCALE_LR if self.scale_lr is None else self.scale_lr


@dataclass
class JobReport:
    """What the job did: history, fidelity (teacher vs the input student, teacher vs the output,
    input vs output), what QAT changed, notes."""

    student: str
    teacher: str
    output: str
    data: str
    history: list[EpochStats]
    before: Fidelity | None
    after: Fidelity | None
    change: Fidelity | None
    recovery: Any = None
    scales_changed: int | None = None
    sparsity: dict[str, float] | None = None  # --sparsity: each pruned weight's zeros
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def fid(f: Fidelity | None) -> dict | None:
            return f.to_dict() if f is not None else None

        return {
            "student": self.student,
            "teacher": self.teacher,
            "output": self.output,
            "data": self.data,
            "history": [vars(s) for s in self.history],
            "teacher_vs_input": fid(self.before),
            "teacher_vs_output": fid(self.after),
            "input_vs_output": fid(self.change),
            "scales_changed": self.scales_changed,
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "notes": self.notes,
        }


@dataclass
class JobHooks:
    """Progress: the trainer's per-epoch display and the verification's task/advance hooks."""

    train: TrainProgress | None = None
    on_task: Callable[[str, int | None], None] | None = None
    on_advance: Callable[[int], None] | None = None
    recover: Any = None


class TappedStudent(nn.Module):
    """The student's graph outputs plus its tapped tensors, by name (what feature losses read);
    a module so that the trainer's (and DDP's) forward call runs it."""

    def __init__(self, student: OnnxModule, taps: list[str]) -> None:
        super().__init__()
        self.student = student
        self.taps = list(taps)
        self.input_names = student.input_names
        self.output_names = student.output_names

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = dict(zip(self.student.input_names, inputs, strict=True))
        return self.student.run(feeds, self.taps)


def _shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    return {
        v.name: tuple(d if isinstance(d, int) else None for d in (v.shape or ()))
        for v in model.graph.outputs
    }


def load_student(path: Path) -> tuple[ir.Model, OnnxModule]:
    """The student file, and the trainable module (the importer's one-line error names the
    node it cannot train, prefixed with the file)."""
    model = load_model(path)
    try:
        return model, import_onnx(model)
    except OnnxcompError as exc:
        raise OnnxcompError(f"{path}: {exc}") from None


def _sample_shapes(data: TrainingData) -> dict[str, tuple[int, ...]]:
    batch = next(data.batches(1, shuffle=False))
    return {name: tuple(array.shape) for name, array in batch.inputs.items()}


def _check_inputs(module: OnnxModule, teacher: OnnxTeacher, path: Path) -> None:
    missing = [n for n in module.input_names if n not in teacher.input_names]
    if missing:
        raise OnnxcompError(
            f"{path}: student input(s) {', '.join(missing)} are not inputs of the teacher "
            f"({', '.join(teacher.input_names)}); both must read the same inputs by name"
        )


def _param_groups(step_lr: float) -> Callable[[nn.Module], list[dict[str, Any]]]:
    """Weights at --lr; LSQ steps (``student.quants``) at ``step_lr`` without weight decay."""

    def groups(wrapper: nn.Module) -> list[dict[str, Any]]:
        steps = {id(p) for p in wrapper.student.quants.parameters()}
        rest = [p for p in wrapper.parameters() if p.requires_grad and id(p) not in steps]
        quant = [p for p in wrapper.student.quants.parameters() if p.requires_grad]
        return [{"params": rest}, {"params": quant, "lr": step_lr, "weight_decay": 0.0}]

    return groups


def _steps(module: OnnxModule) -> dict[str, np.ndarray]:
    return {k: q.exported_scale().copy() for k, q in module.quants.items()}


def _prepare_objective(
    options: JobOptions, module: OnnxModule, wrapper: TappedStudent, teacher: OnnxTeacher, data
):
    objective = options.distillation.objective(module.output_names[0], teacher.graph_outputs[0])
    if options.distillation.features:  # FitNets regressors take their shapes from one batch
        batch = next(data.batches(min(8, data.num_samples), shuffle=False))
        module.eval()
        with torch.no_grad():
            outputs = wrapper(*[torch.from_numpy(batch.inputs[n]) for n in module.input_names])
        objective.prepare(outputs, teacher(batch.inputs))
    return objective


def recover_module() -> Any:
    """``onnxcomp.training.recover`` (block-wise recovery), or a one-line error without it."""
    try:
        return importlib.import_module("onnxcomp.training.recover")
    except ModuleNotFoundError as exc:
        if exc.name != "onnxcomp.training.recover":
            raise
        raise OnnxcompError(
            "--recover blocks: block-wise recovery (onnxcomp.training.recover) is not in this "
            "build of onnxcomp; drop --recover or update onnxcomp"
        ) from None


def student_kind(module: OnnxModule) -> str:
    """``binary`` (BinaryConnect weights), ``int8`` (QDQ fake quantization) or ``float``."""
    if any(isinstance(q, BinaryWeight) for q in module.quants.values()):
        return "binary"
    return "int8" if len(module.quants) else "float"


def _train_config(options: JobOptions, module: OnnxModule) -> tuple[TrainConfig | None, list]:
    """The training config with --lr resolved by student kind when not given, and a note."""
    config = options.train
    if config is None or not options.lr_by_kind:
        return config, []
    kind = student_kind(module)
    lr = DEFAULT_LR[kind]
    return replace(config, lr=lr), [f"learning rate {lr:g} (default for a {kind} student)"]


def _binary_latent_start(module: OnnxModule, teacher_model: ir.Model) -> list[str]:
    """A binarized student's latent weights start from the teacher's float weights (by
    initializer name) when the teacher is the model it was binarized from; else alpha*sign."""
    if not any(isinstance(q, BinaryWeight) for q in module.quants.values()):
        return []
    try:
        names = init_latent_from(module, teacher_model)
    except OnnxcompError as error:
        return [f"binary latent weights start from alpha*sign ({error})"]
    return [f"binary latent weights of {len(names)} layer(s) start from the teacher's weights"]


def _recover(module: OnnxModule, teacher_model: ir.Model, data: TrainingData, hooks) -> Any:
    """``--recover blocks``: block-wise reconstruction against the teacher's graph."""
    recover = recover_module()
    return recover.recover_blocks(
        module, teacher_model, data, recover.RecoverConfig(), progress=hooks.recover
    )


def _verify(
    reference: Path, candidate: Path, spec: DataSpec, options: JobOptions, hooks: JobHooks
) -> Fidelity:
    verify = VerifyOptions(
        data=spec.val or spec.path,
        preprocess=spec.preprocess,
        limit=spec.val_limit,
        batch_size=spec.batch_size,
    )
    return verify_files(
        reference,
        candidate,
        verify,
        options.session,
        on_batch=hooks.on_advance,
        on_start=lambda n: hooks.on_task and hooks.on_task("verifying", n),
    )


def _resolve_student(
    student: StudentSource, teacher: OnnxTeacher, data: TrainingData, folder: Path
) -> Path:
    if isinstance(student, (str, Path)):
        return Path(student)
    spec = StudentSpec(teacher.input_names, teacher.graph_outputs, _sample_shapes(data))
    return student(spec, folder)


def run_job(
    student: StudentSource,
    teacher: str | Path,
    data: DataSpec,
    options: JobOptions,
    hooks: JobHooks | None = None,
) -> JobReport:
    """Train ``student`` against ``teacher`` on ``data`` and write ``options.output`` (see the
    module docstring)."""
    start = time.perf_counter()
    hooks = hooks or JobHooks()
    teacher = Path(teacher)
    inputs = [teacher] + ([Path(student)] if isinstance(student, (str, Path)) else [])
    check_output_path(Path(options.output), inputs, force=options.force)
    if options.recover:
        recover_module()  # before any work
    config = options.train
    teacher_model = load_model(teacher)  # read once: ORT, recovery, binary latent weights
    graph = teacher_model.graph
    names = [v.name for v in graph.inputs if v.name not in graph.initializers]
    train_data = load_training_data(
        data.path, names, data.preprocess, limit=data.limit, seed=config.seed if config else 0
    )
    taps = [t for _, t in options.distillation.features]
    augment = config.augment if config else False
    ort_teacher = OnnxTeacher(
        teacher_model,
        label=f"'{teacher}'",
        taps=taps,
        session_config=options.session,
        cache_samples=None if augment else train_data.num_samples,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="onnxcomp-student-") as folder:
            student_path = _resolve_student(student, ort_teacher, train_data, Path(folder))
            report = _train_and_write(
                student_path, (teacher, teacher_model), ort_teacher, train_data, data, options,
                hooks,
            )  # fmt: skip
    finally:
        ort_teacher.close()
    if not isinstance(student, (str, Path)):  # built from code: its temporary file is gone
        report.student = getattr(student, "label", "the student built from code")
    report.seconds = time.perf_counter() - start
    return report


def _reinsert(options: JobOptions, module: OnnxModule, data: TrainingData) -> list[str]:
    """Step 4: BatchNorm re-inserted after a float student's folded Convs (when on)."""
    if options.train is None or not options.bn_reinsert or len(module.quants):
        return []
    size = min(64, data.num_samples)
    batches = data.batches(size, shuffle=False)
    feeds = (b.inputs for _, b in zip(range(-(-REINSERT_SAMPLES // size)), batches, strict=False))
    return reinsert_batchnorm(module, feeds)


def _gradual(
    options: JobOptions, module: OnnxModule, model: ir.Model
) -> tuple[GradualPruner | None, list[str]]:
    """``--sparsity``: gradual pruning's masks on the student (before BatchNorm re-insertion:
    its hooks sit on the same parameters; the ranking reads the re-inserted scales)."""
    if options.sparsity is None:
        return None, []
    return attach_gradual_pruning(
        module, model, options.sparsity, scales=lambda: weight_scales(module)
    )


def _eval_outputs(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    module.eval()
    with torch.no_grad():
        device = next(module.parameters()).device
        tensors = [torch.from_numpy(feeds[n]).to(device) for n in module.input_names]
        return [t.detach().cpu().numpy() for t in module(*tensors)]


def _check_folded(
    staged: Path,
    trained: list[np.ndarray],
    feeds: dict[str, np.ndarray],
    options: JobOptions,
    lr: float,
) -> float:
    """Step 5: the written model in ONNX Runtime against the trained module (eval mode, before
    the fold); returns the relative error, or a one-line error above `FOLD_TOLERANCE`."""
    if not all(np.isfinite(t).all() for t in trained):
        raise OnnxcompError(
            f"training diverged: the trained student's outputs are not finite; nothing written: "
            f"lower the learning rate (--lr {lr:g})"
        )
    written = ort_run(create_session(staged, options.session), feeds)
    worst = 0.0
    for want, got in zip(trained, written, strict=True):
        error = float(np.max(np.abs(want - got))) / max(float(np.max(np.abs(want))), 1e-12)
        worst = max(worst, error if np.isfinite(error) else np.inf)
    if worst > FOLD_TOLERANCE:
        raise OnnxcompError(
            f"training: folding the re-inserted BatchNorm back moved the outputs by {worst:.3g} "
            f"(relative, above {FOLD_TOLERANCE:g}); nothing written: rerun with --no-bn-reinsert"
        )
    return worst


def _train_and_write(
    student_path: Path,
    teacher_source: tuple[Path, ir.Model],
    teacher: OnnxTeacher,
    train_data: TrainingData,
    spec: DataSpec,
    options: JobOptions,
    hooks: JobHooks,
) -> JobReport:
    """Steps 2-5 of the module docstring on a student file.

    Long because it is the job's sequence read top to bottom (load, check, recover, re-insert,
    train, fold, write, verify); its parts are functions of their own."""
    teacher_path, teacher_model = teacher_source
    model, module = load_student(student_path)
    constraint_notes = apply_weight_constraints(module, model)
    pruner, prune_notes = _gradual(options, module, model)
    _check_inputs(module, teacher, student_path)
    check_compatible(teacher.output_shapes, _shapes(model))
    distill = options.distillation
    if distill.method == "ce" and not distill.features and not train_data.has_labels:
        raise OptionError(
            f"{train_data.source}: --loss ce needs labels and the data has none; use --loss kd "
            "(distillation from the teacher needs no labels) or labelled data"
        )
    config, notes = _train_config(options, module)
    wrapper = TappedStudent(module, [s for s, _ in distill.features])
    objective = _prepare_objective(options, module, wrapper, teacher, train_data)
    notes = (
        list(train_data.notes)
        + notes
        + constraint_notes
        + prune_notes
        + _binary_latent_start(module, teacher_model)
    )
    scales_before = _steps(module)
    recovery = None
    if options.recover:
        recovery = _recover(module, teacher_model, train_data, hooks)
    reinserted = _reinsert(options, module, train_data)
    history: list[EpochStats] = []
    if config is not None:
        result = train(
            wrapper,
            objective,
            train_data,
            config,
            teacher,
            progress=hooks.train,
            param_groups=_param_groups(options.step_lr()) if len(module.quants) else None,
            on_step=pruner.on_step if pruner is not None else None,
        )
        history = result.history
    check_feeds: dict[str, np.ndarray] = {}
    trained_outputs: list[np.ndarray] = []
    if reinserted:  # the trained module's eval outputs, before the fold
        check_feeds = next(
            train_data.batches(min(64, train_data.num_samples), shuffle=False)
        ).inputs
        trained_outputs = _eval_outputs(module, check_feeds)
    fold_batchnorm(module)
    module.eval()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes and verifies
        return JobReport(str(student_path), str(teacher_path), "", "", history, None, None, None)
    trained = module.export_onnx()
    sparsity = None
    if pruner is not None:
        sparsity = pruner.fractions()
        mark_sparsity(trained, sparsity)
        notes.append(sparsity_note(pruner))
    scales_changed = None
    if scales_before:
        after = _steps(module)
        scales_changed = sum(not np.array_equal(after[k], v) for k, v in scales_before.items())
        notes.append(
            f"int8 QDQ student: {scales_changed} of {len(after)} LSQ scales changed "
            f"(step lr {options.step_lr():g})"
        )
    if spec.val is None and options.verify:
        notes.append("fidelity measured on the training data (no --val given): not held out")
    before = after_fid = change = None
    with staged_save(trained, options.output) as staged:
        check_model(staged)
        if reinserted:
            lr = config.lr if config is not None else 0.0
            error = _check_folded(staged, trained_outputs, check_feeds, options, lr)
            notes.append(
                f"{len(reinserted)} conv(s) trained with re-inserted BatchNorm, folded back "
                f"(written model vs trained module: relative error {error:.2g})"
            )
        if options.verify:
            before = _verify(teacher_path, student_path, spec, options, hooks)
            after_fid = _verify(teacher_path, staged, spec, options, hooks)
            change = _verify(student_path, staged, spec, options, hooks)
    return JobReport(
        student=str(student_path),
        teacher=str(teacher_path),
        output=str(options.output),
        data=train_data.describe(),
        history=history,
        before=before,
        after=after_fid,
        change=change,
        recovery=recovery,
        scales_changed=scales_changed,
        sparsity=sparsity,
        notes=notes,
    )
