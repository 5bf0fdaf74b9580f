"""Data-parallel training (dnr.distributed and the harness under torchrun), on the CPU with gloo.

Oracles: the gradients every rank ends with are the mean of the per-rank gradients computed here by
hand; a 2-process clean DNR run equals the 1-process run (same global batches, no BatchNorm, no random
attack) up to the order of the gradient sums, with the same masks; a 2-process adversarial run killed
mid-epoch and resumed ends bitwise equal to the uninterrupted 2-process run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dnr import distributed
from dnr.harness import ConfigError, load_checkpoint
from dnr.harness.builders import EpochBatchSampler
from conftest import final_model_state, metrics_rows  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int = 2, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; a failure in any of them fails the test."""
    mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True, start_method="spawn")


def _entry(rank, fn, world, port, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- helpers' oracles
def _grads_of(rank: int, dtype) -> list:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype),
            torch.randn(2, 2, 2, generator=g).to(dtype)]


def _check_sync_gradients(rank, world, tiny_buckets):
    if tiny_buckets:  # force several buckets per dtype
        distributed._BUCKET_ELEMENTS = 8
    params = [nn.Parameter(torch.zeros_like(t)) for t in _grads_of(0, torch.float32) + _grads_of(0, torch.float64)]
    for p, gr in zip(params, _grads_of(rank, torch.float32) + _grads_of(rank, torch.float64)):
        p.grad = gr.clone()
    extra = nn.Parameter(torch.zeros(3))  # no gradient: skipped
    stats = torch.tensor([1.5 * (rank + 1), rank, 2.0, 16.0])
    out = distributed.sync_gradients(params + [extra], stats)
    assert out is stats
    assert stats.tolist() == [1.5 * 3, 1.0, 4.0, 32.0]
    expect = [(a.double() + b.double()) / 2 for a, b in zip(_grads_of(0, torch.float32) + _grads_of(0, torch.float64),
                                                            _grads_of(1, torch.float32) + _grads_of(1, torch.float64))]
    for p, e in zip(params, expect):
        tol = 1e-6 if p.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(p.grad.double(), e, atol=tol, rtol=0)
        assert p.grad.dtype in (torch.float32, torch.float64)
    assert extra.grad is None


@pytest.mark.parametrize("tiny_buckets", [False, True], ids=["one-bucket", "many-buckets"])
def test_sync_gradients_averages_every_dtype_and_sums_the_stats(tiny_buckets):
    _spawn(_check_sync_gradients, 2, tiny_buckets)


def _check_buffers_and_replicas(rank, world):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with torch.no_grad():  # rank-dependent state everywhere
        for p in model.parameters():
            p.fill_(float(rank))
        model[1].running_mean.fill_(2.0 * rank)
    distributed.average_buffers(model)
    assert torch.equal(model[1].running_mean, torch.full((2,), 1.0))  # (0 + 2) / 2
    assert int(model[1].num_batches_tracked) == 0  # integer buffers untouched
    with pytest.raises(distributed.ReplicaMismatch, match=r"rank 1 and rank 0 hold different values for 4 tensors "
                                                          r"\(0.weight, 0.bias, 1.weight, 1.bias\)"):
        distributed.check_replicas(model)
    distributed.broadcast_module(model)  # rank 0's parameters everywhere
    assert all(float(p.abs().sum()) == 0.0 for p in model.parameters())
    distributed.check_replicas(model)  # equal now: no error
    # a single bit of difference is found
    extra = {"momentum": torch.ones(10)}
    if rank == 1:
        extra["momentum"][7] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(distributed.ReplicaMismatch, match="momentum"):
        distributed.check_replicas(model, extra)
    assert distributed.all_reduce_sum([rank, 1]) == [1.0, 2.0]
    assert distributed.all_gather_objects({"r": rank}) == [{"r": 0}, {"r": 1}]


def test_buffers_are_averaged_and_replica_differences_are_found():
    _spawn(_check_buffers_and_replicas, 2)


def test_single_process_helpers_are_identities():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    stats = torch.tensor([1.0, 2.0])
    assert distributed.sync_gradients([p], stats) is stats and stats.tolist() == [1.0, 2.0]
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.rank_seed(7, 0) == 7 and distributed.rank_seed(7, 1) != 7


def _check_ddp_user_loop(rank, world, mode):
    """The README's pattern: the user's own DistributedDataParallel loop with dnr.DNR (no generator given)."""
    import dnr
    from dnr import attacks
    from dnr.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 28, (0.5,), (0.25,))
    dnr.sparsify(model, density=0.1, mode=mode, generator=torch.Generator().manual_seed(0))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(10 + rank)  # the ranks' global RNGs differ, as in any real data-parallel job
    controller = dnr.DNR(model, opt, total_steps=12, regrowth="random" if mode == "irregular" else "momentum")
    g = torch.Generator().manual_seed(100 + rank)
    before = [layer.mask.clone() for _, layer in dnr.masked_layers(model)]
    for step in range(6):
        x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        x_adv = attacks.pgd(model, x, y, 0.1, 0.025, 2)  # the inner module: no DDP hooks in the attack
        loss = dnr.hybrid_loss(ddp(x), ddp(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (2, 4):
            controller.rewire()
    after = [layer.mask for _, layer in dnr.masked_layers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # it rewired
    distributed.average_buffers(model)  # DDP leaves each rank its own BatchNorm statistics
    distributed.check_replicas(model)  # weights (regrown channels' re-init included) and masks agree


@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_dnr_in_a_user_ddp_loop_keeps_the_replicas_equal(mode):
    """Random regrowth and regrown channels' re-initialisation draw from a generator seeded from rank 0."""
    _spawn(_check_ddp_user_loop, 2, mode)


def _check_fit_in_callers_group(rank, world, out):
    from dnr.harness import TrainConfig, fit

    cfg = TrainConfig(data_root="embedded", train_size=128, test_size=32, eval_size=32, batch_size=32, epochs=1,
                      attack_steps=1, eval_steps=1, threads=1, plots=False).validate()
    summary = fit(cfg, out, quiet=True, progress=False)
    assert summary["processes"] == 2 and summary["test_examples"] == 32
    assert dist.is_initialized()  # fit leaves a group it did not create alone


def test_fit_joins_a_process_group_the_caller_created(tmp_path):
    _spawn(_check_fit_in_callers_group, 2, str(tmp_path / "run"))
    state = load_checkpoint(str(tmp_path / "run"), kind="train")
    assert state["world_size"] == 2 and os.path.isfile(tmp_path / "run" / "model.pt")


# ---------------------------------------------------------------------------------------- data sharding
@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_make_up_the_one_process_batches(world):
    one = EpochBatchSampler(100, 16, seed=3)
    shards = [EpochBatchSampler(100, 16, seed=3, rank=r, world_size=world) for r in range(world)]
    for s in [one, *shards]:
        s.set_epoch(2, start=1)
    parts = [list(s) for s in shards]
    for b, batch in enumerate(one):
        assert sum((p[b] for p in parts), []) == batch
        assert all(len(p[b]) == 16 // world for p in parts)


def test_batch_size_must_split_over_the_processes():
    with pytest.raises(ConfigError, match=r"option --batch-size: got 10, which 4 processes cannot split evenly; "
                                          r"give a multiple of 4"):
        EpochBatchSampler(100, 10, seed=0, rank=0, world_size=4)


def test_setup_rejects_a_pinned_gpu_or_a_missing_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"option --device: got 'cuda', but CUDA is not available here"):
        distributed.setup("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"option --device: got 'cuda:1', but with 2 processes each one uses "
                                         r"cuda:LOCAL_RANK"):
        distributed.setup("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"environment variable WORLD_SIZE: got 'two', expected an integer"):
        distributed.setup("cpu")


def test_cli_needs_out_with_several_processes(monkeypatch, capsys):
    from dnr import cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--epochs", "1"]) == 2
    assert "option --out: required with 2 processes (torchrun)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the harness
def _torchrun(*args, nproc=2, env=None, check=True, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_train_the_one_process_model(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    worker = os.path.join(HERE, "dist_fit_worker.py")
    subprocess.run([sys.executable, worker, one], check=True, timeout=300)
    _torchrun(worker, two)
    a, b = final_model_state(one), final_model_state(two)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("mask"):
            assert torch.equal(a[key], b[key]), key  # the same rewiring decisions
        else:
            # the gradient sums' order differs between one and two processes; over 24 steps at lr 0.1, 6 of them
            # dense (DNR's dense-to-sparse start), that moved the weights by up to 5e-5 (measured); a wrong draw or
            # a rank training on its own gradients moves them by the size of an update (lr * grad, about 1e-2)
            torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=1e-3, msg=key)
    rows_a, rows_b = metrics_rows(one), metrics_rows(two)
    assert [r["rewired_weights"] for r in rows_a] == [r["rewired_weights"] for r in rows_b]
    assert rows_a[0]["rewired_weights"] > 0
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)  # the global batch's loss on both
        assert ra["train_clean_acc"] == rb["train_clean_acc"]
    with open(os.path.join(two, "summary.json")) as f:
        summary = json.load(f)
    assert summary["processes"] == 2 and summary["test_examples"] == 64


# 320 examples / global batch 64 = 5 steps per epoch, 2 epochs, checkpoints every 2 steps
TINY = ["--train-size", "320", "--test-size", "64", "--batch-size", "64", "--epochs", "2", "--attack-steps", "2",
        "--eval-steps", "2", "--eval-size", "64", "--eval-batch-size", "16", "--threads", "1", "--deterministic",
        "--checkpoint-every", "2", "--no-plots", "--no-progress", "--seed", "4", "--density", "0.1"]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (torchrun's workers run in their own process groups)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_torchrun_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    out = _torchrun("-m", "dnr", "train", *TINY, "--out", ref)
    assert out.stdout.count("final evaluation") == 1  # only rank 0 prints
    state = load_checkpoint(ref, kind="train")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    with open(os.path.join(ref, "summary.json")) as f:
        assert json.load(f)["test_examples"] == 64

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "dnr", "train", *TINY, "--out", killed]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DNR_STEP_DELAY": "0.5"})
    deadline, seen = time.time() + 200, []
    for line in proc.stdout:  # the kill lands after the checkpoint of step 6 (epoch 2, batch 1 of 5)
        seen.append(line)
        if line.startswith("checkpoint step 6 "):
            _kill_tree(proc.pid)
            break
        assert time.time() < deadline, "".join(seen)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen) + proc.stderr.read()
    state = load_checkpoint(killed, kind="train")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 6)

    one = subprocess.run([sys.executable, "-m", "dnr", "train", "--resume", killed], capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 1
    assert "was written by 2 processes; resume it with as many (this is 1)" in one.stderr

    out = _torchrun("-m", "dnr", "train", "--resume", killed, "--no-progress")
    assert "batch 1/5" in out.stdout
    a, b = final_model_state(ref), final_model_state(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # weights, masks, averaged BatchNorm statistics: bitwise
    assert metrics_rows(ref) == metrics_rows(killed)
    with open(os.path.join(ref, "summary.json")) as f, open(os.path.join(killed, "summary.json")) as g:
        s_ref, s_res = json.load(f), json.load(g)
    for key in ("clean", "fgsm", "pgd", "density", "test_examples"):
        assert s_ref[key] == s_res[key], key


@pytest.mark.slow
def test_torchrun_nan_loss_stops_every_process_at_the_same_step(tmp_path):
    run = str(tmp_path / "nan")
    proc = _torchrun("-m", "dnr", "train", *TINY, "--epochs", "3", "--lr", "1e12", "--momentum", "0.99", "--out", run,
                     check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dnr: error")]
    assert len(errors) == 1, proc.stderr[-3000:]  # said once, by rank 0, and nobody hangs
    assert errors[0].startswith("dnr: error (rank 0): training stopped: non-finite loss at optimizer step ")
    assert "(over all ranks)" in errors[0] and "last good checkpoint: " in errors[0]
    step = int(errors[0].split("optimizer step ")[1].split()[0])
    state = load_checkpoint(run, kind="train")
    assert state["step"] < step and state["world_size"] == 2
