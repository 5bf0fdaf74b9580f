"""The DNR rewiring controller: masks after every optimizer step, prune / redistribute / regrow on schedule."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from .. import distributed, ops
from ..nn.sparsify import NORM_TYPES, apply_masks, masked_layers, paired_norm
from ..nn.units import active_units, expand_units, num_units, unit_scores, unit_size
from ..allocation import AllocationError, round_exact, water_fill
from .channel_signal import OutputGradientMeter, find_channel_consumers
from .schedule import PRUNE_SCHEDULES, auto_rewire_interval, auto_sparsify_until, prune_rate_at

REGROWTH = ("auto", "momentum", "gradient", "output_gradient", "random")
#: min_active=None in channel mode: every layer keeps at least this fraction of its initial channels.
CHANNEL_FLOOR = 0.5

__all__ = ["DNR"]

log = logging.getLogger("dnr.rewiring")


class DNR:
    """Dynamic Network Rewiring for a sparsified model and its optimizer.

    Wraps the user's own model and optimizer. After every real optimizer step (``optimizer.step()`` or
    ``GradScaler.step(optimizer)``; a step the scaler skips is not counted) it re-applies the masks,
    so pruned weights are exactly zero, and advances the prune-rate schedule. The optimizer's momentum
    buffer (SGD ``momentum_buffer``; Adam/AdamW ``exp_avg``) keeps accumulating the dense gradient at
    pruned positions. ``rewire()`` (called by ``end_epoch()`` or every ``rewire_every`` steps) prunes the
    smallest-magnitude active units of each layer, redistributes the freed budget over the layers in
    proportion to their normalised mean momentum, and regrows the inactive units with the largest
    momentum; the global number of active weights stays exactly ``K``.

    The defaults are the library's budget-aware settings (``REWIRE_SETTINGS["auto"]``): small rewirings
    every few optimizer steps, with a prune rate that decays to its floor at 75% of training, after
    which the structure is fixed and every weight trains. ``**dnr.rewiring.REWIRE_SETTINGS["paper"]``
    gives the paper's schedule (half of the active weights at every epoch end, decayed over all of
    training). docs/method.md says why, and what each choice was measured to be worth.

    Args:
        model: a model converted with ``dnr.sparsify`` (all masked layers in one mode).
        optimizer: the optimizer holding the masked weights: SGD with momentum > 0, Adam or AdamW.
        total_steps: T, the number of optimizer steps of the whole training (for the schedule).
        prune_rate: p0, the prune rate at step 0, in (0, 1) (0.3; the paper: 0.5).
        prune_rate_min: p_min, the prune rate at the horizon, in [0, prune_rate].
        schedule: how p decays from p0 to p_min over [0, rewire_until * T]: "cosine" (default), "linear"
            or "constant".
        rewire_every: "auto" (default: ``auto_rewire_interval(T, rewire_until)`` steps, about 20 rewirings
            and at most 100 steps apart), a step count k, or None to rewire only at ``end_epoch()`` (the
            paper).
        rewire_until: the horizon, as a fraction of T: no rewiring at or after step ``rewire_until * T``
            (0.75; the paper: 1.0).
        redistribution: "momentum" (DNR) or "none" (each layer regrows what it pruned).
        regrowth: which inactive units come back: "momentum" (DNR: largest |v|), "gradient" (largest |g|
            of the last backward, RigL-style), "output_gradient" (channel mode: largest squared loss
            gradient at the channel's output position since the last rewiring, see
            ``dnr.rewiring.channel_signal``), "random", or "auto" (default: momentum for single weights,
            output_gradient for channels, where a pruned channel's momentum is exactly zero).
        regrow_cap: a layer regrows at most this fraction of its free slots (0.99).
        dense_threshold: layers denser than this with mu_l > 1/L prune at most their free fraction (0.8).
        min_active: the per-layer floor when pruning: an int is a number of units, a float in (0, 1) a
            fraction of the layer's initial units; None (default) is 1 unit in irregular mode and
            ``CHANNEL_FLOOR`` (half) of the initial channels in channel mode, so no layer collapses.
        sparsify_until: the dense-to-sparse start, a fraction S / T in [0, rewire_until), or "auto" (default:
            ``dnr.rewiring.auto_sparsify_until``: ``rewire_until / 3``, i.e. 0.25 with the default horizon, in
            irregular mode; 0 in channel mode, where it was measured worse): training starts dense, and every
            ``rewire_every`` steps (the auto interval when that is None) each layer is pruned by magnitude towards
            its initial unit count n_l on a cubic schedule (Zhu & Gupta: n_l + (N_l - n_l) (1 - t / S)^3 units of
            its N_l), reaching exactly n_l, the budget K, at step S; rewiring runs from there to the horizon.
            Building the controller then re-draws the weights outside the initial masks from the layer's default
            init (``dnr.sparsify`` left them at zero), resets the norm layers of the channels it reopens, and opens
            every mask. The initial masks still set the budget K and each layer's share of it. 0 starts at the
            budget from the random sparse masks, as the paper (``dnr train --rewire paper``).
        generator: torch.Generator for random regrowth and for re-initialising regrown channels. Under
            torch.distributed (e.g. DistributedDataParallel) every rank must draw the same numbers: None
            there means a generator seeded from a seed that rank 0 draws and broadcasts (at construction,
            a collective: build the controller on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        prune_rate: float = 0.3,
        prune_rate_min: float = 0.005,
        schedule: str = "cosine",
        rewire_every: int | str | None = "auto",
        rewire_until: float = 0.75,
        redistribution: str = "momentum",
        regrowth: str = "auto",
        regrow_cap: float = 0.99,
        dense_threshold: float = 0.8,
        min_active: int | float | None = None,
        sparsify_until: float | str = "auto",
        generator: torch.Generator | None = None,
    ):
        _check_int("total_steps", total_steps, 1)
        _check_fraction("prune_rate", prune_rate, lo_open=True, hi_open=True)
        if not isinstance(prune_rate_min, (int, float)) or not 0.0 <= prune_rate_min <= prune_rate:
            raise ValueError(f"prune_rate_min must be in [0, prune_rate={prune_rate}], got {prune_rate_min!r}")
        if schedule not in PRUNE_SCHEDULES:
            raise ValueError(f"schedule must be one of {PRUNE_SCHEDULES}, got {schedule!r}")
        if rewire_every is not None and rewire_every != "auto":
            _check_int("rewire_every", rewire_every, 1)
        _check_fraction("rewire_until", rewire_until, lo_open=True, hi_open=False)
        if redistribution not in ("momentum", "none"):
            raise ValueError(f"redistribution must be 'momentum' or 'none', got {redistribution!r}")
        if regrowth not in REGROWTH:
            raise ValueError(f"regrowth must be one of {REGROWTH}, got {regrowth!r}")
        _check_fraction("regrow_cap", regrow_cap, lo_open=True, hi_open=False)
        _check_fraction("dense_threshold", dense_threshold, lo_open=False, hi_open=False)
        if sparsify_until == "auto":
            pass  # resolved below, once the mode is known
        elif isinstance(sparsify_until, bool) or not isinstance(sparsify_until, (int, float)) \
                or not 0.0 <= sparsify_until < rewire_until:
            raise ValueError(f"sparsify_until must be 'auto' or a number in [0, rewire_until={rewire_until}), "
                             f"got {sparsify_until!r}")
        if isinstance(min_active, float):
            _check_fraction("min_active", min_active, lo_open=True, hi_open=True)
        elif min_active is not None:
            _check_int("min_active", min_active, 0)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

        layers = masked_layers(model)
        if not layers:
            raise ValueError(
                f"model {type(model).__name__} has no masked layer: call dnr.sparsify(model, ...) first"
            )
        modes = {getattr(layer, "sparsity_mode", "irregular") for _, layer in layers}
        if len(modes) != 1:
            raise ValueError(f"all masked layers must use one sparsity mode, found {sorted(modes)}")
        for name, layer in layers:
            if layer.mask.device != layer.weight.device:
                raise ValueError(
                    f"layer {name!r}: mask is on {layer.mask.device} but weight on {layer.weight.device}"
                )
        self._momentum_key = _momentum_key(optimizer, [layer.weight for _, layer in layers], [n for n, _ in layers])

        self.model = model
        self.optimizer = optimizer
        self.mode = modes.pop()
        if sparsify_until == "auto":
            sparsify_until = auto_sparsify_until(rewire_until, self.mode)
        self.total_steps = int(total_steps)
        self.prune_rate_initial = float(prune_rate)
        self.prune_rate_min = float(prune_rate_min)
        self.schedule = schedule
        self.rewire_every = auto_rewire_interval(total_steps, rewire_until) if rewire_every == "auto" else rewire_every
        self.rewire_until = float(rewire_until)
        self.redistribution = redistribution
        self.regrowth = regrowth
        self._meter = None
        if self.mode == "channel" and regrowth in ("auto", "output_gradient"):
            producers = {name: getattr(layer, "norm_name", None) for name, layer in layers}
            self._meter = OutputGradientMeter(model, find_channel_consumers(model, producers))
        self.regrow_cap = float(regrow_cap)
        self.dense_threshold = float(dense_threshold)
        self.min_active = min_active
        # the floor in units per layer: an int is a count, a float a fraction of the layer's initial units
        floor = (1 if self.mode == "irregular" else CHANNEL_FLOOR) if min_active is None else min_active
        initial = [int(active_units(layer.mask, self.mode).sum()) for _, layer in layers]
        self.floors = [floor if isinstance(floor, int) else max(1, math.ceil(floor * n)) for n in initial]
        if generator is None and distributed.world_size() > 1:
            # the global RNGs of the ranks differ: a per-rank draw would give the replicas different masks
            generator = torch.Generator().manual_seed(distributed.shared_seed())
        self.generator = generator
        self.steps = 0
        self.epochs = 0
        self.history: list[dict[str, Any]] = []
        self.budget = self.active_weights()
        # the dense-to-sparse start: the units each layer holds at the budget, and the schedule towards them
        self.targets = initial
        self.sparsify_until = float(sparsify_until)
        self.sparsify_every = self.rewire_every or auto_rewire_interval(total_steps, rewire_until)
        if self.sparsify_steps > 0:
            self._open_masks()
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)

    # ----------------------------------------------------------------- public API
    @property
    def prune_rate(self) -> float:
        """p(t) at the current optimizer step."""
        horizon = max(1, round(self.rewire_until * self.total_steps))
        return prune_rate_at(self.schedule, self.steps, horizon, self.prune_rate_initial, self.prune_rate_min)

    def active_weights(self) -> int:
        """sum_l nnz(M_l): active weights over all masked layers."""
        return sum(int(layer.mask.sum()) for _, layer in masked_layers(self.model))

    @property
    def sparsify_steps(self) -> int:
        """S: the optimizer step at which the dense-to-sparse start reaches the budget (0: none)."""
        return max(1, round(self.sparsify_until * self.total_steps)) if self.sparsify_until > 0 else 0

    def sparsify_targets(self, step: int) -> list[int]:
        """Units per layer the dense-to-sparse start keeps after optimizer step ``step``: n_l + (N_l - n_l)
        (1 - step / S)^3, rounded; exactly n_l (the budget) from step S on."""
        S = self.sparsify_steps
        if step >= S:
            return list(self.targets)
        frac = (1.0 - step / S) ** 3
        totals = [num_units(layer.weight, self.mode) for _, layer in masked_layers(self.model)]
        return [n + int(round((N - n) * frac)) for n, N in zip(self.targets, totals)]

    def expected_active(self, step: int) -> int:
        """Active weights the schedule holds after optimizer step ``step``: all of them before the first pruning
        step of the dense-to-sparse start, then its most recent targets, the budget K from step S on."""
        if step >= self.sparsify_steps:
            return self.budget
        sizes = [unit_size(layer.weight, self.mode) for _, layer in masked_layers(self.model)]
        units = self.sparsify_targets(step - step % self.sparsify_every)  # at step 0: every unit
        return sum(u * size for u, size in zip(units, sizes))

    def end_epoch(self, last: bool = False) -> dict | None:
        """Call at the end of every epoch: rewires unless ``last`` (DNR skips the last epoch) or
        ``rewire_every`` is set. Returns the rewiring record or None."""
        self.epochs += 1
        if last or self.rewire_every is not None or self.steps >= self._horizon or self.steps < self.sparsify_steps:
            return None
        return self.rewire()

    def remove(self) -> None:
        """Detach from the optimizer (masks are no longer re-applied after steps) and from the model."""
        self._hook.remove()
        if self._meter is not None:
            self._meter.remove()

    @torch.no_grad()
    def rewire(self) -> dict:
        """One prune / redistribute / regrow round. Returns the record appended to ``history``."""
        if self.steps < self.sparsify_steps:
            raise RuntimeError(f"rewire() at optimizer step {self.steps}: the dense-to-sparse start reaches the "
                               f"budget at step {self.sparsify_steps} (sparsify_until={self.sparsify_until}); "
                               "rewiring starts there")
        layers = masked_layers(self.model)
        momenta = [self._momentum(name, layer.weight) for name, layer in layers]
        masks = [layer.mask for _, layer in layers]
        stats = ops.momentum_stats(momenta, masks).cpu().tolist()  # [L, 2]: sum |v| active, active count
        if self._meter is not None:
            self._meter.all_reduce()
        mean_momentum = [s / c if c > 0 else 0.0 for s, c in stats]
        total_m = sum(mean_momentum)
        count = len(layers)
        mu = [m / total_m for m in mean_momentum] if total_m > 0 else [1.0 / count] * count

        p = self.prune_rate
        sizes = [unit_size(layer.weight, self.mode) for _, layer in layers]
        totals = [num_units(layer.weight, self.mode) for _, layer in layers]
        units = [active_units(layer.mask, self.mode) for _, layer in layers]
        n_active = [int(u.sum()) for u in units]
        pruned = []
        for i, (_, layer) in enumerate(layers):
            density = n_active[i] * sizes[i] / layer.weight.numel()
            rate = p
            if density > self.dense_threshold and mu[i] > 1.0 / count:
                rate = min(p, 1.0 - density)  # a dense, growing layer prunes at most its free fraction
            pruned.append(max(0, min(math.ceil(rate * n_active[i]), n_active[i] - self.floors[i])))
        freed = sum(r * c for r, c in zip(pruned, sizes))
        free = [t - n + r for t, n, r in zip(totals, n_active, pruned)]
        regrown, caps, relaxed = self._regrowth_counts(mu, pruned, sizes, free, freed)

        record_layers = []
        for i, (name, layer) in enumerate(layers):
            before = units[i]
            after = before.clone()
            if pruned[i]:
                score = unit_scores(layer.weight, self.mode)
                score[~before] = math.inf
                after[torch.topk(score, pruned[i], largest=False).indices] = False
            if regrown[i]:
                score = self._regrowth_scores(name, layer, momenta[i], after.device)
                score[after] = -math.inf
                after[torch.topk(score, regrown[i]).indices] = True
            layer.set_mask(expand_units(after, layer.weight, self.mode))
            if self.mode == "channel":
                self._reinit_regrown_channels(layer, after & ~before)
                self._reset_norm_channels(name, layer, after & ~before)
            record_layers.append({
                "name": name, "mu": mu[i], "mean_momentum": mean_momentum[i],
                "pruned": pruned[i] * sizes[i], "regrown": regrown[i] * sizes[i],
                "active": int(after.sum()) * sizes[i], "density": int(after.sum()) * sizes[i] / layer.weight.numel(),
                "units_pruned": pruned[i], "units_regrown": regrown[i], "units_free": free[i],
                "regrow_cap_units": caps[i],
            })
        apply_masks(self.model)
        if self._meter is not None:
            self._meter.reset()
        active = self.active_weights()
        if active != self.budget:  # the allocation guarantees this; a mismatch is a bug, not bad input
            raise RuntimeError(f"rewiring broke the weight budget: {active} active weights, expected {self.budget}")
        record = {"step": self.steps, "epoch": self.epochs, "prune_rate": p, "pruned": freed, "cap_relaxed": relaxed,
                  "regrown": sum(r["regrown"] for r in record_layers), "active": active, "layers": record_layers}
        self.history.append(record)
        log.info("rewire step %d p=%.4f moved %d of %d weights", self.steps, p, freed, active)
        for r in record_layers:
            log.debug("  %-30s density %.4f mu %.4f pruned %d regrown %d", r["name"], r["density"], r["mu"],
                      r["pruned"], r["regrown"])
        return record

    def state_dict(self) -> dict:
        """All controller state (the masks themselves live in the model's state dict)."""
        return {
            "steps": self.steps, "epochs": self.epochs, "budget": self.budget, "mode": self.mode,
            "history": self.history, "floors": self.floors,
            "config": {
                "total_steps": self.total_steps, "prune_rate": self.prune_rate_initial,
                "prune_rate_min": self.prune_rate_min, "schedule": self.schedule,
                "rewire_every": self.rewire_every, "rewire_until": self.rewire_until, "redistribution": self.redistribution,
                "regrowth": self.regrowth, "regrow_cap": self.regrow_cap,
                "dense_threshold": self.dense_threshold, "min_active": self.min_active,
                "sparsify_until": self.sparsify_until, "sparsify_every": self.sparsify_every,
            },
            "targets": self.targets,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "output_gradient": self._meter.state_dict() if self._meter is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the model (masks) must be loaded first."""
        missing = {"steps", "epochs", "budget", "mode", "history", "config"} - set(state)
        if missing:
            raise ValueError(f"controller state is missing keys {sorted(missing)}")
        if state["mode"] != self.mode:
            raise ValueError(f"controller state is for mode {state['mode']!r}, this model uses {self.mode!r}")
        cfg = state["config"]
        # the schedule's parts first (expected_active reads them); put back if the check fails, so a mismatched
        # state changes nothing
        kept = (self.sparsify_until, self.sparsify_every, self.targets, self.total_steps, self.budget)
        self.sparsify_until = float(cfg.get("sparsify_until", 0.0))
        self.sparsify_every = int(cfg.get("sparsify_every", self.sparsify_every))
        self.targets = list(state.get("targets", self.targets))
        self.total_steps = cfg["total_steps"]
        self.budget = int(state["budget"])
        active, expected = self.active_weights(), self.expected_active(int(state["steps"]))
        if active != expected:
            self.sparsify_until, self.sparsify_every, self.targets, self.total_steps, self.budget = kept
            raise ValueError(
                f"controller state expects {expected} active weights at optimizer step {state['steps']} (budget "
                f"{state['budget']}) but the model has {active}: load the model's state dict (with its masks) first"
            )
        self.prune_rate_initial = cfg["prune_rate"]
        self.prune_rate_min = cfg["prune_rate_min"]
        self.schedule = cfg["schedule"]
        self.rewire_every = cfg["rewire_every"]
        self.rewire_until = cfg.get("rewire_until", 1.0)
        self.redistribution = cfg["redistribution"]
        self.regrowth = cfg["regrowth"]
        self.regrow_cap = cfg["regrow_cap"]
        self.dense_threshold = cfg["dense_threshold"]
        self.min_active = cfg["min_active"]
        self.floors = list(state.get("floors", self.floors))
        self.steps = int(state["steps"])
        self.epochs = int(state["epochs"])
        self.history = list(state["history"])
        if state.get("output_gradient") is not None and self._meter is not None:
            self._meter.load_state_dict(state["output_gradient"])
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])

    # ----------------------------------------------------------------- internals
    @property
    def _horizon(self) -> float:
        """rewire_until * T: no rewiring at or after this step."""
        return self.rewire_until * self.total_steps

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        apply_masks(self.model)
        self.steps += 1
        if self.steps <= self.sparsify_steps:
            if self.steps % self.sparsify_every == 0 or self.steps == self.sparsify_steps:
                self._sparsify_step()
            return
        if self.rewire_every is not None and self.steps % self.rewire_every == 0 and self.steps < self._horizon:
            self.rewire()

    @torch.no_grad()
    def _open_masks(self) -> None:
        """The dense start: every mask all ones, the weights outside the initial masks (zero after ``dnr.sparsify``)
        re-drawn from the layer's default init, U(+-1/sqrt(fan_in)) as nn.Conv2d / nn.Linear, and in channel mode
        the reopened channels' norm layers back at their default init (scale 1, shift 0, fresh statistics)."""
        for name, layer in masked_layers(self.model):
            fresh = self._default_init(layer, layer.weight.shape[0])
            layer.weight.copy_(torch.where(layer.mask, layer.weight, fresh))
            if self.mode == "channel":  # dnr.sparsify zeroed the closed channels' norm scale and shift: behind a
                # ReLU a zero output gets no gradient (ReLU'(0) = 0), so without this they would stay dead
                self._reset_norm_channels(name, layer, ~active_units(layer.mask, self.mode))
            layer.set_mask(torch.ones_like(layer.mask))

    @torch.no_grad()
    def _sparsify_step(self) -> dict:
        """One step of the dense-to-sparse start: each layer keeps its ``sparsify_targets`` units of largest
        magnitude among its active ones. Returns the record appended to ``history``."""
        layers = masked_layers(self.model)
        keep = self.sparsify_targets(self.steps)
        record_layers, removed = [], 0
        for (name, layer), k in zip(layers, keep):
            before = active_units(layer.mask, self.mode)
            size = unit_size(layer.weight, self.mode)
            n = int(before.sum())
            if k < n:
                score = unit_scores(layer.weight, self.mode)
                score[~before] = -math.inf
                after = torch.zeros_like(before)
                after[torch.topk(score, k).indices] = True
                layer.set_mask(expand_units(after, layer.weight, self.mode))
            kept = min(k, n)
            removed += (n - kept) * size
            record_layers.append({"name": name, "pruned": (n - kept) * size, "regrown": 0, "active": kept * size,
                                  "density": kept * size / layer.weight.numel(), "units_pruned": n - kept})
        apply_masks(self.model)
        active = self.active_weights()
        if self.steps >= self.sparsify_steps and active != self.budget:
            raise RuntimeError(f"the dense-to-sparse start ended with {active} active weights, expected {self.budget}")
        record = {"step": self.steps, "epoch": self.epochs, "event": "sparsify", "prune_rate": None,
                  "pruned": removed, "regrown": 0, "active": active, "layers": record_layers}
        self.history.append(record)
        log.info("sparsify step %d: %d active weights (budget %d)", self.steps, active, self.budget)
        return record

    def _regrowth_scores(self, name: str, layer, momentum: torch.Tensor, device) -> torch.Tensor:
        """float [num_units]: the regrowth criterion's score of every unit of ``layer`` (higher regrows first)."""
        if self.regrowth == "gradient":
            grad = layer.weight.grad
            if grad is None:
                raise RuntimeError(f"regrowth='gradient' needs layer {name!r}'s dense weight gradient: rewire "
                                   "after backward() and before zero_grad()")
            return unit_scores(grad, self.mode)
        if self.regrowth == "random":
            return torch.rand(num_units(layer.weight, self.mode), generator=self.generator).to(device)
        # output_gradient / auto: the channel signal where the layer has one (the meter exists only for them)
        signal = self._meter.scores(name) if self._meter is not None else None
        if signal is not None:
            return signal.float().to(device)
        return unit_scores(momentum, self.mode)  # momentum, and auto / output_gradient without a signal

    def _momentum(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        buf = self.optimizer.state.get(weight, {}).get(self._momentum_key)
        if buf is None:
            raise RuntimeError(
                f"no momentum buffer for layer {name!r} yet: rewire() needs at least one optimizer step first"
            )
        return buf

    def _regrowth_counts(self, mu, pruned, sizes, free, freed):
        """Units each layer regrows: mu-proportional share of the freed weights, capped, exact total.

        Returns (counts, caps used, whether the regrow_cap had to be relaxed to all free slots).
        """
        caps = [int(math.floor(self.regrow_cap * f)) for f in free]
        if freed == 0:
            return [0] * len(pruned), caps, False
        if self.redistribution == "none":  # each layer regrows what it pruned: no cap applies
            return list(pruned), list(free), True
        if sum(c * s for c, s in zip(caps, sizes)) < freed:
            # the cap cannot hold the freed budget (only near density 1): allow every free slot
            return self._place(mu, sizes, list(free), freed, pruned) + (True,)
        counts, used = self._place(mu, sizes, caps, freed, pruned)
        return counts, used, used is not caps

    def _place(self, mu, sizes, caps, freed, pruned):
        shares = water_fill(mu, [c * s for c, s in zip(caps, sizes)], freed)
        targets = [w / s for w, s in zip(shares, sizes)]
        try:
            return round_exact(targets, sizes, [0] * len(sizes), caps, freed), caps
        except AllocationError:
            # channel units of mixed sizes can miss the exact total inside the caps: every layer
            # regrowing what it pruned is always exact
            log.warning("no exact channel redistribution within the caps; every layer regrows what it pruned")
            return list(pruned), [max(c, r) for c, r in zip(caps, pruned)]

    def _reinit_regrown_channels(self, layer, grown: torch.Tensor) -> None:
        """A regrown channel restarts from the layer's default init (uniform in +-1/sqrt(fan_in), as
        nn.Conv2d / nn.Linear), not from zero: a zero filter outputs a constant 0, which its norm layer
        (scale 1, shift 0) maps to exactly 0 and the ReLU's gradient at 0 is 0, so the channel would
        never receive a gradient (its momentum while pruned was 0 for the same reason)."""
        index = grown.nonzero().flatten()
        if index.numel() == 0:
            return
        layer.weight[index] = self._default_init(layer, index.numel())

    def _default_init(self, layer, rows: int) -> torch.Tensor:
        """``rows`` output units of ``layer``'s weight drawn from nn.Conv2d / nn.Linear's default init,
        U(+-1/sqrt(fan_in)), with the controller's generator: [rows, *weight.shape[1:]], the weight's dtype and
        device."""
        bound = 1.0 / math.sqrt(layer.weight[0].numel())
        fresh = torch.rand((rows,) + tuple(layer.weight.shape[1:]), generator=self.generator)
        return (fresh * (2 * bound) - bound).to(layer.weight)

    def _reset_norm_channels(self, name: str, layer, channels: torch.Tensor) -> None:
        """The channels (bool [out_channels]) that (re)enter the network, regrown or reopened by the dense start,
        restart their norm layer at the default init (scale 1, shift 0, fresh stats)."""
        norm_name = getattr(layer, "norm_name", None)
        if norm_name is None or not bool(channels.any()):
            return
        norm = paired_norm(dict(self.model.named_modules()), name, layer, norm_name)
        if norm.weight is not None:
            norm.weight[channels] = 1.0
        if norm.bias is not None:
            norm.bias[channels] = 0.0
        if isinstance(norm, NORM_TYPES[:2]) and norm.running_mean is not None:
            norm.running_mean[channels] = 0.0
            norm.running_var[channels] = 1.0


def _momentum_key(optimizer: torch.optim.Optimizer, weights: list[torch.Tensor], names: list[str]) -> str:
    """Which optimizer state entry is the momentum; validates that every masked weight is optimized."""
    group_of = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[p] = gi
    for name, w in zip(names, weights):
        if w not in group_of:
            raise ValueError(
                f"the weight of masked layer {name!r} is not in the optimizer's parameters: create the "
                "optimizer after dnr.sparsify(model) from model.parameters()"
            )
    if isinstance(optimizer, torch.optim.SGD):
        for gi in sorted({group_of[w] for w in weights}):
            momentum = optimizer.param_groups[gi].get("momentum", 0)
            if not momentum:
                raise ValueError(
                    f"optimizer param group {gi} has momentum={momentum}; DNR needs a momentum buffer: "
                    "use SGD with momentum > 0 (e.g. 0.9)"
                )
        return "momentum_buffer"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        for gi in sorted({group_of[w] for w in weights}):
            beta1 = optimizer.param_groups[gi]["betas"][0]
            if not beta1:
                raise ValueError(f"optimizer param group {gi} has betas[0]={beta1}; DNR needs betas[0] > 0")
        return "exp_avg"
    raise TypeError(
        f"optimizer {type(optimizer).__name__} has no momentum buffer DNR knows how to read: use "
        "torch.optim.SGD with momentum > 0, Adam or AdamW"
    )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_fraction(name: str, value, *, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if lo_open else value >= 0) and (value < 1 if hi_open else value <= 1)
    if not ok:
        interval = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
