"""End to end: one hybrid adversarial training step (PGD-k attack + clean and adversarial forwards + backward
+ optimizer + masks) of dnr's trainer against research-code-style plain PyTorch, measured in one run.

Variants (same model, batch, attack, beta 0.5, lr 0.1, momentum 0.9 (no Nesterov), weight decay 5e-4):
  dense_naive      dense model; the attack calls loss.backward() (parameter gradients too), model.eval()
                   around it; torch.optim.SGD
  sparse_naive     the same plus ``w.data *= mask`` after every step (sparse research code)   <- baseline
  dense_dnr        dense model through ``dnr.engine.adversarial_step`` (input-only attack gradients,
                   fused PGD step)
  dnr              the sparse model as ``dnr train`` runs it: masked layers, adversarial_step, the
                   fused MaskedSGD where compiled, the DNR controller's mask hook
  dnr_bf16_cl      dnr with ``--precision bf16 --channels-last`` (GPU only unless --bf16)

Correctness first: one clean step (beta 1, no attack) of dnr and of sparse_naive from the same weights
and masks gives the same weights (float32 tolerance), and dnr's PGD examples stay in the eps-ball.
Defaults: CPU small_cnn, 1x28x28, batch 64, PGD-3; CUDA resnet18 and vgg16, 3x32x32, batch 256, PGD-7.
"""

import copy

import torch
import torch.nn.functional as F

import _common
from dnr import attacks, engine
from dnr.models import build_model
from dnr.nn import masked_layers, sparsify
from dnr.precision import ieee_float32

EPS, ALPHA, LR = 8 / 255, 2 / 255, 0.1


def naive_pgd(model, x, y, steps):
    """Research-code PGD: eval mode, ``loss.backward()`` (fills parameter gradients), an explicit projection."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        model.zero_grad()
        loss.backward()
        x_adv = x_adv.detach() + ALPHA * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    model.train()
    return x_adv.detach()


def naive_step(model, opt, masks, x, y, steps, beta=0.5):
    if beta < 1:
        x_adv = naive_pgd(model, x, y, steps)
        loss = beta * F.cross_entropy(model(x), y) + (1 - beta) * F.cross_entropy(model(x_adv), y)
    else:  # clean training: one forward
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for w, m in masks:
            w.mul_(m)


def build(name, device, density, in_channels, size):
    """(sparse dnr model, plain model with the same weights, [(plain weight, mask)], dense dnr-free model)."""
    torch.manual_seed(0)
    sparse = build_model(name, 10, in_channels, size)
    dense = copy.deepcopy(sparse).to(device)
    sparsify(sparse, density=density, generator=torch.Generator().manual_seed(0))
    sparse = sparse.to(device)
    plain = build_model(name, 10, in_channels, size).to(device)
    plain.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.endswith(".mask")})
    modules = dict(plain.named_modules())
    masks = [(modules[n].weight, layer.mask) for n, layer in masked_layers(sparse)]
    return sparse, plain, masks, dense


def plain_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)


def check(name, device, density, in_channels, size, batch):
    sparse, plain, masks, _ = build(name, device, density, in_channels, size)
    opt, _controller = _common.dnr_optimizer(sparse, device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, in_channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    engine.adversarial_step(sparse, x, y, opt, eps=EPS, alpha=ALPHA, steps=1, beta=1.0)
    naive_step(plain, plain_sgd(plain), masks, x, y, steps=1, beta=1.0)
    ours = {k: v for k, v in sparse.state_dict().items() if not k.endswith(".mask")}
    for k, v in plain.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-4, msg=f"{name}: {k} differs after one step")
    x_adv = attacks.pgd(sparse, x, y, EPS, ALPHA, 3)
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1


def measure(name, device, density, in_channels, size, batch, steps, repeats, bf16):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(batch, in_channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    sparse, plain, masks, dense = build(name, device, density, in_channels, size)
    plain_dense = copy.deepcopy(dense)
    dense_opt, plain_dense_opt, plain_opt = plain_sgd(dense), plain_sgd(plain_dense), plain_sgd(plain)
    dnr_opt, _ = _common.dnr_optimizer(sparse, device)
    attack = dict(eps=EPS, alpha=ALPHA, steps=steps)
    cases = {
        "dense_naive": lambda: naive_step(plain_dense, plain_dense_opt, [], x, y, steps),
        "sparse_naive": lambda: naive_step(plain, plain_opt, masks, x, y, steps),
        "dense_dnr": lambda: engine.adversarial_step(dense, x, y, dense_opt, **attack),
        "dnr": lambda: engine.adversarial_step(sparse, x, y, dnr_opt, **attack),
    }
    if bf16:
        fast, _, _, _ = build(name, device, density, in_channels, size)
        fast = fast.to(memory_format=torch.channels_last)
        fast_opt, _ = _common.dnr_optimizer(fast, device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        cases["dnr_bf16_cl"] = lambda: engine.adversarial_step(fast, x_cl, y, fast_opt, autocast_dtype=torch.bfloat16,
                                                              **attack)
    times = {k: _common.time_fn(fn, device, repeats) for k, fn in cases.items()}
    row = {"model": name, "batch": batch, "input": f"{in_channels}x{size}x{size}", "pgd_steps": steps,
           "density": density}
    row.update({f"{k}_ms": v for k, v in times.items()})
    base = times["sparse_naive"]
    row.update({f"speedup_{k}_vs_sparse_naive": base / v for k, v in times.items() if k != "sparse_naive"})
    row["dnr_images_per_s"] = batch / times["dnr"] * 1e3
    return row


def main():
    p = _common.parser(__doc__)
    p.add_argument("--models", nargs="+", default=None, help="small_cnn, resnet18, vgg16 (default by device)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on cpu, 256 on cuda)")
    p.add_argument("--pgd-steps", type=int, default=None, help="attack steps (default 3 on cpu, 7 on cuda)")
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true", help="also time bf16 + channels-last on the CPU")
    args = p.parse_args()
    device = _common.setup(args)
    cuda = device.type == "cuda"
    if cuda:
        args.repeats = min(args.repeats, 20)  # a step is tens of milliseconds
    models = args.models or (["resnet18", "vgg16"] if cuda else ["small_cnn"])
    batch = args.batch or (256 if cuda else 64)
    steps = args.pgd_steps or (7 if cuda else 3)
    rows = []
    for name in models:
        in_channels, size = (1, 28) if name == "small_cnn" else (3, 32)
        with ieee_float32():
            check(name, device, args.density, in_channels, size, min(batch, 32))
        rows.append(measure(name, device, args.density, in_channels, size, batch, steps, args.repeats,
                            cuda or args.bf16))
    _common.write("train_step", device, rows, args, {"eps": EPS, "alpha": ALPHA, "lr": LR, "beta": 0.5})


if __name__ == "__main__":
    main()
