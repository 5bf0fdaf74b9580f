"""dnr.nn.MaxPool2d (the 2x2 pool through dnr.ops.max_pool2x2's CPU kernel) vs nn.MaxPool2d, on the CPU.

Four levels, each a ratio against nn.MaxPool2d measured in the same run, after a bit-for-bit check:
- the pool alone at the shapes of dnr's CNNs (batch 128), no grad and forward + backward;
- a whole no-grad forward of small_cnn / wide_cnn / vgg_cnn (eval mode, batch 128) with either pool;
- a PGD-7 adversarial training step of the same models at 20x irregular sparsity (batch 128: the attack's
  7 forward + backward passes in eval mode, then the training forward + backward and an SGD step), the
  parameters after it compared bit for bit;
- torchattacks' Square attack (AutoAttack's gradient-free part, most of its time on robust models) on a
  wide_cnn, 200 queries on 32 examples labelled with the model's own predictions (so that every one is
  attacked), when torchattacks is installed (--no-square skips it).
On CUDA dnr.nn.MaxPool2d is nn.MaxPool2d (this benchmark is for the CPU).
"""

import torch
from torch import nn

import _common
from dnr.models import build_model
from dnr.nn import MaxPool2d, sparsify, torch_layers

SHAPES = [(128, 32, 28, 28), (128, 64, 14, 14), (128, 128, 7, 7), (128, 64, 32, 32)]
MODELS = ["small_cnn", "wide_cnn", "vgg_cnn"]


def with_torch_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every dnr MaxPool2d replaced by torch's nn.MaxPool2d (same arguments); its
    BatchNorms stay dnr's."""
    plain = torch_layers(model, kinds=[MaxPool2d])
    assert not any(isinstance(m, MaxPool2d) for m in plain.modules())
    return plain


def main():
    p = _common.parser(__doc__)
    p.add_argument("--no-square", action="store_true", help="skip the Square attack row")
    args = p.parse_args()
    device = _common.setup(args)
    torch.manual_seed(0)
    rows = []
    ours, theirs = MaxPool2d(2), nn.MaxPool2d(2)
    for shape in SHAPES:
        x = torch.randn(shape, device=device).relu_()  # post-ReLU: many ties at 0, as in the models
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), f"pool values differ at {shape}"
            t_torch = _common.time_fn(lambda: theirs(x), device, args.repeats)
            t_dnr = _common.time_fn(lambda: ours(x), device, args.repeats)
        rows.append({"case": "pool no-grad " + "x".join(map(str, shape)), "torch_ms": t_torch, "dnr_ms": t_dnr,
                     "speedup": t_torch / t_dnr})
    for shape in SHAPES:
        x = torch.randn(shape, device=device).relu_()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)
        ours(xa).backward(g)
        theirs(xb).backward(g)
        assert torch.equal(xa.grad, xb.grad), f"pool gradients differ at {shape}"
        t_torch = _common.time_fn(lambda: theirs(xb).backward(g), device, args.repeats)
        t_dnr = _common.time_fn(lambda: ours(xa).backward(g), device, args.repeats)
        rows.append({"case": "pool fwd+bwd " + "x".join(map(str, shape)), "torch_ms": t_torch, "dnr_ms": t_dnr,
                     "speedup": t_torch / t_dnr})

    for name in MODELS:
        model = build_model(name, num_classes=10, in_channels=1, input_size=28)
        sparsify(model, density=0.05)
        model = model.to(device).eval()
        plain = with_torch_pools(model)
        x = torch.rand(128, 1, 28, 28, device=device)
        with torch.no_grad():
            assert torch.equal(model(x), plain(x)), f"{name}: logits differ"
            t_torch = _common.time_fn(lambda: plain(x), device, args.repeats)
            t_dnr = _common.time_fn(lambda: model(x), device, args.repeats)
        rows.append({"case": f"{name} forward no-grad 128", "torch_ms": t_torch, "dnr_ms": t_dnr,
                     "speedup": t_torch / t_dnr})

    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=1, input_size=28)
        sparsify(model, density=0.05)
        model = model.to(device)
        plain = with_torch_pools(model)
        x, y = torch.rand(128, 1, 28, 28, device=device), torch.randint(0, 10, (128,), device=device)
        steps = {m: _common.pgd7_training_step(m, x, y) for m in (model, plain)}
        steps[model](), steps[plain]()
        for (key, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), f"{name}: {key} differs after a training step"
        t_torch = _common.time_fn(steps[plain], device, max(1, args.repeats // 2))
        t_dnr = _common.time_fn(steps[model], device, max(1, args.repeats // 2))
        rows.append({"case": f"{name} PGD-7 training step 128", "torch_ms": t_torch, "dnr_ms": t_dnr,
                     "speedup": t_torch / t_dnr})

    if not args.no_square:
        try:
            import torchattacks
        except ImportError:
            torchattacks = None
            print("torchattacks is not installed: no Square row")
        if torchattacks is not None:
            model = build_model("wide_cnn", num_classes=10, in_channels=1, input_size=28).to(device).eval()
            plain = with_torch_pools(model)
            for m in (model, plain):
                m.requires_grad_(False)
            x = torch.rand(32, 1, 28, 28, device=device)
            with torch.no_grad():
                y = plain(x).argmax(1)  # all correct: Square queries every example

            def square(m):
                return torchattacks.Square(m, norm="Linf", eps=0.1, n_queries=200, n_restarts=1, seed=0)(x, y)

            assert torch.equal(square(model), square(plain)), "Square's adversarial examples differ"
            t_torch = _common.time_fn(lambda: square(plain), device, max(1, args.repeats // 5), warmup=1)
            t_dnr = _common.time_fn(lambda: square(model), device, max(1, args.repeats // 5), warmup=1)
            rows.append({"case": "Square attack, wide_cnn, 32 x 200 queries", "torch_ms": t_torch, "dnr_ms": t_dnr,
                         "speedup": t_torch / t_dnr})
    _common.write("pooling", device, rows, args, {"shapes": [list(s) for s in SHAPES], "models": MODELS})


if __name__ == "__main__":
    main()
