"""The training engine: one adversarial step (PGD examples, the hybrid loss, one optimizer step) and the
epoch loop over a loader.

It knows nothing of compression methods, run directories or configs: a method reaches it only through
the optimizer's step hooks and the ``penalty`` callable, the harness (:mod:`dnr.harness.trainer`)
through the arguments. It never imports the harness.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable

import torch
from torch import nn

from . import attacks
from .losses import hybrid_loss

__all__ = ["adversarial_step", "train_epoch"]


def adversarial_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    eps: float,
    alpha: float,
    steps: int,
    beta: float = 0.5,
    attack_bn_mode: str = "eval",
    generator: torch.Generator | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    grad_sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    curriculum=None,
    max_grad_norm: float | None = None,
) -> dict:
    """One hybrid adversarial training step.

    Generates ``x_adv`` with L-inf PGD (input gradients only, BatchNorm in eval mode by default), then
    minimises ``beta * CE(f(x), y) + (1 - beta) * CE(f(x_adv), y)`` with one optimizer step. A DNR
    controller (or any masked method) attached to ``optimizer`` re-applies the masks right after the step. ``beta = 1`` with
    ``steps`` ignored gives clean training (no attack is run). ``penalty()``, when given, is a scalar
    regulariser (e.g. ADMM's or RSR's) added to the loss; the returned loss includes it.

    ``curriculum`` (a :class:`dnr.curriculum.Curriculum`), when given, makes the step's adversarial examples
    from ``eps`` / ``alpha`` / ``steps`` at its difficulty (SAT); None is plain PGD with them.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the attack's and the training's forward passes under
    ``torch.autocast``; the backward pass, the optimizer and the masks stay in the parameters' dtype.

    ``max_grad_norm``, when given, rescales the gradients of ``model``'s parameters so that their global L2
    norm is at most that (``torch.nn.utils.clip_grad_norm_``) before the optimizer step: a recurrent network's
    gradients can explode at a learning rate that trains it well otherwise.

    Data-parallel training passes ``grad_sync(stats)`` (see :class:`dnr.distributed.GradientSync`): called
    after ``backward()``, it averages the gradients over the ranks and returns ``stats`` (float32 [4]:
    loss x n, clean correct, adversarial correct, n) summed over them, so the returned numbers are the
    global batch's and a non-finite loss on any rank stops every rank before the step.

    Args:
        x: [B, C, H, W] inputs in [0, 1]; y: [B] int64 labels.

    Returns:
        dict with the loss and the numbers of correct clean and adversarial predictions.

    Raises:
        FloatingPointError: if the loss is NaN or infinite (the optimizer step is not taken).
    """
    was_training = model.training
    amp = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        if beta < 1.0 and curriculum is not None:
            x_adv = curriculum.adversarial_examples(model, x, y, eps=eps, alpha=alpha, steps=steps,
                                                    bn_mode=attack_bn_mode, generator=generator)
        elif beta < 1.0:
            x_adv = attacks.pgd(model, x, y, eps, alpha, steps, bn_mode=attack_bn_mode, generator=generator)
        model.train(was_training)
        clean_logits = model(x)
        adv_logits = model(x_adv) if beta < 1.0 else clean_logits.detach()
        loss = hybrid_loss(clean_logits, adv_logits, y, beta=beta)
        if penalty is not None:
            extra = penalty()
            if extra is not None:
                loss = loss + extra
    clean_correct = (clean_logits.argmax(1) == y).sum()
    adv_correct = (adv_logits.argmax(1) == y).sum()
    if grad_sync is None:
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}: stopping before the optimizer step")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _clip_gradients(model, max_grad_norm)
        optimizer.step()
        return {"loss": value, "clean_correct": int(clean_correct), "adv_correct": int(adv_correct),
                "n": int(y.numel())}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    n = y.numel()
    stats = torch.stack([loss.detach().float() * n, clean_correct.float(), adv_correct.float(),
                         torch.tensor(float(n), device=loss.device)])
    total_loss, clean, adv, n_all = grad_sync(stats).tolist()
    if not math.isfinite(total_loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss is {total_loss / n_all} (over all ranks): stopping before the optimizer step")
    _clip_gradients(model, max_grad_norm)  # after the averaging: every rank sees the same gradients, clips alike
    optimizer.step()
    return {"loss": total_loss / n_all, "clean_correct": int(round(clean)), "adv_correct": int(round(adv)),
            "n": int(round(n_all))}


def _clip_gradients(model: nn.Module, max_norm: float | None) -> None:
    if max_norm is not None:  # clip_grad_norm_ skips the parameters without a gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
    beta: float = 0.5,
    device: torch.device | str | None = None,
    lr_scheduler=None,
    progress=None,
    attack_bn_mode: str = "eval",
    totals: dict | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    grad_sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    curriculum=None,
    max_grad_norm: float | None = None,
) -> dict:
    """Train ``model`` for one epoch of hybrid adversarial training.

    A compression method's epoch end (e.g. ``dnr.DNR.end_epoch``) is the caller's: call it after this.

    Args:
        loader: iterable of (x [B, C, H, W] in [0, 1], y [B]) batches.
        lr_scheduler: stepped once per batch when given.
        progress: optional callable(batch_index, stats) called after every batch (after the optimizer
            and scheduler steps, and after ``totals`` is updated).
        attack_bn_mode: BatchNorm mode while generating the training attack ("eval" or "train").
        totals: running sums {"loss", "clean_correct", "adv_correct", "n"} to continue (a resumed epoch);
            updated in place. None starts from zero.
        penalty: optional callable returning a scalar added to every step's loss (see adversarial_step).
        grad_sync: data-parallel gradient averaging (see adversarial_step); the totals are then the
            global batches'.
        autocast_dtype: forward passes under ``torch.autocast`` in this dtype (see adversarial_step).
        channels_last: move the input batches to the channels-last memory format (for a model converted
            with ``model.to(memory_format=torch.channels_last)``).
        curriculum: a :class:`dnr.curriculum.Curriculum` consulted at every step (see adversarial_step).
        max_grad_norm: clip every step's global gradient norm to this (see adversarial_step); None: never.

    Returns:
        dict: mean loss, clean and adversarial training accuracy, images, images/s, seconds.
    """
    model.train()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if totals is None:
        totals = {"loss": 0.0, "clean_correct": 0, "adv_correct": 0, "n": 0}
    seen = totals["n"]  # images counted before this call (a resumed epoch): not part of images/s
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            out = adversarial_step(model, x, y, optimizer, eps=eps, alpha=alpha, steps=steps, beta=beta,
                                   attack_bn_mode=attack_bn_mode, penalty=penalty, grad_sync=grad_sync,
                                   autocast_dtype=autocast_dtype, curriculum=curriculum,
                                   max_grad_norm=max_grad_norm)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err} (batch {i} of this epoch)") from None
        if lr_scheduler is not None:
            lr_scheduler.step()
        totals["loss"] += out["loss"] * out["n"]
        for key in ("clean_correct", "adv_correct", "n"):
            totals[key] += out[key]
        if progress is not None:
            progress(i, out)
    seconds = time.perf_counter() - start
    n = max(1, totals["n"])
    return {
        "loss": totals["loss"] / n,
        "train_clean_acc": totals["clean_correct"] / n,
        "train_adv_acc": totals["adv_correct"] / n,
        "images": totals["n"],
        "seconds": seconds,
        "images_per_s": (totals["n"] - seen) / seconds if seconds > 0 else float("nan"),
    }

