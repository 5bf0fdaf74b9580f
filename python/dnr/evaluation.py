"""Robust-accuracy evaluation that users can trust: several attacks, an eps sweep and sanity checks.

A single robust-accuracy number is easy to get wrong. A model that *masks* its gradients
(quantised or non-differentiable inputs, saturated softmax, stochastic layers, ...) makes
gradient attacks weak, so PGD reports a high "robust accuracy" that a stronger or
gradient-free attack would break (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a
False Sense of Security"; Carlini et al. 2019, "On Evaluating Adversarial Robustness", whose
checklist the sanity checks below follow). :func:`robust_evaluation` therefore reports

- clean, FGSM and PGD accuracy for several step counts (with random restarts),
- optionally AutoAttack (Croce & Hein 2020, through the independent ``torchattacks`` package)
  next to PGD on exactly the same examples,
- optionally PGD accuracy over a sweep of radii eps,

and checks the numbers for the classic symptoms of gradient masking (see
:func:`robust_evaluation`). :func:`autoattack_accuracy` is AutoAttack alone (``dnr eval
--autoattack``); :func:`format_sanity` prints the checks.

Inputs are raw pixels ``x [B, ...]`` in ``clip`` (default ``[0, 1]``), labels ``y [B]`` int64;
the model maps ``x`` to logits ``[B, K]`` (normalisation inside the model, as in
:mod:`dnr.attacks`). The attacks are :func:`dnr.attacks.fgsm` and :func:`dnr.attacks.pgd`.
"""
from __future__ import annotations

import json
import math
import numbers
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import attacks as _attacks
from ._files import tensors_sha256
from .eval_progress import EvaluationProgress

__all__ = ["autoattack_accuracy", "apgd_accuracy", "robust_evaluation", "format_sanity", "default_pgd_alpha", "SWEEP_LARGE_EPS"]

AUTOATTACK_INSTALL_HINT = "pip install torchattacks (or pip install 'dnr[attacks]')"

#: A swept eps at least this large (in [0, 1] pixel units) should bring any classifier to ~0 accuracy.
SWEEP_LARGE_EPS = 0.3
#: Accuracy allowed at the largest swept eps (when it is >= SWEEP_LARGE_EPS).
LARGE_EPS_MAX_ACC = 0.05


def default_pgd_alpha(eps: float, steps: int) -> float:
    """PGD step size used when none is given: ``2.5 * eps / steps`` (``1/255`` when eps = 0, where
    the projection keeps x unchanged). The harness's evaluation default (``dnr train``, ``dnr eval``)."""
    return 2.5 * eps / steps if eps > 0 else 1.0 / 255


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _real(fn: str, name: str, value, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {name}={value!r} ({type(value).__name__})")
    v = float(value)
    ok = math.isfinite(v) and (v > minimum if strict else v >= minimum)
    if not ok:
        raise ValueError(f"{fn}: {name} must be finite and {'>' if strict else '>='} {minimum:g}, got {name}={value!r}")
    return v


def _int(fn: str, name: str, value, minimum: int = 1, *, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int or None" if allow_none else "an int"
        raise TypeError(f"{fn}: {name} must be {what}, got {name}={value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {name}={value}")
    return int(value)


def _batches(fn: str, loader: Iterable, dev: torch.device, limit: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """(x, y) on ``dev``; stops after ``limit`` examples (the last batch cut to fit)."""
    seen = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"{fn}: loader must yield (x, y) pairs, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if limit is not None and seen + int(y.shape[0]) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += int(y.shape[0])
        if y.shape[0]:
            yield x.to(dev), y.to(dev)
        if limit is not None and seen >= limit:
            return


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).cpu()


def _resumable_correct(fn: str, model: nn.Module, loader: Iterable, dev: torch.device,
                       max_examples: Optional[int], resume_file: Optional[str], settings: dict,
                       batch_correct: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Per-example results ``[n]`` (bool, cpu) of ``batch_correct(x, y)`` over the loader's batches, saved after
    every batch to ``resume_file`` (when given) so that an interrupted call continues where it stopped.

    Exact for attacks whose result on a batch does not depend on the batches before it (torchattacks seeds each
    call); ``settings`` is everything else the results depend on (the weights and device are added).
    """
    fingerprint = json.dumps({**settings, "max_examples": max_examples, "device": dev.type,
                              "weights": tensors_sha256(model.state_dict()) if resume_file is not None else None})
    saved = EvaluationProgress(fn, resume_file, fingerprint, {})
    parts: Dict[str, List[Tensor]] = {"correct": [], **saved.parts}
    n = saved.n
    for bi, (x, y) in enumerate(_batches(fn, loader, dev, max_examples)):
        if bi < saved.done:  # evaluated before the interruption
            saved.skip(x, y)
            continue
        parts["correct"].append(batch_correct(x, y))
        n += int(y.shape[0])
        saved.save(x, y, parts, n)
    saved.finish_skipping()
    if n == 0:
        raise ValueError(f"{fn}: loader yielded no examples")
    saved.remove()
    return torch.cat(parts["correct"])


# --------------------------------------------------------------------------------------------
# AutoAttack (torchattacks)
# --------------------------------------------------------------------------------------------
def _import_torchattacks(fn: str):
    try:
        import torchattacks
    except ImportError:
        raise ImportError(f"{fn}: AutoAttack needs the torchattacks package: {AUTOATTACK_INSTALL_HINT}") from None
    return torchattacks


class _AutoAttack:
    """torchattacks' standard L-inf AutoAttack, batch by batch, built on the first batch.

    torchattacks seeds the *global* RNG (``torch.manual_seed``) and its FAB attack calls
    ``.backward()`` (which would fill parameter ``.grad``): each call runs under
    ``torch.random.fork_rng`` with parameter gradients switched off, so neither leaks out.
    """

    def __init__(self, fn: str, model: nn.Module, eps: float, seed: int, num_classes: Optional[int]):
        self.torchattacks = _import_torchattacks(fn)
        self.fn = fn
        self.model, self.eps, self.seed, self.num_classes = model, eps, seed, num_classes
        self.attack = None

    def correct(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-example bool ``[B]`` (cpu): still correctly classified after AutoAttack."""
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(self.model(x[:1]).shape[1])
        if self.num_classes < 4:
            # APGD-T's targeted DLR loss reads the 4th-largest logit.
            raise ValueError(f"{self.fn}: standard AutoAttack needs at least 4 classes (its targeted DLR loss "
                             f"uses the 4 largest logits), got num_classes={self.num_classes}")
        if self.attack is None:
            self.attack = self.torchattacks.AutoAttack(self.model, norm="Linf", eps=self.eps, version="standard",
                                                       n_classes=self.num_classes, seed=self.seed)
        params = [(p, p.requires_grad) for p in self.model.parameters()]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            for p, _ in params:
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=devices):
                x_adv = self.attack(x, y)
        finally:
            for p, flag in params:
                p.requires_grad_(flag)
        return _correct(self.model, x_adv.to(x.device, x.dtype), y)


def autoattack_accuracy(model: nn.Module, loader: Iterable, *, eps: float, seed: int = 0,
                        device: Optional[Union[str, torch.device]] = None, max_examples: Optional[int] = None,
                        num_classes: Optional[int] = None, resume_file: Optional[str] = None) -> Dict[str, object]:
    """Accuracy under AutoAttack (standard version, L-inf) through the independent ``torchattacks`` package.

    ``torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes,
    seed=seed)`` (APGD-CE, APGD-T, FAB-T, Square) on the first ``max_examples`` examples of
    ``loader``. The model runs in eval mode; its ``training`` flags, parameter ``.grad`` and the
    global RNG state are left as they were.

    Args:
        model: maps ``x [B, C, H, W]`` in ``[0, 1]`` to logits ``[B, K]``.
        loader: iterable of ``(x [B, ...], y [B])`` batches.
        eps: L-inf radius, ``>= 0``.
        seed: AutoAttack's seed.
        device: where to run; default the device of the model's parameters.
        max_examples: evaluate only the first this many examples (``None``: all).
        num_classes: K (``>= 4``, as AutoAttack's targeted DLR loss needs); default read from the
            model's output on the first batch.
        resume_file: a file in which the evaluation saves its progress after every batch (atomically); a
            later call with the same file, settings, weights and data skips the batches done and returns what an
            uninterrupted call returns (AutoAttack seeds every batch's run); the file is removed at the end.

    Returns:
        ``{"acc": float, "n": int, "correct": bool tensor [n] (cpu)}``.

    Raises:
        ImportError: torchattacks is not installed (the message says how to install it).
    """
    fn = "autoattack_accuracy"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    eps = _real(fn, "eps", eps)
    seed = _int(fn, "seed", seed, 0)
    max_examples = _int(fn, "max_examples", max_examples, 1, allow_none=True)
    num_classes = _int(fn, "num_classes", num_classes, 2, allow_none=True)
    dev = _attacks.check_device(fn, model, device)
    aa = _AutoAttack(fn, model, eps, seed, num_classes)
    settings = {"attack": "autoattack-standard-linf", "eps": eps, "seed": seed, "num_classes": num_classes}
    with _attacks.attack_mode(model, "eval"):
        correct = _resumable_correct(fn, model, loader, dev, max_examples, resume_file, settings, aa.correct)
    return {"acc": float(correct.float().mean()), "n": int(correct.numel()), "correct": correct}


def apgd_accuracy(model: nn.Module, loader: Iterable, *, eps: float, steps: int = 50, seed: int = 0,
                  device: Optional[Union[str, torch.device]] = None, max_examples: Optional[int] = None,
                  num_classes: Optional[int] = None, resume_file: Optional[str] = None) -> Dict[str, object]:
    """Accuracy under AutoAttack's two gradient attacks, APGD-CE then APGD-T, from ``torchattacks``.

    Per batch: ``torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce",
    seed=seed)`` on the examples the model classifies correctly, then ``torchattacks.APGDT(..., n_classes=K)``
    (targeted DLR loss) on those it still classifies correctly. Standard AutoAttack adds FAB-T and Square,
    which on models without gradient masking rarely find more (check with ``autoattack_accuracy``), at
    several times the cost. Eval mode; ``training`` flags, ``.grad`` and the global RNG are left as they were.

    Args:
        model: maps ``x [B, C, H, W]`` in ``[0, 1]`` to logits ``[B, K]``.
        loader: iterable of ``(x [B, ...], y [B])`` batches (the random starts depend on the batching).
        eps: L-inf radius, ``>= 0``; steps: iterations of each attack (``>= 1``); seed: the attacks' seed.
        device, max_examples, num_classes, resume_file: as for :func:`autoattack_accuracy` (K ``>= 4``; each
            batch's attacks are built with ``seed``, so a resumed call returns the uninterrupted result).

    Returns:
        ``{"acc": float, "n": int, "correct": bool tensor [n] (cpu)}``.
    """
    fn = "apgd_accuracy"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    eps = _real(fn, "eps", eps)
    steps = _int(fn, "steps", steps, 1)
    seed = _int(fn, "seed", seed, 0)
    max_examples = _int(fn, "max_examples", max_examples, 1, allow_none=True)
    num_classes = _int(fn, "num_classes", num_classes, 4, allow_none=True)
    torchattacks = _import_torchattacks(fn)
    dev = _attacks.check_device(fn, model, device)
    params = [(p, p.requires_grad) for p in model.parameters()]
    classes = [num_classes]  # read from the model's output on the first batch evaluated when not given

    def batch_correct(x: Tensor, y: Tensor) -> Tensor:
        if classes[0] is None:
            with torch.no_grad():
                classes[0] = int(model(x[:1]).shape[1])
            if classes[0] < 4:
                raise ValueError(f"{fn}: APGD-T's targeted DLR loss uses the 4 largest logits: needs at least "
                                 f"4 classes, got num_classes={classes[0]}")
        ok = _correct(model, x, y).to(x.device)
        attacks = (torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed),
                   torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1,
                                      n_classes=classes[0], seed=seed))
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            for p, _ in params:
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=devices):  # torchattacks seeds the global RNG
                for attack in attacks:
                    idx = ok.nonzero().flatten()
                    if idx.numel() == 0:
                        break
                    x_adv = attack(x[idx], y[idx]).to(x.device, x.dtype)
                    ok[idx] = _correct(model, x_adv, y[idx]).to(x.device)
        finally:
            for p, flag in params:
                p.requires_grad_(flag)
        return ok.cpu()

    settings = {"attack": "apgd-ce+apgd-t-linf", "eps": eps, "steps": steps, "seed": seed,
                "num_classes": num_classes}
    with _attacks.attack_mode(model, "eval"):
        correct = _resumable_correct(fn, model, loader, dev, max_examples, resume_file, settings, batch_correct)
    return {"acc": float(correct.float().mean()), "n": int(correct.numel()), "correct": correct}


# --------------------------------------------------------------------------------------------
# robust evaluation with sanity checks
# --------------------------------------------------------------------------------------------
def _tol(n: int) -> float:
    """Slack of the checks, in accuracy: one example or 0.5 %, whichever is larger."""
    return max(1.0 / n, 0.005) if n > 0 else 0.0


def _pct(a: float) -> str:
    return f"{100 * a:.2f}%"


def _sanity_checks(res: dict) -> List[dict]:
    checks: List[dict] = []
    n = res["n"]
    tol = _tol(n)
    steps_sorted = sorted(int(s) for s in res["pgd"])
    smax = steps_sorted[-1]
    pgd_max = res["pgd"][str(smax)]

    # 1. PGD (an iterated FGSM from a random start) must be at least as strong as FGSM.
    if res["fgsm"] is None:
        checks.append({"check": "pgd_below_fgsm", "passed": None, "detail": "FGSM was not run (fgsm=False)."})
    else:
        ok = pgd_max <= res["fgsm"] + tol
        checks.append({"check": "pgd_below_fgsm", "passed": ok,
                       "detail": f"PGD-{smax} accuracy {_pct(pgd_max)} {'<=' if ok else '>'} FGSM accuracy "
                                 f"{_pct(res['fgsm'])} + tolerance {_pct(tol)} (n={n})."
                                 + ("" if ok else " An iterative attack weaker than one step points to masked or "
                                                  "noisy gradients.")})

    # 2. More PGD steps can only help the attacker.
    if len(steps_sorted) < 2:
        checks.append({"check": "more_steps_not_stronger", "passed": None,
                       "detail": f"needs at least two PGD step counts, got pgd_steps={steps_sorted}."})
    else:
        accs = [res["pgd"][str(s)] for s in steps_sorted]
        rises = [(a, b, accs[i], accs[i + 1]) for i, (a, b) in enumerate(zip(steps_sorted, steps_sorted[1:]))
                 if accs[i + 1] > accs[i] + tol]
        seq = ", ".join(f"PGD-{s} {_pct(a)}" for s, a in zip(steps_sorted, accs))
        if rises:
            a, b, pa, pb = rises[0]
            detail = (f"accuracy rises with more steps: PGD-{a} {_pct(pa)} -> PGD-{b} {_pct(pb)} (tolerance "
                      f"{_pct(tol)}, n={n}); the attack does not converge (check the step size or masked gradients).")
        else:
            detail = f"accuracy does not rise with more steps: {seq} (tolerance {_pct(tol)}, n={n})."
        checks.append({"check": "more_steps_not_stronger", "passed": not rises, "detail": detail})

    # 3. AutoAttack (incl. the gradient-free Square attack) should not be weaker than PGD.
    if res["autoattack"] is None:
        checks.append({"check": "autoattack_not_above_pgd", "passed": None,
                       "detail": "AutoAttack was not run (autoattack=False)."})
    else:
        m = res["autoattack_n"]
        t = _tol(m)
        ok = res["autoattack"] <= res["autoattack_pgd"] + t
        checks.append({"check": "autoattack_not_above_pgd", "passed": ok,
                       "detail": f"AutoAttack accuracy {_pct(res['autoattack'])} {'<=' if ok else '>'} PGD-{smax} "
                                 f"accuracy {_pct(res['autoattack_pgd'])} + tolerance {_pct(t)} on the same {m} "
                                 f"examples." + ("" if ok else " AutoAttack weaker than PGD is unexpected: "
                                                               "check the evaluation setup.")})

    # 4./5. eps sweep.
    sweep = res["sweep"]
    if len(sweep) < 2:
        why = "no eps sweep was run (sweep_eps=None)." if not sweep else "needs at least two swept eps values."
        checks.append({"check": "monotone_in_eps", "passed": None, "detail": why})
    else:
        m = sweep[0]["n"]
        t = _tol(m)
        rises = [(a, b) for a, b in zip(sweep, sweep[1:]) if b["acc"] > a["acc"] + t]
        seq = ", ".join(f"eps {p['eps']:.4g}: {_pct(p['acc'])}" for p in sweep)
        if rises:
            a, b = rises[0]
            detail = (f"accuracy rises with eps: {_pct(a['acc'])} at eps {a['eps']:.4g} -> {_pct(b['acc'])} at eps "
                      f"{b['eps']:.4g} (PGD-{res['sweep_steps']}, tolerance {_pct(t)}, n={m}); a larger ball "
                      f"contains the smaller one, so the attack is failing (gradient masking?).")
        else:
            detail = f"accuracy non-increasing in eps (PGD-{res['sweep_steps']}, n={m}): {seq}."
        checks.append({"check": "monotone_in_eps", "passed": not rises, "detail": detail})
    if not sweep:
        checks.append({"check": "zero_at_large_eps", "passed": None,
                       "detail": "no eps sweep was run (sweep_eps=None)."})
    else:
        last = sweep[-1]
        if last["eps"] < SWEEP_LARGE_EPS:
            checks.append({"check": "zero_at_large_eps", "passed": None,
                           "detail": f"the largest swept eps {last['eps']:.4g} is below {SWEEP_LARGE_EPS}; "
                                     f"sweep up to eps >= {SWEEP_LARGE_EPS} to run this check."})
        else:
            ok = last["acc"] <= LARGE_EPS_MAX_ACC
            checks.append({"check": "zero_at_large_eps", "passed": ok,
                           "detail": f"accuracy {_pct(last['acc'])} at eps {last['eps']:.4g} "
                                     f"{'<=' if ok else '>'} {_pct(LARGE_EPS_MAX_ACC)} (PGD-{res['sweep_steps']}, "
                                     f"n={last['n']})." + ("" if ok else " Such a large perturbation should defeat "
                                                                         "any classifier: the attack is not working "
                                                                         "(gradient masking?).")})
    return checks


def _print_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def robust_evaluation(model: nn.Module, loader: Iterable, *, eps: float, alpha: Optional[float] = None,
                      pgd_steps: Sequence[int] = (20, 50), restarts: int = 1, fgsm: bool = True,
                      autoattack: bool = False, autoattack_examples: Optional[int] = None,
                      sweep_eps: Optional[Sequence[float]] = None, sweep_steps: int = 20,
                      sweep_examples: Optional[int] = None, seed: int = 0,
                      device: Optional[Union[str, torch.device]] = None, clip: Tuple[float, float] = (0.0, 1.0),
                      progress: Union[None, bool, Callable[[str], None]] = None,
                      resume_file: Optional[str] = None) -> Dict[str, object]:
    """Clean / FGSM / PGD (/ AutoAttack) accuracy, an eps sweep and gradient-masking sanity checks.

    What is computed (model in eval mode; one pass over ``loader``):

    - ``clean``: accuracy on the inputs as given;
    - ``fgsm``: accuracy under :func:`dnr.attacks.fgsm` at ``eps`` (``None`` when ``fgsm=False``);
    - ``pgd[str(k)]`` for each ``k`` in ``pgd_steps``: accuracy under :func:`dnr.attacks.pgd` with
      ``k`` steps, step size ``alpha`` (default ``2.5 * eps / k``, see :func:`default_pgd_alpha`)
      and ``restarts`` random starts. ``pgd`` keeps, per example, a successful restart whenever one
      exists, so an example counts as robust only if it survives every restart;
    - ``autoattack`` (when ``autoattack=True``): accuracy under standard L-inf AutoAttack (see
      :func:`autoattack_accuracy`) on the first ``autoattack_examples`` examples (``None``: all),
      and ``autoattack_pgd``: the PGD (largest step count) accuracy on exactly those examples;
    - ``sweep`` (when ``sweep_eps`` is given): PGD-``sweep_steps`` accuracy (step size
      ``2.5 * e / sweep_steps``, ``restarts`` starts) at each radius ``e`` of ``sorted(set(sweep_eps))``
      on the first ``sweep_examples`` examples (``None``: all).

    Every PGD run (each step count, each swept eps) draws its random starts from its own CPU
    ``torch.Generator`` seeded with ``seed`` (the PGD at ``pgd_steps[i]`` thus reproduces
    :func:`dnr.attacks.evaluate` / ``dnr eval`` with the same settings and seed); AutoAttack is
    seeded with ``seed``. The global RNG is not touched, so two calls give identical results.

    Sanity checks (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of Security";
    Carlini et al. 2019, "On Evaluating Adversarial Robustness", section on basic sanity tests).
    A defence that *masks* gradients (shattered, stochastic or vanishing gradients) defeats
    gradient attacks without being robust; these are its usual symptoms. Each check is
    ``{"check": id, "passed": True/False/None (not run), "detail": sentence with the numbers}``
    with a tolerance of ``max(1 example, 0.5 %)`` of the examples compared:

    1. ``pgd_below_fgsm``: PGD (max steps) accuracy <= FGSM accuracy. PGD contains FGSM's step;
       an iterative attack weaker than a single step means its gradient steps lead nowhere
       (masked / noisy gradients, or a bad step size).
    2. ``more_steps_not_stronger``: accuracy never rises with more PGD steps. Otherwise the attack
       has not converged or gradients are unreliable.
    3. ``autoattack_not_above_pgd``: AutoAttack (which includes the gradient-free Square attack and
       the margin-based APGD-T/FAB-T) accuracy <= PGD accuracy on the same subset. AutoAttack
       well below PGD is *allowed* (it is stronger) but is itself a hint that PGD was fooled; above
       PGD means something in the setup is wrong.
    4. ``monotone_in_eps``: accuracy non-increasing in eps: a larger ball contains the smaller one,
       so a working attack can only do better.
    5. ``zero_at_large_eps``: accuracy <= 5 % at the largest swept eps when it is >= 0.3 (in
       [0, 1] pixel units a perturbation that large can turn any image into another class; a
       model still "robust" there has an attack that fails, not a robust model). Not run
       (``passed=None``) when the largest swept eps is below 0.3.

    Passing the checks does not prove robustness; failing one means the numbers must not be trusted.

    Args:
        model: maps ``x [B, ...]`` (raw pixels in ``clip``) to logits ``[B, K]``.
        loader: iterable of ``(x [B, ...], y [B])`` batches (e.g. a ``DataLoader``), same order
            every pass is not required (it is read once).
        eps: L-inf radius, ``>= 0``.
        alpha: PGD step size ``> 0`` for every step count (default ``2.5 * eps / k`` per count).
        pgd_steps: PGD step counts, each ``>= 1`` (non-empty).
        restarts: PGD random restarts, ``>= 1``.
        fgsm: run FGSM.
        autoattack: run AutoAttack (needs ``torchattacks`` and ``clip == (0, 1)``).
        autoattack_examples: AutoAttack on the first this many examples (``>= 1``; ``None``: all).
        sweep_eps: radii to sweep (each ``>= 0``), or ``None`` for no sweep.
        sweep_steps: PGD steps of the sweep, ``>= 1``.
        sweep_examples: sweep on the first this many examples (``>= 1``; ``None``: all).
        seed: seed of all random starts (``>= 0``).
        device: where to run; default the device of the model's parameters.
        clip: valid pixel range ``(lo, hi)``.
        progress: ``True`` prints a line per batch to stderr; a callable receives that line.
        resume_file: a file in which the evaluation saves its progress after every batch (atomically); a
            later call with the same settings and the same weights skips the batches it holds and returns
            what an uninterrupted call would (:mod:`dnr.eval_progress` says why that is exact). A file
            written for other settings or weights is replaced; one written for other data is a
            ValueError. Removed when the evaluation finishes. ``None`` (default): nothing is saved.

    Returns:
        A JSON-serialisable dict: ``n`` (examples), ``eps``, ``clean``, ``fgsm`` (or ``None``),
        ``pgd`` ``{str(k): acc}``, ``pgd_alpha`` ``{str(k): alpha}``, ``restarts``, ``autoattack``
        (or ``None``), ``autoattack_n`` (or ``None``), ``autoattack_pgd`` (or ``None``), ``sweep``
        ``[{"eps", "acc", "n"}]`` sorted by eps, ``sweep_steps``, ``sanity`` (list of checks, see
        above), ``seed``, ``seconds`` (wall time).
    """
    fn = "robust_evaluation"
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    eps = _real(fn, "eps", eps)
    if alpha is not None:
        alpha = _real(fn, "alpha", alpha, strict=True)
    if isinstance(pgd_steps, numbers.Integral) and not isinstance(pgd_steps, bool):
        pgd_steps = (pgd_steps,)
    try:
        steps_list = list(pgd_steps)
    except TypeError:
        raise TypeError(f"{fn}: pgd_steps must be a sequence of ints, got pgd_steps={pgd_steps!r}") from None
    if not steps_list:
        raise ValueError(f"{fn}: pgd_steps must name at least one step count, got pgd_steps={pgd_steps!r}")
    steps_list = sorted(set(_int(fn, "pgd_steps entry", s, 1) for s in steps_list))
    restarts = _int(fn, "restarts", restarts, 1)
    autoattack_examples = _int(fn, "autoattack_examples", autoattack_examples, 1, allow_none=True)
    sweep_steps = _int(fn, "sweep_steps", sweep_steps, 1)
    sweep_examples = _int(fn, "sweep_examples", sweep_examples, 1, allow_none=True)
    seed = _int(fn, "seed", seed, 0)
    lo, hi = _attacks.check_clip_range(fn, clip)
    sweep: Optional[List[float]] = None
    if sweep_eps is not None:
        try:
            raw = list(sweep_eps)
        except TypeError:
            raise TypeError(f"{fn}: sweep_eps must be a sequence of numbers or None, got sweep_eps={sweep_eps!r}") \
                from None
        if not raw:
            raise ValueError(f"{fn}: sweep_eps must hold at least one eps (or be None), got sweep_eps={sweep_eps!r}")
        sweep = sorted(set(_real(fn, "sweep_eps entry", e) for e in raw))
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError(f"{fn}: progress must be None, a bool or a callable, got {type(progress).__name__}")
    if autoattack and (lo, hi) != (0.0, 1.0):
        raise ValueError(f"{fn}: AutoAttack (torchattacks) needs inputs in [0, 1], got clip=({lo}, {hi})")
    dev = _attacks.check_device(fn, model, device)
    aa = _AutoAttack(fn, model, eps, seed, None) if autoattack else None

    alphas = {k: (alpha if alpha is not None else default_pgd_alpha(eps, k)) for k in steps_list}
    gens = {k: torch.Generator().manual_seed(seed) for k in steps_list}
    sweep_gens = {e: torch.Generator().manual_seed(seed) for e in (sweep or [])}
    parts: Dict[str, List[Tensor]] = {"clean": [], "fgsm": [], "aa": [], **{f"pgd{k}": [] for k in steps_list},
                                      **{f"sweep{i}": [] for i in range(len(sweep or []))}}
    say: Optional[Callable[[str], None]] = None
    if progress is True:
        say = _print_stderr
    elif callable(progress):
        say = progress

    kmax = steps_list[-1]
    # everything the per-example results depend on besides the data (which is hashed batch by batch)
    fingerprint = json.dumps({
        "eps": eps, "alphas": {str(k): a for k, a in alphas.items()}, "restarts": restarts, "fgsm": fgsm,
        "autoattack": autoattack, "autoattack_examples": autoattack_examples, "sweep": sweep,
        "sweep_steps": sweep_steps, "sweep_examples": sweep_examples, "seed": seed, "clip": [lo, hi],
        "device": dev.type, "weights": tensors_sha256(model.state_dict()) if resume_file is not None else None})
    saved = EvaluationProgress(fn, resume_file, fingerprint,
                               {**{f"pgd{k}": g for k, g in gens.items()},
                                **{f"sweep{i}": sweep_gens[e] for i, e in enumerate(sweep or [])}})
    parts.update(saved.parts)
    n = saved.n
    if saved.done and say is not None:
        say(f"[dnr.robust_evaluation] resuming after batch {saved.done} (n={n}) from {resume_file}")
    with _attacks.attack_mode(model, "eval"):
        for bi, (x, y) in enumerate(_batches(fn, loader, dev)):
            if bi < saved.done:  # evaluated before the interruption
                saved.skip(x, y)
                continue
            b = int(y.shape[0])
            parts["clean"].append(_correct(model, x, y))
            if fgsm:
                parts["fgsm"].append(_correct(model, _attacks.fgsm(model, x, y, eps, clip=(lo, hi)), y))
            for k in steps_list:
                x_adv = _attacks.pgd(model, x, y, eps, alphas[k], k, restarts=restarts, clip=(lo, hi),
                                     generator=gens[k])
                parts[f"pgd{k}"].append(_correct(model, x_adv, y))
            if aa is not None:
                m = b if autoattack_examples is None else max(0, min(b, autoattack_examples - n))
                if m:
                    parts["aa"].append(aa.correct(x[:m], y[:m]))
            if sweep:
                m = b if sweep_examples is None else max(0, min(b, sweep_examples - n))
                if m:
                    for i, e in enumerate(sweep):
                        x_adv = _attacks.pgd(model, x[:m], y[:m], e, default_pgd_alpha(e, sweep_steps), sweep_steps,
                                             restarts=restarts, clip=(lo, hi), generator=sweep_gens[e])
                        parts[f"sweep{i}"].append(_correct(model, x_adv, y[:m]))
            n += b
            if say is not None:
                acc = lambda key: float(torch.cat(parts[key]).float().mean())  # noqa: E731
                line = f"[dnr.robust_evaluation] batch {bi + 1}: n={n} clean {acc('clean'):.4f}"
                if fgsm:
                    line += f" fgsm {acc('fgsm'):.4f}"
                line += "".join(f" pgd{k} {acc(f'pgd{k}'):.4f}" for k in steps_list)
                if parts["aa"]:
                    line += f" autoattack {acc('aa'):.4f}"
                say(line)
            saved.save(x, y, parts, n)
    saved.finish_skipping()
    if n == 0:
        raise ValueError(f"{fn}: loader yielded no examples")

    def acc_of(ts: List[Tensor]) -> float:
        return float(torch.cat(ts).float().mean())

    res: Dict[str, object] = {
        "n": n, "eps": eps, "clean": acc_of(parts["clean"]), "fgsm": acc_of(parts["fgsm"]) if fgsm else None,
        "pgd": {str(k): acc_of(parts[f"pgd{k}"]) for k in steps_list},
        "pgd_alpha": {str(k): alphas[k] for k in steps_list}, "restarts": restarts,
        "autoattack": None, "autoattack_n": None, "autoattack_pgd": None,
        "sweep": [], "sweep_steps": sweep_steps, "seed": seed,
    }
    if aa is not None:
        aa_correct = torch.cat(parts["aa"])
        m = int(aa_correct.numel())
        res["autoattack"] = float(aa_correct.float().mean())
        res["autoattack_n"] = m
        res["autoattack_pgd"] = float(torch.cat(parts[f"pgd{kmax}"])[:m].float().mean())
    for i, e in enumerate(sweep or []):
        c = torch.cat(parts[f"sweep{i}"])
        res["sweep"].append({"eps": e, "acc": float(c.float().mean()), "n": int(c.numel())})
    res["sanity"] = _sanity_checks(res)
    res["seconds"] = time.perf_counter() - t0
    saved.remove()
    return res


def format_sanity(result: Dict[str, object]) -> str:
    """The sanity checks of a :func:`robust_evaluation` result, one line each::

        sanity checks (gradient masking):
          PASS     pgd_below_fgsm: PGD-50 accuracy 41.00% <= FGSM accuracy 52.00% + ...
          skipped  autoattack_not_above_pgd: AutoAttack was not run (autoattack=False).
    """
    checks = result.get("sanity") if isinstance(result, dict) else None
    if checks is None:
        raise ValueError("format_sanity: result must be a robust_evaluation result with a 'sanity' list")
    lines = ["sanity checks (gradient masking):"]
    for c in checks:
        status = {True: "PASS", False: "FAIL", None: "skipped"}[c["passed"]]
        lines.append(f"  {status:<8} {c['check']}: {c['detail']}")
    failed = [c["check"] for c in checks if c["passed"] is False]
    if failed:
        lines.append(f"  WARNING: {len(failed)} check(s) failed ({', '.join(failed)}): do not trust these robust "
                     f"accuracies before ruling out gradient masking.")
    return "\n".join(lines)
