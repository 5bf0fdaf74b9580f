"""Which product form a block-circulant layer should compute with: FFT form against dense form.

Both forms compute the same function from the same stored vectors (``dnr.nn.BlockCirculantLinear`` /
``BlockCirculantConv2d``, ``impl="fft"`` / ``impl="dense"``): the FFT form transforms the input and the weight
(rfft, per-frequency products summed over input blocks, irfft); the dense form builds the dense matrix /
kernel from the vectors by indexing and calls ``F.linear`` / ``F.conv2d``. ``impl="auto"`` (the default) picks
one per layer by ``dnr.nn.block_circulant.fft_form_pays``; this benchmark is the measurement behind that rule
and checks it.

Two parts, both forward+backward in training mode (the weight transformed at every call, as in training):

- ``layers``: single layers at k in {2, 4, 8, 16}: the small CNN's (``dnr.models.small_cnn``, batch 128), the
  LSTM preset's input (28 -> 512 over 28 steps of batch 128) and hidden (128 -> 512) projections, VGG16's deep
  convs (batch 16) and square linear layers (1024 and 4096 wide, batch 128). ``fft_over_dense`` > 1: the dense
  form is faster; ``auto`` says which form the rule picks, ``auto_is_faster`` whether that was the faster one.
- ``models``: one training step's forward+backward (cross-entropy, batch 128) of whole converted models, the
  small CNN and the LSTM preset on 28x28 inputs, under ``impl="fft"``, ``"dense"`` and ``"auto"``.

Each case is first checked: both forms give the same output (to 1e-3).
"""

import torch
import torch.nn.functional as F

import _common
from dnr.models import build_model
from dnr.nn.block_circulant import (BlockCirculantConv2d, BlockCirculantLinear, circulant, fft_form_pays,
                                    set_circulant_impl)
from dnr.precision import ieee_float32

BLOCK_SIZES = (2, 4, 8, 16)
# (kind, in, out, spatial size or None, batch): where the layer sits is in its name
LAYERS = [
    ("small_cnn conv1", "conv", 1, 16, 28, 128), ("small_cnn conv2", "conv", 16, 32, 14, 128),
    ("small_cnn conv3", "conv", 32, 64, 7, 128), ("small_cnn fc1", "linear", 576, 128, None, 128),
    ("small_cnn fc2", "linear", 128, 10, None, 128),
    ("lstm input projection (28 steps)", "linear", 28, 512, None, 128 * 28),
    ("lstm hidden projection (1 step)", "linear", 128, 512, None, 128),
    ("vgg16 conv 128x128@16", "conv", 128, 128, 16, 16), ("vgg16 conv 256x256@8", "conv", 256, 256, 8, 16),
    ("vgg16 conv 512x512@4", "conv", 512, 512, 4, 16),
    ("linear 1024", "linear", 1024, 1024, None, 128), ("linear 4096", "linear", 4096, 4096, None, 128),
]
MODELS = (("small_cnn", BLOCK_SIZES), ("lstm", (4, 16)))


def layer_rows(device, repeats, block_sizes, layers):
    rows = []
    for name, kind, n_in, n_out, hw, batch in layers:
        for k in block_sizes:
            if k > max(n_in, n_out):
                continue
            if kind == "conv":
                layer = BlockCirculantConv2d(n_in, n_out, 3, k, padding=1, device=device)
                x = torch.randn(batch, n_in, hw, hw, device=device, requires_grad=True)
            else:
                layer = BlockCirculantLinear(n_in, n_out, k, device=device)
                x = torch.randn(batch, n_in, device=device, requires_grad=True)
            auto = layer.product_form()
            times, outputs = {}, {}
            for impl in ("fft", "dense"):
                layer.impl = impl
                with torch.no_grad(), ieee_float32():
                    outputs[impl] = layer(x)

                def step():
                    x.grad = layer.vectors.grad = None
                    layer(x).sum().backward()

                times[impl] = _common.time_fn(step, device, repeats, warmup=1)
            torch.testing.assert_close(outputs["fft"], outputs["dense"], rtol=1e-3, atol=1e-3)
            faster = "fft" if times["fft"] < times["dense"] else "dense"
            rows.append({"layer": name, "kind": kind, "in": n_in, "out": n_out, "batch": batch, "k": k,
                         "fft_fwd_bwd_ms": times["fft"], "dense_fwd_bwd_ms": times["dense"],
                         "fft_over_dense": times["fft"] / times["dense"], "auto": auto,
                         "rule": "fft" if fft_form_pays(kind, n_out, n_in, k, device.type) else "dense",
                         "auto_is_faster": auto == faster})
    return rows


def model_rows(device, repeats, models):
    rows = []
    for model_name, block_sizes in models:
        for k in block_sizes:
            torch.manual_seed(0)
            model = circulant(build_model(model_name, 10, 1, 28), k).to(device).train()
            x = torch.randn(128, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (128,), device=device)
            times, outputs = {}, {}
            for impl in ("fft", "dense", "auto"):
                set_circulant_impl(model, impl)
                with torch.no_grad(), ieee_float32():
                    outputs[impl] = model(x)

                def step():
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()

                times[impl] = _common.time_fn(step, device, repeats, warmup=1)
            torch.testing.assert_close(outputs["fft"], outputs["dense"], rtol=1e-3, atol=1e-3)
            rows.append({"model": model_name, "k": k, "batch": 128, "fft_step_ms": times["fft"],
                         "dense_step_ms": times["dense"], "auto_step_ms": times["auto"],
                         "speedup_auto_vs_fft": times["fft"] / times["auto"]})
    return rows


def main():
    p = _common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="a tiny grid (tests): two layers, k 4 and 16, no VGG16")
    args = p.parse_args()
    device = _common.setup(args)
    block_sizes, layers, models = BLOCK_SIZES, LAYERS, MODELS
    if args.quick:
        block_sizes, layers, models = (4, 16), [LAYERS[2], LAYERS[-2]], (("small_cnn", (4,)),)
    rows = layer_rows(device, args.repeats, block_sizes, layers)
    models_out = model_rows(device, args.repeats, models)
    _common.write("circulant_forms", device, models_out, args, extra={"layers": rows})
    wrong = [r for r in rows if not r["auto_is_faster"]]
    print(f"impl='auto' took the faster form in {len(rows) - len(wrong)} of {len(rows)} layer cases"
          + "".join(f"\n  slower: {r['layer']} k={r['k']} (auto {r['auto']}, fft/dense {r['fft_over_dense']:.2f})"
                    for r in wrong))


if __name__ == "__main__":
    main()
