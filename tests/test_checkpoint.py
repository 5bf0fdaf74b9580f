"""Checkpoint files: atomic writes, weights_only loads, clear errors, RNG state round trips."""

import os
import random

import numpy as np
import pytest
import torch

import dnr
from dnr.harness import checkpoint as ck
from dnr.harness.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from dnr.models import small_cnn


def _state(model, kind="model"):
    return {"kind": kind, "config": {"model": "small_cnn", "dataset": "fashion-mnist"}, "model": model.state_dict()}


@pytest.fixture
def model():
    m = small_cnn()
    dnr.sparsify(m, density=0.1, generator=torch.Generator().manual_seed(0))
    return m


def test_round_trip_is_exact_and_loads_with_weights_only(tmp_path, model):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, _state(model))
    raw = torch.load(path, weights_only=True)  # independent of load_checkpoint: no pickled objects inside
    assert raw["format"] == ck.FORMAT and raw["kind"] == "model"
    other = small_cnn()
    dnr.sparsify(other, density=0.1, generator=torch.Generator().manual_seed(1))
    load_model_state(other, load_checkpoint(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, model, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, _state(model))
    before = open(path, "rb").read()

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(model))
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "empty", "zeroed-start"])
def test_damaged_files_give_one_clear_error(tmp_path, model, damage):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, _state(model))
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "corrupt":
        data = bytearray(data)
        mid = len(data) // 3
        data[mid:mid + 64] = bytes(64)
        data[:4] = b"XXXX"
        data = bytes(data)
    elif damage == "zeroed-start":  # torch then reads it as a legacy pickle and its unpickler complains
        data = bytes(64) + data[64:]
    else:
        data = b""
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and path in str(info.value)
    assert "weights_only" not in str(info.value)  # torch's advice to load unsafely is never passed on


def test_foreign_and_missing_files(tmp_path):
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a dnr checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path))


def test_wrong_kind_is_refused(tmp_path, model):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, _state(model, kind="model"))
    with pytest.raises(CheckpointError, match="'model' checkpoint, expected a 'train'"):
        load_checkpoint(path, kind="train")


def test_other_architecture_is_refused_by_name(tmp_path, model):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, _state(model))
    wider = small_cnn(widths=(8, 16, 32))
    dnr.sparsify(wider, density=0.1)
    with pytest.raises(CheckpointError, match="'small_cnn' model for 'fashion-mnist' that does not fit") as info:
        load_model_state(wider, load_checkpoint(path))
    assert "\n" not in str(info.value)
    dense = small_cnn()  # same shapes, but no masks: not the same architecture either
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_state(dense, load_checkpoint(path))


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    path = str(tmp_path / "rng.pt")
    save_checkpoint(path, {"kind": "train", "config": {}, "model": {}, "rng": ck.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ck.set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_a_pickle_with_code_is_refused_as_such(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = str(tmp_path / "evil.pt")
    torch.save({"format": ck.FORMAT, "version": ck.VERSION, "kind": "model", "config": {}, "model": Payload()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects that dnr will not unpickle") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "truncated" not in str(info.value)


def test_keep_previous_rotates_and_a_damaged_last_falls_back(tmp_path, model):
    folder = tmp_path / "checkpoints"
    last = str(folder / "last.pt")
    for epoch in (1, 2, 3):
        save_checkpoint(last, {**_state(model, "train"), "epoch": epoch, "batch": 0}, keep_previous=True)
    assert sorted(os.listdir(folder)) == ["last.pt", "previous.pt"]
    assert load_checkpoint(last)["epoch"] == 3 and load_checkpoint(str(folder / "previous.pt"))["epoch"] == 2
    data = open(last, "rb").read()
    open(last, "wb").write(data[: len(data) // 3])
    with pytest.warns(ck.CheckpointFallbackWarning, match=r"last\.pt.* is truncated or corrupt .*; using the previous checkpoint .*previous\.pt"):
        state = load_checkpoint(last)
    assert state["epoch"] == 2 and state["path"] == str(folder / "previous.pt")
    open(str(folder / "previous.pt"), "wb").write(b"")  # both damaged: an error that names previous.pt
    with pytest.raises(CheckpointError, match="previous.pt"):
        load_checkpoint(last)
