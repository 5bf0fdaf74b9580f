"""dnr.optim.MaskedSGD (fused dnr.ops.masked_sgd_step_) vs torch.optim.SGD + a mask multiply.

Baseline: SGD(momentum=0.9, weight_decay=5e-4, foreach=True) then torch._foreach_mul_(params, masks),
ResNet-18 weight shapes. Target (GPU): >= 2x faster.
"""

import torch

import _common
from dnr.optim import MaskedSGD


def main():
    args = _common.parser(__doc__).parse_args()
    device = _common.setup(args)
    shapes = _common.RESNET18_SHAPES
    torch.manual_seed(0)
    masks = [torch.rand(s, device=device) < 0.1 for s in shapes]
    init = [torch.randn(s, device=device) * k for s, k in zip(shapes, masks)]
    grads = [torch.randn(s, device=device) for s in shapes]
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)

    def make(kind):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        if kind == "dnr":
            return params, MaskedSGD(params, masks=dict(zip(params, masks)), **hyper)
        return params, torch.optim.SGD(params, foreach=(kind == "foreach"), **hyper)

    def baseline_step(params, opt):
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(params, masks)

    # correctness first: a few steps, bit for bit against single-tensor SGD + mask multiply
    ref, ref_opt = make("single")
    ours, our_opt = make("dnr")
    for _ in range(3):
        baseline_step(ref, ref_opt)
        our_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), f"MaskedSGD differs from SGD + mask: max {(a - b).abs().max().item()}"

    rows = []
    fe, fe_opt = make("foreach")
    t_foreach = _common.time_fn(lambda: baseline_step(fe, fe_opt), device, args.repeats)
    t_single = _common.time_fn(lambda: baseline_step(ref, ref_opt), device, args.repeats)
    t_op = _common.time_fn(our_opt.step, device, args.repeats)
    rows.append({"params": len(shapes), "numel": sum(p.numel() for p in ours), "sgd_foreach_ms": t_foreach,
                 "sgd_single_ms": t_single, "dnr_ms": t_op, "speedup_vs_foreach": t_foreach / t_op,
                 "speedup_vs_single": t_single / t_op})
    _common.write("masked_sgd", device, rows, args, {"shapes": [list(s) for s in shapes], "hyper": hyper})


if __name__ == "__main__":
    main()
