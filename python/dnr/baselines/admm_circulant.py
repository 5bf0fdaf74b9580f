"""ADMM towards block-circulant weights (E-RNN, Wang et al., FPGA 2018; the CirCNN structure).

Training minimises the (adversarial) loss plus ``sum_l rho/2 * ||W_l - Z_l + U_l||^2`` over dense
``nn.Linear`` / ``nn.Conv2d`` weights; every few steps

    Z <- Proj(W + U)        (the nearest block-circulant matrix: the mean along each block's wrapped diagonals)
    U <- U + W - Z
    rho <- min(rho * growth, rho_max)

The set of block-circulant matrices (of a fixed block size, cropped to the layer) is a linear subspace, so
the Euclidean projection is the orthogonal one: each defining-vector entry is the least-squares fit of the
entries it covers, i.e. their mean (``dnr.nn.block_circulant.project_to_vectors``). At the end of the ADMM
phase the layers are replaced by block-circulant ones holding ``Proj(W)`` (``dnr.circulant``), and the defining
vectors are fine-tuned (``dnr.methods.admm_circulant``).
"""

from __future__ import annotations

import torch

from ..nn.block_circulant import block_circulant_dense, check_block_size, project_to_vectors
from .admm import ADMMBase

__all__ = ["CirculantADMM", "project_block_circulant"]


def project_block_circulant(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """The block-circulant matrix (or kernel, circulant over channel blocks at every tap) nearest to ``weight``
    in the Frobenius norm, as a dense tensor of the same shape [m, n, *taps]."""
    vectors = project_to_vectors(weight, block_size)
    return block_circulant_dense(vectors, weight.shape[0], weight.shape[1])


class CirculantADMM(ADMMBase):
    """ADMM towards block-circulant weights of block size ``block_size`` for the given layers.

    Args:
        layers: (qualified name, ``nn.Linear`` / ``nn.Conv2d``) pairs, the layers to make block-circulant.
        optimizer, rho, rho_growth, rho_max, update_every: as :class:`dnr.baselines.admm.ADMMBase`.
        block_size: k (>= 1).
    """

    def __init__(self, layers: list, optimizer: torch.optim.Optimizer | None = None, *, block_size: int,
                 rho: float = 1e-2, rho_growth: float = 1.3, rho_max: float = 1.0, update_every: int | None = None):
        self.block_size = check_block_size(block_size)
        super().__init__(layers, optimizer, rho=rho, rho_growth=rho_growth, rho_max=rho_max,
                         update_every=update_every)

    def project(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [project_block_circulant(t, self.block_size) for t in tensors]

    @torch.no_grad()
    def distance(self) -> float:
        """||W - Proj(W)|| over the layers: how far the weights are from block-circulant."""
        weights = [layer.weight.detach() for _, layer in self.layers]
        return sum(float((w - z).pow(2).sum()) for w, z in zip(weights, self.project(weights))) ** 0.5

    def finish(self) -> dict:
        """Stop the penalty and the updates; returns the record of the hard projection (the caller converts the
        layers: ``distance`` is how much of the weights the projection removes)."""
        return self.stop({"event": "admm_projection", "block_size": self.block_size, "distance": self.distance(),
                          "layers": [name for name, _ in self.layers]})
