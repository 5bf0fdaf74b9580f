"""RSR, Robust Sparse Regularization (Rakin et al., 2019): trainable weight noise + L1 + adversarial training.

During the RSR phase every masked layer computes its output with noisy weights

    W~ = W + alpha_c * sigma(W) * eta,   eta ~ N(0, 1) per weight, fresh every forward,

with ``alpha_c`` a trainable scale per output channel (Parametric Noise Injection, He et al. 2019)
and ``sigma(W)`` the (detached) standard deviation of the layer's active weights, and the loss gets
an L1 penalty ``lambda * sum |W|`` that drives weights towards zero. The noise is only on in training
mode: evaluation, and the attack generation (which runs the model in eval mode), see the plain
weights, so the robustness reported is not an effect of randomness. The phase ends with one global
magnitude prune to the budget and masked adversarial fine-tuning (done by the harness).

The noise is implemented with a forward hook that adds ``layer(x; noise weights)`` (without bias) to
the layer's output: the model's parameters and state dict are unchanged, the scales live here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.masked import MaskedConv2d
from ..nn.sparsify import masked_layers
from .pruning import SCOPES, model_mode, prune_by_magnitude

__all__ = ["RSR"]


class RSR:
    """Trainable channel-wise weight noise and an L1 penalty on the masked layers of ``model``.

    Args:
        model: a model converted with ``dnr.sparsify`` (typically at density 1).
        density: target density of the final prune, in (0, 1].
        l1: weight of the L1 penalty (>= 0).
        noise_init: initial noise scale alpha of every channel (>= 0; PNI uses 0.25).
        scope: scope of the final magnitude prune: "global" (RSR) or "layer".
        init: the per-layer split for scope "layer".

    Attributes:
        noise_scales: one trainable ``[out_channels]`` parameter per masked layer; give them to the
            optimizer (``parameters()``).
    """

    def __init__(self, model: nn.Module, *, density: float, l1: float = 5e-5, noise_init: float = 0.25,
                 scope: str = "global", init: str = "uniform"):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        if not l1 >= 0:
            raise ValueError(f"l1 must be >= 0, got {l1!r}")
        if not noise_init >= 0:
            raise ValueError(f"noise_init must be >= 0, got {noise_init!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.model = model
        self.mode = model_mode(model)
        self.layers = masked_layers(model)
        self.density, self.l1, self.scope, self.init = float(density), float(l1), scope, init
        self.noise_scales = [nn.Parameter(torch.full((layer.weight.shape[0],), float(noise_init),
                                                     device=layer.weight.device, dtype=layer.weight.dtype))
                             for _, layer in self.layers]
        self.active = True
        self.history: list[dict[str, Any]] = []
        self._hooks = [layer.register_forward_hook(self._noise_hook(i)) for i, (_, layer) in enumerate(self.layers)]

    def parameters(self) -> list[nn.Parameter]:
        """The trainable noise scales (one ``[out_channels]`` tensor per masked layer)."""
        return list(self.noise_scales)

    def penalty(self) -> torch.Tensor:
        """lambda * sum_l sum |W_l| over the active weights (0 once finished)."""
        weight = self.layers[0][1].weight
        if not self.active or self.l1 == 0:
            return weight.new_zeros(())
        return self.l1 * sum((layer.weight * layer.mask).abs().sum() for _, layer in self.layers)

    def _noise_hook(self, index: int):
        def hook(module, inputs, output):
            if not (self.active and module.training):
                return None
            w = module.weight * module.mask
            sigma = w.detach()[module.mask].std() if int(module.mask.sum()) > 1 else w.new_zeros(())
            scale = self.noise_scales[index].view(-1, *([1] * (w.dim() - 1)))
            noise = scale * sigma * torch.randn_like(w) * module.mask
            if isinstance(module, MaskedConv2d):
                extra = nn.Conv2d._conv_forward(module, inputs[0], noise, None)
            else:
                extra = F.linear(inputs[0], noise)
            return output + extra
        return hook

    def finish(self) -> dict:
        """Switch the noise off and prune by magnitude to the budget; returns the prune record."""
        self.remove()
        record = {**prune_by_magnitude(self.model, self.density, scope=self.scope, init=self.init),
                  "noise_scales_mean": [float(a.detach().mean()) for a in self.noise_scales]}
        self.history.append(record)
        return record

    def remove(self) -> None:
        """Remove the noise hooks (the penalty is 0 afterwards)."""
        self.active = False
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        return {"noise_scales": [a.detach().clone() for a in self.noise_scales], "active": self.active,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        scales = state["noise_scales"]
        if len(scales) != len(self.noise_scales) or any(tuple(s.shape) != tuple(a.shape)
                                                        for s, a in zip(scales, self.noise_scales)):
            raise ValueError("RSR state does not match the model's masked layers")
        with torch.no_grad():
            for a, s in zip(self.noise_scales, scales):
                a.copy_(s)
        self.history = list(state["history"])
        if not state["active"]:
            self.remove()
