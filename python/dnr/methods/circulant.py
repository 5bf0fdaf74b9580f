"""Block-circulant weights (``circulant``, CirCNN): every conv / linear layer holds one vector per k x k block.

The second compression family next to pruning: the model is converted once by ``dnr.circulant`` (the
block size is ``cfg.block_size``) and then trained with the run's attack, hybrid loss and schedule like any
other method. The structure is fixed and regular, so nothing happens at epoch ends; the stored vectors are the
trained parameters, so checkpoints hold only them (about k times fewer weights).

The vectors' gradient (method option ``gradient``, ``--method-options gradient=sum|mean``): ``sum`` (the
default) is autograd's gradient, as CirCNN and E-RNN train: each vector entry stands for k entries of the
dense-equivalent weight, so SGD moves that weight about k times as far per unit of learning rate as it moves a
dense one. ``mean`` divides by k (:func:`dnr.nn.block_circulant.average_circulant_gradients`, an optimizer step
pre-hook, after gradient clipping), which makes SGD on the vectors projected SGD on the dense-equivalent weight.
Measured (docs/e-rnn/README.md, "The vectors' gradient rule"): ``mean`` wins in longer clean runs of the
recurrent models at their lr 0.5 (dnr explore), ``sum`` in the short adversarial quick jobs of the CNN and GRU,
so the default stays autograd's.
"""

from __future__ import annotations

from torch import nn

from ..nn import density_report
from ..nn.block_circulant import (CIRCULANT_GRADIENTS, average_circulant_gradients, circulant, circulant_layers,
                                  circulant_report)
from .base import CompressionMethod
from .registry import register

__all__ = ["BlockCirculant"]


@register("circulant")
class BlockCirculant(CompressionMethod):
    """Converts every conv / linear layer to a block-circulant one (``--block-size`` k, default round(1 /
    --density); ``--prune-first`` / ``--prune-last`` decide whether the first / last layer is converted too) and
    trains it adversarially."""

    description = "block-circulant weights, FFT products (CirCNN; --block-size k) + AT"
    # its models have no masks: the sparse file format has nothing to store; compact = the vectors themselves
    export_formats = ("compact", "onnx")
    density_axis = True  # dnr compare: one cell per density, at block size round(1 / density)
    options = {"gradient": "sum"}  # the vectors' gradient rule (module docstring): autograd's, or "mean"

    @classmethod
    def check_config(cls, cfg) -> str | None:
        if cfg.eps == 0:
            return "option --eps: got 0, but --method circulant trains adversarially (eps > 0)"
        rule = cfg.method_settings["gradient"]
        if rule not in CIRCULANT_GRADIENTS:
            return (f"option --method-options gradient: got {rule!r}, expected one of "
                    f"{', '.join(CIRCULANT_GRADIENTS)}")
        return None

    def attach(self, model: nn.Module, optimizer, *, total_steps: int, steps_per_epoch: int) -> None:
        super().attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        if self.option("gradient") == "mean":
            # inside optimizer.step(): after the harness's gradient clipping and any data-parallel averaging;
            # layers converted later (admm-circulant's projection) are found at their first step
            def average(optimizer, args, kwargs) -> None:  # a step pre-hook must return None
                average_circulant_gradients(model)
            optimizer.register_step_pre_hook(average)

    def epoch_metrics(self, first_step: int, step: int) -> dict:
        """The metrics row's ``density``: stored over dense-equivalent weights of the block-circulant layers
        (the row's own count covers masked layers only, which these models do not have); nothing before a
        model has block-circulant layers (admm-circulant's dense phase)."""
        layers = circulant_layers(self.model) if self.model is not None else []
        dense = sum(layer.num_dense for _, layer in layers)
        return {"density": sum(layer.num_stored for _, layer in layers) / dense} if dense else {}

    def prepare_model(self, model: nn.Module, *, seed: int) -> nn.Module:
        """Convert ``model`` in place (a model that already has block-circulant layers is kept as it is).

        Raises:
            ValueError: the block size does not fit a layer (the message names the layer and the option).
        """
        cfg = self.cfg
        if circulant_layers(model):
            return model
        try:
            return circulant(model, cfg.resolved_block_size, convert_first=cfg.prune_first,
                             convert_last=True if cfg.prune_last is None else cfg.prune_last)
        except ValueError as err:
            given = "" if cfg.block_size is not None else f" (round(1 / --density {cfg.density}))"
            raise ValueError(f"option --block-size: got {cfg.resolved_block_size}{given}: {err}") from None

    def report(self, model: nn.Module, input_size: tuple[int, ...] | None = None) -> dict:
        """Stored (vector) weights against the dense layers': ``density`` = stored / dense weights of the
        converted layers, ``compression`` its inverse; ``flops_effective`` counts the FFT form (a model, see
        :func:`dnr.nn.block_circulant.fft_flops`) and ``flops_dense`` the dense-equivalent layers."""
        circ = circulant_report(model, input_size)
        rest = density_report(model, input_size=input_size)  # the layers that stayed nn.Conv2d / nn.Linear
        params = sum(p.numel() for p in model.parameters())
        density = circ["stored"] / circ["dense"] if circ["dense"] else 1.0
        flops_dense = flops_effective = None
        if input_size is not None:
            flops_dense = rest.flops_dense + circ["flops_dense"]
            flops_effective = rest.flops_dense + circ["flops_fft"]
        return {
            "density": density, "effective_density": density, "compression": 1.0 / density,
            "params": params, "params_dense": params - circ["stored"] + circ["dense"], "storage_bytes": 4 * params,
            "flops_dense": flops_dense, "flops_effective": flops_effective,
            "layers": [{"name": r["name"], "density": r["stored"] / r["dense"], "active": r["stored"],
                        "prunable": r["dense"], "masked": False, "block_size": r["block_size"]}
                       for r in circ["layers"]],
        }
