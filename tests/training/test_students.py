"""Students designed from their teacher (robopt.training.students) on the zoo's digits-cnn and reacher-policy
architectures: parameter counts worked out by hand, output shapes, weights taken from the teacher, save/load."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from robopt.errors import TechniqueNotApplicableError
from robopt.training.students import design_student
from robopt.zoo.bc_policy import MLPPolicy
from robopt.zoo.digits_cnn import DigitsCNN


def digits_params(c1: int, c2: int | None, hidden: int | None, k: int = 3) -> int:
    """Parameters of DigitsCNN with c1/c2 conv channels (c2 None: conv 2 dropped) and a hidden Linear of `hidden`
    units (None: dropped); the 8x8 image is max-pooled to 4x4 before the classifier."""
    total = c1 * k * k + c1
    features = c1
    if c2 is not None:
        total += c2 * c1 * k * k + c2
        features = c2
    width = features * 16
    if hidden is not None:
        total += width * hidden + hidden
        width = hidden
    return total + width * 10 + 10


def policy_params(hidden: int, depth: int) -> int:
    """Parameters of MLPPolicy(10, 2) with `depth` hidden layers of `hidden` units."""
    if depth == 0:
        return 10 * 2 + 2
    return (10 * hidden + hidden) + (depth - 1) * (hidden * hidden + hidden) + hidden * 2 + 2


def trained_policy() -> MLPPolicy:
    """A reacher-sized policy with non-trivial normalisation and weights (random but fixed)."""
    torch.manual_seed(3)
    policy = MLPPolicy(10, 2)
    policy.set_normalisation(torch.randn(200, 10) * 3 + 1)
    return policy.eval()


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return DigitsCNN().eval(), torch.rand(4, 1, 8, 8)


@pytest.fixture(scope="module")
def policy() -> tuple[nn.Module, torch.Tensor]:
    return trained_policy(), torch.randn(4, 10)


def roundtrip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    ("width", "depth", "expected"),
    [
        (1.0, None, digits_params(16, 32, 256)),
        (0.5, None, digits_params(8, 16, 128)),
        (0.25, None, digits_params(4, 8, 64)),
        # depth 2: conv 2 (16->32 at full width) is narrowed to its input width, then dropped
        (0.5, 2, digits_params(8, None, 128)),
        (0.25, 2, digits_params(4, None, 64)),
    ],
)
def test_digits_cnn_students(digits, width, depth, expected):
    teacher, x = digits
    before = sum(p.numel() for p in teacher.parameters())
    design = design_student(teacher, (x[:1],), width=width, depth=depth)
    assert design.params == expected == sum(p.numel() for p in design.model.parameters())
    assert design.teacher_params == before == digits_params(16, 32, 256)
    assert sum(p.numel() for p in teacher.parameters()) == before  # the teacher is untouched
    with torch.no_grad():
        out = design.model(x)
        assert out.shape == teacher(x).shape == (4, 10)
        assert torch.equal(roundtrip(design.model)(x), out)
    if depth is not None:
        assert "dropped features.2" in design.description


@pytest.mark.parametrize(
    ("width", "depth", "hidden", "kept"),
    [(0.5, None, 128, 2), (0.25, None, 64, 2), (0.5, 1, 128, 1), (0.25, 1, 64, 1), (0.25, 0, 64, 0)],
)
def test_reacher_policy_students(policy, width, depth, hidden, kept):
    teacher, x = policy
    design = design_student(teacher, (x[:1],), width=width, depth=depth)
    assert design.params == policy_params(hidden, kept)
    assert design.teacher_params == policy_params(256, 2)
    assert design.param_ratio == pytest.approx(policy_params(hidden, kept) / policy_params(256, 2))
    # the normalisation buffers come along: the student takes raw observations like the teacher
    assert torch.equal(design.model.observation_mean, teacher.observation_mean)
    assert torch.equal(design.model.observation_std, teacher.observation_std)
    with torch.no_grad():
        out = design.model(x)
        assert out.shape == teacher(x).shape == (4, 2)
        assert torch.equal(roundtrip(design.model)(x), out)
    if depth == 1:
        assert "dropped net.2" in design.description


def test_a_thinned_student_starts_from_the_teachers_strongest_weights(policy):
    teacher, x = policy
    design = design_student(teacher, (x[:1],), width=0.25)
    first_t, first_s = teacher.net[0].weight, design.model.net[0].weight
    # every kept neuron of the first layer is one of the teacher's, with its weights and bias unchanged
    rows = [int(torch.nonzero((first_t == row).all(1)).flatten()[0]) for row in first_s]
    assert len(set(rows)) == 64
    assert torch.equal(design.model.net[0].bias, teacher.net[0].bias[rows])
    # ... and they are the neurons of the largest group L2 norm, not an arbitrary quarter: the kept neurons' own
    # first-layer weights are on average larger than the dropped ones'
    norms = first_t.norm(dim=1)
    dropped = [i for i in range(256) if i not in rows]
    assert norms[rows].mean() > norms[dropped].mean()


def test_the_output_layer_is_intact_and_a_copy_at_width_one_is_exact(digits):
    teacher, x = digits
    same = design_student(teacher, (x[:1],), width=1.0)
    with torch.no_grad():
        assert torch.equal(same.model(x), teacher(x))
    thin = design_student(teacher, (x[:1],), width=0.5)
    assert thin.model.classifier[4].out_features == 10
    assert "a copy of the teacher" in same.description


def test_larger_kernels_start_as_the_same_function_and_smaller_ones_shrink(digits):
    teacher, x = digits
    wide = design_student(teacher, (x[:1],), width=1.0, kernel_size=5)
    assert wide.model.features[0].kernel_size == (5, 5) and wide.model.features[0].padding == (2, 2)
    with torch.no_grad():
        assert torch.allclose(wide.model(x), teacher(x), atol=1e-5)  # zero-padded kernels compute the same
    point = design_student(teacher, (x[:1],), width=0.5, kernel_size=1)
    assert point.params == digits_params(8, 16, 128, k=1)
    assert torch.equal(point.model.features[0].weight[:, :, 0, 0], design_centre(teacher, point))
    with torch.no_grad():
        assert roundtrip(point.model)(x).shape == (4, 10)


def design_centre(teacher: nn.Module, point) -> torch.Tensor:
    """The teacher's centre taps of the kept first-layer channels (matched by their bias)."""
    bias_t, bias_s = teacher.features[0].bias, point.model.features[0].bias
    idx = [int(torch.nonzero(bias_t == b).flatten()[0]) for b in bias_s]
    return teacher.features[0].weight[idx, :, 1, 1]


def test_designs_are_deterministic(digits):
    teacher, x = digits
    a = design_student(teacher, (x[:1],), width=0.25, depth=2, kernel_size=1, seed=5)
    b = design_student(teacher, (x[:1],), width=0.25, depth=2, kernel_size=1, seed=5)
    assert a.description == b.description
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class TwoLayerNet(nn.Module):
    """Hidden layers used directly in forward (no nn.Sequential): nothing can be dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_impossible_requests_raise_with_a_hint(policy, digits):
    teacher, x = policy
    with pytest.raises(TechniqueNotApplicableError, match="exceeds the teacher's 2 hidden"):
        design_student(teacher, (x[:1],), depth=3)
    with pytest.raises(TechniqueNotApplicableError, match="no Conv2d kernel"):
        design_student(teacher, (x[:1],), kernel_size=3)
    with pytest.raises(TechniqueNotApplicableError, match="width must lie"):
        design_student(teacher, (x[:1],), width=0.0)
    with pytest.raises(TechniqueNotApplicableError, match="odd"):
        design_student(digits[0], (digits[1][:1],), kernel_size=4)
    net = TwoLayerNet().eval()
    assert design_student(net, (torch.randn(1, 6),), width=0.5, depth=2).params == 6 * 16 + 16 + 16 * 16 + 16 + 51
    with pytest.raises(TechniqueNotApplicableError, match="none can be dropped") as err:
        design_student(net, (torch.randn(1, 6),), depth=1)
    assert err.value.hint
    with pytest.raises(TechniqueNotApplicableError, match="does not run on the example inputs"):
        design_student(net, (torch.randn(1, 7),))
