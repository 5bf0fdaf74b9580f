"""Sequential (Fashion-)MNIST models (issue 17): the recurrent presets read the images of the existing readers
as sequences (rows, or permuted pixels), PGD on the pixels is PGD on the sequence, FLOPs count every time
step, and the presets train through ``fit`` with the existing attacks (dense-at, and ``circulant`` from
scratch: the baseline of ``admm-circulant``)."""

from __future__ import annotations

import pytest
import torch

from dnr.attacks import pgd
from dnr.harness import fit, resolve_config
from dnr.models import MODEL_NAMES, SequenceClassifier, build_model
from dnr.nn import BlockCirculantGRU, BlockCirculantLSTM, density_report

PRESETS = ["lstm", "gru", "lstm_perm", "gru_perm"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_model_names(name):
    assert name in MODEL_NAMES
    model = build_model(name, 10, 1, 28, (0.5,), (0.25,))
    assert isinstance(model, SequenceClassifier)
    assert isinstance(model.rnn, BlockCirculantLSTM if name.startswith("lstm") else BlockCirculantGRU)
    assert model.rnn.block_size is None  # dense projections until a method converts them
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_rows_reading_is_the_normalised_image_rows():
    model = build_model("lstm", 10, 1, 28, (0.5,), (0.25,))
    x = torch.rand(2, 1, 28, 28)
    seq = model.sequence(x)
    assert seq.shape == (2, 28, 28) and model.steps == 28
    torch.testing.assert_close(seq[:, 5], (x[:, 0, 5] - 0.5) / 0.25)


def test_permuted_reading_is_a_fixed_persistent_permutation():
    a, b = build_model("gru_perm", 10, 1, 28, None, None), build_model("gru_perm", 10, 1, 28, None, None)
    assert torch.equal(a.permutation, b.permutation) and "permutation" in a.state_dict()
    assert torch.equal(a.permutation.sort().values, torch.arange(784))
    assert not torch.equal(a.permutation, torch.arange(784))
    x = torch.rand(2, 1, 28, 28)
    seq = a.sequence(x)
    assert seq.shape == (2, 49, 16) and a.steps == 49
    flat = x.flatten(1)
    torch.testing.assert_close(seq.reshape(2, -1), flat[:, a.permutation])
    one = SequenceClassifier("lstm", "pixels", chunk=1, mean=None, std=None)  # 784 steps of 1
    assert one.steps == 784 and one.sequence(x).shape == (2, 784, 1)
    with pytest.raises(ValueError, match="chunk=15 must divide the 784 pixels"):
        SequenceClassifier("lstm", "pixels", chunk=15)


def test_flops_count_every_time_step():
    """The hidden projection runs once per step: T times its MACs (it was counted once before issue 17)."""
    model = build_model("gru", 10, 1, 28, None, None)
    rep = density_report(model, input_size=(1, 28, 28))
    ih, hh, head = 28 * 384, 128 * 384, 128 * 10
    assert rep.flops_dense == 2 * (28 * ih + 28 * hh + head)


def test_pgd_on_the_input_sequence_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("lstm", 10, 1, 28, None, None).eval()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    adv = pgd(model, x, y, eps=0.1, alpha=0.025, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    delta = model.sequence(adv) - model.sequence(x)  # the same perturbation, read as the sequence
    assert delta.abs().max() <= 0.1 + 1e-6
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)


TINY = dict(train_size=128, test_size=32, batch_size=64, epochs=1, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=3)


@pytest.mark.parametrize("model,method,extra", [("lstm", "dense-at", {}), ("gru_perm", "dense-at", {"beta": 0.5}),
                                                ("gru", "circulant", {"block_size": 8})],
                         ids=["lstm-dense-at", "gru_perm-hybrid", "gru-circulant-from-scratch"])
def test_trains_through_fit_on_the_embedded_subset(tmp_path, model, method, extra):
    cfg = resolve_config(None, {}, dict(TINY, model=model, method=method, **extra))
    assert cfg.dataset == "fashion-mnist" and cfg.data_root == "embedded"
    s = fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    assert s["model"] == model and 0 <= s["pgd"] <= 1 and 0 <= s["clean"] <= 1
    if method == "circulant":
        assert s["compression"] > 7
