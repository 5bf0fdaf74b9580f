"""The trainer: one process's training of a run, from its config to its summary.

    build (builders) -> restore a checkpoint -> per epoch: train_epoch (engine: attack, loss, step; the
    method's hooks run after every step) -> method.epoch_end -> evaluate -> metrics files, checkpoint
    -> final evaluation, model.pt, summary.json, report

The compression method (:mod:`dnr.methods`) is reached only through its interface; the driver
(:mod:`dnr.harness.run`) decides what to train or resume and sets up the process.

Environment (tests only): ``DNR_STEP_DELAY=SECONDS`` sleeps after every optimizer step, so a test can
kill a run at a known point.
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import distributed, methods
from .._files import FileWriteError
from ..data.loader import BatchLoader
from ..engine import train_epoch
from ..nn import masked_layers
from .builders import (EpochBatchSampler, build_dataset, build_model_for, lr_factor, make_optimizer, make_test_loader,
                       prepare_user_model)
from .callbacks import CSV_COLUMNS, ConsoleLog, epoch_line, epoch_row, write_metrics, write_text_atomic
from .checkpoint import CheckpointError, load_model_state, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError
from .errors import TrainingDiverged
from .evaluate import final_evaluation

__all__ = ["train", "finish", "CHECKPOINT"]

CHECKPOINT = os.path.join("checkpoints", "last.pt")


def train(cfg, ctx, run_dir, state, log, user_model, train_data, test_data) -> dict:
    """The training loop of ``fit`` on this process (rank ``ctx.rank`` of ``ctx.world_size``): builds the
    run's parts, restores ``state`` (a training checkpoint) when given, trains, evaluates and writes the
    run directory (rank 0). Returns the summary."""
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    main = rank == 0  # rank 0 prints and writes the run directory
    if not main:
        log = ConsoleLog(True, False)
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("option --tensorboard needs the tensorboard package: pip install tensorboard") from None

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
    # the training steps run the compiled module (same parameters and buffers); evaluation, checkpoints and
    # the rewiring use the model itself
    train_model = model if cfg.compile == "off" else torch.compile(model, mode=cfg.compile)
    # the model parameters are compared by check_replicas via the model's state dict
    model_params = {id(p) for p in model.parameters()}

    def replica_state() -> dict:
        """Optimizer tensors outside the model's state dict that every rank must hold bitwise alike."""
        out = {}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in model_params:
                    out[f"optimizer.group{gi}.param{pi}"] = p
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.numel() > 1:
                        out[f"optimizer.group{gi}.param{pi}.{key}"] = value
        return out

    epoch, batch, step, rows, totals, elapsed = 0, 0, 0, [], None, 0.0
    if state is not None:
        if state.get("world_size", 1) != world:
            raise CheckpointError(f"checkpoint {state['path']!r} was written by {state.get('world_size', 1)} "
                                  f"processes; resume it with as many (this is {world}): each one's random "
                                  "streams are part of the exact resume")
        if state.get("steps_per_epoch") != steps_per_epoch:
            raise CheckpointError(f"checkpoint {state['path']!r} was written with {state.get('steps_per_epoch')} "
                                  f"steps per epoch but the data now gives {steps_per_epoch}: the training set changed")
        load_model_state(model, state)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            # checkpoints before the method interface kept DNR's state under "controller"
            method.load_state_dict(state["method"] if state.get("method") is not None else state.get("controller"))
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {state['path']!r}: cannot restore the training state ({err})") from None
        streams = state["ranks"][rank] if world > 1 else state
        data_gen.set_state(streams["data_generator"])
        loader_gen.set_state(streams["loader_generator"])
        set_rng_state(streams["rng"])
        epoch, batch, step = state["epoch"], state["batch"], state["step"]
        rows, totals, elapsed = list(state["metrics"]), state["epoch_totals"], state["elapsed"]
        log(f"resuming {run_dir} at epoch {epoch + 1}, batch {batch}/{steps_per_epoch} (optimizer step {step})")
    # every rank has passed the checks above on an untouched run directory before rank 0 writes to it
    distributed.barrier()
    if state is None and main:
        try:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        except OSError as err:
            raise FileWriteError(run_dir, err.strerror or str(err), err.errno) from None
        write_text_atomic(os.path.join(run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2) + "\n")
        initial = {name: layer.density for name, layer in masked_layers(model)}
        write_text_atomic(os.path.join(run_dir, "initial_density.json"), json.dumps(initial, indent=2) + "\n")
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard")) if cfg.tensorboard and main else None
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    delay = float(os.environ.get("DNR_STEP_DELAY", "0") or 0)

    def save(epoch_: int, batch_: int, totals_: dict | None) -> None:
        """Write the training state (rank 0; a collective: every rank calls it at the same step)."""
        streams = {"rng": rng_state(), "data_generator": data_gen.get_state(),
                   "loader_generator": loader_gen.get_state()}
        extra = {}
        if world > 1:
            distributed.average_buffers(model)
            extra = {"world_size": world, "ranks": distributed.all_gather_objects(streams)}
        if not main:
            return
        save_checkpoint(ckpt_path, keep_previous=True, state={**extra,
            "kind": "train", "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "method": method.state_dict(),
            **streams, "epoch": epoch_, "batch": batch_,
            "step": step, "epoch_totals": dict(totals_) if totals_ is not None else None, "metrics": rows,
            "elapsed": elapsed + time.perf_counter() - t0, "steps_per_epoch": steps_per_epoch,
        })

    t0 = time.perf_counter()
    attack = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, beta=cfg.beta if cfg.adversarial else 1.0,
                  attack_bn_mode=cfg.attack_bn_mode, channels_last=cfg.channels_last,
                  autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    while epoch < cfg.epochs:
        sampler.set_epoch(epoch, batch)
        epoch_totals = totals if totals is not None else {"loss": 0.0, "clean_correct": 0, "adv_correct": 0, "n": 0}
        bar = log.bar(total=steps_per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        start_batch = batch
        lr_at_start = cfg.lr * lr_factor(cfg, epoch * steps_per_epoch, total_steps, steps_per_epoch)
        done = [batch]  # batches of this epoch finished so far

        def on_batch(i: int, out: dict) -> None:
            nonlocal step
            step += 1
            b = start_batch + i + 1
            done[0] = b
            record = method.after_step(step)
            if record is not None:
                message = method.epoch_message(record)
                if message:
                    log(message)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}")
            if writer is not None:
                writer.add_scalar("train/loss", out["loss"], step)
            if delay:
                time.sleep(delay)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b < steps_per_epoch:
                save(epoch, b, epoch_totals)
                log(f"checkpoint step {step} (epoch {epoch + 1}, batch {b}/{steps_per_epoch}): {ckpt_path}")

        try:
            stats = train_epoch(train_model, loader, optimizer, device=device, lr_scheduler=scheduler,
                                progress=on_batch, totals=epoch_totals, penalty=method.loss_term,
                                grad_sync=grad_sync, **attack)
        except FloatingPointError as err:
            b = done[0] + 1
            last = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
            raise TrainingDiverged(
                f"training stopped: non-finite loss at optimizer step {step + 1} (epoch {epoch + 1}, batch "
                f"{b}/{steps_per_epoch}): {str(err).split(':')[0]}; last good checkpoint: {last}") from None
        finally:
            if bar is not None:
                bar.close()
        record = method.epoch_end(epoch, last=epoch == cfg.epochs - 1)
        if world > 1:  # evaluate and save one model: the ranks' BatchNorm statistics averaged, all else equal
            distributed.average_buffers(model)
            distributed.check_replicas(model, replica_state())
        row = epoch_row(cfg, model, method, lr_at_start, stats, epoch, step, epoch * steps_per_epoch)
        message = method.epoch_message(record) if record is not None else None
        if message:
            log(message)
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            t_eval = time.perf_counter()
            res = final_evaluation(model, eval_loader, eps=cfg.resolved_eval_eps, alpha=cfg.resolved_eval_alpha,
                                   steps=cfg.eval_steps, restarts=1, seed=cfg.seed + 3 + epoch, log=log, fgsm=False,
                                   desc=f"eval epoch {epoch + 1}")
            row.update(test_clean_acc=res["clean"], test_pgd_acc=res["pgd"], eval_seconds=time.perf_counter() - t_eval)
        rows.append(row)
        epoch, batch, totals = epoch + 1, 0, None
        save(epoch, 0, None)
        if main:
            write_metrics(run_dir, rows, {"rewiring.jsonl": [], **method.log_records()})
        if writer is not None:
            for key in CSV_COLUMNS[2:]:
                if isinstance(row.get(key), (int, float)):
                    writer.add_scalar(f"epoch/{key}", row[key], epoch)
            writer.flush()
        log(epoch_line(cfg, row))
    train_seconds = elapsed + time.perf_counter() - t0
    return finish(cfg, method, model, run_dir, test_loader, train_seconds, log, writer, input_shape,
                  user_model is not None, world)


def finish(cfg, method, model, run_dir, test_loader, train_seconds, log, writer, input_shape, user_model,
           world: int = 1) -> dict:
    """Final evaluation on the test set, model.pt, summary.json and the report (written by rank 0 only)."""
    log(f"final evaluation on {len(test_loader.dataset)} test examples (clean, FGSM, PGD-{cfg.eval_steps})")
    res = final_evaluation(model, test_loader, eps=cfg.resolved_eval_eps, alpha=cfg.resolved_eval_alpha,
                           steps=cfg.eval_steps, restarts=cfg.eval_restarts, seed=cfg.seed, log=log)
    report = method.report(model, input_shape)
    summary = {
        "method": cfg.method, "mode": cfg.mode, "model": type(model).__name__ if user_model else cfg.model,
        "dataset": cfg.dataset,
        "density": report["density"], "effective_density": report["effective_density"],
        "compression": report["compression"], "epochs": cfg.epochs,
        "eps": cfg.resolved_eval_eps,
        "alpha": cfg.resolved_eval_alpha, "clean": res["clean"], "fgsm": res["fgsm"], "pgd": res["pgd"],
        "pgd_steps": cfg.eval_steps, "pgd_restarts": cfg.eval_restarts, "test_examples": res["n"],
        "flops_dense": report["flops_dense"], "flops_effective": report["flops_effective"],
        "train_seconds": train_seconds, "seed": cfg.seed, "processes": world, "run_dir": run_dir,
        "model_path": os.path.join(run_dir, "model.pt"),
        "layers": report["layers"],
    }
    if not distributed.is_main():
        return summary
    save_checkpoint(summary["model_path"], {"kind": "model", "config": cfg.to_dict(), "model": model.state_dict(),
                                            "summary": {k: v for k, v in summary.items() if k != "layers"}})
    if writer is not None:
        for key in ("clean", "fgsm", "pgd"):
            writer.add_scalar(f"final/{key}", res[key], cfg.epochs)
        writer.close()
    summary_path = os.path.join(run_dir, "summary.json")
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    if cfg.plots:
        from .report import write_report
        out = write_report(run_dir)
        summary.update(report=out["report"], plots=out["plots"], plots_dir=out["plots_dir"],
                       plots_note=out["note"])
        write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary
