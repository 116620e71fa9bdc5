"""The generic training loop: learning, checkpoints, resume, refusal, NaN stop, options."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from onnxcomp.errors import OnnxcompError, OptionError  # noqa: E402
from onnxcomp.training.data import TrainingData  # noqa: E402
from onnxcomp.training.trainer import (  # noqa: E402
    CHECKPOINT_NAME,
    TrainConfig,
    model_fingerprint,
    rich_progress,
    train,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def blobs(count: int = 64, seed: int = 0) -> TrainingData:
    """Two Gaussian blobs, linearly separable (centres 6 standard deviations apart)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    x = np.where(labels[:, None] == 1, 1.5, -1.5) + 0.25 * rng.standard_normal((count, 2))
    return TrainingData({"x": x.astype(np.float32)}, labels.astype(np.int64), "blobs")


def mlp(seed: int = 0, hidden: int = 8, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))


def cross_entropy(outputs, teacher_outputs, labels):
    loss = nn.functional.cross_entropy(outputs["logits"], labels)
    return loss, {"ce": float(loss.detach())}


def config(tmp_path=None, **kw) -> TrainConfig:
    base = dict(epochs=3, lr=0.1, batch_size=16, device="cpu", seed=1, augment=False)
    if tmp_path is not None:
        base["checkpoint_dir"] = tmp_path / "ckpt"
    base.update(kw)
    return TrainConfig(**base)


class StopAt:
    """Progress hooks that raise KeyboardInterrupt at (epoch, step): a simulated Ctrl-C/kill."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)
        self.epoch = 0
        self.steps = 0

    def start_epoch(self, epoch, epochs, steps):
        self.epoch, self.steps = epoch, 0

    def step(self, samples, loss, accuracy):
        self.steps += 1
        if (self.epoch, self.steps) == self.at:
            raise KeyboardInterrupt

    def end_epoch(self, stats):
        pass


def test_tiny_model_learns_separable_problem():
    data = blobs()
    model = mlp()
    with torch.no_grad():
        before = nn.functional.cross_entropy(
            model(torch.from_numpy(data.arrays["x"])), torch.from_numpy(data.labels)
        )
    result = train(model, cross_entropy, data, config(epochs=5, lr=0.2))
    losses = [s.loss for s in result.history]
    assert len(losses) == 5 and losses[-1] < losses[0] < float(before) + 0.1
    assert result.history[-1].accuracy >= 0.95 > result.history[0].accuracy - 1
    assert result.history[-1].samples == 64
    assert result.history[-1].parts["ce"] == pytest.approx(losses[-1], rel=0.3)
    # the returned last state is the trained module's own weights
    for key, value in model.state_dict().items():
        assert torch.equal(result.last_state[key], value)
    # an independent check of accuracy on the training data
    with torch.no_grad():
        pred = model(torch.from_numpy(data.arrays["x"])).argmax(1).numpy()
    assert (pred == data.labels).mean() >= 0.95


def test_cosine_schedule_reaches_expected_lr():
    data = blobs(32)
    result = train(mlp(), cross_entropy, data, config(epochs=2, lr=0.4, batch_size=8))
    total = 2 * 4
    # history lr is the rate of each epoch's last step (step index 3 and 7)
    expected = [0.4 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in (3, 7)]
    assert [s.lr for s in result.history] == pytest.approx(expected)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    data = blobs()
    full = train(mlp(dropout=0.3), cross_entropy, data, config(tmp_path / "a"))

    cfg = config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(mlp(dropout=0.3), cross_entropy, data, cfg, progress=StopAt(epoch=2, step=2))
    ckpt_dir = tmp_path / "b" / "ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [CHECKPOINT_NAME]  # nothing half-written
    assert torch.load(ckpt_dir / CHECKPOINT_NAME, weights_only=False)["epoch"] == 1

    fresh = mlp(seed=99, dropout=0.3)  # other starting weights: the checkpoint must replace them
    resumed = train(fresh, cross_entropy, data, config(tmp_path / "b", resume=True))
    assert [s.epoch for s in resumed.history] == [1, 2, 3]
    for key, value in full.last_state.items():
        assert torch.equal(resumed.last_state[key], value), key
    assert [s.loss for s in resumed.history] == [s.loss for s in full.history]


def test_on_step_sees_every_optimizer_step_and_counts_across_a_resume(tmp_path):
    data = blobs()  # 64 samples, batch 16: 4 steps per epoch, 12 in all
    seen: list[tuple[int, int, float]] = []

    def record(model):
        weight = model[0].weight
        return lambda step, total: seen.append((step, total, float(weight.detach().sum())))

    model = mlp()
    train(model, cross_entropy, data, config(), on_step=record(model))
    assert [(s, t) for s, t, _ in seen] == [(i, 12) for i in range(1, 13)]
    assert seen[-1][2] == pytest.approx(float(model[0].weight.detach().sum()))  # after the step
    full, seen[:] = list(seen), []
    with pytest.raises(KeyboardInterrupt):
        model = mlp()
        train(model, cross_entropy, data, config(tmp_path), progress=StopAt(2, 2),
              on_step=record(model))  # fmt: skip
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    seen.clear()
    model = mlp()
    train(model, cross_entropy, data, config(tmp_path, resume=True), on_step=record(model))
    assert [(s, t) for s, t, _ in seen] == [(i, 12) for i in range(5, 13)]  # epoch 2 again
    assert [w for _, _, w in seen] == pytest.approx([w for _, _, w in full[4:]])


def test_resume_refuses_checkpoint_of_another_model(tmp_path):
    train(mlp(hidden=8), cross_entropy, blobs(), config(tmp_path, epochs=1))
    other = mlp(hidden=5)
    with pytest.raises(OnnxcompError, match="checkpoint of another model") as info:
        train(other, cross_entropy, blobs(), config(tmp_path, epochs=2, resume=True))
    assert "\n" not in str(info.value) and "--checkpoint-dir" in str(info.value)
    assert model_fingerprint(other) != model_fingerprint(mlp(hidden=8))


def test_resume_without_checkpoint_and_foreign_file(tmp_path):
    with pytest.raises(OnnxcompError, match="no checkpoint"):
        train(mlp(), cross_entropy, blobs(), config(tmp_path, resume=True))
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(OnnxcompError, match="cannot read the checkpoint"):
        train(mlp(), cross_entropy, blobs(), config(tmp_path, resume=True))


def test_nan_loss_stops_keeps_last_good_checkpoint_and_names_lr(tmp_path):
    calls = {"n": 0}

    def poisoned(outputs, teacher_outputs, labels):
        calls["n"] += 1
        loss, parts = cross_entropy(outputs, teacher_outputs, labels)
        return (loss * float("nan") if calls["n"] == 6 else loss), parts  # epoch 2, step 2

    model = mlp()
    with pytest.raises(OnnxcompError) as info:
        train(model, poisoned, blobs(), config(tmp_path, lr=0.5))
    message = str(info.value)
    assert "--lr 0.5 -> try 0.05" in message and "epoch 2" in message and "\n" not in message
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not taken


def test_interrupted_checkpoint_write_leaves_old_file(tmp_path, monkeypatch):
    import onnxcomp.training.trainer as trainer_module

    train(mlp(), cross_entropy, blobs(), config(tmp_path, epochs=1))
    path = tmp_path / "ckpt" / CHECKPOINT_NAME
    before = path.read_bytes()

    def torn_save(state, fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        train(mlp(), cross_entropy, blobs(), config(tmp_path, epochs=1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_NAME]


def test_kd_only_with_teacher_gets_sample_indices():
    data = blobs(24)
    unlabelled = TrainingData(dict(data.arrays), None, "unlabelled")
    assert any("knowledge distillation only" in note for note in unlabelled.notes)
    seen = []

    def teacher(inputs, indices):
        seen.append(indices.copy())
        # a teacher that knows the answer: checks inputs and indices belong together
        np.testing.assert_array_equal(inputs["x"], data.arrays["x"][indices])
        return {"logits": np.eye(2, dtype=np.float32)[data.labels[indices]] * 4}

    def kd(outputs, teacher_outputs, labels):
        assert labels is None
        target = teacher_outputs["logits"].softmax(1)
        loss = -(target * outputs["logits"].log_softmax(1)).sum(1).mean()
        return loss, {}

    model = mlp()
    result = train(model, kd, unlabelled, config(epochs=4, lr=0.3, batch_size=8), teacher=teacher)
    assert result.history[-1].accuracy is None and result.history[-1].loss < result.history[0].loss
    assert sorted(np.concatenate(seen[:3]).tolist()) == list(range(24))  # one epoch: each once
    with torch.no_grad():
        pred = model(torch.from_numpy(data.arrays["x"])).argmax(1).numpy()
    assert (pred == data.labels).mean() >= 0.9
    with pytest.raises(OptionError, match="no labels and no teacher"):
        train(mlp(), kd, unlabelled, config())


def test_objective_module_parameters_are_trained_and_checkpointed(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.tensor(3.0))

        def forward(self, outputs, teacher_outputs, labels):
            loss = nn.functional.cross_entropy(outputs["logits"] / self.temperature, labels)
            return loss, {}

    objective = Scaled()
    train(mlp(), objective, blobs(), config(tmp_path, epochs=1))
    assert float(objective.temperature.detach()) != 3.0
    saved = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=False)["objective"]
    assert float(saved["temperature"]) == float(objective.temperature.detach())


def test_evaluate_hook_and_rich_progress():
    from rich.console import Console

    modes = []

    def evaluate(model):
        modes.append(model.training)
        return {"top1": 1.0}

    sink = io.StringIO()
    with rich_progress(Console(file=sink, force_terminal=False, width=120)) as progress:
        result = train(
            mlp(), cross_entropy, blobs(), config(epochs=1), progress=progress, evaluate=evaluate
        )
    assert modes == [False] and result.evaluation == {"top1": 1.0}
    assert "epoch 1/1" in sink.getvalue() and "loss" in sink.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"batch_size": -1}, "--batch-size"),
        ({"device": "tpu"}, "--device"),
        ({"momentum": 1.5}, "--momentum"),
        ({"warmup_epochs": 5.0, "epochs": 3}, "--warmup-epochs"),
        ({"resume": True}, "--resume"),
        ({"seed": -1}, "--seed"),
        ({"schedule": "step"}, "--schedule"),
    ],
)
def test_config_validates_itself(kwargs, flag):
    with pytest.raises(OptionError, match=flag):
        TrainConfig(**kwargs)


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(OptionError, match="not a folder"):
        TrainConfig(checkpoint_dir=file)
