"""CaP: cascaded projection (Minnehan and Savakis, CVPR 2019), optionally robust.

``cascaded_projection(model, data, ranks=... | flop_ratio=...)`` returns a plain, physically smaller
network. Per channel space (``dnr.compress.spaces``: the output channels of a conv / linear layer
with its BatchNorm folded in, and the input channels of the layers that read them; the channels
feeding a residual sum are one space) it learns P (c x r, orthonormal columns), and the network keeps
P^T W for the producers and V P for the consumers (``dnr.compress.projected``).

1. Initialisation: the top-r principal directions of the space's features on a calibration batch
   (the consumers' inputs in the original network, pixels as samples), *uncentred* (eigenvectors of
   the second-moment matrix E[a a^T]) because the projection has no offset: they minimise the
   reconstruction error E||a - P P^T a||^2.
2. Training (``steps`` > 0): every projection is a proxy matrix, updated by SGD on
   ``CE + gamma * reconstruction`` (with ``adversarial``: the hybrid loss ``beta * CE(clean) +
   (1 - beta) * CE(PGD)`` of the projected network instead of CE; robust CaP goes beyond the paper)
   and retracted to orthonormal columns after every step by the QR retraction, P = Q diag(sign(diag R))
   for M = QR (the sign fix makes it unique and continuous; it is the identity on matrices that are
   already orthonormal). ``reconstruction`` is, averaged over the (space, consumer) pairs, the relative
   squared error of the consumer's features: ||V a - V P a'||^2 / ||V a||^2, with V the consumer's
   original weight, a its input in the original network and a' its (r-channel) input in the projected
   one, so the error of every earlier projection cascades into it.
3. The result: plain ``nn.Conv2d`` / ``nn.Linear`` layers holding the products (``dnr export`` takes
   it like a compacted model); fine-tune it afterwards (the ``cap`` method does, with ``keep_norms``:
   a BatchNorm on each projected producer's r channels, calibrated to the identity, so the fine-tuning
   trains with the normalisation the dense model had).

Ranks: ``ranks`` maps a producer layer's name to r (any producer of a shared residual space names it;
two different ranks for one space are an error), or ``flop_ratio`` in (0, 1] gives the fraction of the
dense conv + linear FLOPs to keep, allocated by one rule: every projectable space keeps the same
fraction f of its channels (r = max(1, round(f c))), with f the largest fraction whose predicted FLOPs
meet the target (bisection). A space at full rank is not projected: a rotation of the whole space
removes nothing and, through a ReLU, would only change the function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import pgd
from ..losses import hybrid_loss
from .projected import build_projected, calibrate_norms, predict_cost
from .spaces import ProjectionError, SpacePlan, find_projection_spaces

__all__ = ["cascaded_projection", "allocate_ranks", "resolve_ranks", "qr_retraction", "pca_projections",
           "AdversarialTerm"]


@dataclass(frozen=True)
class AdversarialTerm:
    """The adversarial part of robust CaP's loss: PGD (L-inf ``eps``, step ``alpha``, ``steps`` steps, on
    the projected network in eval mode) and the hybrid loss's clean weight ``beta``."""

    eps: float
    alpha: float
    steps: int
    beta: float = 0.5


def qr_retraction(m: torch.Tensor) -> torch.Tensor:
    """The QR retraction of ``m`` [c, r] (c >= r) onto orthonormal columns: Q diag(sign(diag R))."""
    q, r = torch.linalg.qr(m)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def _check_ratio(flop_ratio) -> float:
    if isinstance(flop_ratio, bool) or not isinstance(flop_ratio, (int, float)) or not math.isfinite(flop_ratio) \
            or not 0.0 < flop_ratio <= 1.0:
        raise ProjectionError(f"flop_ratio: got {flop_ratio!r}, expected a number in (0, 1] (the fraction of the "
                              "dense FLOPs to keep, 0.5 = 2x fewer)")
    return float(flop_ratio)


def resolve_ranks(plan: SpacePlan, ranks: Mapping[str, int]) -> dict[str, int]:
    """Per-layer ranks (producer name -> r) as space name -> r, checked: every name a producer, r an int
    in [1, c], one rank per space, the space projectable. Full-rank spaces are left out."""
    if not isinstance(ranks, Mapping):
        raise ProjectionError(f"ranks: got {type(ranks).__name__}, expected a mapping layer name -> rank")
    out: dict[str, int] = {}
    given: dict[str, str] = {}
    for layer, r in ranks.items():
        space = plan.space_for_layer(layer)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= space.channels:
            raise ProjectionError(f"layer {layer!r}: rank {r!r} is invalid, expected an integer in [1, "
                                  f"{space.channels}] (its output channels)")
        if space.name in given and out.get(space.name, space.channels) != r:
            raise ProjectionError(f"layer {layer!r}: rank {r} differs from the rank {out.get(space.name, r)} given "
                                  f"for layer {given[space.name]!r}, which feeds the same residual sum "
                                  "(they share one projection)")
        given[space.name] = layer
        if space.problem is not None and r < space.channels:
            raise ProjectionError(f"layer {layer!r}: its output channels cannot be projected: {space.problem}")
        if r < space.channels:
            out[space.name] = r
    return out


def allocate_ranks(plan: SpacePlan, flop_ratio: float) -> dict[str, int]:
    """The ranks (space name -> r) for ``flop_ratio`` by the uniform-fraction rule (module docstring).

    Raises ProjectionError when the ratio is outside (0, 1] or unreachable (rank 1 everywhere keeps
    more FLOPs than asked)."""
    ratio = _check_ratio(flop_ratio)
    spaces = plan.projectable()
    dense = predict_cost(plan, {})["flops_dense"]

    def ranks_at(f: float) -> dict[str, int]:
        return {s.name: max(1, min(s.channels, round(f * s.channels))) for s in spaces}

    def fits(f: float) -> bool:
        return predict_cost(plan, ranks_at(f))["flops"] <= ratio * dense

    if ratio >= 1.0:
        return {}
    if not spaces or not fits(0.0):
        smallest = predict_cost(plan, ranks_at(0.0))["flops"]
        raise ProjectionError(f"flop_ratio: got {ratio}, but projecting every projectable space to rank 1 keeps "
                              f"{smallest / dense:.4f} of the dense FLOPs (the layers outside them stay); "
                              f"projectable spaces: {[s.name for s in spaces]}")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {k: v for k, v in ranks_at(lo).items() if v < plan.spaces[k].channels}


def _batches(data) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, y) batches of ``data``: a tensor of inputs, an (x, y) pair, or an iterable of (x, y)."""
    if isinstance(data, torch.Tensor):
        return [(data, None)]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(data[0], data[1])]
    return data


class _Taps:
    """Forward pre-hooks that keep the input of each named module (the consumers) of the last call."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in set(names):
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: self.inputs.__setitem__(name, args[0])))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _samples(a: torch.Tensor, channels: int, hw: int) -> torch.Tensor:
    """A consumer input as [samples, c]: pixels of a feature map, or the c x hw view of a flat input."""
    if a.dim() == 2:
        return a.reshape(a.shape[0], channels, hw).transpose(1, 2).reshape(-1, channels)
    return a.transpose(0, 1).reshape(channels, -1).t()


@torch.no_grad()
def pca_projections(plan: SpacePlan, ranks: Mapping[str, int], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Initial projections: per space, the top-r eigenvectors of E[a a^T] over the space's consumer
    inputs ``a`` in the original network on the batch ``x`` (float64 eigen-decomposition; each column's
    largest entry made positive so the result is deterministic). Returns space name -> P [c, r]."""
    taps = _Taps(plan.gm, [c for s in ranks for c in plan.spaces[s].consumers])
    try:
        plan.gm(x)
    finally:
        taps.remove()
    out = {}
    for name, r in ranks.items():
        space = plan.spaces[name]
        if not space.consumers:
            raise ProjectionError(f"layer {name!r}: no conv/linear layer reads its output channels, so there is "
                                  "nothing to project them for")
        seen, feats = set(), []
        for c in space.consumers:  # one sample set per distinct tensor (two consumers may read one)
            if space.taps[c] in seen:
                continue
            seen.add(space.taps[c])
            feats.append(_samples(taps.inputs[c], space.channels, space.flat[c]).double())
        a = torch.cat(feats)
        moment = a.t() @ a / max(1, a.shape[0])
        _, vectors = torch.linalg.eigh(moment)
        p = vectors[:, -r:].flip(1)
        idx = p.abs().argmax(0)
        p = p * torch.where(p[idx, torch.arange(r)] < 0, -1.0, 1.0).to(p.dtype)
        out[name] = p.to(x.dtype)
    return out


def _reconstruction(plan: SpacePlan, ranks, projections, ref_inputs, new_inputs) -> torch.Tensor:
    """Mean over (space, consumer) of ||V a - V P a'||^2 / ||V a||^2 (see the module docstring)."""
    modules = dict(plan.gm.named_modules())
    terms = []
    for name in ranks:
        space, p = plan.spaces[name], projections[name]
        for c in space.consumers:
            layer, a, a_new = modules[c], ref_inputs[c], new_inputs[c]
            hw = space.flat[c]
            if a_new.dim() == 2:  # [B, r*hw] -> [B, c*hw]
                b = a_new.shape[0]
                lifted = torch.einsum("brh,cr->bch", a_new.reshape(b, -1, hw), p).reshape(b, -1)
            else:
                lifted = torch.einsum("brhw,cr->bchw", a_new, p)
            diff = a - lifted
            if isinstance(layer, nn.Conv2d):
                ref = F.conv2d(a, layer.weight, None, layer.stride, layer.padding, layer.dilation)
                err = F.conv2d(diff, layer.weight, None, layer.stride, layer.padding, layer.dilation)
            else:
                ref, err = F.linear(a, layer.weight), F.linear(diff, layer.weight)
            terms.append(err.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def cascaded_projection(model: nn.Module, data, *, ranks: Mapping[str, int] | None = None,
                        flop_ratio: float | None = None, steps: int = 0, lr: float = 0.01,
                        momentum: float = 0.9, gamma: float = 1.0, adversarial: AdversarialTerm | None = None,
                        calibration_size: int = 512, generator: torch.Generator | None = None,
                        keep_norms: bool = False) -> nn.Module:
    """Compress ``model`` by cascaded projection into a plain, smaller network (module docstring).

    Args:
        model: a dense model (conv / linear layers, BatchNorm after its conv; not modified). Its dtype
            and device are those of the computation.
        data: a tensor of inputs [N, *input_size] (only with ``steps=0``), an (x, y) pair, or an iterable
            of (x, y) batches (a DataLoader); its first ``calibration_size`` inputs are the calibration
            batch, and ``steps`` training steps cycle over its batches.
        ranks: producer layer name -> rank; or ``flop_ratio``: fraction of the dense FLOPs to keep, in
            (0, 1]. Exactly one of the two.
        steps: SGD steps on the projections (0: the PCA initialisation only).
        lr, momentum: of the projections' SGD.
        gamma: weight of the reconstruction term.
        adversarial: an :class:`AdversarialTerm` for robust CaP (None: the clean CE).
        calibration_size: inputs of the calibration batch.
        generator: for the PGD random starts (None: the global stream).
        keep_norms: keep a BatchNorm on the projected channels of each producer whose BatchNorm is folded,
            calibrated on the calibration batch to be the identity there (``build_projected``'s
            ``keep_norms``; the function is unchanged). False, the paper's form: the norms are folded away.
            True suits a network that will be fine-tuned with the dense model's learning rate.

    Returns:
        an eval-mode ``torch.fx.GraphModule`` of plain layers, input [B, *input_size] -> the model's
        output; ``result.dnr_projection`` holds ``ranks`` (space name -> r), ``spaces`` (space name ->
        its producers), ``norms`` (the kept BatchNorms' names), the predicted ``flops`` / ``params`` and
        their dense values, and ``losses`` (per training step).

    Raises:
        ProjectionError: bad ranks or ratio, or a rank on a structure the projection cannot pass (named).
    """
    if (ranks is None) == (flop_ratio is None):
        raise ProjectionError("cascaded_projection: give exactly one of ranks (per layer) and flop_ratio")
    if flop_ratio is not None:
        _check_ratio(flop_ratio)
    for arg, value, ok in (("steps", steps, isinstance(steps, int) and steps >= 0),
                           ("calibration_size", calibration_size, isinstance(calibration_size, int) and calibration_size >= 1),
                           ("lr", lr, lr > 0), ("gamma", gamma, gamma >= 0), ("momentum", momentum, 0 <= momentum < 1),
                           ("keep_norms", keep_norms, isinstance(keep_norms, bool))):
        if not ok:
            raise ProjectionError(f"cascaded_projection: {arg} got {value!r}, expected "
                                  + {"steps": "an integer >= 0", "calibration_size": "an integer >= 1",
                                     "lr": "a number > 0", "gamma": "a number >= 0", "momentum": "a number in [0, 1)",
                                     "keep_norms": "True or False"}[arg])
    batches = _batches(data)
    first = next(iter(batches), None)
    if first is None:
        raise ProjectionError("cascaded_projection: data holds no batch")
    if steps > 0 and first[1] is None:
        raise ProjectionError("cascaded_projection: steps > 0 needs labels: give data as (x, y) or batches of (x, y)")
    ref = next(iter(model.parameters()))
    calib, n = [], 0
    for x, _ in batches:
        calib.append(x)
        n += x.shape[0]
        if n >= calibration_size:
            break
    x_cal = torch.cat(calib)[:calibration_size].to(ref.device, ref.dtype)
    plan = find_projection_spaces(model, x_cal[:1])
    chosen = resolve_ranks(plan, ranks) if ranks is not None else allocate_ranks(plan, flop_ratio)
    projections = pca_projections(plan, chosen, x_cal)
    losses: list[float] = []
    if steps > 0 and chosen:
        proxies = {k: p.clone().requires_grad_(True) for k, p in projections.items()}
        net = build_projected(plan, proxies, differentiable=True)
        optimizer = torch.optim.SGD(list(proxies.values()), lr=lr, momentum=momentum)
        consumers = [c for s in chosen for c in plan.spaces[s].consumers]
        ref_taps, new_taps = _Taps(plan.gm, consumers), _Taps(net, consumers)
        try:
            step = 0
            while step < steps:
                for x, y in batches:
                    if step >= steps:
                        break
                    x, y = x.to(ref.device, ref.dtype), y.to(ref.device)
                    with torch.no_grad():
                        plan.gm(x)
                    if adversarial is not None:
                        x_adv = pgd(net, x, y, adversarial.eps, adversarial.alpha, adversarial.steps,
                                    generator=generator)
                        adv_logits = net(x_adv)
                        logits = net(x)  # last: the taps hold the clean inputs
                        task = hybrid_loss(logits, adv_logits, y, beta=adversarial.beta)
                    else:
                        task = F.cross_entropy(net(x), y)
                    loss = task + gamma * _reconstruction(plan, chosen, proxies, ref_taps.inputs, new_taps.inputs)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        for p in proxies.values():
                            p.copy_(qr_retraction(p))
                    losses.append(float(loss.detach()))
                    step += 1
        finally:
            ref_taps.remove()
            new_taps.remove()
        projections = {k: p.detach() for k, p in proxies.items()}
    kept = sorted(plan.folded_norms(chosen)) if keep_norms else []
    result = build_projected(plan, projections, keep_norms=kept)
    if kept:
        calibrate_norms(result, kept, x_cal)
    cost = predict_cost(plan, chosen, kept)
    result.dnr_projection = {"ranks": dict(chosen), "channels": {k: plan.spaces[k].channels for k in chosen},
                             "spaces": {s.name: list(s.producers) for s in plan.spaces.values()}, "norms": kept,
                             "flops": cost["flops"], "flops_dense": cost["flops_dense"], "params": cost["params"],
                             "params_dense": cost["params_dense"], "losses": losses}
    result.dnr_projections = projections
    return result
