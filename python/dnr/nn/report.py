"""``density_report(model)``: per-layer and global density, parameter counts and FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Sequence

import torch
from torch import nn

from .masked import MaskedLayer

__all__ = ["density_report", "DensityReport", "LayerDensity"]


@dataclasses.dataclass
class LayerDensity:
    """One conv/linear layer of the report. MACs are per example (multiply-accumulates)."""

    name: str
    kind: str
    shape: tuple
    masked: bool
    prunable: int
    active: int
    active_channels: int
    channels: int
    effective_active: int | None = None
    macs_dense: int | None = None
    macs_masked: int | None = None
    macs_effective: int | None = None

    @property
    def density(self) -> float:
        return self.active / self.prunable if self.prunable else 1.0


@dataclasses.dataclass
class DensityReport:
    """Global sparsity summary of a model.

    ``prunable``/``active`` count the weights of the masked layers (N and K); ``total_params`` counts
    every parameter of the model and ``nonzero_params`` those not removed by a mask. FLOPs are 2 x
    MACs of the conv and linear layers for one example of ``input_size`` (None without an input size).
    "Effective" counts also drop weights that only read input channels that are structurally zero (the
    outputs of pruned channels, found by probing a copy of the model whose non-zero parameters are
    redrawn at random), i.e. what physical compaction would remove.
    """

    layers: list[LayerDensity]
    prunable: int
    active: int
    total_params: int
    nonzero_params: int
    input_size: tuple | None
    effective_active: int | None = None
    flops_dense: int | None = None
    flops_masked: int | None = None
    flops_effective: int | None = None

    @property
    def density(self) -> float:
        return self.active / self.prunable if self.prunable else 1.0

    @property
    def effective_density(self) -> float | None:
        if self.effective_active is None:
            return None
        return self.effective_active / self.prunable if self.prunable else 1.0

    @property
    def compression(self) -> float:
        """Prunable weights over active weights (20.0 means 20x)."""
        return self.prunable / max(1, self.active)

    @property
    def compression_total(self) -> float:
        """All parameters over non-pruned parameters (biases and norm layers included)."""
        return self.total_params / max(1, self.nonzero_params)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("density", "effective_density", "compression", "compression_total"):
            out[key] = getattr(self, key)
        for layer, row in zip(self.layers, out["layers"]):
            row["density"] = layer.density
        return out

    def __str__(self) -> str:
        head = f"{'layer':<28} {'kind':<7} {'shape':<20} {'active/prunable':>22} {'density':>8} {'channels':>10}"
        lines = [head, "-" * len(head)]
        for l in self.layers:
            shape = "x".join(str(s) for s in l.shape)
            tag = "" if l.masked else " (dense)"
            lines.append(
                f"{l.name[:28]:<28} {l.kind:<7} {shape:<20} {l.active:>10}/{l.prunable:<11} "
                f"{l.density:>8.4f} {l.active_channels:>4}/{l.channels:<5}{tag}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"masked layers: {self.active}/{self.prunable} weights, density {self.density:.4f}, "
            f"compression {self.compression:.1f}x"
        )
        lines.append(
            f"all parameters: {self.nonzero_params}/{self.total_params} non-pruned "
            f"({self.compression_total:.1f}x)"
        )
        if self.effective_active is not None:
            lines.append(f"effective density (dead input channels removed): {self.effective_density:.4f}")
        if self.flops_dense is not None:
            lines.append(
                f"FLOPs per example at input {tuple(self.input_size)}: dense {self.flops_dense:,}, "
                f"masked {self.flops_masked:,}, effective {self.flops_effective:,} "
                f"({self.flops_dense / max(1, self.flops_effective):.1f}x fewer)"
            )
        return "\n".join(lines)


@torch.no_grad()
def density_report(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    probe_batch: int = 2,
) -> DensityReport:
    """Density, parameter counts and (with an input size) dense/masked/effective FLOPs of ``model``.

    Args:
        model: any module; masked layers are counted as pruned, other conv/linear layers as dense.
        input_size: shape of ONE example without the batch dim, e.g. (3, 32, 32); enables FLOPs.
        example_input: a batch [B, *input_size] of positive values to probe with (default: uniform in [0.5, 1.5)).
        probe_batch: batch size of the noise probe.

    Returns:
        DensityReport (``print(report)`` gives a table; ``report.to_dict()`` a JSON-ready dict).
    """
    if input_size is not None:
        input_size = tuple(int(s) for s in input_size)
        if not input_size or any(s < 1 for s in input_size):
            raise ValueError(f"input_size must be a non-empty sequence of positive ints, got {input_size}")
    layers = []
    rows: dict[nn.Module, LayerDensity] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        masked = isinstance(m, MaskedLayer)
        w = m.weight
        mask = m.mask if masked else None
        row = LayerDensity(
            name=name or type(m).__name__, kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            shape=tuple(w.shape), masked=masked, prunable=w.numel() if masked else 0,
            active=int(mask.sum()) if masked else 0,
            active_channels=int(mask.reshape(w.shape[0], -1).any(1).sum()) if masked else w.shape[0],
            channels=w.shape[0],
        )
        layers.append(row)
        rows[m] = row
    prunable = sum(r.prunable for r in layers)
    active = sum(r.active for r in layers)
    total = sum(p.numel() for p in model.parameters())
    report = DensityReport(layers=layers, prunable=prunable, active=active, total_params=total,
                           nonzero_params=total - (prunable - active), input_size=input_size)
    if input_size is None and example_input is None:
        return report
    if example_input is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        gen = torch.Generator(device="cpu").manual_seed(0)
        example_input = torch.rand((probe_batch, *input_size), generator=gen).add_(0.5).to(device)
    report.input_size = tuple(example_input.shape[1:])
    _count_flops(model, rows, example_input)
    report.effective_active = sum(r.effective_active for r in layers if r.masked)
    report.flops_dense = 2 * sum(r.macs_dense or 0 for r in layers)
    report.flops_masked = 2 * sum(r.macs_masked or 0 for r in layers)
    report.flops_effective = 2 * sum(r.macs_effective or 0 for r in layers)
    return report


def _count_flops(model: nn.Module, rows: dict, example: torch.Tensor) -> None:
    """Run ``example`` through a structural twin of ``model`` and fill the MAC counts of ``rows``.

    The twin (a float64 deep copy in eval mode) keeps every exactly-zero parameter at zero (and every
    masked weight at zero) and makes everything else positive: live weights are positive and each
    output row sums to 1, norm layers have unit scale and centred statistics, input normalisation is
    the identity, and the probe input is positive. Through conv, linear, norm, ReLU, pooling and
    residual sums every live activation is then strictly positive, so an activation is zero for the
    probe exactly when the structure (masks, masked biases and norm scales) forces it.
    """
    from .normalize import Normalize  # local: normalize is a sibling module

    twin = copy.deepcopy(model).double().eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    masked_weights = {id(m.weight): m.mask for m in twin.modules() if isinstance(m, MaskedLayer)}
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            if isinstance(m, Normalize):
                m.mean.zero_()
                m.std.fill_(1.0)
        for name, p in twin.named_parameters():
            keep = masked_weights.get(id(p), p != 0)
            if p.dim() > 1:
                w = torch.rand(p.shape, generator=gen, dtype=p.dtype).add_(0.5).to(p.device) * keep
                rows_sum = w.reshape(w.shape[0], -1).sum(1).clamp_min(1e-300)
                p.copy_(w / rows_sum.reshape(-1, *([1] * (w.dim() - 1))))
            else:  # norm scales -> 1, biases and shifts -> a small positive constant, zeros stay zero
                value = 1.0 if name.rpartition(".")[2] == "weight" else 1e-3
                p.copy_(keep.to(p.dtype) * value)
    twin_rows = {t: rows[m] for m, t in zip(model.modules(), twin.modules()) if m in rows}
    handles = []
    called: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        row = twin_rows[module]
        x = inputs[0]
        w = module.weight
        mask = module.mask if isinstance(module, MaskedLayer) else torch.ones_like(w, dtype=torch.bool)
        live = _live_weights(module, x, mask)
        if isinstance(module, nn.Conv2d):
            positions = output.shape[-2] * output.shape[-1]  # output pixels per example
        else:
            positions = output[0].numel() // output.shape[-1] if output.dim() > 1 else 1
        # summed over calls: a layer applied several times per example (a recurrent cell's hidden projection,
        # once per time step) costs each call's MACs (issue 17)
        calls = called.setdefault(module, 0)
        called[module] = calls + 1
        previous = (row.macs_dense, row.macs_masked, row.macs_effective) if calls else (0, 0, 0)
        row.macs_dense = previous[0] + positions * w.numel()
        row.macs_masked = previous[1] + positions * int(mask.sum())
        row.effective_active = int(live.sum()) if row.masked else None
        row.macs_effective = previous[2] + positions * int(live.sum())

    for module in twin_rows:
        handles.append(module.register_forward_hook(hook))
    try:
        twin(example.double())
    finally:
        for h in handles:
            h.remove()


def _live_weights(module: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask of active weights whose input channel is not identically zero in the probe batch."""
    if isinstance(module, nn.Conv2d):
        live_in = x.ne(0).transpose(0, 1).reshape(x.shape[1], -1).any(dim=1)  # [C_in]
        groups = module.groups
        out_ch, in_per_group = mask.shape[:2]
        group_of_out = torch.arange(out_ch, device=mask.device) // (out_ch // groups)
        live = live_in.reshape(groups, in_per_group)[group_of_out]  # [C_out, C_in/groups]
        return mask & live[:, :, None, None]
    live_in = x.ne(0).reshape(-1, x.shape[-1]).any(dim=0)  # [in_features]
    return mask & live_in[None, :]
