"""CaP, cascaded projection (dnr.compress): orthonormal projections, exactness at full rank and on exactly
low-rank features, FLOP and parameter counts against the shapes, residual networks, and clear errors.

Oracles are independent of the code under test: P^T P against the identity, the original network's
outputs, a low-rank network built by hand, and FLOPs counted by forward hooks on the result's layers.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICES
from dnr.compress import (AdversarialTerm, ProjectionError, build_projected, calibrate_norms, cascaded_projection,
                          find_projection_spaces, qr_retraction)
from dnr.models import small_cnn
from dnr.models.resnet import ResNet, resnet18

DTYPES = [torch.float32, torch.float64]


def tiny_cnn():
    """small_cnn's layout (conv-BN-ReLU-pool x3, flatten, linear-ReLU-linear) at a test-sized width."""
    return small_cnn(widths=(6, 8, 10), hidden=12)


def narrow_resnet18(widths=(4, 6, 8, 10)):
    """ResNet-18's layout (2 BasicBlocks per stage, 1x1 shortcuts at the stride-2 stages) at test-sized widths."""
    return ResNet((2, 2, 2, 2), 10, 3, widths=widths)


def randomise_norms(model):
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them is tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def data(n=32, seed=0, shape=(1, 28, 28), device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *shape), generator=g).to(device, dtype),
            torch.randint(0, 10, (n,), generator=g).to(device))


def count_flops(model, x):
    """2 x multiply-accumulates of the conv and linear layers per example, counted by forward hooks."""
    total = [0]

    def hook(m, args, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total[0] += 2 * out[0].numel() * k
        else:
            total[0] += 2 * m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total[0]


def permutations(plan, dtype, device):
    g = torch.Generator().manual_seed(3)
    return {s.name: torch.eye(s.channels, dtype=dtype)[torch.randperm(s.channels, generator=g)].to(device)
            for s in plan.projectable()}


# ------------------------------------------------------------------------------------------ orthonormal
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_projections_stay_orthonormal_through_training(device, dtype):
    model = randomise_norms(tiny_cnn()).to(device, dtype)
    x, y = data(device=device, dtype=dtype)
    start = cascaded_projection(model, (x, y), flop_ratio=0.4, steps=0)
    out = cascaded_projection(model, [(x, y), data(seed=1, device=device, dtype=dtype)], flop_ratio=0.4, steps=4,
                              lr=0.05, adversarial=AdversarialTerm(eps=0.1, alpha=0.05, steps=1))
    assert len(out.dnr_projection["losses"]) == 4
    assert all(math.isfinite(v) for v in out.dnr_projection["losses"])
    for name, p in out.dnr_projections.items():
        r = p.shape[1]
        assert r < p.shape[0] and p.device.type == device and p.dtype == dtype
        eye = torch.eye(r, dtype=dtype, device=device)
        assert torch.allclose(p.t() @ p, eye, atol=1e-6, rtol=0), name
        # the SGD steps moved the projection away from its PCA initialisation
        assert not torch.allclose(p, start.dnr_projections[name], atol=1e-6), name


def test_qr_retraction_is_orthonormal_and_fixes_orthonormal_matrices():
    m = torch.randn(20, 7, dtype=torch.float64)
    q = qr_retraction(m)
    assert torch.allclose(q.t() @ q, torch.eye(7, dtype=torch.float64), atol=1e-12)
    # same column space as m, and an orthonormal matrix is its own retraction
    assert torch.allclose(q @ (q.t() @ m), m, atol=1e-10)
    assert torch.allclose(qr_retraction(q), q, atol=1e-12)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("device", DEVICES)
def test_full_rank_projection_equals_the_original(device):
    model = randomise_norms(tiny_cnn()).double().to(device)
    x, y = data(device=device, dtype=torch.float64)
    ranks = {"features.0": 6, "features.4": 8, "features.8": 10, "classifier.1": 12}
    out = cascaded_projection(model, (x, y), ranks=ranks, steps=2)
    assert out.dnr_projection["ranks"] == {}  # a full-rank space is not projected
    torch.testing.assert_close(out(x), model(x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_square_projections_with_norms_folded_equal_the_original(device, name):
    """Identity and permutation projections (which commute with ReLU and max-pool) of every space, the
    BatchNorms folded: float64 outputs equal the original's to 1e-8; residual spaces share one."""
    model = randomise_norms(tiny_cnn() if name == "small_cnn" else narrow_resnet18()).double().to(device)
    shape = (1, 28, 28) if name == "small_cnn" else (3, 32, 32)
    x, _ = data(4, shape=shape, device=device, dtype=torch.float64)
    plan = find_projection_spaces(model, x[:1])
    eye = {s.name: torch.eye(s.channels, dtype=torch.float64, device=device) for s in plan.projectable()}
    for projections in (eye, permutations(plan, torch.float64, device)):
        net = build_projected(plan, projections)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        torch.testing.assert_close(net(x), model(x), atol=1e-8, rtol=0)


class LinearChain(nn.Module):
    """conv -> BN -> avg-pool -> conv -> BN -> flatten -> linear: no activation, so any orthonormal square
    projection of each space leaves the function unchanged."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.pool = nn.AvgPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(5, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn2(self.conv2(self.pool(self.bn1(self.conv1(x))))), 1))


def test_rotations_of_a_linear_chain_equal_the_original():
    model = randomise_norms(LinearChain()).double()
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    plan = find_projection_spaces(model, x[:1])
    assert [s.name for s in plan.projectable()] == ["conv1", "conv2"]
    rot = {s.name: torch.linalg.qr(torch.randn(s.channels, s.channels, dtype=torch.float64))[0]
           for s in plan.projectable()}
    torch.testing.assert_close(build_projected(plan, rot)(x), model(x), atol=1e-10, rtol=0)


def test_pca_recovers_exactly_low_rank_features():
    """conv1's outputs span 3 of its 7 channels: its rank-3 projection (PCA, no training) loses nothing."""
    torch.manual_seed(0)
    model = LinearChain().double()
    model.conv1 = nn.Conv2d(2, 7, 3, padding=1, bias=False).double()
    model.bn1 = nn.Identity()
    basis = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        model.conv1.weight.copy_((basis @ torch.randn(3, 2 * 9, dtype=torch.float64)).view(7, 2, 3, 3))
    model.conv2 = nn.Conv2d(7, 4, 3, bias=False).double()
    model = randomise_norms(model)
    x = torch.rand(16, 2, 8, 8, dtype=torch.float64)
    out = cascaded_projection(model, x, ranks={"conv1": 3})
    assert out.conv1.out_channels == 3 and out.conv2.in_channels == 3
    torch.testing.assert_close(out(x), model(x), atol=1e-8, rtol=0)
    # at rank 2 the same network is no longer exact: the test can fail
    out2 = cascaded_projection(model, x, ranks={"conv1": 2})
    assert (out2(x) - model(x)).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ kept norms
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_kept_norms_are_calibrated_to_the_identity(device, dtype, name):
    """keep_norms=True: every folded BatchNorm comes back on its producer's r channels under its own name, so
    the result has as many norms as the original; calibrated on the calibration batch, the network computes
    the folded network's function: in eval mode on any input, in training mode on that batch itself."""
    model = randomise_norms(tiny_cnn() if name == "small_cnn" else narrow_resnet18()).to(device, dtype)
    shape = (1, 28, 28) if name == "small_cnn" else (3, 32, 32)
    x, y = data(16, shape=shape, device=device, dtype=dtype)
    other, _ = data(8, seed=5, shape=shape, device=device, dtype=dtype)
    folded = cascaded_projection(model, (x, y), flop_ratio=0.5, calibration_size=16)
    kept = cascaded_projection(model, (x, y), flop_ratio=0.5, calibration_size=16, keep_norms=True)
    info = kept.dnr_projection

    def norms(net):
        return {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}

    assert len(norms(kept)) == len(norms(model)) > len(norms(folded))
    assert sorted(info["norms"]) == sorted(set(norms(kept)) - set(norms(folded)))
    for n, m in norms(kept).items():  # a kept norm is as wide as the conv it follows, with the original's eps
        assert m.eps == norms(model)[n].eps and type(m) is type(norms(model)[n])
    if name == "small_cnn":
        assert {n: m.num_features for n, m in norms(kept).items()} == {
            f"features.{i + 1}": kept.get_submodule(f"features.{i}").out_channels for i in (0, 4, 8)}
    extra = sum(2 * norms(kept)[n].num_features for n in info["norms"])
    assert sum(p.numel() for p in kept.parameters()) == info["params"] == folded.dnr_projection["params"] + extra
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    with torch.no_grad():
        torch.testing.assert_close(kept(other), folded(other), **tol)
        torch.testing.assert_close(kept.train()(x), folded(x), **tol)
    # the test can fail: a kept norm that is not the identity changes the output
    with torch.no_grad():
        norms(kept)[info["norms"][0]].weight.zero_()  # its channels become constants
        assert (kept.eval()(other) - folded(other)).abs().max() > 5 * 2e-4


def test_keep_norms_must_name_a_projected_producers_norm():
    model = randomise_norms(tiny_cnn())
    plan = find_projection_spaces(model, data(1)[0])
    p = {"features.0": torch.eye(6, 3)}
    with pytest.raises(ProjectionError, match="keep_norms names 'features.5', which is not the BatchNorm of a "
                                         "projected producer \\(those are: \\['features.1'\\]\\)"):
        build_projected(plan, p, keep_norms=["features.5"])
    net = build_projected(plan, p, keep_norms=["features.1"])
    assert net.get_submodule("features.1").num_features == 3 and net.get_submodule("features.5").num_features == 8
    net.add_module("spare", nn.BatchNorm2d(3))  # a norm the forward pass never runs cannot be calibrated
    with pytest.raises(ProjectionError, match="calibrate_norms: 'spare' did not run in the forward pass"):
        calibrate_norms(net, ["features.1", "spare"], data(4)[0])


# ------------------------------------------------------------------------------------------ costs and shapes
@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_flops_and_parameters_equal_the_prediction(name, ratio):
    model = randomise_norms(small_cnn() if name == "small_cnn" else narrow_resnet18((8, 12, 16, 24)))
    shape = (1, 28, 28) if name == "small_cnn" else (3, 32, 32)
    x, y = data(16, shape=shape)
    out = cascaded_projection(model, (x, y), flop_ratio=ratio)
    info = out.dnr_projection
    assert sum(p.numel() for p in out.parameters()) == info["params"]
    assert count_flops(out, x) == info["flops"]
    assert count_flops(model, x) == info["flops_dense"]
    assert sum(p.numel() for p in model.parameters()) == info["params_dense"]
    assert info["flops"] <= ratio * info["flops_dense"]
    assert info["flops"] > 0.6 * ratio * info["flops_dense"]  # the allocation does not overshoot by far
    # the uniform-fraction rule: every projected space keeps about the same fraction of its channels
    fractions = [r / info["channels"][k] for k, r in info["ranks"].items()]
    assert max(fractions) - min(fractions) <= max(1 / c for c in info["channels"].values()) + 1e-9
    assert out(x).shape == model(x).shape


def test_resnet18_shared_residual_spaces_and_shapes():
    model = resnet18().eval()
    x, y = data(2, shape=(3, 32, 32))
    out = cascaded_projection(model, (x, y), flop_ratio=0.25)
    ranks, spaces = out.dnr_projection["ranks"], out.dnr_projection["spaces"]
    assert spaces["conv1"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert spaces["layer2.0.conv2"] == ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"]
    for space, producers in spaces.items():
        if space not in ranks:
            continue
        for p in producers:  # every conv feeding one residual sum has the same (shared) width
            assert out.get_submodule(p).out_channels == ranks[space], p
    stream = ranks["layer4.0.conv2"]
    assert out.get_submodule("layer4.1.conv1").in_channels == stream and out.linear.in_features == stream
    assert out.get_submodule("layer2.0.shortcut.0").in_channels == ranks["conv1"]
    assert out(x).shape == (2, 10)
    # full rank, every space projected by a permutation (shared across each residual sum), BatchNorms folded:
    # the float64 network equals the original
    model64 = randomise_norms(model).double()
    plan = find_projection_spaces(model64, x[:1].double())
    net = build_projected(plan, permutations(plan, torch.float64, "cpu"))
    torch.testing.assert_close(net(x.double()), model64(x.double()), atol=1e-8, rtol=0)


# ------------------------------------------------------------------------------------------ export
def test_the_result_exports_like_a_compacted_model(tmp_path):
    from dnr.export import compact_model, export_model, load_compact

    model = randomise_norms(tiny_cnn())
    x, y = data(8)
    out = cascaded_projection(model, (x, y), flop_ratio=0.5)
    compacted = compact_model(out, (1, 28, 28))
    torch.testing.assert_close(compacted(x), out(x), atol=1e-5, rtol=1e-5)
    card = export_model(out, tmp_path / "cap.pt2", "compact", (1, 28, 28))
    assert card["export"]["file_bytes"] > 0
    torch.testing.assert_close(load_compact(tmp_path / "cap.pt2")(x), out(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("ranks,match", [
    ({"features.4": 0}, "layer 'features.4': rank 0 is invalid, expected an integer in \\[1, 8\\]"),
    ({"features.4": 9}, "layer 'features.4': rank 9 is invalid"),
    ({"features.4": 2.5}, "layer 'features.4': rank 2.5 is invalid"),
    ({"classifier.3": 5}, "layer 'classifier.3'.*network's output"),
    ({"features.1": 3}, "layer 'features.1': not a conv/linear layer"),
    ({"nope": 3}, "layer 'nope'"),
])
def test_bad_ranks_name_the_layer(ranks, match):
    model = tiny_cnn().eval()
    with pytest.raises(ProjectionError, match=match):
        cascaded_projection(model, data(4)[0], ranks=ranks)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, float("nan"), True, "half"])
def test_bad_flop_ratio(ratio):
    with pytest.raises(ProjectionError, match="flop_ratio: got .*expected a number in \\(0, 1\\]"):
        cascaded_projection(tiny_cnn().eval(), data(4)[0], flop_ratio=ratio)


def test_unreachable_ratio_and_argument_errors():
    model = tiny_cnn().eval()
    x, y = data(4)
    with pytest.raises(ProjectionError, match="rank 1 keeps"):
        cascaded_projection(model, x, flop_ratio=1e-4)
    with pytest.raises(ProjectionError, match="exactly one of ranks"):
        cascaded_projection(model, x)
    with pytest.raises(ProjectionError, match="steps > 0 needs labels"):
        cascaded_projection(model, x, flop_ratio=0.5, steps=1)
    with pytest.raises(ProjectionError, match="steps got -1"):
        cascaded_projection(model, (x, y), flop_ratio=0.5, steps=-1)
    with pytest.raises(ProjectionError, match="keep_norms got 'yes', expected True or False"):
        cascaded_projection(model, (x, y), flop_ratio=0.5, keep_norms="yes")


def test_residual_space_ranks_must_agree():
    model = narrow_resnet18().eval()
    x = data(2, shape=(3, 32, 32))[0]
    with pytest.raises(ProjectionError, match="layer 'layer1.0.conv2': rank 3 differs from the rank 2 given for "
                                              "layer 'conv1'.*same residual sum"):
        cascaded_projection(model, x, ranks={"conv1": 2, "layer1.0.conv2": 3})
    out = cascaded_projection(model, x, ranks={"conv1": 2, "layer1.1.conv2": 2})
    assert out.get_submodule("layer1.0.conv2").out_channels == 2


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), self.b(x)], 1)
        return self.head(F.adaptive_avg_pool2d(self.g(h), 1).flatten(1))


@pytest.mark.parametrize("layer,match", [
    ("a", "layer 'a': its output channels cannot be projected: it reaches call_function 'cat'"),
    ("g", "layer 'g': its output channels cannot be projected: its producer 'g' is a grouped conv"),
])
def test_unsupported_structures_name_the_layer(layer, match):
    with pytest.raises(ProjectionError, match=match):
        cascaded_projection(Concat().eval(), torch.rand(2, 1, 8, 8), ranks={layer: 2})


def test_untraceable_model_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else -self.c(x)

    with pytest.raises(ProjectionError, match="cannot trace Branchy with torch.fx"):
        cascaded_projection(Branchy().eval(), torch.rand(2, 1, 5, 5), ranks={"c": 1})
