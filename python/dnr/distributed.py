"""Data-parallel training over ``torch.distributed``: one process per GPU (or CPU worker), started by torchrun.

Every rank holds a full replica of the model, optimizer and DNR controller and trains on its slice of
each global batch. After ``loss.backward()`` one all-reduce per gradient dtype averages the gradients
of every parameter the optimizer holds and, in the same buffer, sums the step's statistics (loss,
correct counts), so all ranks take the same optimizer step, see the same loss (a NaN on any rank
stops all of them at the same step) and keep bitwise-equal weights, momenta and masks; the DNR
rewiring then makes the same decision everywhere without any mask communication.

Why not ``DistributedDataParallel``: an adversarial step runs PGD forward/backward passes that must
not synchronise, two training forwards per backward, and optimizer parameters that live outside the
model (RSR's noise scales); gradient communication is a small share of a PGD-k step (k+2 passes),
so overlapping it with the backward pass buys little.

Usage (``dnr train`` and ``dnr.harness.fit`` do all of this themselves)::

    torchrun --nproc_per_node 8 -m dnr train --preset cifar10-resnet18 --data-root DIR --out runs/r18

On the CPU (gloo) the same command runs N worker processes; ``--threads`` sets each one's threads.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Context", "ReplicaMismatch", "GradientSync", "launch_info", "setup", "teardown", "rank", "world_size", "is_main", "barrier",
           "rank_seed", "shared_seed", "broadcast_module", "sync_gradients", "average_buffers", "check_replicas",
           "all_gather_objects", "all_reduce_sum"]

# one bucket per dtype up to this many elements (bounds the extra memory of the flattened copy)
_BUCKET_ELEMENTS = 32 * 1024 * 1024


class ReplicaMismatch(RuntimeError):
    """Ranks that should hold identical tensors do not (a non-deterministic op or a rank-dependent input)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, its device, and whether
    :func:`setup` created the process group (and :func:`teardown` should destroy it)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: got {value!r}, expected an integer (set by torchrun)") from None


def launch_info() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from torchrun's environment ((0, 1) without it); readable before any setup."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def setup(device: str = "auto", *, timeout_minutes: float = 60.0) -> Context:
    """Resolve the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:N". With several processes "auto" and "cuda" mean
            ``cuda:LOCAL_RANK`` when CUDA is available (NCCL), and "cpu" (or no CUDA) uses gloo.
        timeout_minutes: collective timeout (a long final evaluation must not trip it).

    Returns:
        the Context; a single process gets rank 0 of 1 and no process group.

    Raises:
        ValueError: a device that does not exist or a pinned ``cuda:N`` with several processes.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"option --device: got {device!r}, but CUDA is not available here")
    if dist.is_available() and dist.is_initialized():  # the caller set the group up: use it as it is
        # without torchrun's LOCAL_RANK, the GPU the caller made current
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        world, rank_, local = dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", current)
        owns = False
    else:
        (rank_, world), local = launch_info(), _env_int("LOCAL_RANK", 0)
        owns = world > 1
    if world > 1 and device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"option --device: got {device!r}, but with {world} processes each one uses "
                             "cuda:LOCAL_RANK; give --device cuda or auto")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: only {torch.cuda.device_count()} are visible")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dev = torch.device(device)
    if owns:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    return Context(rank=rank_, world_size=world, local_rank=local, device=dev, owns_group=owns)


def teardown(ctx: Context) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def rank_seed(seed: int, rank_: int) -> int:
    """The seed of rank ``rank_``'s own random streams (PGD starts, augmentation); rank 0 keeps ``seed``
    so a one-process run is unchanged."""
    return seed if rank_ == 0 else (seed + 1_000_003 * rank_) % (2 ** 63)


def shared_seed() -> int:
    """A random seed drawn on rank 0 (from torch's global RNG) and broadcast, so every rank gets the same;
    in one process just the draw."""
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    if _active():
        seed = seed.to(_float_tensor_device())
        dist.broadcast(seed, 0)
    return int(seed.item())


def _float_tensor_device() -> torch.device:
    """Where collectives need their tensors: the current GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers (masks included) to every rank."""
    if not _active():
        return
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            dist.broadcast(t.data, src)


def _buckets(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """Group ``tensors`` by (dtype, device) into buckets of at most ``_BUCKET_ELEMENTS`` elements."""
    groups: dict[tuple, list[list[Tensor]]] = {}
    filled: dict[tuple, int] = {}  # elements in each key's last bucket
    for t in tensors:
        key = (t.dtype, t.device)
        bucket_list = groups.setdefault(key, [[]])
        if bucket_list[-1] and filled[key] + t.numel() > _BUCKET_ELEMENTS:
            bucket_list.append([])
            filled[key] = 0
        bucket_list[-1].append(t)
        filled[key] = filled.get(key, 0) + t.numel()
    return [b for bl in groups.values() for b in bl]


def _all_reduce_bucket(bucket: Sequence[Tensor], divisor: int, tail: Tensor | None = None) -> None:
    """Sum ``bucket`` (same dtype and device) and ``tail`` over the ranks with one all-reduce, in place;
    the bucket's tensors are then divided by ``divisor``, the tail is left a sum."""
    flat = torch.cat([t.reshape(-1) for t in bucket] + ([tail.reshape(-1)] if tail is not None else []))
    dist.all_reduce(flat)
    offset = 0
    for t in bucket:
        t.copy_(flat[offset:offset + t.numel()].view_as(t).div_(divisor))
        offset += t.numel()
    if tail is not None:
        tail.copy_(flat[offset:])


def sync_gradients(params: Iterable[Tensor], stats: Tensor | None = None) -> Tensor | None:
    """Average the ``.grad`` of ``params`` over all ranks and sum ``stats`` (float32 [k]); in place.

    One all-reduce per bucket (dtype, up to 32M elements); ``stats`` rides in the first float32 bucket,
    so the loss and the correct counts of a step cost no extra collective. Parameters without a
    gradient are skipped (the same ones on every rank: the replicas run the same code).

    Returns:
        ``stats`` summed over ranks (the same tensor object), or None.
    """
    if not _active():
        return stats
    if stats is not None and (stats.dtype != torch.float32 or stats.dim() != 1):
        raise ValueError(f"sync_gradients: stats must be a float32 vector, got {stats.dtype} {list(stats.shape)}")
    world = dist.get_world_size()
    placed = stats is None
    for bucket in _buckets([p.grad for p in params if p.grad is not None]):
        with_stats = not placed and bucket[0].dtype == torch.float32 and bucket[0].device == stats.device
        _all_reduce_bucket(bucket, world, stats if with_stats else None)
        placed = placed or with_stats
    if not placed:  # no float32 gradient on the stats' device: reduce the stats alone
        dist.all_reduce(stats)
    return stats


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64; identity in one process)."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_float_tensor_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place.

    Each rank's BatchNorm sees only its slice of the batch; averaging at epoch ends and checkpoints
    makes the saved and evaluated model the same on every rank. Integer and bool buffers (step
    counters, masks) are left alone: they must already be equal (see :func:`check_replicas`).
    """
    if not _active():
        return
    world = dist.get_world_size()
    with torch.no_grad():
        for bucket in _buckets([b for b in module.buffers() if b.is_floating_point()]):
            _all_reduce_bucket(bucket, world)


def check_replicas(module: nn.Module, extra: dict[str, Tensor] | None = None) -> None:
    """Raise :class:`ReplicaMismatch` unless every rank holds bitwise the same ``module`` state and ``extra``.

    Compares a float64 fingerprint per tensor (sum and position-weighted sum of the values seen as
    integers), gathered from all ranks: one small collective, cheap enough for every epoch end.
    """
    if not _active():
        return
    named = list(module.state_dict().items()) + list((extra or {}).items())
    prints = torch.stack([_fingerprint(t) for _, t in named]) if named else torch.zeros(0, 2, dtype=torch.float64)
    prints = prints.to(_float_tensor_device())
    gathered = [torch.empty_like(prints) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, prints)
    for r, other in enumerate(gathered):
        diff = (other != gathered[0]).any(dim=1).nonzero().flatten().tolist()
        if diff:
            names = ", ".join(named[i][0] for i in diff[:5])
            raise ReplicaMismatch(f"rank {r} and rank 0 hold different values for {len(diff)} tensors ({names}"
                                  f"{', ...' if len(diff) > 5 else ''}): the replicas have diverged")


def _fingerprint(t: Tensor) -> Tensor:
    """float64 [2]: the sum and a position-weighted sum of ``t``'s bit patterns (exact-equality probe)."""
    t = t.detach().reshape(-1)
    if t.is_floating_point():
        bits = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    else:
        bits = t
    v = bits.to(torch.float64)
    w = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device).remainder_(1021.0).add_(1.0)
    return torch.stack([v.sum(), (v * w).sum()]).cpu()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a one-element list in one process)."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class GradientSync:
    """The ``grad_sync`` of :func:`dnr.engine.adversarial_step`: averages the gradients of every parameter
    that ``optimizer`` holds (all its groups, e.g. RSR's noise scales too) and sums the step's stats."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __call__(self, stats: Tensor) -> Tensor:
        return sync_gradients([p for group in self.optimizer.param_groups for p in group["params"]], stats)
