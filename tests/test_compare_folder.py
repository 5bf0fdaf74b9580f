"""`dnr compare` into a folder that already records a comparison (compare_spec.json): a superset of its cells
replaces the record, a subset runs under the recorded names and keeps it, anything else (renamed cells, a
partly different grid) fails before anything is written. Also the model prefix of cell names under
``--models``. No training: the folder's record is written by hand from plan_cells."""

import json
import os

import pytest

from dnr.harness import compare
from dnr.harness.compare.runner import CELL_FIELDS, folder_relation
from dnr.harness.config import ConfigError

TRAIN = {"data_root": "embedded", "train_size": 256, "test_size": 64, "epochs": 1, "batch_size": 64,
         "attack_steps": 1, "eval_steps": 2, "eval_every": 0}
EVAL = {"test_size": 64, "pgd_steps": [2], "restarts": 1, "autoattack": False, "sweep_eps": [0.1],
        "sweep_steps": 2, "sweep_examples": 32}
TWO_MODELS = {"preset": "fashion-mnist-quick", "train": TRAIN, "models": ["small_cnn", "wide_cnn"],
              "methods": ["dense-at", "dnr"], "modes": ["channel"], "densities": [0.5], "seeds": [0], "eval": EVAL}
RECORDED = ["small_cnn-dense-at-s0", "small_cnn-dnr-channel-d0.5-s0", "wide_cnn-dense-at-s0",
            "wide_cnn-dnr-channel-d0.5-s0"]


def _record(folder, raw):
    """A compare folder whose compare_spec.json records the cells of ``raw``, as run_compare writes it."""
    cells = compare.plan_cells(raw)
    os.makedirs(folder, exist_ok=True)
    record = {"spec": compare.validate_compare_spec(raw), "command": "by hand",
              "cells": [dict({k: c[k] for k in CELL_FIELDS if k != "run_dir"}, run_dir=os.path.join("runs", c["key"]))
                        for c in cells]}
    path = os.path.join(folder, "compare_spec.json")
    with open(path, "w") as f:
        json.dump(record, f)
    return path


def test_models_flag_keeps_the_model_prefix_of_a_several_model_config():
    narrowed = compare.override_lists(TWO_MODELS, models=["wide_cnn"])
    assert narrowed["model_prefix"] is True and "model_prefix" not in TWO_MODELS
    assert [c["key"] for c in compare.plan_cells(narrowed)] == RECORDED[2:]
    # a config that names one model (or none) keeps its unprefixed names, with and without the flag
    one = dict(TWO_MODELS, models=["small_cnn"])
    assert [c["key"] for c in compare.plan_cells(one)] == ["dense-at-s0", "dnr-channel-d0.5-s0"]
    assert compare.plan_cells(compare.override_lists(one, models=["wide_cnn"]))[0]["key"] == "dense-at-s0"
    # the config's own model_prefix wins over the flag's default
    assert compare.plan_cells(dict(one, model_prefix=True))[0]["key"] == "small_cnn-dense-at-s0"
    assert compare.validate_compare_spec(narrowed)["model_prefix"] is True


@pytest.mark.parametrize("change, words", [
    ({"model_prefix": "yes"}, ["'model_prefix'", "'yes'", "true or false"]),
    ({"model_prefix": True, "models": None}, ["'model_prefix'", "True", "no models key"]),
    ({"model_prefix": False}, ["'model_prefix'", "False", "share names"]),
])
def test_bad_model_prefix_fails_before_training(change, words, tmp_path):
    with pytest.raises(ConfigError) as err:
        compare.run_compare(dict(TWO_MODELS, **change), str(tmp_path / "out"), log=None)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert "\n" not in str(err.value) and not os.path.exists(tmp_path / "out")


def test_relation_of_a_plan_to_the_recorded_cells(tmp_path):
    out = str(tmp_path / "out")
    assert folder_relation(out, compare.plan_cells(TWO_MODELS)) == "new"
    _record(out, TWO_MODELS)
    assert folder_relation(out, compare.plan_cells(TWO_MODELS)) == "grid"
    more_seeds = compare.plan_cells(dict(TWO_MODELS, seeds=[0, 1]))
    assert folder_relation(out, more_seeds) == "grid"
    narrowed = compare.plan_cells(compare.override_lists(TWO_MODELS, models=["wide_cnn"]))
    assert folder_relation(out, narrowed) == "subset"
    assert folder_relation(out, compare.plan_cells(dict(TWO_MODELS, methods=["dnr"]))) == "subset"


@pytest.mark.parametrize("raw, words", [
    # the defect this guards against: one model named without the flag, so the names lose their prefix
    (dict(TWO_MODELS, models=["small_cnn"]), ["records cell 'small_cnn-dense-at-s0'", "names 'dense-at-s0'",
                                               "another name", "another --out"]),
    # some recorded cells dropped and new ones added: neither a subset nor a superset
    (dict(TWO_MODELS, models=["small_cnn"], model_prefix=True, seeds=[1]),
     ["leaves out 4 of its 4 recorded cells", "small_cnn-dense-at-s0", "plans 2 cell(s) it does not record",
      "small_cnn-dense-at-s1"]),
    # a subset of the names with other settings
    (compare.override_lists(dict(TWO_MODELS, eval=dict(EVAL, restarts=2)), models=["wide_cnn"]),
     ["leaves out 2 of its 4", "'wide_cnn-dense-at-s0' with other eval"]),
    (compare.override_lists(dict(TWO_MODELS, train=dict(TRAIN, lr=0.2)), models=["wide_cnn"]),
     ["'wide_cnn-dense-at-s0' with other config"]),
])
def test_a_plan_that_would_lose_the_folders_record_fails_before_anything_is_written(raw, words, tmp_path):
    out = str(tmp_path / "out")
    path = _record(out, TWO_MODELS)
    before = open(path).read()
    with pytest.raises(ConfigError) as err:
        compare.run_compare(raw, out, log=None)
    msg = str(err.value)
    assert msg.startswith("option --out: ") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert open(path).read() == before and os.listdir(out) == ["compare_spec.json"]


def test_an_unreadable_record_is_an_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare_spec.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"option --out: .* compare_spec.json that cannot be read"):
        folder_relation(str(out), compare.plan_cells(TWO_MODELS))
