"""dnr.nn.BatchNorm2d (the eval-mode input gradient through dnr.ops.batch_norm_eval's CPU kernel) vs
nn.BatchNorm2d, on the CPU.

Four levels, each a ratio against nn.BatchNorm2d measured in the same run (the two timed runs alternated, the
minimum of each kept), after a bit-for-bit check:
- BatchNorm alone in eval mode with frozen parameters, forward + input gradient, at the shapes of dnr's CNNs
  (batch 128);
- a PGD-7 attack (7 forward + backward passes in eval mode, the parameters frozen) on small_cnn / wide_cnn /
  vgg_cnn at 20x irregular sparsity, batch 128, the adversarial examples compared bit for bit;
- a PGD-7 adversarial training step of the same models (the attack, then the training forward + backward in
  train mode, where both layers are torch's, and an SGD step), the parameters after it compared bit for bit;
- torchattacks' APGD-CE (AutoAttack's first attack), 20 steps on 64 examples of a wide_cnn, when torchattacks
  is installed (--no-apgd skips it).
On CUDA dnr.nn.BatchNorm2d is nn.BatchNorm2d (this benchmark is for the CPU).
"""

import torch
from torch import nn

import _common
from dnr.models import build_model
from dnr.nn import BatchNorm2d, sparsify, torch_layers

SHAPES = [(128, 32, 28, 28), (128, 64, 14, 14), (128, 128, 7, 7), (128, 64, 32, 32)]
MODELS = ["small_cnn", "wide_cnn", "vgg_cnn"]


def with_torch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (or of a lone layer) with every dnr BatchNorm2d replaced by torch's nn.BatchNorm2d
    (same state, mode and requires_grad); its pools stay dnr's."""
    plain = torch_layers(model, kinds=[BatchNorm2d])
    assert not any(isinstance(m, BatchNorm2d) for m in plain.modules())
    return plain


def trained_state(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial 0 / 1 (as after training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


def main():
    p = _common.parser(__doc__)
    p.add_argument("--no-apgd", action="store_true", help="skip the APGD row")
    args = p.parse_args()
    device = _common.setup(args)
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        ours = trained_state(BatchNorm2d(shape[1])).to(device).eval().requires_grad_(False)
        theirs = with_torch_norms(ours)
        x = torch.randn(shape, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape, device=device)
        ours(xa).backward(g)
        theirs(xb).backward(g)
        assert torch.equal(xa.grad, xb.grad), f"input gradients differ at {shape}"
        # autograd.grad, not backward(): no accumulation into .grad, which would add a pass of its own
        t_torch, t_dnr = _common.time_pair(lambda: torch.autograd.grad(theirs(xb), xb, g),
                                           lambda: torch.autograd.grad(ours(xa), xa, g), device, 3 * args.repeats)
        rows.append({"case": "eval BN fwd+input grad " + "x".join(map(str, shape)), "torch_ms": t_torch,
                     "dnr_ms": t_dnr, "speedup": t_torch / t_dnr})

    for name in MODELS:
        torch.manual_seed(0)
        model = trained_state(build_model(name, num_classes=10, in_channels=1, input_size=28))
        sparsify(model, density=0.05)
        model = model.to(device)
        plain = with_torch_norms(model)
        x, y = torch.rand(128, 1, 28, 28, device=device), torch.randint(0, 10, (128,), device=device)
        assert torch.equal(_common.pgd7_attack(model, x, y), _common.pgd7_attack(plain, x, y)), f"{name}: adversarial examples differ"
        t_torch, t_dnr = _common.time_pair(lambda: _common.pgd7_attack(plain, x, y), lambda: _common.pgd7_attack(model, x, y), device,
                                           args.repeats, warmup=1)
        rows.append({"case": f"{name} PGD-7 attack 128", "torch_ms": t_torch, "dnr_ms": t_dnr,
                     "speedup": t_torch / t_dnr})
        steps = {m: _common.pgd7_training_step(m, x, y) for m in (model, plain)}
        steps[model](), steps[plain]()
        for (key, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), f"{name}: {key} differs after a training step"
        t_torch, t_dnr = _common.time_pair(steps[plain], steps[model], device, args.repeats, warmup=1)
        rows.append({"case": f"{name} PGD-7 training step 128", "torch_ms": t_torch, "dnr_ms": t_dnr,
                     "speedup": t_torch / t_dnr})

    if not args.no_apgd:
        try:
            import torchattacks
        except ImportError:
            torchattacks = None
            print("torchattacks is not installed: no APGD row")
        if torchattacks is not None:
            model = trained_state(build_model("wide_cnn", num_classes=10, in_channels=1, input_size=28))
            model = model.to(device).eval().requires_grad_(False)
            plain = with_torch_norms(model)
            x = torch.rand(64, 1, 28, 28, device=device)
            with torch.no_grad():
                y = plain(x).argmax(1)  # all correct: APGD attacks every example

            def apgd(m):
                return torchattacks.APGD(m, norm="Linf", eps=0.1, steps=20, n_restarts=1, seed=0)(x, y)

            assert torch.equal(apgd(model), apgd(plain)), "APGD's adversarial examples differ"
            t_torch, t_dnr = _common.time_pair(lambda: apgd(plain), lambda: apgd(model), device,
                                               max(1, args.repeats // 2), warmup=1)
            rows.append({"case": "APGD-CE, wide_cnn, 64 x 20 steps", "torch_ms": t_torch, "dnr_ms": t_dnr,
                         "speedup": t_torch / t_dnr})
    _common.write("batch_norm", device, rows, args, {"shapes": [list(s) for s in SHAPES], "models": MODELS})


if __name__ == "__main__":
    main()
