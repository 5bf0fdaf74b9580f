"""Block-circulant LSTM and GRU (E-RNN, Wang et al., FPGA 2018): ``torch.nn.LSTM`` / ``GRU`` gate equations
with block-circulant input-to-hidden and hidden-to-hidden matrices and FFT products.

Layout (attribute names are part of the interface: checkpoints rely on them)::

    layers[l].ih   x_t -> the stacked gate pre-activations  [*, G * hidden]   (G = 4 LSTM, 3 GRU)
    layers[l].hh   h_{t-1} -> the stacked gate pre-activations  [*, G * hidden]

The rows are stacked in torch's gate order (LSTM: i, f, g, o; GRU: r, z, n), so ``ih.weight`` is
``torch.nn.LSTM``'s ``weight_ih_l{l}``. Each projection is a :class:`dnr.nn.BlockCirculantLinear` of block
size k (or a plain ``nn.Linear`` with ``block_size=None``: a dense model that ``dnr.circulant`` or the
``admm-circulant`` method converts later, through the very same forward code). When ``hidden_size`` is a
multiple of k, every gate's matrix is block-circulant on its own (E-RNN's layout); otherwise blocks straddle
gate boundaries of the stacked matrix (still exactly a block-circulant matrix of the stacked weights).

The input projection of each layer runs once over all time steps (one batched product); only the
hidden projection runs step by step, with its weight prepared once per sequence (``BlockCirculantLinear.prepare``:
the spectrum in the FFT form, the dense matrix in the dense form; ``impl`` picks the form). ``dense_weights()``
gives the ``torch.nn.LSTM`` / ``GRU`` state dict of the same function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .block_circulant import BlockCirculantLinear, check_block_size, check_impl

__all__ = ["BlockCirculantLSTM", "BlockCirculantGRU", "BlockCirculantRNNBase"]


def _projection(in_size: int, out_size: int, block_size: int | None, bias: bool, impl: str, device,
                dtype) -> nn.Module:
    if block_size is None:
        return nn.Linear(in_size, out_size, bias=bias, device=device, dtype=dtype)
    return BlockCirculantLinear(in_size, out_size, block_size, bias=bias, impl=impl, device=device, dtype=dtype)


def _weight(projection: nn.Module) -> torch.Tensor:
    """The dense weight [out, in] of a projection (nn.Linear or BlockCirculantLinear)."""
    return projection.dense_weight() if isinstance(projection, BlockCirculantLinear) else projection.weight


class BlockCirculantRNNBase(nn.Module):
    """Shared part of :class:`BlockCirculantLSTM` and :class:`BlockCirculantGRU` (not used directly).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first: as ``torch.nn.LSTM`` / ``GRU``
            (no dropout, no bidirectional, no proj_size).
        block_size: k of every projection (an int, at most ``max(in, G * hidden)`` of each), or None for
            dense ``nn.Linear`` projections.
        impl: the block-circulant projections' product form, "auto" (default), "fft" or "dense"
            (:class:`dnr.nn.BlockCirculantLinear`; the same function either way).
    """

    gates: int = 0
    torch_class: type = nn.Module

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, block_size: int | None,
                 bias: bool = True, batch_first: bool = False, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_impl(impl, subject=f"{name}: impl")
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be an int >= 1, got {value!r}")
        if block_size is not None:
            check_block_size(block_size, subject=f"{name}: block_size")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first = bias, batch_first
        width = self.gates * hidden_size
        layers = []
        for layer in range(num_layers):
            cell = nn.Module()
            cell.ih = _projection(input_size if layer == 0 else hidden_size, width, block_size, bias, impl, device,
                                  dtype)
            cell.hh = _projection(hidden_size, width, block_size, bias, impl, device, dtype)
            layers.append(cell)
        self.layers = nn.ModuleList(layers)
        # torch's init: every weight and bias U(-1/sqrt(hidden), 1/sqrt(hidden)) (the FFT form stores vectors:
        # each dense entry is one vector entry, so the dense-equivalent matrix has the same distribution)
        bound = hidden_size ** -0.5
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    # ------------------------------------------------------------------ structure
    @property
    def block_size(self) -> int | None:
        """k of the projections (None while they are dense ``nn.Linear``, or when they differ: see ``block_sizes``)."""
        sizes = set(self.block_sizes().values())
        return sizes.pop() if len(sizes) == 1 else None

    def block_sizes(self) -> dict[str, int | None]:
        """Per projection (``"layers.0.ih"``, ...): its block size, or None for a dense one."""
        return {f"layers.{l}.{kind}": getattr(getattr(cell, kind), "block_size", None)
                for l, cell in enumerate(self.layers) for kind in ("ih", "hh")}

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """The state dict of the equivalent ``torch.nn.LSTM`` / ``GRU`` (``weight_ih_l0``, ``weight_hh_l0``,
        ``bias_ih_l0``, ``bias_hh_l0``, ...): detached copies, same device and dtype."""
        out = {}
        with torch.no_grad():
            for l, cell in enumerate(self.layers):
                out[f"weight_ih_l{l}"] = _weight(cell.ih).detach().clone()
                out[f"weight_hh_l{l}"] = _weight(cell.hh).detach().clone()
                if self.bias:
                    out[f"bias_ih_l{l}"] = cell.ih.bias.detach().clone()
                    out[f"bias_hh_l{l}"] = cell.hh.bias.detach().clone()
        return out

    def to_dense(self) -> nn.Module:
        """A ``torch.nn.LSTM`` / ``GRU`` computing the same function (``dense_weights()`` loaded)."""
        w = next(self.parameters())
        plain = self.torch_class(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                                 batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        plain.load_state_dict(self.dense_weights())
        return plain.train(self.training)

    @classmethod
    def from_dense(cls, rnn: nn.Module, block_size: int | None, *, impl: str = "auto"):
        """A layer with ``rnn``'s (a ``torch.nn.LSTM`` / ``GRU``) sizes, device and dtype whose projections start
        from ``rnn``'s weights projected onto block-circulant matrices (``block_size=None``: copied).

        Raises:
            ValueError: a bidirectional, dropout or proj_size ``rnn`` (not supported).
        """
        if not isinstance(rnn, cls.torch_class):
            raise TypeError(f"{cls.__name__}.from_dense: expected a torch.nn.{cls.torch_class.__name__}, "
                            f"got {type(rnn).__name__}")
        if rnn.bidirectional or rnn.dropout or getattr(rnn, "proj_size", 0):
            raise ValueError(f"{cls.__name__}.from_dense: bidirectional, dropout and proj_size are not supported, got "
                             f"bidirectional={rnn.bidirectional}, dropout={rnn.dropout}, "
                             f"proj_size={getattr(rnn, 'proj_size', 0)}")
        w = rnn.weight_ih_l0
        new = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, block_size=None, bias=rnn.bias,
                  batch_first=rnn.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for l, cell in enumerate(new.layers):
                for kind in ("ih", "hh"):
                    proj = getattr(cell, kind)
                    proj.weight.copy_(getattr(rnn, f"weight_{kind}_l{l}"))
                    if rnn.bias:
                        proj.bias.copy_(getattr(rnn, f"bias_{kind}_l{l}"))
                    if block_size is not None:
                        setattr(cell, kind, BlockCirculantLinear.from_dense(proj, block_size, impl=impl))
        return new.train(rnn.training)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> tuple[torch.Tensor, bool]:
        name = type(self).__name__
        if isinstance(x, PackedSequence):
            raise TypeError(f"{name}: PackedSequence input is not supported; pass a padded tensor "
                            "(torch.nn.utils.rnn.pad_packed_sequence) and read each sequence's output at its length")
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: input must be a tensor [T, B, {self.input_size}] (batch_first: [B, T, "
                             f"{self.input_size}]) or unbatched [T, {self.input_size}], got {shape}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has {x.shape[-1]} features, expected input_size={self.input_size}")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(0)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        # batch-major [B, T, input_size]: the input projection's output [B, T, G*H] is per example in its first
        # dimension, as the FLOP counters' forward hooks read it (dnr.density_report, circulant_report)
        return x, batched

    def _check_state(self, h: torch.Tensor | None, batch: int, like: torch.Tensor, batched: bool,
                     what: str) -> torch.Tensor:
        shape = (self.num_layers, batch, self.hidden_size)
        if h is None:
            return like.new_zeros(shape)
        h = h if batched else h.unsqueeze(1)
        if tuple(h.shape) != shape:
            raise ValueError(f"{type(self).__name__}: {what} must have shape {shape if batched else (shape[0], shape[2])}, "
                             f"got {tuple(h.shape if batched else h.squeeze(1).shape)}")
        return h

    def _run(self, x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, T, input_size], states: per state kind (h, and c for the LSTM) [L, B, H] ->
        output [B, T, H] of the last layer and the final states in the same layout."""
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        out = x
        for l, cell in enumerate(self.layers):
            pre = cell.ih(out)  # [B, T, G*H]: the whole sequence's input projection at once
            state = [s[l] for s in states]
            outputs = []
            hh = cell.hh
            # a block-circulant hidden projection transforms its weight once per sequence, not once per step
            kwargs = {"prepared": hh.prepare(state[0])} if isinstance(hh, BlockCirculantLinear) else {}
            for t in range(pre.shape[1]):
                state = self.step(pre[:, t], hh(state[0], **kwargs), state)
                outputs.append(state[0])
            out = torch.stack(outputs, dim=1)
            for kind, s in enumerate(state):
                finals[kind].append(s)
        return out, [torch.stack(f) for f in finals]

    def step(self, gi: torch.Tensor, gh: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """One time step from the input and hidden pre-activations gi, gh [B, G*H]; returns the new state."""
        raise NotImplementedError

    def _finish(self, out: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, block_size={self.block_size}, "
                f"bias={self.bias}, batch_first={self.batch_first}")


class BlockCirculantLSTM(BlockCirculantRNNBase):
    """``torch.nn.LSTM`` with block-circulant weight matrices (see the module docstring).

    Shapes (as ``torch.nn.LSTM``): input [T, B, input_size] ([B, T, input_size] with ``batch_first``; [T,
    input_size] unbatched), optional ``(h_0, c_0)`` [num_layers, B, hidden_size] each -> ``(output, (h_n, c_n))``,
    output [T, B, hidden_size] (batch_first: [B, T, hidden_size]). PackedSequence: a TypeError.

    Gates (torch's): i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); c_t = sigmoid(f) c_{t-1}
    + sigmoid(i) tanh(g); h_t = sigmoid(o) tanh(c_t).
    """

    gates = 4
    torch_class = nn.LSTM

    def step(self, gi, gh, state):
        h, c = state
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return [torch.sigmoid(o) * torch.tanh(c), c]

    def forward(self, x, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        x, batched = self._check_input(x)
        h0, c0 = (None, None) if hx is None else hx
        h0 = self._check_state(h0, x.shape[0], x, batched, "h_0")
        c0 = self._check_state(c0, x.shape[0], x, batched, "c_0")
        out, (h, c) = self._run(x, [h0, c0])
        if not batched:
            h, c = h.squeeze(1), c.squeeze(1)
        return self._finish(out, batched), (h, c)


class BlockCirculantGRU(BlockCirculantRNNBase):
    """``torch.nn.GRU`` with block-circulant weight matrices (see the module docstring).

    Shapes (as ``torch.nn.GRU``): input [T, B, input_size] ([B, T, input_size] with ``batch_first``), optional
    h_0 [num_layers, B, hidden_size] -> ``(output, h_n)``. PackedSequence: a TypeError.

    Gates (torch's): r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r (W_hn h + b_hn)), h_t = (1 - z) n + z h_{t-1}.
    """

    gates = 3
    torch_class = nn.GRU

    def step(self, gi, gh, state):
        (h,) = state
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return [(1 - z) * n + z * h]

    def forward(self, x, hx: torch.Tensor | None = None):
        x, batched = self._check_input(x)
        h0 = self._check_state(hx, x.shape[0], x, batched, "h_0")
        out, (h,) = self._run(x, [h0])
        return self._finish(out, batched), (h if batched else h.squeeze(1))
