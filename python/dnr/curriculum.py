"""Curriculum adversarial training (SAT: Sitawarin, Chakraborty, Wagner, AISec 2021, arXiv 2003.09347).

A curriculum is a training schedule that composes with every compression method: the engine
(:func:`dnr.engine.adversarial_step`) asks it for each step's adversarial examples, and it decides how
strong the attack is from a difficulty ``lambda_t`` in [0, 1] (t = optimizer steps done before the step,
T = the run's optimizer steps, eps / alpha = the run's attack radius and step size):

- ``none``: plain adversarial training, ``lambda_t = 1``; the attack is exactly ``attacks.pgd(eps, alpha)``.
- ``eps``: a ramp of the radius, ``eps_t = lambda_t * eps`` and ``alpha_t = lambda_t * alpha`` (the step
  keeps its ratio to the radius, so the same number of steps reaches the ball's boundary), with
  ``lambda_t = ramp(u)``, ``u = min(1, (t + 1) / (ramp * T))``: ``u`` (linear) or ``(1 - cos(pi u)) / 2``
  (cosine); the ramp's last step (t + 1 = ramp * T) is the first at full strength. A step with
  ``eps_t = 0`` trains on the clean batch (no attack is run).
- ``p-sat``: per-example difficulty from the softmax probability of the true class. The radius is the
  full ``eps``; an example's PGD stops for good at the first iterate where ``p_y(x_adv) < (1 - lambda_t) *
  prob`` (``lambda_t`` the same ramp; :func:`dnr.attacks.pgd`'s ``stop_prob``, per-sample step sizes of
  the fused PGD op; in the attack's eval mode a stopped example also leaves the later passes, which is what
  makes P-SAT's early steps cheaper than AT's). Early in training an example stops once the model doubts it; from the ramp's end on
  no example stops (plain PGD).
- ``h-sat``: ``lambda`` starts at 0 and, at each Hessian measurement (every ``every`` steps, on the
  step's own batch and adversarial examples), advances by ``every / (ramp * T)`` only if the top
  eigenvalue lambda_max of the adversarial loss is at most ``threshold`` (when given), else if it grew by
  at most the factor ``ratio`` since the previous measurement (``h <= max(h_prev, ratio * h_prev)``; the
  first measurement always advances). Unobstructed, it is the linear ``eps`` ramp taken in stairs;
  held back, it may not reach 1 (the run's metrics say where it got).
  The radius and step are ``lambda * eps`` and ``lambda * alpha`` as for ``eps``.

Any schedule can also measure the top Hessian eigenvalue (``every`` > 0, e.g. plain AT, to
compare with H-SAT): a measurement draws its power-iteration start from its own generator (seeded by the
run's seed and the step), computes parameter gradients with ``torch.autograd.grad`` (no ``.grad``
changes) in train mode (the loss the optimizer sees) and restores the BatchNorm statistics, so it changes
nothing in the training.

The state (step counter, H-SAT's lambda and reference, the measurements, the epoch's running sums) is in
``state_dict`` and the run's checkpoints, so a resume is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import attacks
from .analysis import hessian_top_eigenvalue

__all__ = ["CURRICULA", "RAMP_SHAPES", "Curriculum", "PlainAT", "EpsRamp", "ProbabilitySAT", "HessianSAT",
           "create", "ramp_value", "check_curriculum_args"]

CURRICULA = ("none", "eps", "p-sat", "h-sat")
RAMP_SHAPES = ("linear", "cosine")


def ramp_value(t: int, ramp_steps: float, shape: str = "linear") -> float:
    """The ramp's lambda at step ``t`` (0-based): ``u = min(1, (t + 1) / ramp_steps)`` (linear) or
    ``(1 - cos(pi u)) / 2`` (cosine); 1 from step ``ramp_steps - 1`` on."""
    u = min(1.0, (t + 1) / ramp_steps)
    return u if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * u))


def check_curriculum_args(name, *, total_steps=1, ramp=0.5, shape="linear", prob=0.5, every=0,
                          threshold=None, ratio=1.5, power_iters=10, subject=None) -> None:
    """Raise ValueError (one line: the argument, the value, what was expected) on a bad argument.

    ``subject(arg)`` names an argument in the message (default ``"curriculum <arg>"``; the run config
    names its options)."""
    def need(arg, value, ok, expected):
        if not ok:
            raise ValueError(f"{subject(arg) if subject else 'curriculum ' + arg}: got {value!r}, expected {expected}")

    need("name", name, name in CURRICULA, f"one of {list(CURRICULA)}")
    need("total_steps", total_steps, isinstance(total_steps, int) and total_steps >= 1, "an integer >= 1")
    need("ramp", ramp, isinstance(ramp, (int, float)) and 0.0 < ramp <= 1.0, "a fraction of training in (0, 1]")
    need("shape", shape, shape in RAMP_SHAPES, f"one of {list(RAMP_SHAPES)}")
    need("prob", prob, isinstance(prob, (int, float)) and 0.0 < prob <= 1.0, "a probability in (0, 1]")
    need("every", every, isinstance(every, int) and every >= 0, "an integer >= 0 (0: never measure)")
    if name == "h-sat":
        need("every", every, every >= 1, "an integer >= 1 (h-sat decides at its measurements)")
    if threshold is not None:
        need("threshold", threshold, isinstance(threshold, (int, float)) and threshold >= 0 and math.isfinite(threshold),
             "a number >= 0 (or None: use the ratio)")
    need("ratio", ratio, isinstance(ratio, (int, float)) and 1.0 <= ratio < math.inf, "a number >= 1")
    need("power_iters", power_iters, isinstance(power_iters, int) and power_iters >= 1, "an integer >= 1")


class Curriculum:
    """Plain adversarial training, and the base of every schedule: ``adversarial_examples`` is called once
    per training step (it counts the steps), ``epoch_metrics`` once per epoch.

    Args:
        total_steps: T, the run's optimizer steps.
        every: measure the top Hessian eigenvalue of the adversarial loss every this many steps (0: never).
        power_iters: power-iteration steps per measurement.
        seed: seeds each measurement's own generator (with the step).
    """

    name = "none"

    def __init__(self, *, total_steps: int, ramp: float = 0.5, shape: str = "linear", prob: float = 0.5,
                 every: int = 0, threshold: float | None = None, ratio: float = 1.5, power_iters: int = 10,
                 seed: int = 0):
        check_curriculum_args(self.name, total_steps=total_steps, ramp=ramp, shape=shape, prob=prob, every=every,
                              threshold=threshold, ratio=ratio, power_iters=power_iters)
        self.total_steps, self.ramp, self.shape, self.prob = total_steps, float(ramp), shape, float(prob)
        self.every, self.threshold, self.ratio = every, threshold, float(ratio)
        self.power_iters, self.seed = power_iters, seed
        self.step = 0                 # training steps done
        self.measurements: list[dict] = []
        self._epoch = self._empty_epoch()

    # ---------------------------------------------------------------- the schedule (overridden)
    def difficulty(self, step: int | None = None) -> float:
        """lambda_t at ``step`` (default: the next step)."""
        return 1.0

    def budget(self, eps: float, alpha: float) -> tuple[float, float]:
        """The next step's attack radius and step size, from the run's ``eps`` and ``alpha``."""
        return eps, alpha

    def stop_prob(self) -> float | None:
        """The next step's early-stopping probability (P-SAT), or None."""
        return None

    def measured(self, lambda_max: float) -> bool:
        """Take a measurement into account; returns whether lambda advanced (H-SAT)."""
        return False

    # ---------------------------------------------------------------- what the engine calls
    def adversarial_examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                             alpha: float, steps: int, bn_mode: str = "eval",
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """This step's training examples ``x_adv`` [B, ...] for ``x`` [B, ...] and ``y`` [B], at the
        schedule's difficulty for the run's ``eps`` / ``alpha`` / ``steps``; then counts the step (and
        measures the Hessian when one is due)."""
        lam = self.difficulty()
        eps_t, alpha_t = self.budget(eps, alpha)
        stop = self.stop_prob()
        if eps_t == 0.0 and eps > 0:  # the schedule's radius 0: nothing to attack, the clean batch
            x_adv = x.detach()
        elif not stop:  # None, or 0 (P-SAT after its ramp): nothing stops, plain PGD without the checks
            x_adv = attacks.pgd(model, x, y, eps_t, alpha_t, steps, bn_mode=bn_mode, generator=generator)
        else:
            x_adv = attacks.pgd(model, x, y, eps_t, alpha_t, steps, bn_mode=bn_mode, generator=generator,
                                stop_prob=stop)
        with torch.no_grad():  # the mean L-inf size of the perturbations actually used (no sync here)
            linf = (x_adv - x).flatten(1).abs().amax(dim=1).float().mean()
        e = self._epoch
        e["linf_sum"] = e["linf_sum"] + linf
        e["steps"] += 1
        e["lambda"], e["eps"] = lam, eps_t
        if self.every and self.step % self.every == 0:
            self._measure(model, x_adv, y, lam, eps_t)
        self.step += 1
        return x_adv

    def _measure(self, model, x_adv, y, lam, eps_t) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        with torch.autocast(x_adv.device.type, enabled=False):
            value = hessian_top_eigenvalue(model, nn.functional.cross_entropy, (x_adv.float(), y),
                                           iters=self.power_iters, generator=gen, bn_mode="train")
        advanced = self.measured(value)
        record = {"step": self.step, "lambda": lam, "eps": eps_t, "lambda_max": value, "advanced": advanced,
                  "lambda_next": self.difficulty(self.step + 1)}
        self.measurements.append(record)
        self._epoch["lambda_max"] = value

    # ---------------------------------------------------------------- logging and state
    @staticmethod
    def _empty_epoch() -> dict:
        return {"linf_sum": 0.0, "steps": 0, "lambda": None, "eps": None, "lambda_max": None}

    def epoch_metrics(self) -> dict:
        """The epoch's columns (and a new epoch starts): ``curriculum_lambda`` and ``curriculum_eps`` (lambda_t
        and the attack radius of the epoch's last step), ``effective_eps`` (the mean over the epoch's steps of
        the mean L-inf norm of the perturbations) and ``hessian_lambda_max`` (the epoch's last measurement)."""
        e, self._epoch = self._epoch, self._empty_epoch()
        return {"curriculum_lambda": e["lambda"], "curriculum_eps": e["eps"],
                "effective_eps": float(e["linf_sum"]) / e["steps"] if e["steps"] else None,
                "hessian_lambda_max": e["lambda_max"]}

    def log_records(self) -> dict[str, list[dict]]:
        """``{"curriculum.jsonl": measurements}`` when the schedule measures, else ``{}``."""
        return {"curriculum.jsonl": list(self.measurements)} if self.every else {}

    def state_dict(self) -> dict:
        epoch = dict(self._epoch, linf_sum=float(self._epoch["linf_sum"]))
        return {"name": self.name, "step": self.step, "measurements": [dict(m) for m in self.measurements],
                "epoch": epoch, **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"curriculum state is for {state.get('name')!r}, this run's curriculum is {self.name!r}")
        self.step = int(state["step"])
        self.measurements = [dict(m) for m in state["measurements"]]
        self._epoch = dict(state["epoch"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


class PlainAT(Curriculum):
    """``none``: plain adversarial training (lambda_t = 1)."""

    name = "none"


class EpsRamp(Curriculum):
    """``eps``: eps_t = lambda_t * eps, alpha_t = lambda_t * alpha, lambda_t a linear or cosine ramp over
    ``ramp`` of training."""

    name = "eps"

    def difficulty(self, step=None):
        return ramp_value(self.step if step is None else step, self.ramp * self.total_steps, self.shape)

    def budget(self, eps, alpha):
        lam = self.difficulty()
        return lam * eps, (lam * alpha if lam > 0 else alpha)  # alpha must stay > 0; eps_t = 0 runs no attack


class ProbabilitySAT(Curriculum):
    """``p-sat``: full radius; an example's PGD stops once ``p_y(x_adv) < (1 - lambda_t) * prob``."""

    name = "p-sat"

    def difficulty(self, step=None):
        return ramp_value(self.step if step is None else step, self.ramp * self.total_steps, self.shape)

    def stop_prob(self):
        return (1.0 - self.difficulty()) * self.prob


class HessianSAT(Curriculum):
    """``h-sat``: lambda advances by ``every / (ramp * T)`` at a measurement whose top Hessian eigenvalue is
    at most ``threshold`` (or grew by at most ``ratio`` since the previous measurement)."""

    name = "h-sat"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.increment = min(1.0, self.every / (self.ramp * self.total_steps))
        self.lam = 0.0
        self.reference: float | None = None  # lambda_max at the previous measurement

    def difficulty(self, step=None):
        return self.lam  # changes only at measurements

    def budget(self, eps, alpha):
        return self.lam * eps, (self.lam * alpha if self.lam > 0 else alpha)

    def measured(self, lambda_max):
        if self.threshold is not None:
            ok = lambda_max <= self.threshold
        else:  # max(): a negative previous value (non-convex point) must not make every later one "too high"
            ok = self.reference is None or lambda_max <= max(self.reference, self.ratio * self.reference)
        self.reference = lambda_max
        if ok:
            # a count of increments, not a running sum: lambda reaches exactly 1 after ceil(1 / increment)
            self.lam = min(1.0, round(self.lam / self.increment + 1) * self.increment)
        return ok

    def _extra_state(self):
        return {"lambda": self.lam, "reference": self.reference}

    def _load_extra_state(self, state):
        self.lam, self.reference = float(state["lambda"]), state["reference"]


_CLASSES = {cls.name: cls for cls in (PlainAT, EpsRamp, ProbabilitySAT, HessianSAT)}


def create(name: str, **kwargs) -> Curriculum:
    """The curriculum ``name`` (one of :data:`CURRICULA`) with the keyword arguments of :class:`Curriculum`.

    Raises:
        ValueError: an unknown name or a bad argument (one line naming it).
    """
    if name not in _CLASSES:
        raise ValueError(f"curriculum name: got {name!r}, expected one of {list(CURRICULA)}")
    return _CLASSES[name](**kwargs)
