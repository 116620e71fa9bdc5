"""Each distillation loss against a numpy computation of its paper's formula; the objective."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxcomp.errors import OnnxcompError, OptionError  # noqa: E402
from onnxcomp.training.losses import (  # noqa: E402
    AttentionTransferLoss,
    DistillationConfig,
    DistillationObjective,
    DKDLoss,
    FitNetsLoss,
    KDLoss,
    Term,
)

RNG = np.random.default_rng(7)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def kd_numpy(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    return float(t * t * kl(softmax(teacher / t), softmax(student / t)).mean())


def dkd_numpy(student, teacher, target, alpha, beta, t) -> float:
    """Zhao et al. 2022, eq. (2)-(5): binary target/non-target KL and non-target KL."""
    total = []
    for s, te, k in zip(student, teacher, target, strict=True):
        p_s, p_t = softmax(s[None] / t)[0], softmax(te[None] / t)[0]
        b_s = np.array([p_s[k], 1 - p_s[k]])
        b_t = np.array([p_t[k], 1 - p_t[k]])
        others = np.arange(len(s)) != k
        hat_s = p_s[others] / p_s[others].sum()
        hat_t = p_t[others] / p_t[others].sum()
        tckd = (b_t * np.log(b_t / b_s)).sum()
        nckd = (hat_t * np.log(hat_t / hat_s)).sum()
        total.append(t * t * (alpha * tckd + beta * nckd))
    return float(np.mean(total))


def tensor(array: np.ndarray, grad: bool = False):
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


def logits(rows: int = 4, classes: int = 5, scale: float = 3.0) -> np.ndarray:
    return RNG.normal(scale=scale, size=(rows, classes))


def test_kd_by_hand_two_classes():
    # teacher p = (3/4, 1/4), student p = (1/2, 1/2) at T = 1
    value = KDLoss(temperature=1.0)(tensor([[0.0, 0.0]]), tensor([[np.log(3.0), 0.0]]))
    expected = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    assert float(value) == pytest.approx(expected, rel=1e-12)
    same = KDLoss(temperature=4.0)(tensor([[1.0, 2.0, 3.0]]), tensor([[1.0, 2.0, 3.0]]))
    assert float(same) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_against_numpy(t):
    student, teacher = logits(), logits()
    value = KDLoss(temperature=t)(tensor(student), tensor(teacher))
    assert float(value) == pytest.approx(kd_numpy(student, teacher, t), rel=1e-10)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_against_the_papers_formulas(t):
    student, teacher = logits(6, 7), logits(6, 7)
    target = RNG.integers(0, 7, size=6)
    value = DKDLoss(alpha=1.5, beta=8.0, temperature=t)(
        tensor(student), tensor(teacher), torch.tensor(target)
    )
    assert float(value) == pytest.approx(dkd_numpy(student, teacher, target, 1.5, 8.0, t), 1e-9)


def test_dkd_decouples_kd():
    # the paper's identity: KD = TCKD + (1 - p_t(target)) * NCKD, for each sample
    student, teacher = logits(1, 6), logits(1, 6)
    target = torch.tensor([2])
    p_target = softmax(teacher / 2.0)[0, 2]
    dkd = DKDLoss(alpha=1.0, beta=1.0 - p_target, temperature=2.0)
    value = dkd(tensor(student), tensor(teacher), target)
    kd = KDLoss(temperature=2.0)(tensor(student), tensor(teacher))
    assert float(value) == pytest.approx(float(kd), rel=1e-9)


def test_dkd_without_labels_uses_the_teachers_top_class_and_warms_up():
    student, teacher = logits(), logits()
    dkd = DKDLoss(temperature=4.0, warmup=4)
    top = torch.tensor(teacher.argmax(axis=1))
    plain = DKDLoss(temperature=4.0)(tensor(student), tensor(teacher), top)
    assert float(dkd(tensor(student), tensor(teacher))) == pytest.approx(0.25 * float(plain))
    dkd.set_epoch(1)
    assert float(dkd(tensor(student), tensor(teacher), top)) == pytest.approx(0.5 * float(plain))
    dkd.set_epoch(10)
    assert float(dkd(tensor(student), tensor(teacher), top)) == pytest.approx(float(plain))


def attention_numpy(features: np.ndarray, pool: int = 1) -> np.ndarray:
    a = (features**2).sum(axis=1)
    b, h, w = a.shape
    a = a.reshape(b, h // pool, pool, w // pool, pool).mean(axis=(2, 4)).reshape(b, -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_attention_transfer_against_numpy_with_different_sizes_and_channels():
    student = RNG.normal(size=(2, 3, 4, 4))
    teacher = RNG.normal(size=(2, 5, 2, 2))
    value = AttentionTransferLoss(beta=1000.0)(tensor(student), tensor(teacher))
    diff = attention_numpy(student, pool=2) - attention_numpy(teacher)
    assert float(value) == pytest.approx(500.0 * np.mean(diff**2), rel=1e-10)
    same = RNG.normal(size=(2, 3, 4, 4))
    value = AttentionTransferLoss(beta=2.0)(tensor(same), tensor(2 * same))
    assert float(value) == pytest.approx(0.0, abs=1e-12)  # the maps are normalised


def test_fitnets_conv_regressor_with_a_fixed_weight():
    student = RNG.normal(size=(2, 3, 4, 4))
    teacher = RNG.normal(size=(2, 5, 4, 4))
    weight = RNG.normal(size=(5, 3))
    loss = FitNetsLoss(weight=0.5)
    s, t = tensor(student, grad=True), tensor(teacher)
    regressor = loss.build(s, t)
    assert isinstance(regressor, torch.nn.Conv2d) and regressor.weight.shape == (5, 3, 1, 1)
    with torch.no_grad():
        regressor.weight.copy_(torch.tensor(weight[:, :, None, None]))
    value = loss(s, t)
    regressed = np.einsum("oc,bchw->bohw", weight, student)
    assert float(value.detach()) == pytest.approx(
        0.5 * np.mean((regressed - teacher) ** 2), rel=1e-10
    )
    value.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert regressor.weight.grad is not None and float(regressor.weight.grad.abs().sum()) > 0


def test_fitnets_linear_regressor_and_its_gradient():
    student, teacher = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 2))
    weight = RNG.normal(size=(2, 3))
    loss = FitNetsLoss()
    regressor = loss.build(tensor(student), tensor(teacher))
    assert isinstance(regressor, torch.nn.Linear)
    with torch.no_grad():
        regressor.weight.copy_(torch.tensor(weight))
    value = loss(tensor(student), tensor(teacher))
    residual = student @ weight.T - teacher
    assert float(value.detach()) == pytest.approx(np.mean(residual**2), rel=1e-10)
    value.backward()
    expected = 2 * residual.T @ student / residual.size
    np.testing.assert_allclose(regressor.weight.grad.numpy(), expected, rtol=1e-10)


def test_fitnets_refuses_features_of_other_ranks():
    with pytest.raises(OnnxcompError, match="2-D or 4-D features of the same rank"):
        FitNetsLoss()(tensor(np.zeros((2, 3, 4))), tensor(np.zeros((2, 3, 4))))


class Student(torch.nn.Module):
    """A tiny student with a feature map and logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return {"feat": features, "out": self.fc(features.mean(dim=(2, 3)))}


def test_objective_with_labels_against_numpy():
    student = Student().double()
    x = torch.tensor(RNG.normal(size=(3, 2, 4, 4)))
    teacher = {"logits": logits(3, 4), "layer": RNG.normal(size=(3, 6, 4, 4))}
    labels = np.array([0, 3, 1])
    objective = DistillationObjective(
        [Term(KDLoss(4.0, alpha=0.75)), Term(AttentionTransferLoss(10.0), "feat", "layer")],
        student_logits="out",
        teacher_logits="logits",
    )
    outputs = student(x)
    loss, parts = objective(outputs, teacher, torch.tensor(labels))
    s_logits = outputs["out"].detach().numpy()
    ce = -np.log(softmax(s_logits)[np.arange(3), labels]).mean()
    kd = kd_numpy(s_logits, teacher["logits"], 4.0)
    at = 5.0 * np.mean(
        (attention_numpy(outputs["feat"].detach().numpy()) - attention_numpy(teacher["layer"])) ** 2
    )
    assert parts == pytest.approx({"ce": 0.25 * ce, "kd": 0.75 * kd, "at:feat": at}, rel=1e-9)
    assert float(loss.detach()) == pytest.approx(0.25 * ce + 0.75 * kd + at, rel=1e-9)
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


def test_kd_only_without_labels():
    student, teacher = logits(), logits()
    objective = DistillationObjective([Term(KDLoss(2.0, alpha=0.5))])
    loss, parts = objective({"logits": tensor(student)}, {"logits": teacher}, None)
    assert list(parts) == ["kd"]
    assert float(loss) == pytest.approx(kd_numpy(student, teacher, 2.0), rel=1e-10)
    with pytest.raises(OnnxcompError, match="no labels and no distillation loss"):
        DistillationObjective()({"logits": tensor(student)}, {}, None)


def test_regressor_parameters_reach_the_optimizer_after_prepare():
    student = Student().double()
    x = torch.tensor(RNG.normal(size=(2, 2, 4, 4)))
    teacher = {"logits": logits(2, 4), "layer": RNG.normal(size=(2, 6, 2, 2))}
    objective = DistillationObjective(
        [Term(DKDLoss()), Term(FitNetsLoss(), "feat", "layer")], "out", "logits"
    )
    assert not list(objective.parameters())
    objective.prepare(student(x), teacher)
    (regressor,) = list(objective.parameters())
    assert regressor.shape == (6, 3, 1, 1)
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1)
    before = regressor.detach().clone()
    loss, parts = objective(student(x), teacher, torch.tensor([1, 2]))
    assert set(parts) == {"ce", "dkd", "fitnets:feat"}
    assert float(loss.detach()) == pytest.approx(sum(parts.values()), rel=1e-9)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, regressor.detach())


def test_objective_names_missing_tensors():
    objective = DistillationObjective([Term(KDLoss())], student_logits="out")
    with pytest.raises(OnnxcompError, match="the teacher has no output or tapped tensor 'out'"):
        objective({"out": tensor(logits())}, {"logits": logits()}, None)
    with pytest.raises(OnnxcompError, match=r"student has no output .* 'out' \(have: y\)"):
        objective({"y": tensor(logits())}, {"out": logits()}, None)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: KDLoss(temperature=0), "KD temperature must be > 0"),
        (lambda: KDLoss(alpha=1.5), "KD alpha must be between 0 and 1"),
        (lambda: DKDLoss(beta=-1), "DKD beta must be >= 0"),
        (lambda: DKDLoss(warmup=-2), "DKD warm-up must be >= 0"),
        (lambda: AttentionTransferLoss(p=0), "attention-transfer p must be > 0"),
        (lambda: FitNetsLoss(weight=-1), "FitNets weight must be >= 0"),
        (lambda: DistillationObjective([Term(KDLoss()), Term(KDLoss())]), "at most one KD"),
        (lambda: DistillationConfig(method="hint"), "unknown distillation method 'hint'"),
        (lambda: DistillationConfig(feature_loss="mse"), "unknown feature loss 'mse'"),
        (lambda: DistillationConfig(temperature=-1.0), "KD temperature must be > 0"),
        (lambda: DistillationConfig(method="dkd", dkd_alpha=-1), "DKD alpha must be >= 0"),
    ],
)
def test_option_errors(build, message):
    with pytest.raises(OptionError, match=message):
        build()


def test_without_torch_one_line_says_how_to_install_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from onnxcomp.errors import OnnxcompError\n"
        "try:\n    import onnxcomp.training.losses\n"
        "except OnnxcompError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == (
        "onnxcomp.training.losses needs torch: pip install 'onnxcomp[torch]'"
    )


def test_config_builds_the_objective():
    config = DistillationConfig(
        method="dkd", features=(("s1", "t1"),), feature_loss="fitnets", feature_weight=2.0
    )
    objective = config.objective("out", "logits")
    assert [type(m).__name__ for m in objective.losses] == ["DKDLoss", "FitNetsLoss"]
    assert objective.labels == ["dkd", "fitnets:s1"] and objective.ce_weight == 1.0
    assert objective.losses[1].weight == 2.0
    assert DistillationConfig().objective("out").ce_weight == pytest.approx(0.1)
