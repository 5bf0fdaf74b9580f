"""Screening run: DNR with a ONE-SHOT dense start (the library has the gradual one, ``--sparsify-until``).

    DENSE_UNTIL=0.5 python docs/ablations/dense_start_oneshot.py train --method dnr ... --out DIR

The first DENSE_UNTIL * T optimizer steps train the dense model (masks all ones; the weights that
``dnr.sparsify`` zeroed re-drawn from nn's default init), then every layer is pruned by magnitude in one step
to its initial (uniform) count, the exact budget K, and DNR's rewiring continues as shipped. The numbers are in
docs/method.md ("Dense-to-sparse start"). Not part of the library: the arguments after the script go to
`dnr`'s command line unchanged.
"""

import math
import os
import sys

import torch
from torch import nn

import dnr.methods.dnr as dnr_method
import dnr.rewiring
import dnr.rewiring.controller as controller
from dnr.baselines.pruning import magnitude_masks
from dnr.cli import main
from dnr.nn import apply_masks, masked_layers

FRACTION = float(os.environ.get("DENSE_UNTIL", "0.5"))


class OneShotDenseStart(controller.DNR):
    def __init__(self, model, optimizer, **kwargs):
        kwargs["sparsify_until"] = 0.0  # this script's one-shot start replaces the library's gradual one
        super().__init__(model, optimizer, **kwargs)
        self.dense_steps = int(round(FRACTION * self.total_steps))
        self.counts = [int(layer.mask.sum()) for _, layer in masked_layers(model)]  # irregular: units = weights
        if self.dense_steps > 0:
            with torch.no_grad():
                for _, layer in masked_layers(model):
                    fresh = torch.empty_like(layer.weight)
                    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
                    layer.weight.copy_(torch.where(layer.mask, layer.weight, fresh))
                    layer.set_mask(torch.ones_like(layer.mask))

    def _after_optimizer_step(self, optimizer, args, kwargs):
        if self.steps >= self.dense_steps:
            return super()._after_optimizer_step(optimizer, args, kwargs)
        self.steps += 1
        if self.steps == self.dense_steps:
            layers = masked_layers(self.model)
            masks = magnitude_masks([layer.weight.detach() for _, layer in layers], self.counts, self.mode)
            for (_, layer), mask in zip(layers, masks):
                layer.set_mask(mask)
            apply_masks(self.model)
            assert self.active_weights() == self.budget, (self.active_weights(), self.budget)
            print(f"dense start: pruned to {self.budget} weights at step {self.steps}", flush=True)


if __name__ == "__main__":
    controller.DNR = dnr.rewiring.DNR = dnr_method.DNR = OneShotDenseStart
    sys.exit(main(sys.argv[1:]))
