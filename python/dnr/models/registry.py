"""``build_model(name, ...)``: one entry point for every model of the package, by name."""

from __future__ import annotations

from torch import nn

from ._common import check_positive_int, input_normalization
from .recurrent import RECURRENT_MODELS, recurrent_classifier
from .resnet import resnet18
from .small_cnn import small_cnn, wide_cnn
from .vgg import vgg16, vgg_cnn

__all__ = ["MODEL_NAMES", "build_model", "default_lr", "default_max_grad_norm"]

MODEL_NAMES = ("small_cnn", "wide_cnn", "vgg16", "resnet18", "vgg_cnn", *RECURRENT_MODELS)  # + lstm, gru, lstm_perm, gru_perm

# What `dnr train` uses for a model when --lr / --max-grad-norm are not given. 0.05 and no clipping suit the
# CNNs (the quick job's setting). A recurrent cell's gates want steps 10x larger: at 0.05 the quick job's LSTM /
# GRU end 25 clean points below the same runs at 0.5. At 0.5 the block-circulant GRU's gradients explode (its
# loss climbs from 2.2 to 14 within 40 steps, the gradient norm to 54) unless each step's gradients are
# clipped to norm 1, which also lifts the block-circulant LSTM and leaves DNR's runs where they were
# (docs/e-rnn/README.md, "The learning rate and gradient clipping").
CNN_LR = 0.05
RECURRENT_LR = 0.5
RECURRENT_MAX_GRAD_NORM = 1.0


def default_lr(name: str) -> float:
    """The peak learning rate `dnr train` uses for the model called ``name`` when none is given.

    Returns RECURRENT_LR for the recurrent presets (lstm, gru, lstm_perm, gru_perm), CNN_LR for every other name,
    including a user's own model (dnr.harness.fit), whose name the registry does not know."""
    return RECURRENT_LR if name in RECURRENT_MODELS else CNN_LR


def default_max_grad_norm(name: str) -> float:
    """The global gradient-norm bound `dnr train` clips each step to for the model ``name`` when none is given:
    RECURRENT_MAX_GRAD_NORM for the recurrent presets, 0 (never clip) for every other name."""
    return RECURRENT_MAX_GRAD_NORM if name in RECURRENT_MODELS else 0.0


def build_model(name: str, num_classes: int, in_channels: int, input_size: int, mean=None, std=None) -> nn.Module:
    """Build the model called ``name`` for inputs [B, in_channels, input_size, input_size] in [0, 1].

    Args:
        name: one of MODEL_NAMES: "small_cnn" and "wide_cnn" (input_size must be 28), "vgg16" (a multiple of 32),
            "resnet18" (>= 8), "vgg_cnn" (a VGG-style CNN for 28x28 inputs; a multiple of 4); the recurrent
            classifiers (dnr.models.recurrent, any size) "lstm" / "gru" (rows as steps: sequential Fashion-MNIST /
            MNIST) and "lstm_perm" / "gru_perm" (permuted pixels, 16 per step).
        num_classes: logits per example.
        in_channels: input channels.
        input_size: side of the square input.
        mean, std: per-channel statistics for the model's first layer ``Normalize``; both None for no
            normalisation (typically ``dnr.data.dataset_info(name).mean`` / ``.std``).

    Returns:
        A freshly initialised model (train mode, CPU, float32) mapping [B, C, S, S] to [B, num_classes].

    Raises:
        ValueError: unknown name (lists MODEL_NAMES), bad sizes, or mean/std not matching in_channels.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"build_model: unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    check_positive_int(input_size, "input_size", name)
    if name in RECURRENT_MODELS:
        return recurrent_classifier(name, num_classes, in_channels, input_size, mean=mean, std=std)
    if name in ("small_cnn", "wide_cnn"):
        if input_size != 28:
            raise ValueError(f"{name}: input_size must be 28, got {input_size}")
        input_normalization(mean, std, in_channels, name)  # same checks as the other models
        builder = small_cnn if name == "small_cnn" else wide_cnn
        return builder(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    builder = {"vgg16": vgg16, "resnet18": resnet18, "vgg_cnn": vgg_cnn}[name]
    return builder(num_classes=num_classes, in_channels=in_channels, input_size=input_size, mean=mean, std=std)
