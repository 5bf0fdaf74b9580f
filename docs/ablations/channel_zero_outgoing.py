"""Screening run: channel-mode DNR whose regrown channels enter with their OUTGOING weights zeroed.

    python docs/ablations/channel_zero_outgoing.py train --mode channel --density 0.25 --threads 1 --seed S --out DIR

As shipped, a regrown channel restarts its filter from the layer's default init and its norm layer at scale 1,
shift 0, while the weights that read it in the consuming layers (the next conv's input slice, or the block of a
flattened linear input) are whatever they were while the channel was dead. This variant also zeroes those
input slices and their momentum, so that a rewiring leaves the network's function unchanged (the channel-mode
analogue of irregular mode's zero-initialised regrown weights); the channel then enters as the consumers learn
to read it. The numbers are in docs/method.md ("Channel mode, three seeds"). Not part of the library: the
arguments after the script go to `dnr`'s command line unchanged.
"""

import sys

import torch

import dnr.methods.dnr as dnr_method
import dnr.rewiring.controller as controller
from dnr.cli import main
from dnr.nn import masked_layers
from dnr.rewiring.channel_signal import find_channel_consumers


class ZeroOutgoingRegrowth(controller.DNR):
    def __init__(self, model, optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        layers = masked_layers(model)
        self.layer_names = {id(layer): name for name, layer in layers}
        self.consumers = find_channel_consumers(model, {name: getattr(layer, "norm_name", None)
                                                        for name, layer in layers})
        self.modules_by_name = dict(model.named_modules())

    def _reinit_regrown_channels(self, layer, grown):
        super()._reinit_regrown_channels(layer, grown)
        channels = grown.nonzero().flatten().tolist()
        for consumer in self.consumers.get(self.layer_names[id(layer)], []) if channels else []:
            weight = self.modules_by_name[consumer.name].weight  # [out, in] or [out, in, kh, kw]
            columns = [j for c in channels for j in range(c * consumer.block, (c + 1) * consumer.block)]
            with torch.no_grad():
                weight[:, columns] = 0
                momentum = self.optimizer.state.get(weight, {}).get("momentum_buffer")
                if momentum is not None:
                    momentum[:, columns] = 0


dnr_method.DNR = ZeroOutgoingRegrowth  # the method builds its controller through this module attribute
sys.exit(main(sys.argv[1:]))
