"""The harness's evaluation policy: clean / FGSM / PGD accuracy of a model on a test loader with a seeded
attack generator, sharded over the processes of a data-parallel run.

The layers, one path from the attack primitives up:

1. :func:`dnr.attacks.evaluate` measures one model on one loader (clean / FGSM / PGD with a generator).
2. :func:`final_evaluation` here adds the harness's policy (seeding, progress, sharding over processes);
   it is what ``dnr train`` reports per epoch and at the end.
3. :func:`dnr.evaluation.robust_evaluation` (built on the same attack functions) adds PGD at several step
   counts with restarts, AutoAttack, an eps sweep and the gradient-masking sanity checks; ``dnr compare``
   evaluates every cell with it.
4. :func:`evaluate_trained` is ``dnr eval``: the defaults for a trained run (:func:`attack_settings`: the
   run's own evaluation settings), level 2, and on request AutoAttack or level 3 (:func:`sanity_settings`).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch.utils.data import DataLoader

from .. import attacks, distributed, evaluation
from ..evaluation import default_pgd_alpha
from ..nn import density_report
from .builders import make_test_loader
from .console import ConsoleLog
from .config import ConfigError, TrainConfig, validate_options

__all__ = ["final_evaluation", "sharded_evaluation", "evaluate_trained", "attack_settings", "sanity_settings",
           "check_evaluation_options", "resolve_device", "EVAL_OPTION_FIELDS", "RESUME_FILES", "SANITY_LONG_PGD"]


def final_evaluation(model, loader, *, eps, alpha, steps, restarts, seed, log: ConsoleLog | None = None,
                     fgsm=True, pgd=True, desc="eval") -> dict:
    """Clean / FGSM / PGD accuracy with a seeded PGD generator (does not touch the global RNG).

    With several processes each rank evaluates every ``world_size``-th batch (its PGD starts drawn from
    its own seed) and the correct counts are summed over the ranks.
    """
    world = distributed.world_size()
    if world > 1:
        return sharded_evaluation(model, loader, eps=eps, alpha=alpha, steps=steps, restarts=restarts, seed=seed,
                                   fgsm=fgsm, pgd=pgd)
    bar = log.bar(total=len(loader), desc=desc) if log is not None else None
    wrapped = loader
    if bar is not None:
        def wrapped_iter():
            for batch in loader:
                yield batch
                bar.update(1)
        wrapped = wrapped_iter()
    try:
        return attacks.evaluate(model, wrapped, eps=eps, alpha=alpha, steps=steps, restarts=restarts, fgsm=fgsm,
                                pgd=pgd, generator=torch.Generator().manual_seed(seed))
    finally:
        if bar is not None:
            bar.close()


def sharded_evaluation(model, loader, *, eps, alpha, steps, restarts, seed, fgsm, pgd) -> dict:
    """final_evaluation over several processes: rank r takes batches r, r + world, ...; counts are summed."""
    rank, world = distributed.rank(), distributed.world_size()
    size, n_data = loader.batch_size, len(loader.dataset)
    batches = [list(range(i * size, min(n_data, (i + 1) * size))) for i in range(rank, len(loader), world)]
    res = None
    if batches:
        res = attacks.evaluate(model, DataLoader(loader.dataset, batch_sampler=batches), eps=eps, alpha=alpha,
                               steps=steps, restarts=restarts, fgsm=fgsm, pgd=pgd,
                               generator=torch.Generator().manual_seed(distributed.rank_seed(seed, rank)))
    keys = [k for k, on in (("clean", True), ("fgsm", fgsm), ("pgd", pgd)) if on]
    n = res["n"] if res else 0
    # each accuracy is a count divided by n: round back to the count before summing
    total = distributed.all_reduce_sum([n] + [round(res[k] * n) if res else 0 for k in keys])
    n_all = int(round(total[0]))
    out = dict(res) if res else {}
    out.update(clean=None, fgsm=None, pgd=None, n=n_all)
    out.update({k: total[1 + i] / n_all for i, k in enumerate(keys)})
    return out


# ---------------------------------------------------------------------------------------- a trained run
# dnr eval's options and the TrainConfig fields whose rules (and defaults) they follow
EVAL_OPTION_FIELDS = {"test_size": "test_size", "batch_size": "eval_batch_size", "steps": "eval_steps",
                      "restarts": "eval_restarts", "eps": "eval_eps", "alpha": "eval_alpha", "seed": "seed"}
#: ``evaluate_trained(resume_dir=...)``: the progress file of each long evaluation in that folder
# (named apart from dnr compare's robust_eval.partial.pt, so that a run folder can hold both)
RESUME_FILES = {"autoattack": "eval-autoattack.partial.pt", "apgd": "eval-apgd.partial.pt",
                "sanity": "eval-sanity.partial.pt"}
SANITY_LONG_PGD = 50  # the sanity checks compare PGD-k with PGD-50: more steps must not raise the accuracy


def check_evaluation_options(**given) -> dict:
    """Check an evaluation's numbers (names of EVAL_OPTION_FIELDS; None = not given) by the config's own rules
    for the fields they set; errors name them as ``dnr eval``'s flags (``--steps``). Returns the given values,
    converted."""
    values = {EVAL_OPTION_FIELDS[name]: v for name, v in given.items() if v is not None}
    flags = {field: "--" + name.replace("_", "-") for name, field in EVAL_OPTION_FIELDS.items()}
    checked = validate_options(values, flags=flags)
    return {name: checked[field] for name, field in EVAL_OPTION_FIELDS.items() if field in checked}


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; a cuda device without CUDA is a ConfigError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"option --device: got {name!r}, but CUDA is not available here")
    return name


def attack_settings(cfg: TrainConfig, *, eps=None, alpha=None, steps=None, restarts=None, seed=None) -> dict:
    """The attack of an evaluation of a run: every setting not given is the run's (eval_eps, eval_steps,
    eval_restarts, seed, which reproduce its final evaluation); the step size is the run's eval alpha while
    neither eps nor steps changes, else the default rule for the given eps and steps."""
    eps_ = cfg.resolved_eval_eps if eps is None else eps
    steps_ = cfg.eval_steps if steps is None else steps
    if alpha is None:
        alpha = cfg.resolved_eval_alpha if eps is None and steps is None else default_pgd_alpha(eps_, steps_)
    return {"eps": eps_, "alpha": alpha, "steps": steps_,
            "restarts": cfg.eval_restarts if restarts is None else restarts,
            "seed": cfg.seed if seed is None else seed}


def sanity_settings(eps: float, steps: int) -> dict:
    """The gradient-masking checks' attacks: PGD with ``steps`` and with SANITY_LONG_PGD steps, and an eps
    sweep [0, eps/2, eps, 2 eps, 0.3, 0.5]."""
    return {"pgd_steps": (steps, SANITY_LONG_PGD) if steps < SANITY_LONG_PGD else (steps,),
            "sweep_eps": sorted({0.0, eps / 2, eps, 2 * eps, 0.3, 0.5})}


def evaluate_trained(model, cfg: TrainConfig, *, device: str, data_root=None, test_size=None, batch_size=None,
                     eps=None, alpha=None, steps=None, restarts=None, seed=None, fgsm=True, pgd=True,
                     autoattack=False, apgd=False, sanity=False, quiet=False, resume_dir=None) -> dict:
    """``dnr eval``: clean / FGSM / PGD (final_evaluation with :func:`attack_settings`), optionally AutoAttack
    and APGD-CE + APGD-T (:func:`dnr.evaluation.apgd_accuracy`, under "apgd"),
    and with ``sanity`` the gradient-masking checks of :func:`dnr.evaluation.robust_evaluation` (full result
    under "robust"), on the run's test split; plus the model's density and compression.

    Args:
        model: the trained model (on ``device``), ``cfg`` its config (``dnr.harness.load_trained_model``).
        data_root, test_size, batch_size: the test data (default: the run's).
        eps, alpha, steps, restarts, seed: the attack (None: see attack_settings).
        resume_dir: an existing folder where the long evaluations (AutoAttack, APGD, the sanity checks) save their
            progress after every batch, one file each (:data:`RESUME_FILES`); the same call again continues an
            interrupted one and returns the uninterrupted result. Each file is removed when its evaluation ends.
    """
    check_evaluation_options(test_size=test_size, batch_size=batch_size, steps=steps, restarts=restarts, eps=eps,
                             alpha=alpha, seed=seed)
    cfg = dataclasses.replace(cfg)
    if data_root is not None:
        cfg.data_root = data_root
    if batch_size is not None:
        cfg.eval_batch_size = batch_size
    if test_size is not None:
        cfg.test_size = test_size
    att = attack_settings(cfg, eps=eps, alpha=alpha, steps=steps, restarts=restarts, seed=seed)

    def resume_path(stage: str):
        return None if resume_dir is None else os.path.join(resume_dir, RESUME_FILES[stage])

    loader = make_test_loader(cfg)
    res = final_evaluation(model, loader, eps=att["eps"], alpha=att["alpha"], steps=att["steps"],
                           restarts=att["restarts"], seed=att["seed"], log=ConsoleLog(quiet=quiet, progress=True),
                           fgsm=fgsm, pgd=pgd)
    out = {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method, "mode": cfg.mode, "n": res["n"],
           "clean": res["clean"], "fgsm": res["fgsm"], "pgd": res["pgd"], "autoattack": None, "apgd": None,
           "eps": att["eps"],
           "alpha": att["alpha"], "pgd_steps": att["steps"], "pgd_restarts": att["restarts"], "seed": att["seed"]}
    try:
        if sanity:
            robust = evaluation.robust_evaluation(
                model, loader, eps=att["eps"], alpha=alpha, restarts=att["restarts"], fgsm=fgsm,
                autoattack=autoattack, seed=att["seed"], device=device, progress=None if quiet else True,
                resume_file=resume_path("sanity"), **sanity_settings(att["eps"], att["steps"]))
            out["robust"] = robust
            if autoattack:
                out["autoattack"] = robust["autoattack"]
        elif autoattack:
            out["autoattack"] = evaluation.autoattack_accuracy(
                model, loader, eps=att["eps"], seed=att["seed"], device=device,
                resume_file=resume_path("autoattack"))["acc"]
        if apgd:
            out["apgd"] = evaluation.apgd_accuracy(model, loader, eps=att["eps"], seed=att["seed"], device=device,
                                                   resume_file=resume_path("apgd"))["acc"]
    except ImportError:
        if not (autoattack or apgd):
            raise
        raise ConfigError(f"option {'--autoattack' if autoattack else '--apgd'} needs the torchattacks package: "
                          f"{evaluation.AUTOATTACK_INSTALL_HINT}") from None
    report = density_report(model)
    out.update(density=report.density, compression=report.compression)
    return out
