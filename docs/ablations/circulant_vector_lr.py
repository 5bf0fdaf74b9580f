"""Screening run: the block-circulant vectors' SGD step scaled by s, everything else as `dnr train`.

    python docs/ablations/circulant_vector_lr.py MODE train --method circulant --block-size K --threads 1 --out DIR

MODE is "1" (dnr as shipped), "sqrt" (s = 1/sqrt(k)) or "k" (s = 1/k): the vectors get their own parameter group
with lr * s and weight decay / s, so the per-step decay of the dense-equivalent matrix is unchanged. Why: each
vector entry stands for k entries of its block, so its gradient is the sum of their k gradients, and plain SGD on
the vectors moves the dense-equivalent matrix by lr * k * P(g) (P: the projection onto block-circulant matrices);
s = 1/k makes the step exactly projected dense SGD (momentum and Nesterov are linear, so they agree too). The
numbers are in docs/circulant/README.md ("What was tried"). Not part of the library: the rest of the arguments
go to `dnr`'s command line unchanged.
"""

import math
import sys

from dnr.cli import main
from dnr.methods.circulant import BlockCirculant
from dnr.nn import circulant_layers

SCALES = {"1": lambda k: 1.0, "sqrt": lambda k: 1 / math.sqrt(k), "k": lambda k: 1 / k}


def with_vector_lr(mode: str):
    shipped = BlockCirculant.attach

    def attach(self, model, optimizer, **kwargs):
        s = SCALES[mode](self.cfg.resolved_block_size)
        if s != 1.0:
            vectors = [layer.vectors for _, layer in circulant_layers(model)]
            ids = {id(v) for v in vectors}
            group = optimizer.param_groups[0]
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": vectors, "lr": group["lr"] * s,
                                       "weight_decay": group["weight_decay"] / s})
        return shipped(self, model, optimizer, **kwargs)

    BlockCirculant.attach = attach


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SCALES:
        sys.exit(f"usage: {sys.argv[0]} {{1,sqrt,k}} train --method circulant ... (got {sys.argv[1:2]})")
    with_vector_lr(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
