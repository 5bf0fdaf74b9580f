"""dnr.data.BatchLoader against a DataLoader over the same ImageDataset (exact without augmentation) and
against the augmentation applied by hand to the gathered batch (with it)."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from dnr.data import Augmentation, BatchLoader, ImageDataset


def _dataset(aug=None, seed=0, n=40):
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    return ImageDataset(images, labels, [str(i) for i in range(5)], aug, torch.Generator().manual_seed(seed))


BATCHES = [[3, 1, 4, 15], [9, 2, 6, 5], [0, 8, 7, 11]]


@pytest.mark.parametrize("wrap", ["plain", "subset", "subset-of-subset"])
def test_without_augmentation_it_yields_the_dataloader_batches(wrap, device):
    ds = _dataset()
    if wrap != "plain":
        ds = Subset(ds, list(range(30, 10, -1)))
    if wrap == "subset-of-subset":
        ds = Subset(ds, [5, 0, 19, 3, 2, 1, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    ours = list(BatchLoader(ds, BATCHES, device))
    ref = list(DataLoader(ds, batch_sampler=BATCHES))
    assert len(ours) == len(ref) == len(BatchLoader(ds, BATCHES, device)) == 3
    for (x, y), (rx, ry) in zip(ours, ref):
        assert x.device.type == y.device.type == torch.device(device).type
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x.cpu(), rx) and torch.equal(y.cpu(), ry)


def test_with_augmentation_each_batch_is_augmented_from_the_dataset_generator(device):
    aug = Augmentation(padding=2, flip=True)
    ds = _dataset(aug, seed=3)
    oracle_gen = torch.Generator().manual_seed(3)
    for epoch in range(2):  # the generator carries on from epoch to epoch
        for (x, y), idx in zip(BatchLoader(ds, BATCHES, device), BATCHES):
            expect = aug(ds.images[idx], oracle_gen).float() / 255
            assert torch.equal(x.cpu(), expect), epoch
            assert torch.equal(y.cpu(), ds.labels[idx])
    assert torch.equal(ds.generator.get_state(), oracle_gen.get_state())


def test_augmented_batches_differ_per_example():
    ds = _dataset(Augmentation(padding=2, flip=True))
    ds.images[:] = ds.images[0]  # one image everywhere: any difference comes from the augmentation
    x, _ = next(iter(BatchLoader(ds, [list(range(40))])))
    assert len({tuple(v.flatten().tolist()) for v in x}) > 10


def test_only_image_datasets_are_supported():
    plain = TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    assert not BatchLoader.supports(plain) and BatchLoader.supports(Subset(_dataset(), [0, 1]))
    with pytest.raises(TypeError, match="BatchLoader: dataset must be an ImageDataset or a Subset of one, got "
                                        "TensorDataset"):
        BatchLoader(plain, BATCHES)


@pytest.mark.needs_cuda
def test_images_stay_on_the_host_above_the_device_limit():
    ds = _dataset()
    resident = BatchLoader(ds, BATCHES, "cuda")
    hosted = BatchLoader(ds, BATCHES, "cuda", max_device_bytes=0)
    assert resident.images.is_cuda and not hosted.images.is_cuda and hosted.images.is_pinned()
    for (a, ya), (b, yb) in zip(resident, hosted):
        assert a.is_cuda and b.is_cuda and torch.equal(a, b) and torch.equal(ya, yb)
