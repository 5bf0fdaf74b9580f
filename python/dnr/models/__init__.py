"""Models of the field. Every model takes an optional input normalisation as its first layer, so
attacks operate on [0, 1] pixels."""

from .small_cnn import SmallCNN, small_cnn

__all__ = ["SmallCNN", "small_cnn"]
