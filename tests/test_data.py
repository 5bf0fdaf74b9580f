"""Tests for dnr.data: IDX reader/writer, Fashion-MNIST/MNIST loaders, embedded subset."""

import gzip
import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dnr.data import (
    FASHION_MNIST_CLASSES,
    default_fashion_mnist_root,
    embedded_root,
    fashion_mnist,
    mnist,
    read_idx,
    write_idx,
)

FULL_ROOT = "/usr/share/datasets/fashion-mnist"
needs_full = pytest.mark.skipif(not os.path.isdir(FULL_ROOT), reason=f"{FULL_ROOT} missing")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_NAMES = [n for pair in FILES.values() for n in pair]

# IDX dtype code -> big-endian struct format letter; written out by hand as the oracle.
CODES = [(0x08, "B", np.uint8), (0x09, "b", np.int8), (0x0B, "h", np.int16),
         (0x0C, "i", np.int32), (0x0D, "f", np.float32), (0x0E, "d", np.float64)]


def idx_bytes(code, fmt, dims, values):
    """Hand-built IDX file content (independent of write_idx)."""
    return (bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
            + struct.pack(f">{len(values)}{fmt}", *values))


def extreme_values(np_dtype, n):
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        base = [info.min, info.max, 0, 1, -1 if info.min < 0 else 2]
    else:
        info = np.finfo(np_dtype)
        base = [info.min, info.max, info.tiny, -0.0, np.inf, -np.inf, 0.5, 1e-3]
    return np.resize(np.array(base, dtype=np_dtype), n)


# ---------------------------------------------------------------- IDX reader / writer
@pytest.mark.parametrize("code,fmt,np_dtype", CODES)
@pytest.mark.parametrize("gz", [False, True])
def test_read_hand_built_file(tmp_path, code, fmt, np_dtype, gz):
    dims = (2, 3, 4)
    values = extreme_values(np_dtype, 24)
    blob = idx_bytes(code, fmt, dims, values.tolist())
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    out = read_idx(path)
    assert out.dtype == np.dtype(np_dtype) and out.dtype.isnative
    assert out.shape == dims
    np.testing.assert_array_equal(out, values.reshape(dims))
    assert out.flags.writeable and out.flags.c_contiguous


@pytest.mark.parametrize("code,fmt,np_dtype", CODES)
def test_write_matches_hand_built_bytes(tmp_path, code, fmt, np_dtype):
    arr = extreme_values(np_dtype, 12).reshape(3, 4)
    write_idx(tmp_path / "a.idx", arr)
    assert (tmp_path / "a.idx").read_bytes() == idx_bytes(code, fmt, (3, 4), arr.ravel().tolist())
    # a big-endian input array is stored identically
    write_idx(tmp_path / "b.idx", arr.astype(arr.dtype.newbyteorder(">")))
    assert (tmp_path / "b.idx").read_bytes() == (tmp_path / "a.idx").read_bytes()


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    name=st.sampled_from(["x.idx", "x.idx.gz"]),
)
def test_roundtrip_any_array(tmp_path_factory, arr, name):
    path = tmp_path_factory.mktemp("rt") / name
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)  # NaNs compare equal here


def test_compression_detected_by_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.int16)
    write_idx(tmp_path / "plain.gz", arr, compress=False)
    write_idx(tmp_path / "packed.idx", arr, compress=True)
    assert (tmp_path / "plain.gz").read_bytes()[:4] == b"\x00\x00\x0b\x01"
    assert (tmp_path / "packed.idx").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), arr)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "packed.idx")), arr)


def test_gzip_output_is_reproducible(tmp_path):
    arr = np.arange(1000, dtype=np.uint8).reshape(10, 100)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b.gz", arr)
    a = (tmp_path / "a.gz").read_bytes()
    assert a == (tmp_path / "b.gz").read_bytes()
    assert a[4:8] == b"\x00\x00\x00\x00"  # gzip header MTIME field is 0


def _write_raw(tmp_path, blob, name="bad.idx"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload_message(tmp_path, gz):
    blob = idx_bytes(0x08, "B", (3, 4), list(range(12)))[:-5]
    p = _write_raw(tmp_path, gzip.compress(blob) if gz else blob)
    with pytest.raises(ValueError) as e:
        read_idx(p)
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg and "12 bytes" in msg and "found 7 bytes" in msg


def test_oversized_payload_message(tmp_path):
    p = _write_raw(tmp_path, idx_bytes(0x0C, "i", (2,), [1, 2]) + b"\x00\x00\x00\x07")
    with pytest.raises(ValueError, match="oversized") as e:
        read_idx(p)
    assert str(p) in str(e.value) and "8 bytes" in str(e.value) and "found 12 bytes" in str(e.value)


@pytest.mark.parametrize("head,expect", [
    (b"\x01\x00\x08\x01", "bad IDX magic number"),       # nonzero leading bytes
    (b"\x00\x00\x0a\x01", "bad IDX magic number"),       # unknown dtype code 0x0A
    (b"\x00\x00\x08\x00", "declares 0 dimensions"),
])
def test_bad_magic_messages(tmp_path, head, expect):
    p = _write_raw(tmp_path, head + b"\x00\x00\x00\x01" + b"\x05")
    with pytest.raises(ValueError, match=expect) as e:
        read_idx(p)
    assert str(p) in str(e.value) and head.hex().upper() in str(e.value)


def test_real_file_name_with_wrong_magic(tmp_path):
    # an idx1 labels file whose magic claims 3 dims: header truncated relative to claim
    p = _write_raw(tmp_path, b"\x00\x00\x08\x03" + struct.pack(">I", 5) + bytes(5),
                   "train-labels-idx1-ubyte")
    with pytest.raises(ValueError, match="3 dimensions need 16 header bytes, found 13"):
        read_idx(p)


@pytest.mark.parametrize("blob", [b"", b"\x00\x00"])
def test_too_short_header(tmp_path, blob):
    p = _write_raw(tmp_path, blob)
    with pytest.raises(ValueError, match=f"at least 4 bytes, found {len(blob)}"):
        read_idx(p)


def test_corrupt_gzip_stream(tmp_path):
    good = gzip.compress(idx_bytes(0x08, "B", (100,), list(range(100))))
    p = _write_raw(tmp_path, good[: len(good) // 2], "x.gz")
    with pytest.raises(ValueError, match="not a valid gzip stream") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_missing_file_and_bad_path_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")
    with pytest.raises(TypeError, match="path"):
        read_idx(3)


@pytest.mark.parametrize("arr,exc,match", [
    (np.zeros(3, np.int64), TypeError, "int64"),
    (np.zeros(3, np.float16), TypeError, "float16"),
    (np.zeros(3, bool), TypeError, "bool"),
    (np.zeros((), np.uint8), ValueError, "0 dimensions"),
])
def test_write_rejects_and_leaves_file_untouched(tmp_path, arr, exc, match):
    p = tmp_path / "keep.idx"
    p.write_bytes(b"original")
    with pytest.raises(exc, match=match):
        write_idx(p, arr)
    assert p.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["keep.idx"]  # no stray temporary file


def test_write_rejects_bad_compress(tmp_path):
    with pytest.raises(TypeError, match="compress"):
        write_idx(tmp_path / "a.idx", np.zeros(2, np.uint8), compress="yes")
    assert not (tmp_path / "a.idx").exists()


# ---------------------------------------------------------------- folder loader
def make_folder(root, n_train=7, n_test=5, gz=True, seed=0):
    """Write a small Fashion-MNIST-format folder; returns the uint8 arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # endpoints of the range present
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / (FILES[split][0] + suffix), images)
        write_idx(root / (FILES[split][1] + suffix), labels)
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_loader_reads_written_folder(tmp_path, gz, split):
    data = make_folder(tmp_path / "fm", gz=gz)
    ds = fashion_mnist(split, root=tmp_path / "fm")
    x, y = ds.tensors
    images, labels = data[split]
    assert x.dtype == torch.float32 and x.shape == (len(images), 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (len(images),)
    # oracle: pixel / 255 computed in float64 then rounded once to float32
    expect = (images.astype(np.float64) / 255.0).astype(np.float32)[:, None]
    np.testing.assert_array_equal(x.numpy(), expect)
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.tolist() == labels.tolist()
    assert len(ds) == len(images)


def test_loader_subset_first_n(tmp_path):
    data = make_folder(tmp_path / "fm", n_train=9)
    x, y = fashion_mnist("train", str(tmp_path / "fm"), subset=4).tensors
    assert x.shape[0] == 4
    np.testing.assert_array_equal((x * 255).round().to(torch.uint8)[:, 0].numpy(), data["train"][0][:4])
    assert y.tolist() == data["train"][1][:4].tolist()
    assert len(fashion_mnist("train", tmp_path / "fm", subset=9)) == 9


@pytest.mark.parametrize("subset", [0, -1, 2.5, True, "3", 10])
def test_loader_bad_subset(tmp_path, subset):
    make_folder(tmp_path / "fm", n_train=9)
    with pytest.raises(ValueError, match="subset"):
        fashion_mnist("train", tmp_path / "fm", subset=subset)


@pytest.mark.parametrize("split", ["val", "Train", None, 0])
def test_loader_bad_split(split):
    with pytest.raises(ValueError, match="split") as e:
        fashion_mnist(split)
    assert repr(split) in str(e.value)


def test_loader_missing_folder_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist("train", tmp_path / "absent")
    msg = str(e.value)
    assert "absent" in msg and all(n in msg for n in ALL_NAMES)


def test_loader_missing_file_shows_layout(tmp_path):
    make_folder(tmp_path / "fm")
    os.remove(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz")
    fashion_mnist("train", tmp_path / "fm")  # the other split still loads
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist("test", tmp_path / "fm")
    assert all(n in str(e.value) for n in ALL_NAMES)


def test_loader_count_mismatch(tmp_path):
    make_folder(tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match="7 images.*6 labels"):
        fashion_mnist("train", tmp_path / "fm")


@pytest.mark.parametrize("which,arr,match", [
    (0, np.zeros((3, 28, 27), np.uint8), "28, 28"),
    (0, np.zeros((3, 28, 28), np.float32), "uint8"),
    (1, np.array([0, 10, 1], np.uint8), "label 10"),
    (1, np.zeros((3, 1), np.uint8), r"labels \[N\]"),
])
def test_loader_rejects_malformed_content(tmp_path, which, arr, match):
    make_folder(tmp_path / "fm", n_train=3)
    write_idx(tmp_path / "fm" / (FILES["train"][which] + ".gz"), arr)
    with pytest.raises(ValueError, match=match):
        fashion_mnist("train", tmp_path / "fm")


def test_loader_bad_root_type():
    with pytest.raises(TypeError, match="root"):
        fashion_mnist("train", root=5)


def test_mnist_requires_root_and_reads_folder(tmp_path):
    with pytest.raises(ValueError, match="root"):
        mnist("train", None)
    data = make_folder(tmp_path / "mn", gz=False)
    x, y = mnist("test", tmp_path / "mn").tensors
    assert x.shape == (5, 1, 28, 28) and y.tolist() == data["test"][1].tolist()


def test_default_root_and_classes():
    expect = FULL_ROOT if os.path.isdir(FULL_ROOT) else None
    assert default_fashion_mnist_root() == expect
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


# ---------------------------------------------------------------- embedded subset
EMBEDDED_COUNTS = {"train": 600, "test": 100}


@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_subset(split):
    x, y = fashion_mnist(split).tensors
    n = 10 * EMBEDDED_COUNTS[split]
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0.0 <= x.min() < 0.01 and 0.99 < x.max() <= 1.0
    assert torch.bincount(y, minlength=10).tolist() == [EMBEDDED_COUNTS[split]] * 10
    # real images, not noise: per-class mean images differ clearly (trouser vs bag)
    assert (x[y == 1].mean(0) - x[y == 8].mean(0)).abs().max() > 0.3


def test_embedded_folder_contents():
    root = embedded_root()
    names = sorted(os.listdir(root))
    assert names == sorted([n + ".gz" for n in ALL_NAMES] + ["LICENSE", "README.md", "indices.json"])
    assert sum(os.path.getsize(os.path.join(root, n)) for n in names) < 5 * 1024 * 1024
    lic = open(os.path.join(root, "LICENSE")).read()
    assert "Copyright: 2017, Zalando SE" in lic and "Permission is hereby granted" in lic
    rec = json.load(open(os.path.join(root, "indices.json")))
    for split, per in EMBEDDED_COUNTS.items():
        idx = rec["indices"][split]
        assert len(idx) == 10 * per and idx == sorted(set(idx))
    assert fashion_mnist("test", subset=10).tensors[0].shape == (10, 1, 28, 28)


# ---------------------------------------------------------------- full dataset
@pytest.fixture(scope="module")
def full_raw():
    return {s: (read_idx(os.path.join(FULL_ROOT, f[0] + ".gz")),
                read_idx(os.path.join(FULL_ROOT, f[1] + ".gz"))) for s, f in FILES.items()}


@needs_full
def test_full_dataset_loads():
    ds = fashion_mnist("test", root=default_fashion_mnist_root())
    x, y = ds.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert len(fashion_mnist("train", root=FULL_ROOT)) == 60000


@needs_full
@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_subset_is_contained_in_full(full_raw, split):
    root = embedded_root()
    rec = json.load(open(os.path.join(root, "indices.json")))
    idx = np.array(rec["indices"][split])
    full_images, full_labels = full_raw[split]
    sub_images = read_idx(os.path.join(root, FILES[split][0] + ".gz"))
    sub_labels = read_idx(os.path.join(root, FILES[split][1] + ".gz"))
    np.testing.assert_array_equal(sub_images, full_images[idx])
    np.testing.assert_array_equal(sub_labels, full_labels[idx])
    # and through the loader
    x_sub = fashion_mnist(split).tensors[0]
    x_full = fashion_mnist(split, FULL_ROOT).tensors[0]
    for i in (0, 1, len(idx) // 2, len(idx) - 1):
        assert torch.equal(x_sub[i], x_full[idx[i]])
    for name in FILES[split]:
        path = os.path.join(FULL_ROOT, name + ".gz")
        assert rec["source_sha256"][name + ".gz"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


@needs_full
def test_subset_script_regenerates_same_subset(tmp_path):
    from dnr.data.make_embedded_subset import main

    assert main(["--source", FULL_ROOT, "--dest", str(tmp_path),
                 "--train-per-class", "600", "--test-per-class", "100"]) == 0
    shipped = json.load(open(os.path.join(embedded_root(), "indices.json")))
    assert json.load(open(tmp_path / "indices.json")) == shipped
    for name in ALL_NAMES:
        a = read_idx(tmp_path / (name + ".gz"))
        np.testing.assert_array_equal(a, read_idx(os.path.join(embedded_root(), name + ".gz")))
