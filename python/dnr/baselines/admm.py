"""ADMM robust pruning (Ye et al., "Adversarial Robustness vs. Model Compression, or Both?", ICCV 2019).

Training minimises the adversarial loss plus ``sum_l rho/2 * ||W_l - Z_l + U_l||^2``; every few steps

    Z <- Proj_S(W + U)      (S: the sparsity set, exactly the budget's number of weights / channels)
    U <- U + W - Z
    rho <- min(rho * growth, rho_max)

so the weights are pulled towards a sparse copy of themselves. :class:`ADMMBase` holds the Z/U/rho mechanics for
any constraint set with an exact projection (``dnr.baselines.admm_circulant``: block-circulant matrices). At the end of the ADMM phase the model
is hard-pruned to the support of ``Proj_S(W)`` and retrained with the mask fixed (the harness does the
masked adversarial retraining).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn.sparsify import masked_layers
from .pruning import SCOPES, magnitude_masks, model_mode, prune_by_magnitude, unit_counts

__all__ = ["ADMM", "ADMMBase"]


class ADMMBase:
    """ADMM towards a constraint set S: the state (Z, U, rho) of a list of layers' ``weight`` tensors and the
    updates, for any exact Euclidean projection ``project`` onto S (a subclass defines it and ``finish``).

    Args:
        layers: (qualified name, module with a ``weight``) pairs: the constrained weights.
        optimizer: the model's optimizer; ``update()`` runs after every ``update_every``-th step.
        rho: initial penalty weight (> 0).
        rho_growth: factor applied to rho after every update (>= 1).
        rho_max: upper bound of rho.
        update_every: optimizer steps between Z/U updates; None = only when ``update()`` is called.

    Attributes:
        Z, U: lists of tensors with the weights' shapes (one per layer).
        history: one record per update ({"event": "admm_update", "step", "rho", "residual"}).
    """

    def __init__(self, layers: list, optimizer: torch.optim.Optimizer | None = None, *, rho: float = 1e-2,
                 rho_growth: float = 1.3, rho_max: float = 1.0, update_every: int | None = None):
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        if not rho_growth >= 1:
            raise ValueError(f"rho_growth must be >= 1, got {rho_growth!r}")
        if not rho_max >= rho:
            raise ValueError(f"rho_max must be >= rho={rho}, got {rho_max!r}")
        if update_every is not None and (isinstance(update_every, bool) or not isinstance(update_every, int)
                                         or update_every < 1):
            raise ValueError(f"update_every must be an integer >= 1 or None, got {update_every!r}")
        if not layers:
            raise ValueError("ADMM needs at least one layer to constrain, got none")
        self.layers = list(layers)
        self.rho, self.rho_growth, self.rho_max = float(rho), float(rho_growth), float(rho_max)
        self.update_every = update_every
        self.steps = 0
        self.active = True
        self.history: list[dict[str, Any]] = []
        with torch.no_grad():
            weights = [layer.weight.detach() for _, layer in self.layers]
            self.Z = self.project(weights)
            self.U = [torch.zeros_like(w) for w in weights]
        self._hook = optimizer.register_step_post_hook(self._after_step) if optimizer is not None else None

    def project(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Proj_S of each tensor (one per layer, with the weight's shape): the subclass's constraint set."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the ADMM pieces
    def penalty(self) -> torch.Tensor:
        """sum_l rho/2 * ||W_l - Z_l + U_l||^2: a scalar with a graph to the weights (0 once finished)."""
        if not self.active:
            return self.layers[0][1].weight.new_zeros(())
        return sum(0.5 * self.rho * (layer.weight - z + u).pow(2).sum()
                   for (_, layer), z, u in zip(self.layers, self.Z, self.U))

    @torch.no_grad()
    def update(self) -> dict:
        """Z <- Proj_S(W + U); U <- U + W - Z; rho grows. Returns the update's record."""
        weights = [layer.weight.detach() for _, layer in self.layers]
        self.Z = self.project([w + u for w, u in zip(weights, self.U)])
        for u, w, z in zip(self.U, weights, self.Z):
            u.add_(w - z)
        residual = sum(float((w - z).pow(2).sum()) for w, z in zip(weights, self.Z)) ** 0.5
        record = {"event": "admm_update", "step": self.steps, "rho": self.rho, "residual": residual}
        self.rho = min(self.rho * self.rho_growth, self.rho_max)
        self.history.append(record)
        return record

    def stop(self, record: dict) -> dict:
        """Stop the penalty and the updates (the ADMM phase is over); ``record`` (the hard projection's) joins
        the history with the step count. Returns the record."""
        self.active = False
        self.remove()
        self.history.append({**record, "step": self.steps})
        return record

    def remove(self) -> None:
        """Detach from the optimizer."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self.active:
            return
        self.steps += 1
        if self.update_every and self.steps % self.update_every == 0:
            self.update()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"Z": [z.clone() for z in self.Z], "U": [u.clone() for u in self.U], "rho": self.rho,
                "steps": self.steps, "active": self.active, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["Z"]) != len(self.layers) or len(state["U"]) != len(self.layers):
            raise ValueError(f"ADMM state holds {len(state['Z'])} layers, the model has {len(self.layers)}")
        for z, u, (name, layer) in zip(state["Z"], state["U"], self.layers):
            if tuple(z.shape) != tuple(layer.weight.shape) or tuple(u.shape) != tuple(layer.weight.shape):
                raise ValueError(f"ADMM state for layer {name!r} has shape {tuple(z.shape)}, expected "
                                 f"{tuple(layer.weight.shape)}")
        dev = self.layers[0][1].weight.device
        self.Z = [z.to(dev).clone() for z in state["Z"]]
        self.U = [u.to(dev).clone() for u in state["U"]]
        self.rho, self.steps, self.active = float(state["rho"]), int(state["steps"]), bool(state["active"])
        self.history = list(state["history"])
        if not self.active:
            self.remove()


class ADMM(ADMMBase):
    """ADMM robust pruning: the ADMM state (Z, U, rho) of a dense-masked model and its optimizer; S is the
    sparsity set (exactly the budget's number of weights / channels).

    Args:
        model: a model converted with ``dnr.sparsify`` (typically at density 1: ADMM trains it dense).
        optimizer: the model's optimizer; ``update()`` runs after every ``update_every``-th step.
        density: the target global density of the projection and the final prune, in (0, 1].
        scope: "layer" (per-layer counts of ``dnr.sparsify``'s allocation, as in Ye et al.) or "global".
        init: the per-layer split for scope "layer": "uniform" or "erk".
        rho, rho_growth, rho_max, update_every: as :class:`ADMMBase`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, density: float,
                 scope: str = "layer", init: str = "uniform", rho: float = 1e-2, rho_growth: float = 1.3,
                 rho_max: float = 1.0, update_every: int | None = None):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.model = model
        self.mode = model_mode(model)
        self.density, self.scope, self.init = float(density), scope, init
        super().__init__(masked_layers(model), optimizer, rho=rho, rho_growth=rho_growth, rho_max=rho_max,
                         update_every=update_every)

    def project(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Proj_S: each tensor with all but the kept units zeroed (exactly the budget's weights in total).

        Args:
            tensors: one tensor per masked layer, with the weight's shape.
        """
        counts = unit_counts(tensors, self.density, self.mode, self.scope, self.init)
        return [t * m for t, m in zip(tensors, magnitude_masks(tensors, counts, self.mode))]

    def finish(self) -> dict:
        """Hard-prune the model to the support of Proj_S(W) and stop the penalty and the updates.

        Returns the prune record of :func:`dnr.baselines.prune_by_magnitude`."""
        return self.stop(prune_by_magnitude(self.model, self.density, scope=self.scope, init=self.init))
