"""VGG16 with BatchNorm for CIFAR-sized inputs (the DNR paper's VGG16).

Layout (attribute names are part of the interface: checkpoints and export rely on them)::

    normalize   Normalize(mean, std) or Identity                      [B, C, S, S] in [0, 1]
    features    nn.Sequential of, per "conv" entry of VGG16_CONFIG:
                    Conv2d(3x3, padding 1, bias=False), BatchNorm2d, ReLU
                and MaxPool2d(2) per "M"                               -> [B, 512, S/32, S/32]
    classifier  nn.Linear(512 * (S/32)**2, num_classes) on the flattened features

For 32x32 (CIFAR) the head is Linear(512, num_classes); for 64x64 (Tiny-ImageNet) the 2x2 map is
flattened into Linear(2048, num_classes) -- no adaptive pooling, so no spatial information is
averaged away. Convs have no bias (each is followed by BatchNorm, whose shift plays that role).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..data.stats import CIFAR10_MEAN, CIFAR10_STD
from ..nn.batchnorm import BatchNorm2d
from ..nn.pooling import MaxPool2d
from ._common import check_positive_int, init_weights, input_normalization

__all__ = ["VGG", "vgg16", "VGG16_CONFIG", "vgg_cnn", "VGG_CNN_CONFIG"]

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
#: ``vgg_cnn``: a VGG-style network for 28x28 inputs (two 3x3 conv-BN-ReLU per stage, two max-pools, so the
#: 7x7 map of the last stage is flattened into the linear head). Widths 16/32/64 per stage, as small_cnn's: at
#: 7.4M multiply-adds per image (3.7x small_cnn) adversarial training on the full Fashion-MNIST set stays
#: CPU-sized (twice these widths is 29M, an estimated ~3 hours per 4-epoch PGD-7 run on one core; docs/cap/README.md)
VGG_CNN_CONFIG = (16, 16, "M", 32, 32, "M", 64, 64)


class VGG(nn.Module):
    """VGG with BatchNorm; see the module docstring for the layout.

    Shapes: input [B, in_channels, input_size, input_size] in [0, 1] -> logits [B, num_classes].

    Args:
        config: channel counts and "M" (2x2 max-pool) entries, e.g. VGG16_CONFIG.
        num_classes, in_channels: output classes and input channels.
        input_size: side of the square input; must be a multiple of 2**(number of "M").
        mean, std: per-channel input normalisation (the model's first layer); None for none.
    """

    def __init__(self, config=VGG16_CONFIG, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        check_positive_int(num_classes, "num_classes", "vgg")
        check_positive_int(in_channels, "in_channels", "vgg")
        check_positive_int(input_size, "input_size", "vgg")
        pools = sum(1 for c in config if c == "M")
        if input_size % (2 ** pools):
            raise ValueError(
                f"vgg: input_size must be a multiple of {2 ** pools} ({pools} 2x2 max-pools), got {input_size}"
            )
        self.normalize = input_normalization(mean, std, in_channels, "vgg")
        layers: list[nn.Module] = []
        cin = in_channels
        for c in config:
            if c == "M":
                layers.append(MaxPool2d(2))  # nn.MaxPool2d, faster on the CPU without autograd
            else:
                layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin = c
        self.features = nn.Sequential(*layers)
        side = input_size // (2 ** pools)
        self.classifier = nn.Linear(cin * side * side, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)).flatten(1))


def vgg16(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, mean=CIFAR10_MEAN,
          std=CIFAR10_STD) -> VGG:
    """VGG16-BN for CIFAR (input_size 32) or Tiny-ImageNet (64); see :class:`VGG`.

    Parameters at (10 classes, 32x32): 14,710,464 conv + 5,120 linear weights (14,715,584 prunable),
    14,724,042 trainable in all (BatchNorm affine and the linear bias).
    """
    return VGG(VGG16_CONFIG, num_classes, in_channels, input_size, mean, std)


def vgg_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, mean=None, std=None) -> VGG:
    """A VGG-style CNN for Fashion-MNIST-sized inputs (input_size a multiple of 4): :class:`VGG` with
    ``VGG_CNN_CONFIG`` (six 3x3 conv-BN-ReLU layers of 16/16/32/32/64/64 channels, two max-pools) and a
    Linear(64 * 7 * 7, num_classes) head at 28x28. 71,568 conv + 31,360 linear weights at 10 classes, 7.4M
    multiply-adds per 28x28 image."""
    return VGG(VGG_CNN_CONFIG, num_classes, in_channels, input_size, mean, std)
