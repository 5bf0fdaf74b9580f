"""dnr.ops.pgd_step_ vs the same PGD step as a torch-ops expression.

Targets (GPU): >= 5x faster than the torch expression at batch 256, within 1.5x of
the bandwidth time (5 float32 streams at the device's measured copy bandwidth) at 4096.
"""

import torch

import _common
import dnr.ops


def torch_step(delta, x_adv, x, grad, eps, alpha, lo=0.0, hi=1.0):
    """The step as research code writes it: one kernel per op."""
    d = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
    x_adv.copy_(torch.clamp(x + d, lo, hi))
    delta.copy_(x_adv - x)


def main():
    args = _common.parser(__doc__).parse_args()
    device = _common.setup(args)
    batches = [256, 4096] if device.type == "cuda" else [64, 256]
    bandwidth = _common.copy_bandwidth(device)
    rows = []
    for batch in batches:
        shape = (batch, 3, 32, 32)
        x = torch.rand(shape, device=device)
        grad = torch.randn(shape, device=device)
        eps, alpha = 8 / 255, 2 / 255
        start = (torch.rand(shape, device=device) * 2 - 1) * eps
        # correctness first: the op against the expression, exact in float32
        want = [start.clone(), (x + start).clamp(0, 1)]
        torch_step(*want, x, grad, eps, alpha)
        got = [start.clone(), (x + start).clamp(0, 1)]
        dnr.ops.pgd_step_(*got, x, grad, eps, alpha)
        assert torch.equal(got[1], want[1]), "pgd_step_ x_adv differs from the torch expression"
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-7)

        bufs = [start.clone(), (x + start).clamp(0, 1)]
        eps_t = torch.tensor(eps, device=device)
        alpha_t = torch.tensor(alpha, device=device)
        t_torch = _common.time_fn(lambda: torch_step(*bufs, x, grad, eps, alpha), device, args.repeats)
        t_op = _common.time_fn(lambda: dnr.ops.pgd_step_(*bufs, x, grad, eps_t, alpha_t), device, args.repeats)
        t_bw = 5 * 4 * x.numel() / bandwidth * 1e3  # read delta, x, grad; write delta, x_adv
        rows.append({"batch": batch, "shape": list(shape), "torch_ms": t_torch, "dnr_ms": t_op,
                     "bandwidth_ms": t_bw, "speedup_vs_torch": t_torch / t_op, "dnr_over_bandwidth": t_op / t_bw})
    _common.write("pgd_step", device, rows, args, {"copy_bandwidth_GBps": bandwidth / 1e9})


if __name__ == "__main__":
    main()
