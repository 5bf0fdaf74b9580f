"""`dnr.harness.fit` with the user's own model and datasets (not the package's registry)."""

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dnr
from dnr.harness import TrainConfig


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x):
        return self.body(x)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (torch.rand(n, 3, 8, 8, generator=g) * 0.5 + y[:, None, None, None] * 0.12).clamp(0, 1)
    return TensorDataset(x, y)


@pytest.mark.parametrize("method", ["dnr", "static"])
def test_fit_trains_a_user_model_on_user_data(tmp_path, method):
    cfg = TrainConfig(method=method, density=0.2, epochs=2, batch_size=32, attack_steps=1, eval_steps=1,
                      eval_size=16, threads=1, plots=False).validate()
    model = UserNet()
    summary = dnr.harness.fit(cfg, str(tmp_path / "run"), model=model, train_data=_data(128, 0),
                            test_data=_data(32, 1), quiet=True, progress=False)
    assert summary["model"] == "UserNet" and summary["test_examples"] == 32
    layers = dnr.masked_layers(model)  # the user's own object was sparsified and trained in place
    assert len(layers) == 2
    prunable = sum(l.weight.numel() for _, l in layers)
    assert sum(int(l.mask.sum()) for _, l in layers) == round(0.2 * prunable)
    with open(os.path.join(tmp_path, "run", "summary.json")) as f:
        assert json.load(f)["flops_dense"] == 2 * (64 * 8 * 27 + 32 * 4)
    assert 0.0 <= summary["pgd"] <= summary["clean"] <= 1.0
