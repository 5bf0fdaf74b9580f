"""Per-channel mean/std of the training sets (pixels in [0, 1]), used by the models' ``Normalize`` layer.

CIFAR-10/100 and Tiny-ImageNet: the per-channel statistics over all training pixels as commonly
published (CIFAR-10 std 0.2470/0.2435/0.2616 -- not the often-copied 0.2023/0.1994/0.2010, which are
an average of per-image stds). They only condition the input, so small differences are harmless;
what matters is that training and evaluation use the same values (they are model buffers).
"""

__all__ = [
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "MNIST_MEAN", "MNIST_STD",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "TINY_IMAGENET_MEAN", "TINY_IMAGENET_STD",
]

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)
