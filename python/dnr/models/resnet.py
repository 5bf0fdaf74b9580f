"""CIFAR ResNet-18 (He et al. 2016, the CIFAR variant used by the DNR paper).

Layout (attribute names are part of the interface: checkpoints and export rely on them; they follow
the widely used kuangliu/pytorch-cifar layout, so its state_dicts load after adding the
``normalize.*`` buffers)::

    normalize      Normalize(mean, std) or Identity                     [B, C, S, S] in [0, 1]
    conv1, bn1     3x3 conv (stride 1, no max-pool) + BN + ReLU          -> [B, 64, S, S]
    layer1..layer4 nn.Sequential of 2 BasicBlocks each, widths 64/128/256/512, strides 1/2/2/2
                                                                         -> [B, 512, S/8, S/8]
    (adaptive average pool to 1x1, flatten)                             -> [B, 512]
    linear         nn.Linear(512, num_classes)

BasicBlock: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``shortcut`` is an empty
``nn.Sequential`` (identity) or ``nn.Sequential(Conv2d 1x1 stride s, bias=False; BatchNorm2d)``
(``shortcut[0]``, ``shortcut[1]``) when the stride or width changes. Convs have no bias.
The adaptive pool makes any input size >= 8 work: 28x28 -> 4x4 map, 32x32 -> 4x4, 64x64
(Tiny-ImageNet) -> 8x8, each averaged to 1x1, so the head is Linear(512, num_classes) for all.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from ..data.stats import CIFAR10_MEAN, CIFAR10_STD
from ..nn.batchnorm import BatchNorm2d
from ._common import check_positive_int, init_weights, input_normalization

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN stages plus a shortcut. Input [B, in_planes, H, W] -> [B, planes, H/stride, W/stride].

    Attributes: conv1, bn1, conv2, bn2, shortcut (see the module docstring), and the ints
    in_planes, planes, stride.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          BatchNorm2d(planes))

    @property
    def has_projection(self) -> bool:
        """True when the shortcut is a 1x1 conv + BN (else identity)."""
        return len(self.shortcut) > 0

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet; see the module docstring for the layout.

    Shapes: input [B, in_channels, S, S] in [0, 1] (S >= 8) -> logits [B, num_classes].

    Args:
        num_blocks: BasicBlocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        num_classes, in_channels: output classes and input channels.
        mean, std: per-channel input normalisation (the model's first layer); None for none.
        widths: channels of the four stages (the stem has widths[0]).
    """

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        check_positive_int(num_classes, "num_classes", "resnet")
        check_positive_int(in_channels, "in_channels", "resnet")
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError(f"resnet: num_blocks and widths must have 4 entries, got {tuple(num_blocks)}, "
                             f"{tuple(widths)}")
        self.normalize = input_normalization(mean, std, in_channels, "resnet")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (planes, n, stride) in enumerate(zip(widths, num_blocks, (1, 2, 2, 2)), start=1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, mean=CIFAR10_MEAN,
             std=CIFAR10_STD) -> ResNet:
    """CIFAR ResNet-18 (BasicBlock x [2, 2, 2, 2]); see :class:`ResNet`.

    ``input_size`` (>= 8) is only checked: the adaptive pool makes the network size-agnostic.
    Parameters at 10 classes: 11,173,962 trainable (11,159,232 conv + 5,120 linear = 11,164,352 prunable weights).
    """
    check_positive_int(input_size, "input_size", "resnet18")
    if input_size < 8:
        raise ValueError(f"resnet18: input_size must be >= 8 (three stride-2 stages), got {input_size}")
    return ResNet((2, 2, 2, 2), num_classes, in_channels, mean, std)
