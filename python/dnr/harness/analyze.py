"""``dnr analyze``: the loss landscape of a trained model. ``hessian_of_checkpoint`` is the top Hessian
eigenvalue (w.r.t. the parameters) of the clean and of the adversarial cross-entropy on a fixed batch of
the run's data (:func:`dnr.analysis.hessian_top_eigenvalue`), the quantity SAT's H-SAT curriculum watches."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import attacks
from ..analysis import hessian_top_eigenvalue
from .builders import build_dataset
from .config import ConfigError, check_choice, check_number
from .evaluate import resolve_device
from .run import load_trained_model

__all__ = ["hessian_of_checkpoint", "check_hessian_options"]


def check_hessian_options(*, examples, iters, eps=None, seed=None, split="test") -> None:
    """The options of ``dnr analyze hessian``, each a one-line ConfigError naming its flag (before any work)."""
    check_number("option --examples", examples, int, lo=1)
    check_number("option --iters", iters, int, lo=1)
    check_number("option --eps", eps, float, lo=0, optional=True)
    check_number("option --seed", seed, int, lo=0, hi=2**32 - 1, optional=True)
    check_choice("option --split", split, ("train", "test"))


def hessian_of_checkpoint(path: str, *, examples: int = 256, iters: int = 20, eps: float | None = None,
                          split: str = "test", data_root: str | None = None, seed: int | None = None,
                          device: str = "auto") -> dict:
    """The top Hessian eigenvalue of the clean and the adversarial loss of a checkpoint's model (eval mode).

    The batch is the first ``examples`` examples of the run's ``split``; the adversarial examples are the
    run's training attack (PGD with its ``eps`` or the given one, its ``alpha`` scaled to the radius, its
    ``attack_steps``), seeded with ``seed`` (default the run's); the power iteration starts from a vector
    drawn with the same seed. Returns a JSON-ready dict.
    """
    check_hessian_options(examples=examples, iters=iters, eps=eps, seed=seed, split=split)
    device = resolve_device(device)
    model, cfg, state = load_trained_model(path, device)
    if data_root is not None:
        cfg.data_root = data_root
    seed = cfg.seed if seed is None else seed
    data = build_dataset(cfg, split, None)
    n = min(examples, len(data))
    x = torch.stack([data[i][0] for i in range(n)]).to(device)
    y = torch.tensor([int(data[i][1]) for i in range(n)], device=device)
    eps = cfg.eps if eps is None else eps
    alpha = cfg.alpha * eps / cfg.eps if cfg.eps > 0 else cfg.alpha
    if eps > 0 and alpha <= 0:
        raise ConfigError(f"option --eps: got {eps}, but the run's PGD step size is {cfg.alpha}")
    gen = torch.Generator().manual_seed(seed)
    x_adv = (attacks.pgd(model, x, y, eps, alpha, cfg.attack_steps, generator=gen) if eps > 0 else x)
    out = {"checkpoint": state["path"], "split": split, "examples": n, "iters": iters, "eps": eps,
           "alpha": alpha, "attack_steps": cfg.attack_steps, "seed": seed}
    for key, inputs in (("clean", x), ("adversarial", x_adv)):
        out[key] = hessian_top_eigenvalue(model, F.cross_entropy, (inputs, y), iters=iters,
                                          generator=torch.Generator().manual_seed(seed), bn_mode="eval")
    return out
