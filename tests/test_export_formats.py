"""dnr-sparse storage, ONNX export, model cards and the ``dnr export`` command."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

import dnr
from dnr.nn import masked_layers, sparsify

pytest.importorskip("safetensors")
from dnr.export import (SparseFormatError, export_model, file_payload_bytes, load_sparse, read_sparse,  # noqa: E402
                        save_dense, save_sparse)


def _model(mode, density=0.1, widths=(16, 32, 64), seed=0):
    model = dnr.models.small_cnn(widths=widths, hidden=64)
    return sparsify(model, density, mode=mode, generator=torch.Generator().manual_seed(seed)).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


# ---------------------------------------------------------------------------------------- sparse storage
@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_sparse_round_trip_is_bit_exact(tmp_path, mode):
    model = _model(mode)
    with torch.no_grad():  # a regrown weight is active at value 0: its mask bit must survive
        layer = masked_layers(model)[1][1]
        layer.weight[layer.mask.nonzero()[0].tolist()] = 0.0
    path = tmp_path / "m.safetensors"
    save_sparse(model, path)
    other = _model(mode, seed=5)  # same architecture, other masks and weights
    load_sparse(path, other)
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        mask_key = k[: -len("weight")] + "mask"
        if k.endswith("weight") and mask_key in a:  # active values bit for bit; pruned ones read back as +0.0
            assert torch.equal(_bits(a[k])[a[mask_key]], _bits(b[k])[a[mask_key]]), k
            assert bool((_bits(b[k])[~a[mask_key]] == 0).all()), k
        else:
            assert torch.equal(_bits(a[k]), _bits(b[k])), k
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("mode,encoding", [("irregular", "bitmask"), ("channel", "rows")])
def test_file_size_is_the_predicted_one(tmp_path, mode, encoding):
    model = _model(mode, widths=(32, 64, 128))  # large enough that the JSON header is a small part
    sparse, dense = tmp_path / "s.safetensors", tmp_path / "d.safetensors"
    layout = save_sparse(model, sparse)
    dense_bytes = save_dense(model, dense)
    # independent prediction from the masks: 4 bytes per active weight + the mask encoding; the rest dense
    expected = 0
    state = model.state_dict()
    masked = {f"{n}.weight": m for n, m in masked_layers(model)}
    for k, v in state.items():
        if k.endswith(".mask"):
            continue
        if k in masked:
            mask = masked[k].mask
            enc = math.ceil(mask.numel() / 8) if encoding == "bitmask" else math.ceil(mask.shape[0] / 8)
            expected += 4 * int(mask.sum()) + enc
        else:
            expected += v.numel() * v.element_size()
    assert {t.encoding for t in layout.tensors if t.encoding != "dense"} == {encoding}
    assert file_payload_bytes(sparse) == layout.payload_bytes == expected
    assert file_payload_bytes(dense) == layout.dense_payload_bytes
    # the files (headers included) are smaller by the predicted factor, to within the header overhead
    ratio = dense_bytes / os.path.getsize(sparse)
    assert ratio > 3
    assert ratio == pytest.approx(layout.ratio, rel=0.05)


def test_index_encoding_at_very_low_density(tmp_path):
    model = dnr.models.small_cnn(widths=(16, 32, 64), hidden=64)
    sparsify(model, 0.01, mode="irregular", generator=torch.Generator().manual_seed(0))
    path = tmp_path / "s.safetensors"
    layout = save_sparse(model, path)
    assert "index" in {t.encoding for t in layout.tensors}
    state, _ = read_sparse(path)
    own = model.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in own)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_values(tmp_path, dtype):
    model = _model("irregular")
    full, half = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    save_sparse(model, full)
    layout = save_sparse(model, half, dtype=dtype)
    assert layout.value_dtype == dtype
    assert file_payload_bytes(half) == layout.payload_bytes < file_payload_bytes(full)
    state, _ = read_sparse(half)
    own = model.state_dict()
    for k in own:
        if k.endswith("mask") or not own[k].is_floating_point():
            assert torch.equal(state[k], own[k]), k
        else:
            assert state[k].dtype == own[k].dtype
            torch.testing.assert_close(state[k], own[k], rtol=1e-2, atol=1e-3)


def test_wrong_architecture_is_refused_and_model_untouched(tmp_path):
    path = tmp_path / "s.safetensors"
    save_sparse(_model("irregular"), path)
    narrow = _model("irregular", widths=(8, 32, 64))
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(SparseFormatError, match=r"features\.0\.weight.*shape"):
        load_sparse(path, narrow)
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())
    with pytest.raises(SparseFormatError, match="masked layers differ"):
        load_sparse(path, dnr.models.small_cnn(widths=(16, 32, 64), hidden=64))


def test_corrupted_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "s.safetensors"
    save_sparse(_model("channel"), path)
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-10] ^= 0xFF  # one byte of tensor payload
    flipped.write_bytes(bytes(data))
    with pytest.raises(SparseFormatError, match="corrupt"):
        read_sparse(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SparseFormatError, match="corrupt or truncated"):
        read_sparse(truncated)
    dense = tmp_path / "dense.safetensors"
    save_dense(_model("channel"), dense)
    with pytest.raises(SparseFormatError, match="not a dnr-sparse file"):
        read_sparse(dense)


# ---------------------------------------------------------------------------------------- ONNX
class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.b1(self.c1(h)) + h)
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("which", ["masked", "compact"])
def test_onnxruntime_matches_pytorch(tmp_path, which):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dnr.export import check_onnx, compact_model, export_onnx, run_onnx
    model = sparsify(_Res(), 0.4, mode="channel", generator=torch.Generator().manual_seed(2)).eval()
    net = compact_model(model, (3, 4, 4)) if which == "compact" else model
    path = export_onnx(net, tmp_path / "m.onnx", (3, 4, 4))
    x = torch.randn(3, 3, 4, 4)  # another batch size than the export's example: dynamic batch
    assert check_onnx(net, path, x) < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(path, x), model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- export + card + CLI
@pytest.mark.parametrize("fmt", [pytest.param("compact", marks=pytest.mark.slow), "sparse"])  # torch.export: slow
def test_export_model_writes_file_and_card(tmp_path, fmt):
    model = _model("channel", density=0.3, widths=(8, 16, 16))
    out = tmp_path / ("m.pt2" if fmt == "compact" else "m.safetensors")
    card = export_model(model, out, fmt, (1, 28, 28), architecture="small_cnn", summary={"clean": 0.8, "pgd": 0.4})
    on_disk = json.loads((tmp_path / (out.name + ".card.json")).read_text())
    assert on_disk["export"]["file_bytes"] == os.path.getsize(out) == card["export"]["file_bytes"]
    assert on_disk["accuracy"] == {"clean": 0.8, "pgd": 0.4}
    assert on_disk["architecture"]["name"] == "small_cnn"
    assert 0 < on_disk["density"]["effective"] <= on_disk["density"]["masked"] <= 0.31
    assert on_disk["flops"]["effective"] < on_disk["flops"]["dense"]
    if fmt == "sparse":
        assert on_disk["export"]["dense_file_bytes"] > 2 * on_disk["export"]["file_bytes"]
    if fmt == "compact":
        from dnr.export import load_compact
        loaded = load_compact(out)
        x = torch.rand(5, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
        assert on_disk["parameters"]["exported"] == sum(p.numel() for p in loaded.parameters())


def _checkpoint(tmp_path, mode):
    from dnr.harness.checkpoint import save_checkpoint
    from dnr.harness.config import TrainConfig
    from dnr.harness.builders import build_model_for
    cfg = TrainConfig(mode=mode, density=0.3).validate()
    model = build_model_for(cfg)
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, {"kind": "model", "config": cfg.to_dict(), "model": model.state_dict(),
                           "summary": {"clean": 0.75, "pgd": 0.35, "fgsm": 0.5, "eps": 0.1}})
    return path, model


@pytest.mark.parametrize("fmt", [pytest.param("compact", marks=pytest.mark.slow), "sparse"])
def test_cli_export(tmp_path, capsys, fmt):
    cli = pytest.importorskip("dnr.cli")
    path, model = _checkpoint(tmp_path, "channel")
    out = tmp_path / "out" / ("m.pt2" if fmt == "compact" else "m.safetensors")
    assert cli.main(["export", path, "--format", fmt, "--out", str(out)]) == 0
    card = json.loads((tmp_path / "out" / (out.name + ".card.json")).read_text())
    assert card["accuracy"]["clean"] == 0.75 and card["accuracy"]["pgd"] == 0.35
    assert card["architecture"]["name"] == "small_cnn"
    assert json.loads(capsys.readouterr().out)["file_bytes"] == os.path.getsize(out)
    if fmt == "sparse":
        assert cli.main(["export", path, "--format", "sparse"]) == 0  # default: beside the checkpoint
        assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.safetensors.card.json").is_file()


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    cli = pytest.importorskip("dnr.cli")
    path, _ = _checkpoint(tmp_path, "irregular")
    assert cli.main(["export", path, "--format", "compact", "--out", str(tmp_path / "x.pt2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dnr: error: export:") and "irregular" in err and "features.0" in err
    assert not (tmp_path / "x.pt2").exists()
