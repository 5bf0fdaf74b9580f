"""Tests for dnr.data.augment (random crop / flip) and the per-item augmentation of ImageDataset."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dnr.data import Augmentation, ImageDataset, random_crop, random_hflip


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=6, c=3, h=8, w=10, dtype=torch.uint8, device="cpu"):
    # distinct values everywhere, so a shift or mirror is always visible (uint8 wraps at 256: fine for h*w*c<256)
    x = torch.arange(b * c * h * w).reshape(b, c, h, w) % 251 + 1
    return x.to(dtype=dtype, device=device)


def shifted_versions(img: np.ndarray, p: int):
    """All (dy, dx) crops of the zero-padded image, by numpy (the oracle). img [C, H, W]."""
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (p, p), (p, p)))
    return {(dy, dx): padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_crop_content_is_a_shifted_padded_image(device, dtype):
    x = images(dtype=dtype, device=device)
    out = random_crop(x, 2, gen())
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    for i in range(x.shape[0]):
        candidates = shifted_versions(x[i].cpu().numpy(), 2)
        assert any(np.array_equal(out[i].cpu().numpy(), v) for v in candidates.values())


def test_crop_covers_every_offset_uniformly():
    x = images(b=1, c=1, h=5, w=5).expand(1800, 1, 5, 5).contiguous()
    out = random_crop(x, 1, gen(3))
    versions = shifted_versions(x[0].numpy(), 1)
    counts = {k: 0 for k in versions}
    for o in out.numpy():
        (k,) = [k for k, v in versions.items() if np.array_equal(o, v)]
        counts[k] += 1
    assert all(150 <= n <= 250 for n in counts.values()), counts  # 9 offsets, 200 expected each


def test_crop_single_image_and_zero_padding():
    x = images()[0]
    out = random_crop(x, 3, gen())
    assert out.shape == x.shape
    assert any(np.array_equal(out.numpy(), v) for v in shifted_versions(x.numpy(), 3).values())
    same = random_crop(x, 0, gen())
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def test_flip_is_a_flip(device):
    x = images(b=400, dtype=torch.float32, device=device)
    out = random_hflip(x, gen(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())  # each example is exactly one of the two
    assert 150 < int(flipped.sum()) < 250
    # mirror by hand: column j of the output is column W-1-j of the input
    i = int(flipped.nonzero()[0])
    w = x.shape[-1]
    assert all(torch.equal(out[i, :, :, j], x[i, :, :, w - 1 - j]) for j in range(w))
    assert torch.equal(random_hflip(x, gen(), p=0.0), x)
    assert torch.equal(random_hflip(x, gen(), p=1.0), x.flip(-1))


def test_augmentation_is_crop_then_flip():
    x = images(b=50)
    out = Augmentation(padding=2, flip=True)(x, gen(5))
    n_flipped = 0
    for o, xi in zip(out.numpy(), x.numpy()):
        versions = list(shifted_versions(xi, 2).values())
        plain = any(np.array_equal(o, v) for v in versions)
        mirrored = any(np.array_equal(o, v[..., ::-1]) for v in versions)
        assert plain or mirrored
        n_flipped += mirrored and not plain
    assert 0 < n_flipped < 50


def test_determinism_under_seeded_generator():
    x = images(b=32, dtype=torch.float32)
    aug = Augmentation(padding=4, flip=True)
    assert torch.equal(aug(x, gen(7)), aug(x, gen(7)))
    assert not torch.equal(aug(x, gen(7)), aug(x, gen(8)))
    torch.manual_seed(11)
    a = aug(x)
    torch.manual_seed(11)
    assert torch.equal(a, aug(x))  # no generator: the global RNG


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_padding(bad):
    with pytest.raises(ValueError, match="padding"):
        random_crop(images(), bad)
    with pytest.raises(ValueError, match="padding"):
        Augmentation(padding=bad)


def test_bad_input_rank():
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        random_crop(torch.zeros(4, 4), 1)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        random_hflip(torch.zeros(1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="p must be"):
        random_hflip(images(), p=1.5)


def test_dataset_items_reproducible_and_augmented():
    x = images(b=20, c=3, h=8, w=8)
    y = torch.arange(20) % 4
    ds = ImageDataset(x, y, ["a", "b", "c", "d"], Augmentation(2, True), gen(3))
    first = [ds[i][0] for i in range(20)]
    ds2 = ImageDataset(x, y, ["a", "b", "c", "d"], Augmentation(2, True), gen(3))
    assert all(torch.equal(a, ds2[i][0]) for i, a in enumerate(first))
    for i, item in enumerate(first):
        assert item.dtype == torch.float32 and item.shape == (3, 8, 8)
        u8 = (item * 255).round().to(torch.uint8).numpy()
        versions = list(shifted_versions(x[i].numpy(), 2).values())
        assert any(np.array_equal(u8, v) or np.array_equal(u8, v[..., ::-1]) for v in versions)
    assert not all(torch.equal(a, x[i].float() / 255) for i, a in enumerate(first))
    plain = ImageDataset(x, y, "abcd")
    assert torch.equal(plain[3][0], x[3].float() / 255) and plain[3][1].dtype == torch.int64


def test_dataset_rejects_bad_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), "ab")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), "ab")


def test_dataloader_workers_reproducible_and_distinct():
    same = images(b=1, c=3, h=8, w=8).expand(16, 3, 8, 8).contiguous()  # 16 copies of one image

    def epoch():
        ds = ImageDataset(same, torch.zeros(16, dtype=torch.int64), ["a"], Augmentation(2, True), gen(1))
        loader = DataLoader(ds, batch_size=4, num_workers=2, generator=gen(2))
        return [b for b, _ in loader]

    a, b = epoch(), epoch()
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # reproducible under the loader's seed
    assert not torch.equal(a[0], a[1])  # batches 0 and 1 come from different workers: different draws
    assert any(not torch.equal(x, same[0].float() / 255) for x in a[0])  # augmented at all
