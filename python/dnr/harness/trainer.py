"""The trainer: one process's training of a run, from its config to its summary. It reads top to bottom:

    build the parts (builders) -> restore a checkpoint -> callbacks.on_run_start
    -> per epoch: train_epoch (engine: attack, loss, step; method.after_step after every step)
                  -> method.epoch_end -> the metrics row -> callbacks.on_epoch_end (evaluation, checkpoint,
                  metrics files, TensorBoard, console line)
    -> final evaluation -> callbacks.on_run_end (model.pt, summary.json, report)

Training is the trainer's; everything it reports or writes is a callback's (:mod:`dnr.harness.callbacks`
documents the hooks and the order it calls them in). The compression method (:mod:`dnr.methods`) is
reached only through its interface; the driver (:mod:`dnr.harness.run`) decides what to train or resume
and sets up the process.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import curriculum as curricula
from .. import distributed, methods
from ..data.loader import BatchLoader
from ..engine import train_epoch
from .builders import (EpochBatchSampler, build_dataset, build_model_for, lr_factor, make_optimizer, make_test_loader,
                       prepare_user_model)
from .callbacks import (CallbackList, Checkpoints, ConsoleLines, EpochEvaluation, ProgressBar, RunFiles, StepDelay,
                        TensorBoard, TrainingRun, epoch_row)
from .checkpoint import CheckpointError, load_model_state, set_rng_state
from .config import ConfigError
from .console import ConsoleLog
from .errors import TrainingDiverged
from .evaluate import final_evaluation

__all__ = ["train", "CHECKPOINT"]

CHECKPOINT = os.path.join("checkpoints", "last.pt")


def train(cfg, ctx, run_dir, state, log, user_model, train_data, test_data, user_callbacks=()) -> dict:
    """The training loop of ``fit`` on this process (rank ``ctx.rank`` of ``ctx.world_size``): builds the
    run's parts, restores ``state`` (a training checkpoint) when given, trains, evaluates and writes the
    run directory (rank 0). ``user_callbacks`` run after the evaluation and before the checkpoint. Returns
    the summary."""
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    main = rank == 0  # rank 0 prints and writes the run directory
    if not main:
        log = ConsoleLog(True, False)
    tensorboard = TensorBoard() if cfg.tensorboard else None  # checks the package before any work

    # Everything that can fail on bad input happens before the run directory is touched.
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 1, rank))
    train_set = train_data if train_data is not None else build_dataset(cfg, "train", data_gen)
    test_loader = make_test_loader(cfg, dataset=test_data)
    eval_loader = make_test_loader(cfg, cfg.eval_size, dataset=test_data)
    input_shape = tuple(train_set[0][0].shape)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"option --batch-size: got {cfg.batch_size}, larger than the {len(train_set)} training "
                          "examples (the last partial batch is dropped)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    method = methods.create(cfg)
    model = (prepare_user_model(user_model, cfg, method) if user_model is not None else build_model_for(cfg)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    problem = method.check_model(model, input_shape)  # e.g. CaP's ranks against the model's layers
    if problem:
        raise ConfigError(problem)
    method.use_training_data(train_set, input_shape)
    sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world)
    if world > 1:
        distributed.broadcast_module(model)  # a user's model may be initialised differently on each rank
        # each rank's own stream for PGD starts and noise (rank 0 keeps the one-process stream)
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
    # the loader's own generator: creating its iterator every epoch must not draw from the global RNG
    loader_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 4, rank))
    if BatchLoader.supports(train_set):  # in-memory images: one gather (and augmentation) per batch
        loader = BatchLoader(train_set, sampler, device)
    else:
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=0, pin_memory=device.type == "cuda",
                            generator=loader_gen)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(cfg, model, device)
    # before the scheduler: a method may add parameter groups (RSR's noise scales)
    method.attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(cfg, k, total_steps, steps_per_epoch))
    grad_sync = distributed.GradientSync(optimizer) if world > 1 else None
    # the SAT curriculum (issue 15): consulted by the engine at every step; none for clean training
    curriculum = curricula.create(cfg.curriculum, **cfg.curriculum_settings(total_steps)) if cfg.adversarial else None
    if curriculum is not None and cfg.curriculum == "h-sat" and world > 1:
        raise ConfigError("option --curriculum: h-sat under data parallel is not supported (each process would "
                          "measure its own batch and advance on its own); run it in one process")
    # the training steps run the compiled module (same parameters and buffers); evaluation, checkpoints and
    # the rewiring use the model itself
    train_model = model if cfg.compile == "off" else torch.compile(model, mode=cfg.compile)
    run = TrainingRun(cfg=cfg, run_dir=run_dir, log=log, model=model, method=method, optimizer=optimizer,
                      scheduler=scheduler, data_gen=data_gen, loader_gen=loader_gen, steps_per_epoch=steps_per_epoch,
                      rank=rank, world=world, curriculum=curriculum)
    if state is not None:
        method.restructure(model, state["model"], input_size=input_shape)  # a method that changed the model
        restore(run, state)
    # every rank has passed the checks above on an untouched run directory before rank 0 writes to it
    distributed.barrier()

    # The callbacks, in the order each hook runs them: the evaluation completes the epoch's row before the
    # checkpoint and the files record it; the step delay (tests) comes before the step's checkpoint.
    checkpoint_path = os.path.join(run_dir, CHECKPOINT)
    callbacks = CallbackList([ProgressBar(), EpochEvaluation(eval_loader), StepDelay(), *user_callbacks,
                              Checkpoints(checkpoint_path, cfg.checkpoint_every),
                              *([RunFiles()] if main else []),
                              *([tensorboard] if tensorboard is not None and main else []),
                              ConsoleLines()])
    callbacks.on_run_start(run)

    run.started = time.perf_counter()
    attack = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, beta=cfg.beta if cfg.adversarial else 1.0,
                  attack_bn_mode=cfg.attack_bn_mode, channels_last=cfg.channels_last,
                  autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    while run.epoch < cfg.epochs:
        epoch = run.epoch
        sampler.set_epoch(epoch, run.batch)
        if run.totals is None:
            run.totals = {"loss": 0.0, "clean_correct": 0, "adv_correct": 0, "n": 0}
        lr_at_start = cfg.lr * lr_factor(cfg, epoch * steps_per_epoch, total_steps, steps_per_epoch)
        start_batch = run.batch
        callbacks.on_epoch_start(run)

        def after_step(i: int, out: dict) -> None:
            """The engine's per-step callback: count the step, run the method's hook, then the callbacks."""
            run.step += 1
            run.batch = start_batch + i + 1
            record = method.after_step(run.step)
            if record is not None:
                callbacks.on_method_record(run, record)
            callbacks.on_batch_end(run, out)

        try:
            stats = train_epoch(train_model, loader, optimizer, device=device, lr_scheduler=scheduler,
                                progress=after_step, totals=run.totals, penalty=method.loss_term,
                                grad_sync=grad_sync, curriculum=curriculum,
                                max_grad_norm=cfg.max_grad_norm or None, **attack)  # 0: never clip
        except FloatingPointError as err:
            last = checkpoint_path if os.path.exists(checkpoint_path) else "none written yet"
            raise TrainingDiverged(
                f"training stopped: non-finite loss at optimizer step {run.step + 1} (epoch {epoch + 1}, batch "
                f"{run.batch + 1}/{steps_per_epoch}): {str(err).split(':')[0]}; last good checkpoint: {last}") from None
        finally:
            callbacks.on_steps_end(run)
        record = method.epoch_end(epoch, last=epoch == cfg.epochs - 1)
        if world > 1:  # evaluate and save one model: the ranks' BatchNorm statistics averaged, all else equal
            distributed.average_buffers(model)
            distributed.check_replicas(model, replica_state(model, optimizer))
        row = epoch_row(cfg, model, method, lr_at_start, stats, epoch, run.step, epoch * steps_per_epoch,
                        curriculum=curriculum)
        if record is not None:
            callbacks.on_method_record(run, record)
        run.rows.append(row)
        run.epoch, run.batch, run.totals = epoch + 1, 0, None
        callbacks.on_epoch_end(run, row)

    summary = final_summary(run, test_loader, input_shape, user_model is not None)
    callbacks.on_run_end(run, summary)
    return summary


def restore(run: TrainingRun, state: dict) -> None:
    """Load a training checkpoint into ``run``'s parts (model, optimizer, scheduler, method, random streams)
    and position; the checks first, so a mismatched checkpoint changes nothing."""
    if state.get("world_size", 1) != run.world:
        raise CheckpointError(f"checkpoint {state['path']!r} was written by {state.get('world_size', 1)} "
                              f"processes; resume it with as many (this is {run.world}): each one's random "
                              "streams are part of the exact resume")
    if state.get("steps_per_epoch") != run.steps_per_epoch:
        raise CheckpointError(f"checkpoint {state['path']!r} was written with {state.get('steps_per_epoch')} "
                              f"steps per epoch but the data now gives {run.steps_per_epoch}: the training set changed")
    load_model_state(run.model, state)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        # checkpoints before the method interface kept DNR's state under "controller"
        run.method.load_state_dict(state["method"] if state.get("method") is not None else state.get("controller"))
        if run.curriculum is not None and state.get("curriculum") is not None:
            run.curriculum.load_state_dict(state["curriculum"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {state['path']!r}: cannot restore the training state ({err})") from None
    streams = state["ranks"][run.rank] if run.world > 1 else state
    run.data_gen.set_state(streams["data_generator"])
    run.loader_gen.set_state(streams["loader_generator"])
    set_rng_state(streams["rng"])
    run.epoch, run.batch, run.step = state["epoch"], state["batch"], state["step"]
    run.rows, run.totals, run.elapsed = list(state["metrics"]), state["epoch_totals"], state["elapsed"]
    run.resumed = True
    run.log(f"resuming {run.run_dir} at epoch {run.epoch + 1}, batch {run.batch}/{run.steps_per_epoch} "
            f"(optimizer step {run.step})")


def replica_state(model, optimizer) -> dict:
    """Optimizer tensors outside the model's state dict that every data-parallel rank must hold bitwise
    alike (the model's own are compared through its state dict by ``distributed.check_replicas``)."""
    model_params = {id(p) for p in model.parameters()}
    out = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in model_params:
                out[f"optimizer.group{gi}.param{pi}"] = p
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.numel() > 1:
                    out[f"optimizer.group{gi}.param{pi}.{key}"] = value
    return out


def final_summary(run: TrainingRun, test_loader, input_shape, user_model: bool) -> dict:
    """Final evaluation on the test set (clean, FGSM, PGD) and the run's summary (``summary.json``)."""
    cfg, model = run.cfg, run.model
    train_seconds = run.train_seconds()
    run.log(f"final evaluation on {len(test_loader.dataset)} test examples (clean, FGSM, PGD-{cfg.eval_steps})")
    res = final_evaluation(model, test_loader, eps=cfg.resolved_eval_eps, alpha=cfg.resolved_eval_alpha,
                           steps=cfg.eval_steps, restarts=cfg.eval_restarts, seed=cfg.seed, log=run.log)
    report = run.method.report(model, input_shape)
    return {
        "method": cfg.method, "defaults_revision": run.method.defaults_revision, "mode": cfg.mode,
        "sparse": run.method.sparse, "model": type(model).__name__ if user_model else cfg.model,
        "dataset": cfg.dataset,
        "density": report["density"], "effective_density": report["effective_density"],
        "compression": report["compression"], "epochs": cfg.epochs,
        "eps": cfg.resolved_eval_eps,
        "alpha": cfg.resolved_eval_alpha, "clean": res["clean"], "fgsm": res["fgsm"], "pgd": res["pgd"],
        "pgd_steps": cfg.eval_steps, "pgd_restarts": cfg.eval_restarts, "test_examples": res["n"],
        "flops_dense": report["flops_dense"], "flops_effective": report["flops_effective"],
        "train_seconds": train_seconds, "seed": cfg.seed, "processes": run.world, "run_dir": run.run_dir,
        "model_path": os.path.join(run.run_dir, "model.pt"),
        "layers": report["layers"],
    }
