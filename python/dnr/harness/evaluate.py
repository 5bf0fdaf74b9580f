"""The harness's evaluation policy: clean / FGSM / PGD accuracy of a model on a test loader with a seeded
attack generator, sharded over the processes of a data-parallel run.

The layers: :func:`dnr.attacks.evaluate` measures one model on one loader (the attack primitives);
:func:`final_evaluation` here adds the run's policy (seeding, progress, sharding) and is what ``dnr train``
(per epoch and at the end), ``dnr eval`` and ``dnr compare`` report; :func:`dnr.evaluation.robust_evaluation`
adds the gradient-masking sanity checks and AutoAttack on top of the same attack functions.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .. import attacks, distributed
from .callbacks import ConsoleLog

__all__ = ["final_evaluation", "sharded_evaluation"]


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
