"""CaP as a compression method: dense adversarial training -> cascaded projection -> adversarial fine-tuning.

    cap         the projections trained on CE + gamma * reconstruction (the paper's objective)
    cap-robust  the same with the hybrid clean + PGD loss in place of CE (robust CaP, beyond the paper)

Like the phased pruning baselines (``phased = True``), the first ``cfg.pre_epochs`` epochs train the
dense model with the run's attack; at the end of the last of them ``dnr.compress.cascaded_projection``
replaces the network by its projected, physically smaller version, and the remaining epochs fine-tune
it with the learning-rate schedule restarted. The projected network keeps a BatchNorm on the r channels
of each projected producer whose BatchNorm the projection folded (``cascaded_projection``'s
``keep_norms``, calibrated to the identity): the folded network alone computes the same function, but
fine-tuned at the dense model's learning rate it can diverge in its first steps (defaults revision 1;
docs/cap/README.md, "Fine-tuning with the BatchNorms kept"). The model the harness holds is a :class:`ProjectedNetwork`
wrapper whose ``net`` is swapped at the projection (the optimizer is re-pointed at the new parameters,
its momentum reset). Options (``TrainConfig``): ``cap_flops`` (fraction of the dense FLOPs kept;
default ``density``) or ``cap_ranks`` ("layer=rank" pairs), ``cap_steps``, ``cap_lr``, ``cap_gamma``,
``cap_calibration``.

A saved projected model is rebuilt from its state dict's shapes (``restructure``), so resuming, ``dnr eval``
and ``dnr export`` need nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compress import AdversarialTerm, build_projected, cascaded_projection, find_projection_spaces
from ..compress.cap import allocate_ranks, resolve_ranks
from ..nn import density_report
from .base import CompressionMethod
from .registry import register

__all__ = ["ProjectedNetwork", "CascadedProjection", "RobustCascadedProjection", "parse_cap_ranks"]


class ProjectedNetwork(nn.Module):
    """The model a ``cap`` run trains: ``net`` is the dense network, then its projected replacement.

    Shapes: those of ``net`` ([B, *input_size] -> logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def parse_cap_ranks(pairs) -> dict[str, int]:
    """``["features.0=8", ...]`` -> ``{"features.0": 8}``; ValueError naming a malformed pair."""
    out: dict[str, int] = {}
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        try:
            rank = int(value)
        except ValueError:
            rank = None
        if not sep or not name or rank is None:
            raise ValueError(f"option --cap-ranks: got {pair!r}, expected LAYER=RANK (e.g. features.0=8)")
        if name in out:
            raise ValueError(f"option --cap-ranks: layer {name!r} is given twice")
        out[name] = rank
    return out


@register("cap")
class CascadedProjection(CompressionMethod):
    description = "CaP: dense AT, cascaded projection to --cap-flops of the FLOPs, AT fine-tuning"
    phased = True
    density_axis = True  # dnr compare: a cell per density, read as the FLOP fraction kept (without --cap-flops)
    # 1: the projected network keeps BatchNorms on its projected channels for the fine-tuning (revision 0 folded
    # them away, and vgg_cnn at 4x fewer FLOPs collapsed to chance in its first fine-tuning steps)
    defaults_revision = 1
    robust = False  # the projections' loss: CE (cap) or the hybrid clean + PGD loss (cap-robust)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.projected = False
        self.history: list[dict] = []
        self.data = None
        self.input_size: tuple[int, ...] | None = None

    @classmethod
    def check_config(cls, cfg) -> str | None:
        if cfg.epochs < 2:
            return (f"option --epochs: got {cfg.epochs!r}, expected at least 2 for --method {cls.name} (a training "
                    "phase and a fine-tuning phase)")
        try:
            parse_cap_ranks(cfg.cap_ranks)
        except ValueError as err:
            return str(err)
        return None

    @property
    def flop_ratio(self) -> float:
        return self.cfg.cap_flops if self.cfg.cap_flops is not None else self.cfg.density

    # ------------------------------------------------------------------ model and data
    def prepare_model(self, model: nn.Module, *, seed: int) -> nn.Module:
        return model if isinstance(model, ProjectedNetwork) else ProjectedNetwork(model)

    def use_training_data(self, dataset, input_size: tuple[int, ...]) -> None:
        """Keep the training set: a seeded permutation's first ``cap_calibration`` examples are the
        projection's data."""
        self.data, self.input_size = dataset, tuple(input_size)

    def check_model(self, model: nn.Module, input_size: tuple[int, ...]) -> str | None:
        """The configured ranks or FLOP ratio checked against ``model`` (the layer named), before training."""
        net = model.net if isinstance(model, ProjectedNetwork) else model
        ref = next(net.parameters())
        try:
            plan = find_projection_spaces(net, torch.zeros((1, *input_size), device=ref.device, dtype=ref.dtype))
            ranks = parse_cap_ranks(self.cfg.cap_ranks)
            if ranks:
                resolve_ranks(plan, ranks)
            else:
                allocate_ranks(plan, self.flop_ratio)
        except ValueError as err:
            option = "--cap-ranks" if self.cfg.cap_ranks else ("--cap-flops" if self.cfg.cap_flops is not None
                                                                else "--density (the FLOP fraction of cap)")
            return f"option {option}: {err}"
        return None

    def projection_data(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``cap_calibration`` training examples (a permutation seeded by the run's seed), in batches."""
        cfg = self.cfg
        n = min(cfg.cap_calibration, len(self.data))
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(cfg.seed + 11))[:n]
        items = [self.data[int(i)] for i in order]
        x = torch.stack([torch.as_tensor(a) for a, _ in items]).to(device)
        y = torch.as_tensor([int(b) for _, b in items], dtype=torch.long, device=device)
        return [(x[i:i + cfg.batch_size], y[i:i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]

    def _install(self, model: ProjectedNetwork, net: nn.Module) -> None:
        """Swap the projected network into ``model``; if this method is attached to it, point the optimizer
        at the new parameters (momentum reset)."""
        model.net = net.train(model.training)
        if self.optimizer is not None and model is self.model:
            if len(self.optimizer.param_groups) != 1:
                raise RuntimeError("cap expects the harness's single optimizer parameter group")
            self.optimizer.param_groups[0]["params"] = list(self.model.parameters())
            self.optimizer.state.clear()

    def project(self, dense: nn.Module, *, keep_norms: bool = True) -> nn.Module:
        """The run's cascaded projection of ``dense`` (its ranks or FLOP ratio, projection steps, loss and
        calibration data, seeded by the run's seed), as the projection event computes it; ``keep_norms=False``
        gives defaults revision 0's form, the BatchNorms folded away (docs/cap/finetune_probe.py compares
        the two). ``dense`` is left in the mode it was in. Returns ``cascaded_projection``'s result."""
        cfg, was = self.cfg, dense.training
        ref = next(dense.parameters())
        ranks = parse_cap_ranks(cfg.cap_ranks)
        adversarial = AdversarialTerm(cfg.eps, cfg.alpha, cfg.attack_steps, cfg.beta) if self.robust else None
        try:
            return cascaded_projection(
                dense.eval(), self.projection_data(ref.device), ranks=ranks or None,
                flop_ratio=None if ranks else self.flop_ratio, steps=cfg.cap_steps, lr=cfg.cap_lr,
                gamma=cfg.cap_gamma, adversarial=adversarial, calibration_size=cfg.cap_calibration,
                generator=torch.Generator(device=ref.device).manual_seed(cfg.seed + 12), keep_norms=keep_norms)
        finally:
            dense.train(was)

    # ------------------------------------------------------------------ training hooks
    def epoch_end(self, epoch: int, *, last: bool) -> dict | None:
        if self.projected or epoch + 1 != self.cfg.pre_epochs:
            return None
        cfg = self.cfg
        result = self.project(self.model.net)
        info = result.dnr_projection
        self._install(self.model, result)
        self.projected = True
        record = {"method": cfg.method, "epoch": epoch + 1, "event": "projection", "ranks": info["ranks"],
                  "channels": info["channels"], "flops": info["flops"], "flops_dense": info["flops_dense"],
                  "params": info["params"], "params_dense": info["params_dense"],
                  "loss_first": info["losses"][0] if info["losses"] else None,
                  "loss_last": info["losses"][-1] if info["losses"] else None}
        self.history.append(record)
        return record

    def epoch_metrics(self, first_step: int, step: int) -> dict:
        """The metrics row's ``density`` once projected: the network's parameters over the dense model's (the
        same measure as ``report``); 1.0 (the row's default) before."""
        if not self.history:
            return {}
        return {"density": self.history[-1]["params"] / self.history[-1]["params_dense"]}

    def epoch_message(self, record: dict) -> str | None:
        return (f"epoch {record['epoch']}: {record['method']} projected {len(record['ranks'])} channel spaces to "
                f"{record['flops'] / record['flops_dense']:.3f} of the dense FLOPs ({record['params']:,} of "
                f"{record['params_dense']:,} parameters); fine-tuning the smaller network")

    def log_records(self) -> dict[str, list[dict]]:
        return {"projection.jsonl": list(self.history)}

    # ------------------------------------------------------------------ saved models
    def restructure(self, model: nn.Module, model_state: dict, *, input_size: tuple[int, ...]) -> None:
        """Rebuild the projected structure that ``model_state`` was saved from (its conv / linear shapes
        give the ranks; a projected producer's BatchNorm is kept on the r channels where the state holds it,
        as revision 1 saves, and absent where it was folded away, as revision 0 saved), so that the state
        dict loads strictly."""
        if not isinstance(model, ProjectedNetwork):
            return
        current = model.state_dict()
        if set(current) == set(model_state) and all(current[k].shape == model_state[k].shape for k in current):
            return  # the same structure (dense, or already rebuilt)
        ref = next(model.net.parameters())
        plan = find_projection_spaces(model.net, torch.zeros((1, *input_size), device=ref.device, dtype=ref.dtype))
        projections, kept = {}, []
        for space in plan.projectable():
            key = f"net.{space.producers[0]}.weight"
            if key in model_state and model_state[key].shape[0] < space.channels:
                r = model_state[key].shape[0]
                projections[space.name] = torch.eye(space.channels, r, device=ref.device, dtype=ref.dtype)
                kept += [n for p, n in space.norms.items() if f"net.{n}.running_mean" in model_state]
        self._install(model, build_projected(plan, projections, keep_norms=kept))
        self.projected = True

    # ------------------------------------------------------------------ results and state
    def report(self, model: nn.Module, input_size: tuple[int, ...] | None = None) -> dict:
        """Parameters and FLOPs of the (projected) network, next to the dense model's when known."""
        rep = density_report(model, input_size=input_size)
        params = sum(p.numel() for p in model.parameters())
        dense = self.history[-1] if self.history else {}
        params_dense = dense.get("params_dense", params)
        return {"density": params / params_dense, "effective_density": params / params_dense,
                "compression": params_dense / params, "params": params, "params_dense": params_dense,
                "storage_bytes": 4 * params, "flops_dense": dense.get("flops_dense", rep.flops_dense),
                "flops_effective": rep.flops_dense, "projection": dense.get("ranks"), "layers": []}

    def state_dict(self) -> dict:
        return {"projected": self.projected, "history": list(self.history)}

    def load_state_dict(self, state: dict | None) -> None:
        self.projected, self.history = bool(state["projected"]), list(state["history"])


@register("cap-robust")
class RobustCascadedProjection(CascadedProjection):
    description = "robust CaP: as cap, the projections trained on the hybrid clean + PGD loss"
    robust = True
