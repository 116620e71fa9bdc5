"""The training loop: any torch student, any objective, optional teacher, 1 process or DDP.

`train(student, objective, data, config, teacher=None)` runs SGD (Nesterov momentum by default)
with a cosine learning-rate schedule (per step, optional linear warm-up) over `TrainingData`, and
returns a `TrainResult` (per-epoch history, best and last weights). Contracts:

- student: a ``torch.nn.Module``; a `StudentAdapter` turns a batch (input name -> Tensor) into
  named outputs. The default calls ``student(*inputs)`` in the order of ``student.input_names``
  (else the batch's order) and names the outputs by ``student.output_names`` (else ``logits``
  for a single tensor, ``output_<i>`` for a tuple). Accuracy is measured on the first output.
- objective: ``objective(student_outputs, teacher_outputs, labels) -> (loss, parts)``; when it
  is an ``nn.Module`` its parameters (e.g. a FitNets regressor) are trained and checkpointed too.
- teacher: ``teacher(batch_inputs: dict[str, np.ndarray], sample_indices) -> dict[str, ndarray]``
  (run on the same augmented inputs the student sees).

Checkpoints (`config.checkpoint_dir`): ``last.pt`` after every complete epoch, written to a
temporary file and renamed over the old one, holding the model, objective, optimizer, scheduler,
epoch, history, RNG states and a fingerprint of the model (parameter names and shapes).
``resume=True`` continues after the last complete epoch and refuses a checkpoint of another
model. Ctrl-C (KeyboardInterrupt) propagates after the last complete epoch's checkpoint, never a
half-written file. A non-finite loss stops training before the step is taken and raises an
OnnxcompError naming the learning rate to lower; the last good checkpoint is kept.

DDP: under ``torchrun --nproc_per_node N`` (RANK / WORLD_SIZE in the environment) the same call
initialises the process group (gloo on CPU, nccl on CUDA) if nobody did, shards each epoch like
DistributedSampler (`TrainingData.batches`), wraps the student in DistributedDataParallel, and
writes checkpoints and shows progress on rank 0 only. `config.batch_size` is the global batch:
each of N processes takes batch_size / N. BatchNorm statistics are per process (as in DDP
without SyncBatchNorm), so only BatchNorm-free models match a 1-process run exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from onnxcomp.errors import OnnxcompError, OptionError
from onnxcomp.training.data import TrainBatch, TrainingData

try:
    import torch
    import torch.distributed as dist
    from torch import nn
except ImportError:  # pragma: no cover - exercised only without the extra
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from None

__all__ = [
    "CHECKPOINT_NAME",
    "EpochStats",
    "StudentAdapter",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "default_adapter",
    "model_fingerprint",
    "rich_progress",
    "train",
]

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "onnxcomp-train-checkpoint/1"
DEVICES = ("cpu", "cuda", "auto")
SCHEDULES = ("cosine", "constant")

Objective = Callable[..., tuple["torch.Tensor", dict[str, float]]]
Teacher = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]
ParamGroups = Callable[["nn.Module"], list[dict[str, Any]]]
StepHook = Callable[[int, int], None]  # (step, total_steps), after each optimizer step


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Training options; each maps to a CLI flag (``--epochs --lr --batch-size --device --resume
    --checkpoint-dir --seed``...). Validated when built (OptionError naming the flag)."""

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    batch_size: int = 128
    device: Literal["cpu", "cuda", "auto"] = "auto"
    seed: int = 0
    checkpoint_dir: Path | None = None
    resume: bool = False
    num_threads: int | None = None
    augment: bool = True

    def __post_init__(self) -> None:
        _positive_int("--epochs", self.epochs)
        _positive_int("--batch-size", self.batch_size)
        _number("--lr", self.lr, low=0.0, open_low=True)
        _number("--momentum", self.momentum, low=0.0, high=1.0)
        _number("--weight-decay", self.weight_decay, low=0.0)
        _number("--warmup-epochs", self.warmup_epochs, low=0.0)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise OptionError(
                f"--warmup-epochs {self.warmup_epochs:g} must be below --epochs {self.epochs}"
            )
        if self.nesterov and self.momentum == 0:
            raise OptionError("Nesterov momentum needs --momentum > 0 (or turn Nesterov off)")
        if self.schedule not in SCHEDULES:
            raise OptionError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise OptionError(f"--device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.num_threads is not None:
            _positive_int("--num-threads", self.num_threads)
        if self.resume and self.checkpoint_dir is None:
            raise OptionError("--resume needs --checkpoint-dir (where the checkpoint is)")
        if self.checkpoint_dir is not None:
            directory = Path(self.checkpoint_dir)
            if directory.exists() and not directory.is_dir():
                raise OptionError(f"--checkpoint-dir {directory}: exists and is not a folder")
            object.__setattr__(self, "checkpoint_dir", directory)


def _positive_int(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{flag} must be a positive integer, got {value!r}")


def _number(
    flag: str, value: Any, low: float, high: float | None = None, open_low: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'above' if open_low else 'at least'} {low:g}"
        bound += f" and at most {high:g}" if high is not None else ""
        raise OptionError(f"{flag} must be a number {bound}, got {value!r}")


# --------------------------------------------------------------------------- results and hooks


@dataclass
class EpochStats:
    """One epoch's averages over all processes (accuracy None without labels)."""

    epoch: int
    loss: float
    accuracy: float | None
    lr: float
    samples: int
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """History of the epochs run (resumed ones included), best (by accuracy, else loss) and
    last weights (CPU state dicts), and what the evaluation hook returned."""

    history: list[EpochStats]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    checkpoint: Path | None
    evaluation: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)


class StudentAdapter(Protocol):
    """Runs the (possibly DDP-wrapped) student on a batch and names its outputs.

    It must call ``model(...)`` (the forward), never a method of the wrapped module, so that DDP
    synchronises the gradients.
    """

    def __call__(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...


class TrainProgress(Protocol):
    """Progress hooks (called on rank 0 only); raising from one stops training like Ctrl-C."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, samples: int, loss: float, accuracy: float | None) -> None: ...

    def end_epoch(self, stats: EpochStats) -> None: ...


def default_adapter(student: nn.Module) -> StudentAdapter:
    """The adapter described in the module docstring, for `student` (names read once)."""
    input_names = getattr(student, "input_names", None)
    output_names = getattr(student, "output_names", None)

    def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(input_names) if input_names else list(inputs)
        outputs = model(*[inputs[name] for name in names])
        if isinstance(outputs, dict):
            return outputs
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if output_names and len(output_names) == len(outputs):
            return dict(zip(output_names, outputs, strict=True))
        if len(outputs) == 1:
            return {"logits": outputs[0]}
        return {f"output_{i}": out for i, out in enumerate(outputs)}

    return run


# --------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What one call of train() works with."""

    student: nn.Module
    model: nn.Module  # the student or its DDP wrapper
    objective: Objective
    extra_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    rank: int
    world_size: int
    fingerprint: str
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)


def train(
    student: nn.Module,
    objective: Objective,
    data: TrainingData,
    config: TrainConfig,
    teacher: Teacher | None = None,
    *,
    adapter: StudentAdapter | None = None,
    progress: TrainProgress | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    param_groups: ParamGroups | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train `student` in place (see the module docstring); returns the TrainResult.

    `evaluate(student)` runs once at the end on rank 0, the student in eval mode.
    `param_groups(student)` returns the optimizer's parameter groups (torch's dicts: ``params``
    and optional ``lr``/``weight_decay``, covering every trainable parameter once), e.g. a
    smaller learning rate for LSQ steps; the schedule scales every group's own learning rate.
    `on_step(step, total_steps)` runs on every process after each optimizer step (``step``
    counts from 1 over the whole run, resumed epochs included; ``total_steps`` = epochs x steps
    per epoch), e.g. gradual pruning's mask updates; what it keeps must live in the student's
    state dict (buffers) to survive ``--resume``.
    """
    if not data.has_labels and teacher is None:
        raise OptionError(
            f"{data.source}: the training data has no labels and no teacher was given; "
            "give labelled data (class subfolders or a 'labels' array) or a --teacher"
        )
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    owns_group = _init_distributed(config)
    try:
        run = _prepare(student, objective, data, config, adapter, param_groups)
        _seed_everything(config.seed + run.rank)
        first_epoch = _resume(run, config) if config.resume else 0
        for epoch in range(first_epoch, config.epochs):
            stats = _train_epoch(run, data, config, teacher, epoch, adapter, progress, on_step)
            run.history.append(stats)
            if _is_better(stats, run):
                run.best_epoch = stats.epoch
                run.best_state = _cpu_state(run.student)
            if run.rank == 0 and config.checkpoint_dir is not None:
                _save_checkpoint(run, config, epoch + 1)
            if progress is not None and run.rank == 0:
                progress.end_epoch(stats)
        run.student.eval()
        evaluation = evaluate(run.student) if evaluate is not None and run.rank == 0 else None
        if run.world_size > 1:
            dist.barrier()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return TrainResult(
        history=run.history,
        best_epoch=run.best_epoch,
        best_state=run.best_state or _cpu_state(run.student),
        last_state=_cpu_state(run.student),
        checkpoint=_checkpoint_path(config),
        evaluation=evaluation,
        notes=list(data.notes),
    )


def _prepare(
    student: nn.Module,
    objective: Objective,
    data: TrainingData,
    config: TrainConfig,
    adapter: StudentAdapter | None,
    param_groups: ParamGroups | None = None,
) -> _Run:
    rank, world_size = _rank_and_world()
    if config.batch_size % world_size:
        raise OptionError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of "
            f"the {world_size} processes"
        )
    device = _resolve_device(config.device, rank)
    student.to(device)
    extra_params: list[nn.Parameter] = []
    if isinstance(objective, nn.Module):
        objective.to(device)
        extra_params = [p for p in objective.parameters() if p.requires_grad]
    model: nn.Module = student
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    if param_groups is None:
        groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    else:
        groups = [dict(g, params=list(g["params"])) for g in param_groups(student)]
    groups = [g for g in groups if g["params"]]
    if extra_params:
        groups.append({"params": extra_params})
    if not groups:
        raise OptionError("the student has no trainable parameters")
    optimizer = torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    steps = data.steps_per_epoch(config.batch_size // world_size, world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, steps))
    return _Run(
        student, model, objective, extra_params, optimizer, scheduler, device, rank, world_size,
        model_fingerprint(student),
    )  # fmt: skip


def _lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step factor on `config.lr`: linear warm-up, then cosine to 0 (or constant)."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _train_epoch(
    run: _Run,
    data: TrainingData,
    config: TrainConfig,
    teacher: Teacher | None,
    epoch: int,
    adapter: StudentAdapter | None,
    progress: TrainProgress | None,
    on_step: StepHook | None = None,
) -> EpochStats:
    """One epoch; sums are all-reduced per step so every process sees the same figures."""
    adapter = adapter if adapter is not None else default_adapter(run.student)
    run.student.train()
    if isinstance(run.objective, nn.Module):
        run.objective.train()
    per_rank = config.batch_size // run.world_size
    steps = data.steps_per_epoch(per_rank, run.world_size)
    if progress is not None and run.rank == 0:
        progress.start_epoch(epoch + 1, config.epochs, steps)
    totals = np.zeros(3)  # loss * samples, correct, samples (all processes)
    local = 0  # samples of this process, for its objective parts
    parts_sum: dict[str, float] = {}
    start = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    batches = data.batches(
        per_rank, epoch, config.seed, augment=config.augment, rank=run.rank,
        world_size=run.world_size,
    )  # fmt: skip
    for index, batch in enumerate(batches):
        lr = run.optimizer.param_groups[0]["lr"]
        loss, correct, parts = _step(run, batch, teacher, adapter)
        step_sums = _all_reduce(run, [loss.item() * len(batch), correct, len(batch)])
        if not math.isfinite(step_sums[0]):
            raise _nan_error(config, epoch, lr, step_sums[0])
        run.optimizer.step()
        run.scheduler.step()
        if on_step is not None:
            on_step(epoch * steps + index + 1, config.epochs * steps)
        totals += step_sums
        local += len(batch)
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0.0) + value * len(batch)
        if progress is not None and run.rank == 0:
            acc = step_sums[1] / step_sums[2] if data.has_labels else None
            progress.step(int(step_sums[2]), step_sums[0] / step_sums[2], acc)
    samples = int(totals[2])
    return EpochStats(
        epoch=epoch + 1,
        loss=totals[0] / samples,
        accuracy=totals[1] / samples if data.has_labels else None,
        lr=lr,
        samples=samples,
        seconds=time.perf_counter() - start,
        parts={k: v / max(1, local) for k, v in parts_sum.items()},
    )


def _step(
    run: _Run, batch: TrainBatch, teacher: Teacher | None, adapter: StudentAdapter
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Forward, loss and backward for one batch (the optimizer step is the caller's)."""
    inputs = {k: torch.from_numpy(v).to(run.device) for k, v in batch.inputs.items()}
    labels = None
    if batch.labels is not None:
        labels = torch.from_numpy(batch.labels).to(run.device)
    teacher_out = None
    if teacher is not None:
        raw = teacher(batch.inputs, batch.indices)
        teacher_out = {k: torch.as_tensor(v).to(run.device) for k, v in raw.items()}
    run.optimizer.zero_grad(set_to_none=True)
    outputs = adapter(run.model, inputs)
    loss, parts = run.objective(outputs, teacher_out, labels)
    if not torch.isfinite(loss.detach()):
        return loss.detach(), 0, parts
    loss.backward()
    if run.world_size > 1:
        for param in run.extra_params:  # the objective's parameters are outside DDP
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= run.world_size
    correct = 0
    if labels is not None:
        logits = next(iter(outputs.values())).detach()
        if logits.ndim == 2:
            correct = int((logits.argmax(dim=1) == labels).sum().item())
    return loss.detach(), correct, parts


def _nan_error(config: TrainConfig, epoch: int, lr: float, value: float) -> OnnxcompError:
    kept = _checkpoint_path(config)
    where = (
        f"the last good checkpoint (epoch {epoch}) is kept in {kept}"
        if kept is not None and epoch > 0
        else "no checkpoint was written"
    )
    return OnnxcompError(
        f"the loss became {value} in epoch {epoch + 1} at learning rate {lr:g}; training "
        f"stopped and {where}; lower the learning rate: --lr {config.lr:g} -> try "
        f"{config.lr / 10:g}"
    )


def _is_better(stats: EpochStats, run: _Run) -> bool:
    if not run.best_state or not run.best_epoch:
        return True
    best = run.history[run.best_epoch - 1]
    if stats.accuracy is not None and best.accuracy is not None:
        return stats.accuracy > best.accuracy
    return stats.loss < best.loss


# --------------------------------------------------------------------------- checkpoints


def model_fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex digits) of the state dict's names, shapes and dtypes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def _checkpoint_path(config: TrainConfig) -> Path | None:
    return None if config.checkpoint_dir is None else config.checkpoint_dir / CHECKPOINT_NAME


def _save_checkpoint(run: _Run, config: TrainConfig, completed_epochs: int) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": run.fingerprint,
        "epoch": completed_epochs,
        "model": run.student.state_dict(),
        "objective": (run.objective.state_dict() if isinstance(run.objective, nn.Module) else None),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "history": [asdict(s) for s in run.history],
        "best_epoch": run.best_epoch,
        "best_state": run.best_state,
        "rng": _rng_states(),
        "config": {k: str(v) for k, v in asdict(config).items()},
    }
    path = _checkpoint_path(config)
    assert path is not None
    atomic_save(state, path)


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """torch.save into a temporary file beside `path`, fsync, then rename over `path`; the
    temporary file is removed if anything (Ctrl-C included) interrupts the write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume(run: _Run, config: TrainConfig) -> int:
    """Load the last checkpoint into `run`; returns the number of epochs it completed."""
    path = _checkpoint_path(config)
    assert path is not None
    if not path.is_file():
        raise OnnxcompError(
            f"--resume: no checkpoint {path}; run without --resume to start from epoch 1"
        )
    try:
        state = torch.load(path, map_location=run.device, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say so in one line
        raise OnnxcompError(f"{path}: cannot read the checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OnnxcompError(
            f"{path}: not an onnxcomp training checkpoint; remove it or drop --resume"
        )
    if state["fingerprint"] != run.fingerprint:
        raise OnnxcompError(
            f"{path}: checkpoint of another model (fingerprint {state['fingerprint']}, this "
            f"model {run.fingerprint}); use another --checkpoint-dir or drop --resume"
        )
    run.student.load_state_dict(state["model"])
    if isinstance(run.objective, nn.Module) and state["objective"] is not None:
        run.objective.load_state_dict(state["objective"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.history = [EpochStats(**s) for s in state["history"]]
    run.best_epoch = state["best_epoch"]
    run.best_state = state["best_state"]
    if run.rank == 0:
        _set_rng_states(state["rng"])
    return int(state["epoch"])


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- devices and DDP


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(config: TrainConfig) -> bool:
    """Start the process group when torchrun's environment says so; True if we started it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _resolve_device(device: str, rank: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available to torch; use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _all_reduce(run: _Run, values: list[float]) -> np.ndarray:
    if run.world_size == 1:
        return np.asarray(values, dtype=np.float64)
    tensor = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


# --------------------------------------------------------------------------- Rich progress


@contextmanager
def rich_progress(console: Any = None) -> Iterator[TrainProgress]:
    """A TrainProgress showing one bar per epoch with the running loss and accuracy."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    display = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with display:
        yield _RichProgress(display)


class _RichProgress:
    def __init__(self, display: Any) -> None:
        self.display = display
        self.task: Any = None
        self.samples = 0
        self.loss_sum = 0.0
        self.acc_sum = 0.0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.task = self.display.add_task(f"epoch {epoch}/{epochs}", total=steps, metrics="")
        self.samples, self.loss_sum, self.acc_sum = 0, 0.0, 0.0

    def step(self, samples: int, loss: float, accuracy: float | None) -> None:
        self.samples += samples
        self.loss_sum += loss * samples
        metrics = f"loss {self.loss_sum / self.samples:.4f}"
        if accuracy is not None:
            self.acc_sum += accuracy * samples
            metrics += f"  acc {100 * self.acc_sum / self.samples:.2f}%"
        self.display.update(self.task, advance=1, metrics=metrics)

    def end_epoch(self, stats: EpochStats) -> None:
        metrics = f"loss {stats.loss:.4f}"
        if stats.accuracy is not None:
            metrics += f"  acc {100 * stats.accuracy:.2f}%"
        self.display.update(self.task, metrics=f"{metrics}  ({stats.seconds:.0f}s)")
