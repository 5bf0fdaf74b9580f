"""dnr.nn.BlockCirculantLSTM / GRU against torch.nn.LSTM / GRU loaded with dense_weights() (issue 17).

The oracle is torch's own recurrent implementation: the block-circulant layer's function must be the torch
layer's with the dense-equivalent weights (float64, 1e-10), outputs, final states and every gradient.
"""

import pytest
import torch
from torch import nn

from dnr.nn import BlockCirculantGRU, BlockCirculantLSTM, circulant, circulant_layers
from dnr.nn.block_circulant import BlockCirculantLinear, block_circulant_dense

CLASSES = [pytest.param(BlockCirculantLSTM, id="lstm"), pytest.param(BlockCirculantGRU, id="gru")]
TOL = dict(rtol=1e-10, atol=1e-10)


def _pair(cls, device, *, input_size=12, hidden=8, layers=2, block_size=4, batch_first=False, bias=True,
          impl="auto"):
    layer = cls(input_size, hidden, layers, block_size=block_size, bias=bias, batch_first=batch_first, impl=impl,
                device=device, dtype=torch.float64)
    return layer, layer.to_dense()


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("impl", ["fft", "dense"])
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("layers,block_size,hidden", [(1, 4, 8), (3, 4, 8), (2, 3, 7), (2, 1, 5)])
def test_forward_backward_match_torch(cls, batch_first, layers, block_size, hidden, impl, device):
    """Outputs, final states, the input's gradient and every weight gradient (mapped to the dense weights
    through the linear map vectors -> dense matrix) equal torch's, in both product forms (the hidden projection's
    weight is transformed once per sequence and serves every step)."""
    ours, ref = _pair(cls, device, layers=layers, block_size=block_size, hidden=hidden, batch_first=batch_first,
                      impl=impl)
    assert {layer.product_form() for _, layer in circulant_layers(ours)} == {impl}
    assert isinstance(ref, cls.torch_class)
    T, B = 5, 3
    shape = (B, T, 12) if batch_first else (T, B, 12)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    h0 = torch.randn(layers, B, hidden, dtype=torch.float64, device=device)
    state = (h0, torch.randn_like(h0)) if cls is BlockCirculantLSTM else h0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, st_a = ours(xa, state)
    out_b, st_b = ref(xb, state)
    torch.testing.assert_close(out_a, out_b, **TOL)
    for a, b in zip(st_a if isinstance(st_a, tuple) else (st_a,), st_b if isinstance(st_b, tuple) else (st_b,)):
        torch.testing.assert_close(a, b, **TOL)
    weights = torch.randn_like(out_a)
    final = st_a[0] if isinstance(st_a, tuple) else st_a
    final_b = st_b[0] if isinstance(st_b, tuple) else st_b
    ((out_a * weights).sum() + final.sum()).backward()
    ((out_b * weights).sum() + final_b.sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    ref_grads = _grads(ref)
    for l, cell in enumerate(ours.layers):
        for kind in ("ih", "hh"):
            proj = getattr(cell, kind)
            # the vectors' gradient is the dense gradient pulled back through vectors -> dense (a linear map)
            dense = lambda v: block_circulant_dense(v, proj.out_features, proj.in_features)  # noqa: E731
            _, pullback = torch.func.vjp(dense, proj.vectors.detach())
            torch.testing.assert_close(proj.vectors.grad, pullback(ref_grads[f"weight_{kind}_l{l}"])[0], **TOL)
            torch.testing.assert_close(proj.bias.grad, ref_grads[f"bias_{kind}_l{l}"], **TOL)


@pytest.mark.parametrize("cls", CLASSES)
def test_unbatched_default_state_and_no_bias(cls, device):
    ours, ref = _pair(cls, device, bias=False, layers=2)
    x = torch.randn(6, 12, dtype=torch.float64, device=device)
    out_a, st_a = ours(x)
    out_b, st_b = ref(x)
    torch.testing.assert_close(out_a, out_b, **TOL)
    torch.testing.assert_close(st_a[0] if isinstance(st_a, tuple) else st_a,
                               st_b[0] if isinstance(st_b, tuple) else st_b, **TOL)
    assert set(ours.dense_weights()) == {"weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"}


@pytest.mark.parametrize("cls", CLASSES)
def test_padded_sequences_match_torch_and_packed_is_a_clear_error(cls):
    """Padded batches are plain tensors (each sequence's output read at its length equals torch's packed run);
    a PackedSequence is refused with a message saying what to pass instead."""
    ours, ref = _pair(cls, "cpu", batch_first=True)
    lengths = torch.tensor([5, 3, 2])
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    out, _ = ours(x)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], ref_out[b, :n], **TOL)
    with pytest.raises(TypeError, match="PackedSequence input is not supported; pass a padded tensor"):
        ours(packed)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_inputs_name_the_argument(cls):
    layer = cls(12, 8, 2, block_size=4)
    with pytest.raises(ValueError, match="input has 11 features, expected input_size=12"):
        layer(torch.randn(5, 3, 11))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 3, 8\)"):
        layer(torch.randn(5, 3, 12), (torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)) if cls is BlockCirculantLSTM
              else torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        cls(12, 8, block_size=0)
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 0"):
        cls(12, 0, block_size=4)
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'fft', 'dense', got 'fastest'"):
        cls(12, 8, block_size=4, impl="fastest")


@pytest.mark.parametrize("cls", CLASSES)
def test_structure_stored_numbers_and_from_dense(cls):
    """k x fewer stored weights when the sizes are multiples of k; from_dense projects torch's weights (a torch
    layer whose matrices already are block-circulant is reproduced exactly); block_size=None is dense and
    dnr.circulant converts its projections in place."""
    layer = cls(16, 8, 2, block_size=4)
    gates = cls.gates
    dense = sum(p.numel() for n, p in layer.to_dense().named_parameters() if n.startswith("weight"))
    stored = sum(m.vectors.numel() for _, m in circulant_layers(layer))
    assert dense == gates * 8 * (16 + 8 + 8 + 8) and stored * 4 == dense
    assert layer.block_size == 4
    again = cls.from_dense(layer.to_dense(), 4)
    for (name, a), b in zip(again.dense_weights().items(), layer.dense_weights().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    plain = cls(16, 8, 2, block_size=None)
    assert plain.block_size is None and isinstance(plain.layers[0].ih, nn.Linear)
    x = torch.randn(4, 2, 16)
    before = plain(x)[0]
    assert len(circulant_layers(circulant(plain, 1))) == 4  # k = 1: block-circulant == dense, same function
    torch.testing.assert_close(plain(x)[0], before, rtol=1e-5, atol=1e-6)
    assert all(isinstance(getattr(c, k), BlockCirculantLinear) for c in plain.layers for k in ("ih", "hh"))
    with pytest.raises(ValueError, match="bidirectional, dropout and proj_size are not supported"):
        cls.from_dense(cls.torch_class(4, 4, bidirectional=True), 2)


@pytest.mark.parametrize("cls", CLASSES)
def test_float32_matches_torch(cls, device):
    ours = cls(12, 16, 2, block_size=4, batch_first=True, device=device)
    ref = ours.to_dense()
    x = torch.randn(3, 7, 12, device=device)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
