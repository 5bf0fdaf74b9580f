"""dnr: Dynamic Network Rewiring -- sparse and adversarially robust networks in one training run.

Typical use::

    model = dnr.sparsify(model, density=0.05)               # masked layers, exact global budget
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rewiring = dnr.DNR(model, optimizer, total_steps=epochs * len(loader))
    ...  # x_adv = dnr.attacks.pgd(model, x, y, eps, alpha, steps)
         # loss = dnr.hybrid_loss(model(x), model(x_adv), y, beta=0.5); optimizer.step()
    rewiring.end_epoch(last=(epoch == epochs - 1))
"""

__version__ = "0.1.0"

from . import attacks, data, engine, evaluation, methods, models, ops
from . import analysis, curriculum  # SAT curriculum (issue 15)
from .losses import HybridLoss, hybrid_loss
from .nn import (MaskedConv2d, MaskedLinear, Normalize, apply_masks, density_report, masked_layers,
                 sparsify)
from .nn import BlockCirculantConv2d, BlockCirculantLinear, circulant  # block-circulant layers (CirCNN)
from .rewiring import DNR
from . import compress  # CaP: dnr.compress.cascaded_projection (after .nn, which it builds on)

__all__ = ["__version__", "attacks", "data", "engine", "evaluation", "methods", "ops", "hybrid_loss", "HybridLoss", "MaskedConv2d",
           "MaskedLinear", "Normalize", "sparsify", "density_report", "apply_masks", "masked_layers", "DNR",
           "analysis", "curriculum", "compress", "BlockCirculantLinear", "BlockCirculantConv2d", "circulant"]
