"""dnr.ops.masked_conv2d vs F.conv2d(x, w * mask) and dense F.conv2d, forward + backward.

Irregular mask (10% density, every channel alive) and channel mask (25% of output
channels alive). Targets (GPU): irregular within 2% of dense cuDNN; channel mask
>= 2x faster than dense (forward; forward+backward with the masked weight gradient --
the dense weight gradient DNR's regrowth reads needs every filter's GEMM).
"""

import torch
import torch.nn.functional as F

import _common
import dnr.ops
from dnr import reference
from dnr.precision import ieee_float32


def main():
    args = _common.parser(__doc__).parse_args()
    device = _common.setup(args)
    if device.type == "cuda":
        cases = [(256, 64, 32, 64), (256, 128, 16, 128), (256, 256, 8, 256)]  # (batch, C, H=W, O), 3x3
    else:
        cases = [(8, 32, 16, 32), (8, 64, 8, 64)]
    rows = []
    for batch, c, hw, o in cases:
        x = torch.randn(batch, c, hw, hw, device=device, requires_grad=True)
        w = torch.randn(o, c, 3, 3, device=device, requires_grad=True)
        g = torch.randn(batch, o, hw, hw, device=device)
        irregular = torch.rand(w.shape, device=device) < 0.1
        irregular[:, 0, 0, 0] = True  # every output channel alive
        alive = torch.zeros(o, dtype=torch.bool, device=device)
        alive[torch.randperm(o, device=device)[: o // 4]] = True
        channel = alive.view(-1, 1, 1, 1).expand(w.shape).clone()
        conf = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)

        def fwd_bwd(fn):
            def run():
                x.grad = w.grad = None
                fn().backward(g)
            return run

        for name, mask in (("irregular", irregular), ("channel", channel)):
            # correctness first: values and both gradients against the reference (F.conv2d of w * mask)
            with ieee_float32():
                x.grad = w.grad = None
                out = dnr.ops.masked_conv2d(x, w, mask, None, 1, 1)
                out.backward(g)
                got = (out.detach(), x.grad.clone(), w.grad.clone())
                x.grad = w.grad = None
                want_out = reference.masked_conv2d(x, w, mask, None, (1, 1), (1, 1), (1, 1), 1, True)
                want_out.backward(g)
            for a, b in zip(got, (want_out.detach(), x.grad, w.grad)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)

            t_dense = _common.time_fn(fwd_bwd(lambda: F.conv2d(x, w, None, **conf)), device, args.repeats)
            t_mul = _common.time_fn(fwd_bwd(lambda: F.conv2d(x, w * mask, None, **conf)), device, args.repeats)
            t_op = _common.time_fn(fwd_bwd(lambda: dnr.ops.masked_conv2d(x, w, mask, None, 1, 1)), device, args.repeats)
            # masked weight gradient: pruned channels need no weight-gradient GEMM either
            t_op_masked = _common.time_fn(
                fwd_bwd(lambda: dnr.ops.masked_conv2d(x, w, mask, None, 1, 1, dense_weight_grad=False)),
                device, args.repeats)
            with torch.no_grad():
                f_dense = _common.time_fn(lambda: F.conv2d(x, w, None, **conf), device, args.repeats)
                f_op = _common.time_fn(lambda: dnr.ops.masked_conv2d(x, w, mask, None, 1, 1), device, args.repeats)
            rows.append({"mask": name, "shape": f"B{batch} C{c} {hw}x{hw} O{o} k3", "density": mask.float().mean().item(),
                         "dense_fb_ms": t_dense, "w_times_mask_fb_ms": t_mul, "dnr_fb_ms": t_op,
                         "dnr_fb_masked_grad_ms": t_op_masked,
                         "dnr_over_dense_fb": t_op / t_dense, "dnr_masked_grad_over_dense_fb": t_op_masked / t_dense, "dnr_over_w_times_mask_fb": t_op / t_mul,
                         "dense_fwd_ms": f_dense, "dnr_fwd_ms": f_op, "dnr_over_dense_fwd": f_op / f_dense})
    _common.write("masked_conv", device, rows, args)


if __name__ == "__main__":
    main()
