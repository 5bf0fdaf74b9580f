"""``dnr.harness.fit`` on a BatchNorm-free model and the embedded Fashion-MNIST subset, clean DNR training.

Launched by tests/test_distributed.py as one plain process or under torchrun; without BatchNorm and
without a random attack the training is the same computation for any number of processes (up to the
order of the gradient sums), which is what the test compares.

    python tests/dist_fit_worker.py OUT_DIR
"""

import sys

import torch
from torch import nn

from dnr.harness import TrainConfig, fit


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 7 * 7, 10))


CONFIG = dict(dataset="fashion-mnist", data_root="embedded", method="dnr", beta=1.0, density=0.5, epochs=3,
              batch_size=32, train_size=256, test_size=64, eval_size=64, eval_steps=2, threads=1, lr=0.1, warmup_epochs=0,
              deterministic=True, plots=False, seed=5)

if __name__ == "__main__":
    fit(TrainConfig(**CONFIG).validate(), sys.argv[1], model=model(), quiet=True, progress=False)
