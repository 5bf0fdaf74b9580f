"""Tests for the CIFAR-10/100, Tiny-ImageNet and synthetic readers and the build_dataset registry.

The CIFAR and Tiny-ImageNet files are written here in their real on-disk formats (pickled dicts with
the real keys; a folder tree of JPEGs written by Pillow with a val_annotations.txt).
"""

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from dnr.data import (
    DATASET_NAMES,
    build_dataset,
    dataset_info,
    default_augmentation,
    make_synthetic,
    read_cifar,
    read_tiny_imagenet,
    write_idx,
)

FULL_FASHION = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- CIFAR
def cifar_rows(img_hwc: np.ndarray) -> np.ndarray:
    """The documented CIFAR row format: 1024 red, then green, then blue values, each plane row-major."""
    n = img_hwc.shape[0]
    return np.concatenate([img_hwc[..., c].reshape(n, 1024) for c in range(3)], axis=1)


def dump(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root, sizes=(3, 2, 4, 1, 2), n_test=5, protocol=2, meta=True, seed=0):
    """Write cifar-10-batches-py under root; returns {split: (images NCHW uint8, labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for split, names, ns in (("train", train_names, sizes), ("test", ["test_batch"], [n_test])):
        imgs, labs = [], []
        for name, n in zip(names, ns):
            img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            lab = [int(v) for v in rng.integers(0, 10, n)]
            dump(folder / name, {b"batch_label": b"x", b"labels": lab, b"data": cifar_rows(img),
                                 b"filenames": [b"f.png"] * n}, protocol)
            imgs.append(img)
            labs += lab
        out[split] = (np.concatenate(imgs).transpose(0, 3, 1, 2), labs)
    if meta:
        dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                       b"num_cases_per_batch": 10000, b"num_vis": 3072}, protocol)
    return out


def make_cifar100(root, n_train=6, n_test=3, protocol=2):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = [99, 0] + [int(v) for v in rng.integers(0, 100, n - 2)]
        dump(folder / split, {b"filenames": [b"a"] * n, b"batch_label": b"b", b"fine_labels": fine,
                              b"coarse_labels": [f // 5 for f in fine], b"data": cifar_rows(img)}, protocol)
        out[split] = (img.transpose(0, 3, 1, 2), fine)
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}, protocol)
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_reads_real_format(tmp_path, protocol, split):
    data = make_cifar10(tmp_path, protocol=protocol)
    ds = build_dataset("cifar10", split, root=tmp_path)
    images, labels = data[split]
    assert len(ds) == len(labels) and ds.images.shape == (len(labels), 3, 32, 32)
    assert torch.equal(ds.images, torch.from_numpy(images))
    assert ds.labels.tolist() == labels and ds.labels.dtype == torch.int64
    x, y = ds[len(ds) - 1]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal((x * 255).round().numpy().astype(np.uint8), images[-1])
    assert y.dtype == torch.int64 and y.dim() == 0 and int(y) == labels[-1]
    assert ds.classes == tuple(f"c{i}" for i in range(10))


def test_cifar10_root_is_the_folder_itself_and_meta_optional(tmp_path):
    data = make_cifar10(tmp_path, meta=False)
    images, labels, classes = read_cifar("cifar10", "test", tmp_path / "cifar-10-batches-py")
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == data["test"][1]
    assert classes[0] == "airplane" and classes[9] == "truck"


def test_cifar10_subset_spans_files(tmp_path):
    data = make_cifar10(tmp_path)
    images, labels, _ = read_cifar("cifar10", "train", tmp_path, subset=6)  # batches hold 3, 2, 4, ...
    np.testing.assert_array_equal(images, data["train"][0][:6])
    assert labels.tolist() == data["train"][1][:6]
    with pytest.raises(ValueError, match="subset=13 exceeds the 12 examples"):
        read_cifar("cifar10", "train", tmp_path, subset=13)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_reads_fine_labels(tmp_path, split):
    data = make_cifar100(tmp_path, protocol=pickle.HIGHEST_PROTOCOL)
    ds = build_dataset("cifar100", split, root=tmp_path)
    assert torch.equal(ds.images, torch.from_numpy(data[split][0]))
    assert ds.labels.tolist() == data[split][1] and ds.labels[0] == 99
    assert len(ds.classes) == 100 and ds.classes[99] == "f99"


def test_cifar_missing_folder_shows_tree(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("cifar10", "train", root=tmp_path / "absent")
    msg = str(e.value)
    assert "absent" in msg and "is not an existing folder" in msg
    assert all(s in msg for s in ("cifar-10-batches-py/", "data_batch_1", "test_batch", "batches.meta"))
    with pytest.raises(FileNotFoundError, match="holds neither cifar-100-python/ nor test") as e:
        build_dataset("cifar100", "test", root=tmp_path)
    assert "fine_labels" in str(e.value)
    with pytest.raises(ValueError, match="root is required") as e:
        build_dataset("cifar10", "test")
    assert "data_batch_1" in str(e.value)


def test_read_cifar_bad_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="dataset must be 'cifar10' or 'cifar100', got 'cifar20'"):
        read_cifar("cifar20", "train", tmp_path)


def test_cifar_missing_batch_file(tmp_path):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    assert len(build_dataset("cifar10", "test", root=tmp_path)) == 5
    with pytest.raises(FileNotFoundError, match="data_batch_4 not found") as e:
        build_dataset("cifar10", "train", root=tmp_path)
    assert "data_batch_5" in str(e.value)  # the layout


def bad_batches():
    img = np.zeros((2, 3072), np.uint8)
    return [
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]},
         r"uint8 array \[N, 3072\], found uint8 \[2, 3071\]"),
        ({b"data": img.astype(np.float32), b"labels": [0, 1]}, "found float32"),
        ({b"data": img.tolist(), b"labels": [0, 1]}, "found list"),
        ({b"data": img, b"labels": [0]}, "2 integer 'labels'"),
        ({b"data": img, b"labels": [0, 10]}, "label 10; expected values 0..9"),
        ({b"data": img, b"labels": [-1, 0]}, "label -1"),
        ({b"data": img, b"fine_labels": [0, 1]}, "no 'labels' key"),
        ([img], "pickled dict, found list"),
    ]


@pytest.mark.parametrize("obj,match", bad_batches())
def test_cifar_malformed_batch(tmp_path, obj, match):
    make_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", obj, 2)
    with pytest.raises(ValueError, match=match) as e:
        build_dataset("cifar10", "test", root=tmp_path)
    assert "test_batch" in str(e.value)


def test_cifar_not_a_pickle_and_bad_meta(tmp_path):
    make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"\x00not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        build_dataset("cifar10", "test", root=tmp_path)
    dump(folder / "batches.meta", {b"label_names": [b"a", b"b"]}, 2)
    with pytest.raises(ValueError, match="list of 10 class names; found 2"):
        build_dataset("cifar10", "train", root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Evil(), b"labels": []}, 2)
    with pytest.raises(ValueError, match="global .*system is not allowed"):
        build_dataset("cifar10", "test", root=tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_cifar100_wrong_label_key_and_range(tmp_path):
    make_cifar100(tmp_path)
    img = np.zeros((2, 3072), np.uint8)
    dump(tmp_path / "cifar-100-python" / "test", {b"data": img, b"labels": [0, 1]}, 2)
    with pytest.raises(ValueError, match="no 'fine_labels' key"):
        build_dataset("cifar100", "test", root=tmp_path)
    dump(tmp_path / "cifar-100-python" / "test", {b"data": img, b"fine_labels": [0, 100]}, 2)
    with pytest.raises(ValueError, match="label 100; expected values 0..99"):
        build_dataset("cifar100", "test", root=tmp_path)


# ---------------------------------------------------------------- Tiny-ImageNet
try:  # Pillow is an optional dependency (extra "images"): only the Tiny-ImageNet tests need it
    from PIL import Image
except ImportError:
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow is not installed")
WNIDS = ["n02", "n01", "n03"]  # written unsorted; labels follow the sorted order n01, n02, n03


def solid(value, size=64, mode="RGB"):
    return Image.new(mode, (size, size), value)


def make_tiny(root, per_class=(2, 3, 1)):
    """Write a tiny-imagenet-200 tree; returns {split: [(path, label, rgb)]} in the expected order."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    sorted_ids = sorted(WNIDS)
    train = {}
    for wnid, n in zip(sorted_ids, per_class):
        d = folder / "train" / wnid / "images"
        d.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        train[wnid] = []
        for i in range(n):
            rgb = (40 * sorted_ids.index(wnid) + 20, 30 * i + 10, 200)
            path = d / f"{wnid}_{i}.JPEG"
            solid(rgb).save(path, quality=95)
            train[wnid].append((path, sorted_ids.index(wnid), rgb))
    order = [train[w][i] for i in range(max(per_class)) for w in sorted_ids if i < len(train[w])]
    (folder / "val" / "images").mkdir(parents=True)
    val = []
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n03", "n02"]):
        rgb = (10 * i, 250, 60 * i)
        path = folder / "val" / "images" / f"val_{i}.JPEG"
        solid(rgb).save(path, quality=95)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t3\t40\t50")
        val.append((path, sorted_ids.index(wnid), rgb))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)  # unlabelled, never read
    return {"train": order, "test": val}


@needs_pillow
@pytest.mark.parametrize("split", ["train", "test", "val"])
def test_tiny_imagenet_reads_tree(tmp_path, split):
    expect = make_tiny(tmp_path)["train" if split == "train" else "test"]
    ds = build_dataset("tiny-imagenet", split, root=tmp_path, workers=2)
    assert ds.images.shape == (len(expect), 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [label for _, label, _ in expect]
    assert ds.classes == ("n01", "n02", "n03")
    for i, (path, _, rgb) in enumerate(expect):
        with Image.open(path) as im:
            direct = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(ds.images[i].numpy(), direct)
        # and the colour that was written (JPEG is lossy: a few levels)
        assert np.abs(ds.images[i].numpy().astype(int) - np.array(rgb)[:, None, None]).max() <= 3
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64


@needs_pillow
def test_tiny_imagenet_train_order_is_class_balanced_prefix(tmp_path):
    make_tiny(tmp_path)
    images, labels, _ = read_tiny_imagenet("train", tmp_path / "tiny-imagenet-200", subset=4)
    assert labels.tolist() == [0, 1, 2, 0] and images.shape == (4, 3, 64, 64)


@needs_pillow
def test_tiny_imagenet_grayscale_becomes_rgb(tmp_path):
    expect = make_tiny(tmp_path)
    path = expect["test"][1][0]
    solid(77, mode="L").save(path)
    images, _, _ = read_tiny_imagenet("val", tmp_path)
    assert images.shape[1] == 3
    assert np.abs(images[1].astype(int) - 77).max() <= 2 and (images[1][0] == images[1][2]).all()


@needs_pillow
def test_tiny_imagenet_missing_pieces(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("tiny-imagenet", "train", root=tmp_path / "nope")
    assert all(s in str(e.value) for s in ("wnids.txt", "train/<wnid>/images/*.JPEG", "val_annotations.txt"))
    expect = make_tiny(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    os.remove(expect["test"][2][0])
    with pytest.raises(FileNotFoundError, match="val_2.JPEG' is missing"):
        read_tiny_imagenet("test", tmp_path)
    os.rename(folder / "train" / "n02", folder / "train" / "x02")
    with pytest.raises(FileNotFoundError, match="wnid n02 from wnids.txt"):
        read_tiny_imagenet("train", tmp_path)
    os.remove(folder / "val" / "val_annotations.txt")
    with pytest.raises(FileNotFoundError, match="val_annotations.txt' not found"):
        read_tiny_imagenet("test", tmp_path)
    os.remove(folder / "wnids.txt")
    with pytest.raises(FileNotFoundError, match="holds neither tiny-imagenet-200/ nor wnids.txt"):
        read_tiny_imagenet("test", folder)


@needs_pillow
def test_tiny_imagenet_malformed(tmp_path):
    expect = make_tiny(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    ann = folder / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="line 5 .*'val_9.JPEG\\\\tn99"):
        read_tiny_imagenet("test", tmp_path)
    ann.write_text(good)
    solid((1, 2, 3), size=32).save(expect["test"][0][0])
    with pytest.raises(ValueError, match="must be a 64x64 image, found 32x32"):
        read_tiny_imagenet("test", tmp_path)
    expect["test"][0][0].write_bytes(b"garbage")
    with pytest.raises(ValueError, match="val_0.JPEG' is not a readable image"):
        read_tiny_imagenet("test", tmp_path)
    (folder / "wnids.txt").write_text("n01\nn01\n")
    with pytest.raises(ValueError, match="distinct class ids"):
        read_tiny_imagenet("train", tmp_path)


@needs_pillow
def test_tiny_imagenet_without_pillow(tmp_path, monkeypatch):
    make_tiny(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install Pillow"):
        read_tiny_imagenet("test", tmp_path)


@needs_pillow
def test_tiny_imagenet_progress_note(tmp_path, capsys, monkeypatch):
    import dnr.data.tiny_imagenet as ti

    make_tiny(tmp_path)
    monkeypatch.setattr(ti, "_PROGRESS_MIN", 2)
    read_tiny_imagenet("test", tmp_path)
    assert "decoded 4/4 test images" in capsys.readouterr().err
    read_tiny_imagenet("test", tmp_path, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_shaped():
    a = make_synthetic("train", size=50, num_classes=5, in_channels=2, input_size=12, seed=3)
    b = make_synthetic("train", size=50, num_classes=5, in_channels=2, input_size=12, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (50, 2, 12, 12) and a[0].dtype == torch.uint8 and a[1].dtype == torch.int64
    assert torch.bincount(a[1], minlength=5).tolist() == [10] * 5
    shape = dict(size=50, num_classes=5, in_channels=2, input_size=12)
    assert not torch.equal(make_synthetic("test", seed=3, **shape)[0], a[0])
    assert not torch.equal(make_synthetic("train", seed=4, **shape)[0], a[0])
    assert len(make_synthetic("train")[0]) == 1024 and len(make_synthetic("test")[0]) == 256


def test_synthetic_is_learnable():
    """Nearest class mean from train classifies test almost perfectly: classes are separable."""
    xtr, ytr, _ = make_synthetic("train", size=500)
    xte, yte, _ = make_synthetic("test", size=200)
    means = torch.stack([xtr[ytr == c].float().mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(xte.float().flatten(1), means).argmin(1)
    assert (pred == yte).float().mean() > 0.95


@pytest.mark.parametrize("kw,match", [({"size": 0}, "size"), ({"num_classes": 1}, "num_classes"),
                                      ({"noise": -0.1}, "noise"), ({"input_size": 2.0}, "input_size")])
def test_synthetic_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic("train", **kw)


# ---------------------------------------------------------------- registry
def test_dataset_info_published_values():
    assert DATASET_NAMES == ("fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet", "synthetic")
    cifar10 = dataset_info("cifar10")
    assert cifar10[:3] == (10, 3, 32) and cifar10.default_root is None
    np.testing.assert_allclose(cifar10.mean, (0.4914, 0.4822, 0.4465))
    np.testing.assert_allclose(cifar10.std, (0.2470, 0.2435, 0.2616))
    np.testing.assert_allclose(dataset_info("cifar100").mean, (0.5071, 0.4865, 0.4409))
    assert dataset_info("cifar100").num_classes == 100
    tiny = dataset_info("tiny-imagenet")
    assert tiny[:3] == (200, 3, 64)
    np.testing.assert_allclose(tiny.mean, (0.4802, 0.4481, 0.3975))
    assert dataset_info("fashion-mnist")[:5] == (10, 1, 28, (0.2860,), (0.3530,))
    assert dataset_info("mnist")[:5] == (10, 1, 28, (0.1307,), (0.3081,))
    fm_root = dataset_info("fashion-mnist").default_root
    assert fm_root == FULL_FASHION if os.path.isdir(FULL_FASHION) else fm_root.endswith("fashion-mnist")
    assert dataset_info("synthetic", num_classes=4, in_channels=1, input_size=16, size=8)[:3] == (4, 1, 16)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_dataset_info_matches_data(name, tmp_path):
    roots = {"cifar10": make_cifar10, "cifar100": make_cifar100, "tiny-imagenet": make_tiny}
    if name == "tiny-imagenet" and Image is None:
        pytest.skip("Pillow is not installed")
    if name == "mnist":  # an MNIST-format folder (the IDX reader itself is tested in test_data.py)
        for prefix, n in (("train", 4), ("t10k", 3)):
            write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), 9, np.uint8))
            write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
        roots[name] = None
    elif name in roots:
        roots[name](tmp_path)
    root = tmp_path if name in roots else None
    info = dataset_info(name)
    kw = {"size": 3} if name == "synthetic" else {"subset": 3}
    ds = build_dataset(name, "test", root=root, **kw)
    x, y = ds[2]
    assert x.shape == (info.in_channels, info.input_size, info.input_size)
    # the Tiny-ImageNet tree written here has 3 of the 200 classes
    assert len(ds.classes) == (3 if name == "tiny-imagenet" else info.num_classes)
    assert 0 <= int(y) < info.num_classes
    assert len(info.mean) == len(info.std) == info.in_channels


def test_fashion_mnist_default_root():
    ds = build_dataset("fashion-mnist", "test", subset=5, augment=True, generator=torch.Generator().manual_seed(0))
    assert ds.images.shape == (5, 1, 28, 28)
    assert ds.augmentation == default_augmentation("fashion-mnist")
    assert len(build_dataset("fashion-mnist", "test")) == (10000 if os.path.isdir(FULL_FASHION) else 1000)
    with pytest.raises(ValueError, match="mnist: root is required"):
        build_dataset("mnist", "train")


def test_registry_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset name 'cifar'; expected one of fashion-mnist, mnist, "
                                         "cifar10, cifar100, tiny-imagenet, synthetic"):
        build_dataset("cifar", "train")
    with pytest.raises(ValueError, match="unknown dataset name"):
        dataset_info("imagenet")
    with pytest.raises(TypeError, match="unexpected keyword.*size"):
        build_dataset("cifar10", "train", root=tmp_path, size=3)
    with pytest.raises(ValueError, match="only apply with augment=True"):
        build_dataset("synthetic", "train", padding=2)
    with pytest.raises(ValueError, match="split must be"):
        build_dataset("synthetic", "val")
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
        build_dataset("cifar10", "val", root=tmp_path)
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("synthetic", "train", root=tmp_path)


def test_default_augmentations_and_overrides():
    assert default_augmentation("cifar10") == default_augmentation("cifar100") == default_augmentation("tiny-imagenet")
    assert (default_augmentation("cifar10").padding, default_augmentation("cifar10").flip) == (4, True)
    assert (default_augmentation("mnist").padding, default_augmentation("mnist").flip) == (2, False)
    ds = build_dataset("synthetic", "train", augment=True, size=4, input_size=16)
    assert (ds.augmentation.padding, ds.augmentation.flip) == (2, False)
    ds = build_dataset("synthetic", "train", augment=True, padding=0, flip=True, size=4)
    assert (ds.augmentation.padding, ds.augmentation.flip) == (0, True)
    assert build_dataset("synthetic", "train", augment=True, padding=0, size=4).augmentation is None
