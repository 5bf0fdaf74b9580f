"""dnr.ops.momentum_stats vs plain PyTorch, ResNet-18 weight shapes.

Baselines: a Python loop over layers (as research code does) and torch._foreach ops.
Target (GPU): <= 0.1 ms for all ResNet-18 layers.
"""

import torch

import _common
import dnr.ops


def loop_stats(momenta, masks):
    return torch.stack([torch.stack([(m.abs() * k).sum(dtype=torch.float64), k.sum().double()])
                        for m, k in zip(momenta, masks)])


def foreach_stats(momenta, masks):
    sums = torch._foreach_norm(torch._foreach_mul(momenta, masks), 1)
    counts = [k.sum() for k in masks]
    return torch.stack([torch.stack(sums).double(), torch.stack(counts).double()], dim=1)


def main():
    args = _common.parser(__doc__).parse_args()
    device = _common.setup(args)
    shapes = _common.RESNET18_SHAPES
    momenta = [torch.randn(s, device=device) for s in shapes]
    masks = [torch.rand(s, device=device) < 0.1 for s in shapes]

    exact = loop_stats([m.double() for m in momenta], masks)
    got = dnr.ops.momentum_stats(momenta, masks)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(foreach_stats(momenta, masks), exact, rtol=1e-4, atol=0)

    rows = []
    t_loop = _common.time_fn(lambda: loop_stats(momenta, masks), device, args.repeats)
    t_foreach = _common.time_fn(lambda: foreach_stats(momenta, masks), device, args.repeats)
    t_op = _common.time_fn(lambda: dnr.ops.momentum_stats(momenta, masks), device, args.repeats)
    rows.append({"op": "momentum_stats", "layers": len(shapes), "numel": sum(m.numel() for m in momenta),
                 "loop_ms": t_loop, "foreach_ms": t_foreach, "dnr_ms": t_op,
                 "speedup_vs_loop": t_loop / t_op, "speedup_vs_foreach": t_op and t_foreach / t_op})
    _common.write("momentum_stats", device, rows, args, {"shapes": [list(s) for s in shapes]})


if __name__ == "__main__":
    main()
