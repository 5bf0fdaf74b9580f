"""dnr.nn.MaxPool2d (the 2x2 max-of-four-views path without autograd) vs nn.MaxPool2d, on the CPU.

Three levels, each a ratio against nn.MaxPool2d measured in the same run, after a bit-for-bit check:
- the pool alone, no grad, at the shapes of dnr's CNNs (batch 128);
- a whole no-grad forward of small_cnn / wide_cnn / vgg_cnn (eval mode, batch 128) with either pool;
- torchattacks' Square attack (AutoAttack's gradient-free part, most of its time on robust models) on a
  wide_cnn, 200 queries on 32 examples labelled with the model's own predictions (so that every one is
  attacked), when torchattacks is installed (--no-square skips it).
With autograd recording (training, gradient attacks) both modules run PyTorch's max_pool2d, so the forward
+ backward row is a control: its ratio should be about 1. On CUDA dnr.nn.MaxPool2d is nn.MaxPool2d.
"""

import copy

import torch
from torch import nn

import _common
from dnr.models import build_model
from dnr.nn import MaxPool2d, sparsify

SHAPES = [(128, 32, 28, 28), (128, 64, 14, 14), (128, 128, 7, 7), (128, 64, 32, 32)]
MODELS = ["small_cnn", "wide_cnn", "vgg_cnn"]


def with_torch_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every dnr MaxPool2d replaced by torch's nn.MaxPool2d (same arguments)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                                   ceil_mode=child.ceil_mode))
    return model


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
    x = torch.randn(SHAPES[0], device=device).relu_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(SHAPES[0][0], SHAPES[0][1], SHAPES[0][2] // 2, SHAPES[0][3] // 2, device=device)
    ours(xa).backward(g)
    theirs(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad), "pool gradients differ"
    t_torch = _common.time_fn(lambda: theirs(xb).backward(g), device, args.repeats)
    t_dnr = _common.time_fn(lambda: ours(xa).backward(g), device, args.repeats)
    rows.append({"case": "pool fwd+bwd (control) " + "x".join(map(str, SHAPES[0])), "torch_ms": t_torch,
                 "dnr_ms": t_dnr, "speedup": t_torch / t_dnr})

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
