"""Block-circulant layers (dnr.nn.BlockCirculantLinear / BlockCirculantConv2d) against dense layers.

For square linear layers (1024 and 4096 wide) and the VGG16 conv shapes (CIFAR, 32x32 input), at block
sizes k in {4, 8, 16, 32, 64}, three ways of computing one layer are timed, forward and forward+backward:

- ``fft``: the block-circulant layer, FFT form (``impl="fft"``: rfft, per-frequency products summed over input blocks, irfft):
  forward in eval mode (the weight spectrum cached, as at inference and during an attack: ``fft_fwd_ms``) and
  in training mode (the weight transformed at every call: ``fft_fwd_train_ms``), forward+backward in training
  mode;
- ``dense_matrix``: the same layer through its dense matrix (``F.linear(x, layer.dense_weight())``, the matrix
  rebuilt from the vectors at every call, as training would have to: the layer's ``impl="dense"`` form;
  ``bench_circulant_forms.py`` compares the two forms on more shapes, and whole models);
- ``plain``: an ``nn.Linear`` / ``nn.Conv2d`` of the same size (timed once per shape and batch: it has no k).

Each FFT case is first checked against the dense-matrix form. The ``crossover`` entries give, per shape,
batch and pass, the smallest k from which the FFT layer is faster than the plain layer (None: at no k of the
grid). ``saved_bytes_fft`` is what autograd keeps for the FFT layer's backward beyond the layer's parameters
(linear: the custom function's input; conv: the spectra autograd saves), next to the input's own size.

CPU default: batch 1 and 256 for the linear layers; for the convs batch 1 and ``--conv-batch`` (default 16 on
CPU, 256 on CUDA), because VGG16's convs at batch 256 take minutes per case on one CPU thread.
"""

import torch
import torch.nn.functional as F

import _common
from dnr.nn.block_circulant import BlockCirculantConv2d, BlockCirculantLayer, BlockCirculantLinear
from dnr.precision import ieee_float32

BLOCK_SIZES = (4, 8, 16, 32, 64)
LINEAR_WIDTHS = (1024, 4096)
# VGG16-BN on 32x32 inputs: (in, out, spatial size) of each distinct 3x3 conv
VGG16_CONVS = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8),
               (256, 512, 4), (512, 512, 4), (512, 512, 2)]


def saved_bytes(fn, params=()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs, without the storages of
    ``params`` (the layer's parameters are held anyway)."""
    held = {q.untyped_storage().data_ptr() for q in params}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main():
    p = _common.parser(__doc__)
    p.add_argument("--conv-batch", type=int, default=None, help="the larger conv batch (default: 16 on cpu, 256 on cuda)")
    p.add_argument("--quick", action="store_true", help="a tiny grid (tests): 1024-wide linear, two convs, k 4 and 16")
    args = p.parse_args()
    device = _common.setup(args)
    conv_batch = args.conv_batch or (256 if device.type == "cuda" else 16)
    widths, convs, ks = LINEAR_WIDTHS, VGG16_CONVS, BLOCK_SIZES
    if args.quick:
        widths, convs, ks = (1024,), [(128, 256, 8), (512, 512, 2)], (4, 16)
    rows = []

    def timed(fn, x, g, params):
        def fwd():
            with torch.no_grad():
                fn(x)

        def fwd_train():
            fn.train()
            with torch.no_grad():
                fn(x)

        def fwd_bwd():
            x.grad = None
            for q in params:
                q.grad = None
            fn(x).backward(g)

        if isinstance(fn, torch.nn.Module):
            fn.eval()
        forward = _common.time_fn(fwd, device, args.repeats, warmup=1)
        train_forward = _common.time_fn(fwd_train, device, args.repeats, warmup=1) \
            if isinstance(fn, BlockCirculantLayer) else None
        if isinstance(fn, torch.nn.Module):
            fn.train()
        return forward, train_forward, _common.time_fn(fwd_bwd, device, args.repeats, warmup=1)

    cases = [("linear", n, n, None, b) for n in widths for b in (1, 256)]
    cases += [("conv", cin, cout, hw, b) for cin, cout, hw in convs for b in (1, conv_batch)]
    for kind, n_in, n_out, hw, batch in cases:
        if kind == "linear":
            plain = torch.nn.Linear(n_in, n_out, device=device)
            x = torch.randn(batch, n_in, device=device, requires_grad=True)
        else:
            plain = torch.nn.Conv2d(n_in, n_out, 3, padding=1, device=device)
            x = torch.randn(batch, n_in, hw, hw, device=device, requires_grad=True)
        g = torch.randn_like(plain(x)).detach()
        plain_fwd, _, plain_fb = timed(plain, x, g, list(plain.parameters()))
        shape = f"{n_out}x{n_in}" + ("" if hw is None else f"x3x3@{hw}x{hw}")
        for k in ks:
            if k > max(n_in, n_out):
                continue
            if kind == "linear":
                layer = BlockCirculantLinear(n_in, n_out, k, impl="fft", device=device)

                def dense(inp, layer=layer):
                    return F.linear(inp, layer.dense_weight(), layer.bias)
            else:
                layer = BlockCirculantConv2d(n_in, n_out, 3, k, padding=1, impl="fft", device=device)

                def dense(inp, layer=layer):
                    return F.conv2d(inp, layer.dense_weight(), layer.bias, padding=1)
            with torch.no_grad(), ieee_float32():  # correctness first: FFT form against the dense matrix
                torch.testing.assert_close(layer(x), dense(x), rtol=1e-3, atol=1e-3)
            fft_fwd, fft_fwd_train, fft_fb = timed(layer, x, g, list(layer.parameters()))
            dense_fwd, _, dense_fb = timed(dense, x, g, list(layer.parameters()))
            rows.append({
                "kind": kind, "shape": shape, "batch": batch, "k": k,
                "fft_fwd_ms": fft_fwd, "fft_fwd_train_ms": fft_fwd_train, "dense_matrix_fwd_ms": dense_fwd,
                "plain_fwd_ms": plain_fwd,
                "fft_fwd_bwd_ms": fft_fb, "dense_matrix_fwd_bwd_ms": dense_fb, "plain_fwd_bwd_ms": plain_fb,
                "speedup_fwd_vs_plain": plain_fwd / fft_fwd, "speedup_fwd_bwd_vs_plain": plain_fb / fft_fb,
                "saved_bytes_fft": saved_bytes(lambda: layer(x), list(layer.parameters())), "input_bytes": x.numel() * x.element_size(),
            })
    crossover = []
    for kind, n_in, n_out, hw, batch in cases:
        shape = f"{n_out}x{n_in}" + ("" if hw is None else f"x3x3@{hw}x{hw}")
        mine = [r for r in rows if r["shape"] == shape and r["batch"] == batch]
        for pass_ in ("fwd", "fwd_bwd"):
            faster = [r["k"] for r in mine if r[f"speedup_{pass_}_vs_plain"] > 1]
            crossover.append({"shape": shape, "batch": batch, "pass": pass_, "smallest_faster_k": min(faster, default=None),
                              "faster_at_k": faster})
    _common.write("circulant", device, rows, args, extra={"block_sizes": list(ks), "conv_batch": conv_batch,
                                                          "crossover": crossover})


if __name__ == "__main__":
    main()
