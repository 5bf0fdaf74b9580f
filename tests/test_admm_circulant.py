"""ADMM to block-circulant weights (issue 17): the projection is the exact Euclidean one (against a least-squares
solution), the Z/U/rho updates follow the formulas, and the ``admm-circulant`` method trains a recurrent model
through ``fit``: ADMM state in the checkpoints, the projection and conversion at the phase's end, and a bitwise
resume from a checkpoint in either phase."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

from conftest import assert_same_final_model
import dnr.harness.callbacks as callbacks
import dnr.methods as methods
from dnr.baselines import CirculantADMM, project_block_circulant
from dnr.harness import ConfigError, fit, load_checkpoint, resolve_config
from dnr.harness.run import load_trained_model
from dnr.nn.block_circulant import BlockCirculantLinear, block_circulant_dense, circulant_layers


def _least_squares_projection(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle: the block-circulant matrix nearest to ``weight`` by solving min ||A v - vec(W)|| with A the
    matrix of the linear map vectors -> dense weight (its columns: the dense weights of the unit vectors)."""
    m, n = weight.shape[:2]
    taps = weight.shape[2:]
    shape = (-(-m // k), -(-n // k), k, *taps)
    count = torch.Size(shape).numel()
    basis = torch.eye(count, dtype=torch.float64).reshape(count, *shape)
    A = torch.stack([block_circulant_dense(b, m, n).flatten() for b in basis], dim=1)   # [m*n*taps, count]
    v = torch.linalg.lstsq(A, weight.flatten()[:, None], driver="gelsd").solution
    return (A @ v).reshape(weight.shape)


@pytest.mark.parametrize("shape,k", [((8, 8), 4), ((6, 10), 4), ((7, 5), 3), ((4, 6, 3, 3), 2), ((5, 3, 1, 2), 4),
                                     ((9, 9), 1)])
def test_projection_is_the_exact_least_squares_projection(shape, k):
    w = torch.randn(shape, dtype=torch.float64)
    p = project_block_circulant(w, k)
    torch.testing.assert_close(p, _least_squares_projection(w, k), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(project_block_circulant(p, k), p, rtol=1e-12, atol=1e-12)  # idempotent


def test_admm_updates_follow_the_formulas():
    layer = nn.Linear(12, 8, dtype=torch.float64)
    admm = CirculantADMM([("fc", layer)], block_size=4, rho=0.1, rho_growth=2.0, rho_max=0.3)
    w0 = layer.weight.detach().clone()
    torch.testing.assert_close(admm.Z[0], project_block_circulant(w0, 4))
    assert not admm.U[0].any()
    expected = 0.05 * (w0 - admm.Z[0]).pow(2).sum()
    torch.testing.assert_close(admm.penalty(), expected)
    for rho in (0.1, 0.2, 0.3):
        with torch.no_grad():
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
        w, u = layer.weight.detach().clone(), admm.U[0].clone()
        record = admm.update()
        torch.testing.assert_close(admm.Z[0], project_block_circulant(w + u, 4))
        torch.testing.assert_close(admm.U[0], u + w - admm.Z[0])
        assert record["rho"] == rho
    assert admm.rho == 0.3
    finished = admm.finish()
    assert finished["event"] == "admm_projection" and not admm.active and admm.penalty() == 0
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        CirculantADMM([("fc", layer)], block_size=0)


TINY = dict(method="admm-circulant", model="gru", block_size=8, train_size=128, test_size=32, batch_size=64, epochs=3,
            attack_steps=1, eval_steps=1, eval_size=16, threads=1, plots=False, seed=3, deterministic=True,
            checkpoint_every=1, admm_rho=0.01, admm_rho_max=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (3 epochs x 2 steps; ADMM for 2 epochs, then 1 of fine-tuning), every checkpoint kept."""
    root = tmp_path_factory.mktemp("admmc")
    out, kept = str(root / "run"), root / "kept"
    kept.mkdir()
    save = callbacks.save_checkpoint

    def keep_every_checkpoint(path, state, **kw):
        save(path, state, **kw)
        if state.get("kind") == "train":
            shutil.copy(path, kept / f"step{state['step']}.pt")

    callbacks.save_checkpoint = keep_every_checkpoint
    try:
        summary = fit(resolve_config(None, {}, TINY), out, quiet=True, progress=False)
    finally:
        callbacks.save_checkpoint = save
    return summary, kept


def test_registered_and_checks_its_config(tmp_path):
    cls = methods.get("admm-circulant")
    assert cls.phased and cls.density_axis and not cls.sparse
    with pytest.raises(ConfigError, match="option --epochs: got 1, expected at least 2 for --method admm-circulant"):
        resolve_config(None, {}, dict(TINY, epochs=1))
    with pytest.raises(ConfigError, match="option --compile: got 'default', expected off for --method admm-circulant"):
        resolve_config(None, {}, dict(TINY, compile="default"))
    with pytest.raises(ConfigError, match="option --block-size: got 200"):
        fit(resolve_config(None, {}, dict(TINY, block_size=200)), str(tmp_path / "run"), quiet=True, progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_admm_phase_then_projection_then_vectors(trained):
    summary, kept = trained
    phase1 = load_checkpoint(str(kept / "step2.pt"), kind="train")
    admm = phase1["method"]["admm"]
    assert not phase1["method"]["converted"] and admm["active"] and admm["steps"] == 2
    assert "rnn.layers.0.ih.weight" in phase1["model"]
    # Z of the input projection is block-circulant at k = 8 and U is the accumulated W - Z (non-zero)
    z, u = admm["Z"][0], admm["U"][0]
    torch.testing.assert_close(z, project_block_circulant(z, 8))
    assert u.abs().sum() > 0
    phase2 = load_checkpoint(str(kept / "step5.pt"), kind="train")
    assert phase2["method"]["converted"] and phase2["method"]["admm"] is None
    final = load_checkpoint(summary["model_path"])["model"]
    for name in ("rnn.layers.0.ih", "rnn.layers.0.hh", "classifier"):
        assert name + ".vectors" in final and name + ".weight" not in final
    assert tuple(final["rnn.layers.0.hh.vectors"].shape) == (48, 16, 8)  # [3 * 128 / 8, 128 / 8, 8]
    with open(os.path.join(summary["run_dir"], "admm.jsonl")) as f:
        log = [json.loads(line) for line in f]
    updates = [r for r in log if r["event"] == "admm_update"]
    projection = [r for r in log if r["event"] == "admm_projection"]
    assert len(updates) == 4 and len(projection) == 1 and projection[0]["epoch"] == 2
    assert [r["rho"] for r in updates] == pytest.approx([0.01 * 10 ** (i / 3) for i in range(4)])
    model, cfg, _ = load_trained_model(summary["model_path"])
    assert len(circulant_layers(model)) == 3 and isinstance(model.rnn.layers[0].hh, BlockCirculantLinear)
    # dense 384x28 + 384x128 + 10x128 weights; stored 48*4*8 + 48*16*8 + 2*16*8 (28 inputs and 10 outputs padded)
    assert summary["compression"] == pytest.approx((384 * 28 + 384 * 128 + 10 * 128) / (1536 + 6144 + 256))


@pytest.mark.parametrize("step", [2, 5], ids=["in-admm-phase", "after-projection"])
def test_resume_is_bitwise_identical(trained, tmp_path, step):
    summary, kept = trained
    ref = summary["run_dir"]
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copy(os.path.join(ref, "config.json"), resumed / "config.json")
    shutil.copy(kept / f"step{step}.pt", resumed / "checkpoints" / "last.pt")
    fit(None, None, resume=str(resumed), quiet=True, progress=False)
    assert_same_final_model(ref, str(resumed))


def test_applies_to_the_cnn_conv_and_linear_layers(tmp_path):
    """ADMM to block-circulant on the small CNN (CirCNN's layers): every conv / linear layer ends as vectors."""
    cfg = resolve_config(None, {}, dict(TINY, model="small_cnn", epochs=2, block_size=4, checkpoint_every=None))
    s = fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    state = load_checkpoint(s["model_path"])["model"]
    for name in ("features.0", "features.4", "features.8", "classifier.1", "classifier.3"):
        assert name + ".vectors" in state and name + ".weight" not in state
    assert s["compression"] == pytest.approx(98192 / 24720)
