"""Recurrent classifiers that read an image as a sequence (E-RNN's model side, issue 17).

The data stay the image data sets of ``dnr.data`` (the Fashion-MNIST / MNIST readers, the embedded subset),
so attacks, the hybrid loss and every harness feature work unchanged: an L-inf PGD on the [0, 1] pixels IS
an L-inf PGD on the input sequence (the reading below is a fixed permutation of the pixels). The model reads:

    rows    sequential (Fashion-)MNIST: T = S steps of C * S features (28 steps of 28 for 28x28)
    pixels  permuted-pixel variant: the C * S * S pixels in a fixed random order (a persistent buffer,
            ``permutation``, drawn once from seed ``PERMUTATION_SEED``), read ``chunk`` at a time
            (default 16: 49 steps of 16 for 28x28)

Layout::

    normalize   Normalize(mean, std) or Identity        [B, C, S, S] in [0, 1]
    rnn         BlockCirculantLSTM / GRU (dense nn.Linear projections: block_size None; the ``circulant`` and
                ``admm-circulant`` methods convert them), batch_first          -> [B, T, hidden]
    classifier  nn.Linear(hidden, num_classes) on the last step's output
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.stats import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from ..nn.recurrent import BlockCirculantGRU, BlockCirculantLSTM
from ._common import check_positive_int, input_normalization

__all__ = ["SequenceClassifier", "RECURRENT_MODELS", "PERMUTATION_SEED", "recurrent_classifier"]

PERMUTATION_SEED = 17
CELLS = {"lstm": BlockCirculantLSTM, "gru": BlockCirculantGRU}
READINGS = ("rows", "pixels")

#: model name -> (cell, reading): the presets of ``dnr.models.build_model`` / ``dnr train --model``
RECURRENT_MODELS = {"lstm": ("lstm", "rows"), "gru": ("gru", "rows"),
                    "lstm_perm": ("lstm", "pixels"), "gru_perm": ("gru", "pixels")}


class SequenceClassifier(nn.Module):
    """An LSTM / GRU classifier of images read as sequences (see the module docstring).

    Shapes: input [B, in_channels, S, S] in [0, 1] -> logits [B, num_classes].

    Args:
        cell: "lstm" or "gru".
        reading: "rows" or "pixels" (permuted pixels, ``chunk`` per step).
        hidden_size, num_layers: of the recurrent layer.
        block_size: k of the recurrent projections, or None (dense; a compression method converts them).
        chunk: pixels per step of the "pixels" reading (must divide C * S * S).
    """

    def __init__(self, cell: str = "lstm", reading: str = "rows", num_classes: int = 10, in_channels: int = 1,
                 input_size: int = 28, hidden_size: int = 128, num_layers: int = 1, block_size: int | None = None,
                 chunk: int = 16, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"SequenceClassifier: cell must be one of {', '.join(CELLS)}, got {cell!r}")
        if reading not in READINGS:
            raise ValueError(f"SequenceClassifier: reading must be one of {', '.join(READINGS)}, got {reading!r}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size),
                            ("chunk", chunk)):
            check_positive_int(value, name, "SequenceClassifier")
        pixels = in_channels * input_size * input_size
        if reading == "pixels" and pixels % chunk:
            raise ValueError(f"SequenceClassifier: chunk={chunk} must divide the {pixels} pixels of a "
                             f"{in_channels}x{input_size}x{input_size} input")
        self.cell, self.reading, self.chunk = cell, reading, chunk
        self.in_channels, self.input_size = in_channels, input_size
        self.normalize = input_normalization(mean, std, in_channels, "SequenceClassifier")
        features = in_channels * input_size if reading == "rows" else chunk
        if reading == "pixels":
            gen = torch.Generator().manual_seed(PERMUTATION_SEED)
            self.register_buffer("permutation", torch.randperm(pixels, generator=gen))
        self.rnn = CELLS[cell](features, hidden_size, num_layers, block_size=block_size, batch_first=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    @property
    def steps(self) -> int:
        """Time steps T of one example."""
        return self.input_size if self.reading == "rows" else self.in_channels * self.input_size ** 2 // self.chunk

    def sequence(self, x: Tensor) -> Tensor:
        """The normalised image [B, C, S, S] as the sequence the cell reads, [B, T, features]."""
        x = self.normalize(x)
        if self.reading == "rows":
            return x.permute(0, 2, 1, 3).reshape(x.shape[0], self.input_size, -1)  # row t: all channels of row t
        return x.flatten(1)[:, self.permutation].reshape(x.shape[0], -1, self.chunk)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.sequence(x))
        return self.classifier(out[:, -1])


def recurrent_classifier(name: str, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                         mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, **kwargs) -> SequenceClassifier:
    """The preset ``name`` of RECURRENT_MODELS (hidden 128, one layer, dense projections unless ``block_size``)."""
    if name not in RECURRENT_MODELS:
        raise ValueError(f"recurrent_classifier: unknown preset {name!r}; expected one of {', '.join(RECURRENT_MODELS)}")
    cell, reading = RECURRENT_MODELS[name]
    return SequenceClassifier(cell, reading, num_classes, in_channels, input_size, mean=mean, std=std, **kwargs)
