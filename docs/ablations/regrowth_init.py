"""Screening run: irregular-mode DNR whose regrown weights enter with random values instead of zero.

    REGROW_INIT_SCALE=S python docs/ablations/regrowth_init.py train --threads 1 --seed SEED --out DIR

As shipped (the paper, RigL), a weight that DNR regrows enters at zero: it was zeroed when it was pruned, so a
rewiring changes the network's function only through the weights it prunes (the smallest active ones). This
variant gives every regrown weight a value drawn from U(+-S / sqrt(fan_in)) right after each rewiring: S = 1 is
the layer's default init (nn.Conv2d / nn.Linear, SET's choice), S = 0.1 "small values". The draws come from
their own generator (seeded per rewiring step), so the training's random stream is the shipped run's; S = 0 is
the shipped run.

With REGROW_BN_LOG=FILE it also measures what each rewiring does to the BatchNorm layers' input statistics: on a
fixed probe batch (the first 256 test images, eval mode, no state changed) the per-channel mean of every norm
layer's input just before and just after the rewiring, in units of the layer's running std: "shift" (after -
before) and the distance of each from the running mean that evaluation uses ("mismatch_before" /
"mismatch_after"), averaged over channels; one JSON line per rewiring. The numbers are in docs/method.md ("What
each choice is worth"). Not part of the library: the arguments after the script go to `dnr`'s command line
unchanged.
"""

import json
import math
import os
import sys

import torch
from torch import nn

import dnr
import dnr.methods.dnr as dnr_method
import dnr.rewiring.controller as controller
from dnr.cli import main
from dnr.nn import masked_layers

SCALE = float(os.environ.get("REGROW_INIT_SCALE", "1.0"))
BN_LOG = os.environ.get("REGROW_BN_LOG")


def norm_input_means(model, x):
    """name -> per-channel mean [C] of every norm layer's input on x (eval mode, no grad, nothing updated)."""
    means, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: means.__setitem__(name, inp[0].transpose(0, 1).flatten(1).mean(1))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return means


class RandomRegrowthInit(controller.DNR):
    probe = None

    def rewire(self):
        if BN_LOG and self.probe is None:
            device = next(self.model.parameters()).device
            self.probe = dnr.data.fashion_mnist("test").tensors[0][:256].to(device)
        means_before = norm_input_means(self.model, self.probe) if BN_LOG else None
        before = {name: layer.mask.clone() for name, layer in masked_layers(self.model)}
        record = super().rewire()
        draws = torch.Generator().manual_seed(12345 + self.steps)
        with torch.no_grad():
            for name, layer in masked_layers(self.model):
                grown = layer.mask & ~before[name]
                if grown.any():
                    bound = SCALE / math.sqrt(layer.weight[0].numel())
                    fresh = (torch.rand(layer.weight.shape, generator=draws) * 2 - 1) * bound
                    layer.weight[grown] = fresh.to(layer.weight)[grown]
        if BN_LOG:
            means_after = norm_input_means(self.model, self.probe)
            modules = dict(self.model.named_modules())
            layers = {}
            for name, after in means_after.items():
                norm = modules[name]
                std = (norm.running_var + norm.eps).sqrt()
                layers[name] = {
                    "shift": float(((after - means_before[name]).abs() / std).mean()),
                    "mismatch_before": float(((means_before[name] - norm.running_mean).abs() / std).mean()),
                    "mismatch_after": float(((after - norm.running_mean).abs() / std).mean())}
            with open(BN_LOG, "a") as f:
                f.write(json.dumps({"step": self.steps, "scale": SCALE, "prune_rate": record["prune_rate"],
                                    "layers": layers}) + "\n")
        return record


dnr_method.DNR = RandomRegrowthInit  # the method builds its controller through this module attribute
sys.exit(main(sys.argv[1:]))
