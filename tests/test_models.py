"""Tests for dnr.models: VGG16-BN, CIFAR ResNet-18, SmallCNN and the build_model registry."""

import copy
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dnr.models import MODEL_NAMES, VGG16_CONFIG, BasicBlock, build_model, resnet18, small_cnn, vgg16, wide_cnn

CNN28 = ("small_cnn", "wide_cnn")  # the 28x28 single-channel models with a two-layer head
INPUT28 = CNN28 + ("vgg_cnn",)  # every 28x28 single-channel model
CNNS = ("small_cnn", "wide_cnn", "vgg16", "resnet18", "vgg_cnn")  # the recurrent presets: tests/test_sequence_models.py
from dnr.nn import MaskedConv2d, Normalize, masked_layers, sparsify

MEAN3, STD3 = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=None)
def _built(name, num_classes, channels, size, normalized=True):
    stats = ((0.5,) * channels, (0.25,) * channels) if normalized else (None, None)
    torch.manual_seed(0)
    return build_model(name, num_classes, channels, size, *stats)


def fresh(name, num_classes=10, channels=None, size=None, normalized=True):
    """A copy of a cached model (building VGG16/ResNet-18 takes a while on a loaded CPU)."""
    channels = channels or (1 if name in INPUT28 else 3)
    size = size or (28 if name in INPUT28 else 32)
    return copy.deepcopy(_built(name, num_classes, channels, size, normalized))


def weights(model, types=(nn.Conv2d, nn.Linear)):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, types))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("name,size,channels", [
    ("small_cnn", 28, 1), ("vgg16", 32, 3), ("vgg16", 64, 3), ("resnet18", 28, 1), ("resnet18", 32, 3),
])
def test_output_shapes_eval_forward(name, size, channels, device):
    model = fresh(name, 7, channels, size).to(device).eval()
    x = torch.rand(2, channels, size, size, device=device)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        # eval mode: each example's logits do not depend on the rest of the batch
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-4, atol=1e-5)
        if name == "resnet18" and size == 32:  # adaptive pooling: the same net takes 64x64 inputs
            assert model(torch.rand(1, 3, 64, 64, device=device)).shape == (1, 7)


# ---------------------------------------------------------------- parameter counts (known values)
def test_vgg16_parameter_counts():
    m = vgg16(num_classes=10)
    # conv weights by hand from the config: sum of 3*3*c_in*c_out
    convs = [c for c in VGG16_CONFIG if c != "M"]
    by_hand = sum(9 * a * b for a, b in zip([3] + convs[:-1], convs))
    assert weights(m, nn.Conv2d) == by_hand == 14_710_464
    assert weights(m, nn.Linear) == 5_120
    assert n_params(m) == 14_724_042  # + BatchNorm affine 2*4224 and the linear bias
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 13
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 13
    tiny = vgg16(num_classes=200, input_size=64)
    assert tiny.classifier.in_features == 2048 and n_params(tiny) == 15_128_712


def test_resnet18_parameter_counts():
    assert n_params(resnet18(num_classes=10)) == 11_173_962  # the CIFAR ResNet-18 figure
    assert n_params(resnet18(num_classes=100)) == 11_220_132
    assert weights(resnet18(num_classes=10), nn.Conv2d) == 11_159_232 and weights(resnet18(), nn.Linear) == 5_120
    assert n_params(resnet18(num_classes=200, input_size=64)) == 11_271_432


def test_small_cnn_unchanged():
    m = small_cnn()
    assert n_params(m) == 98_554 and isinstance(m.normalize, Normalize)


def test_wide_cnn_is_small_cnn_widened():
    m = wide_cnn()
    assert [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)] == [32, 64, 128]
    assert m.classifier[1].out_features == 320
    # 1*32*9 + 32*64*9 + 64*128*9 + 1152*320 + 320*10 prunable weights: 20x keeps 23,214 of them
    assert weights(m) == 464_288 and n_params(m) == 465_066


# ---------------------------------------------------------------- structure
@pytest.mark.parametrize("name,size", [("small_cnn", 28), ("vgg16", 32), ("resnet18", 32)])
def test_normalize_is_first_layer(name, size):
    c = 1 if name in CNN28 else 3
    mean, std = MEAN3[:c], STD3[:c]
    model = build_model(name, 10, c, size, mean, std)
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    assert first.mean.tolist() == pytest.approx(mean) and first.std.tolist() == pytest.approx(std)
    # the normalisation really is applied first: same net without it on pre-normalised inputs
    plain = fresh(name, normalized=False)
    assert isinstance(plain.normalize, nn.Identity)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")})
    model.eval(), plain.eval()
    x = torch.rand(1, c, size, size)
    xn = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(model(x), plain(xn))


def test_resnet18_layout():
    m = resnet18()
    assert [n for n, _ in m.named_children()] == ["normalize", "conv1", "bn1", "layer1", "layer2", "layer3",
                                                  "layer4", "linear"]
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.out_channels == 64
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    for i, (width, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
        layer = getattr(m, f"layer{i}")
        assert len(layer) == 2 and all(isinstance(b, BasicBlock) for b in layer)
        first, second = layer
        assert first.conv1.stride == (stride, stride) and first.conv2.out_channels == width
        assert first.has_projection == (i > 1) and not second.has_projection
        if first.has_projection:
            conv, bn = first.shortcut
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and bn.num_features == width
    assert m.linear.in_features == 512
    keys = m.state_dict().keys()
    assert "layer2.0.shortcut.0.weight" in keys and "layer2.0.shortcut.1.running_mean" in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)


def test_basic_block_matches_functional_oracle():
    torch.manual_seed(1)
    block = BasicBlock(4, 8, stride=2).eval()
    for bn in (block.bn1, block.bn2, block.shortcut[1]):  # non-trivial BN statistics
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(3, 4, 9, 9)

    def bn(t, m):
        return (t - m.running_mean.view(1, -1, 1, 1)) / torch.sqrt(m.running_var.view(1, -1, 1, 1) + m.eps) \
            * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)

    h = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    h = bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    sc = bn(F.conv2d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    torch.testing.assert_close(block(x), F.relu(h + sc))
    ident = BasicBlock(4, 4).eval()
    y = torch.randn(2, 4, 5, 5)
    h = F.relu(bn(F.conv2d(y, ident.conv1.weight, padding=1), ident.bn1))
    torch.testing.assert_close(ident(y), F.relu(bn(F.conv2d(h, ident.conv2.weight, padding=1), ident.bn2) + y))


def test_vgg16_layout():
    m = vgg16()
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [c for c in VGG16_CONFIG if c != "M"]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.features) == 5
    assert isinstance(m.classifier, nn.Linear) and m.classifier.in_features == 512


# ---------------------------------------------------------------- sparsify
def expected_norm(conv_name: str) -> str:
    """Name of the BatchNorm that follows a conv, from the documented layouts."""
    head, _, last = conv_name.rpartition(".")
    if conv_name.startswith("features."):  # VGG: Conv2d, BatchNorm2d, ReLU
        return f"features.{int(last) + 1}"
    if last == "0" and head.endswith("shortcut"):
        return f"{head}.1"
    return (head + "." if head else "") + last.replace("conv", "bn")


@pytest.mark.parametrize("name", CNNS)
@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_sparsify_each_model(name, mode):
    c, size = (1, 28) if name in INPUT28 else (3, 32)
    model = fresh(name)
    total = weights(model)
    sparsify(model, density=0.1, mode=mode, generator=torch.Generator().manual_seed(0))
    layers = masked_layers(model)
    n_convs = {"small_cnn": 3, "wide_cnn": 3, "vgg16": 13, "resnet18": 20, "vgg_cnn": 6}[name]
    convs = [(n, l) for n, l in layers if isinstance(l, MaskedConv2d)]
    assert len(convs) == n_convs
    active = sum(int(l.mask.sum()) for _, l in layers)
    if mode == "irregular":
        assert len(layers) == n_convs + (2 if name in CNN28 else 1)
        assert active == round(0.1 * total)
    else:
        dense_last = model.classifier[-1] if name in CNN28 else (model.linear if name == "resnet18"
                                                                       else model.classifier)
        assert type(dense_last) is nn.Linear and all(l is not dense_last for _, l in layers)
        modules = dict(model.named_modules())
        for conv_name, layer in convs:
            if name in CNN28:
                assert isinstance(modules[layer.norm_name], nn.BatchNorm2d)
            else:
                assert layer.norm_name == expected_norm(conv_name)
            bn = modules[layer.norm_name]
            dead = ~layer.channel_mask
            assert bn.num_features == layer.out_channels
            assert bool((bn.weight[dead] == 0).all() and (bn.bias[dead] == 0).all())
            assert bool((layer.weight[dead] == 0).all())
        assert 0.05 < active / sum(l.weight.numel() for _, l in layers) < 0.15
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, c, size, size))
    assert out.shape == (1, 10) and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------- registry errors
def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model name 'resnet50'; expected one of small_cnn, wide_cnn, vgg16, resnet18, vgg_cnn"):
        build_model("resnet50", 10, 3, 32)
    with pytest.raises(ValueError, match="small_cnn: input_size must be 28, got 32"):
        build_model("small_cnn", 10, 1, 32)
    with pytest.raises(ValueError, match="input_size must be a multiple of 32"):
        build_model("vgg16", 10, 3, 28)
    with pytest.raises(ValueError, match="input_size must be >= 8"):
        build_model("resnet18", 10, 3, 4)
    with pytest.raises(ValueError, match="mean/std have 3 values but in_channels=1"):
        build_model("resnet18", 10, 1, 28, MEAN3, STD3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("vgg16", 0, 3, 32)
    with pytest.raises(ValueError, match="both mean and std"):
        build_model("vgg16", 10, 3, 32, MEAN3, None)
    assert MODEL_NAMES == (*CNNS, "lstm", "gru", "lstm_perm", "gru_perm")
    with pytest.raises(ValueError, match="input_size must be a multiple of 4"):
        build_model("vgg_cnn", 10, 1, 30)
