"""dnr.data.BatchLoader (one gather + batch augmentation per batch) vs a DataLoader over the same ImageDataset
(per-item conversion and augmentation, num_workers=0, as the harness used it).

CIFAR-shaped uint8 images (3x32x32, 10,000 of them), batch 256, random crop (padding 4) + flip and
without augmentation. Correctness first: without augmentation both yield the same batches. Times are
per batch, delivered on --device (the DataLoader's batches are copied there).
"""

import torch
from torch.utils.data import DataLoader

import _common
from dnr.data import Augmentation, BatchLoader, ImageDataset


def main():
    p = _common.parser(__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=10_000)
    args = p.parse_args()
    device = _common.setup(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    batches = [torch.randperm(args.images, generator=g)[:args.batch].tolist() for _ in range(8)]

    def dataset(aug):
        return ImageDataset(images, labels, [str(i) for i in range(10)], aug, torch.Generator().manual_seed(1))

    plain = dataset(None)
    for (x, y), (rx, ry) in zip(BatchLoader(plain, batches, device), DataLoader(plain, batch_sampler=batches)):
        assert torch.equal(x.cpu(), rx) and torch.equal(y.cpu(), ry), "BatchLoader differs from DataLoader"

    def drain(loader):
        for x, y in loader:
            x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    rows = []
    for name, aug in (("none", None), ("crop4+flip", Augmentation(padding=4, flip=True))):
        ds = dataset(aug)
        item_loader = DataLoader(ds, batch_sampler=batches, pin_memory=device.type == "cuda")
        batch_loader = BatchLoader(ds, batches, device)
        t_item = _common.time_fn(lambda: drain(item_loader), device, args.repeats) / len(batches)
        t_batch = _common.time_fn(lambda: drain(batch_loader), device, args.repeats) / len(batches)
        rows.append({"augmentation": name, "batch": args.batch, "dataloader_ms": t_item, "dnr_ms": t_batch,
                     "speedup_vs_dataloader": t_item / t_batch})
    _common.write("batch_loader", device, rows, args, {"images": args.images, "image_shape": [3, 32, 32]})


if __name__ == "__main__":
    main()
