"""The distributed runtime of training: process group, device, batch layout, reductions, rank checks.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; NCCL on GPUs, gloo on CPU; a plain process is world 1
and every function here is then a no-op. The trainer, the objectives' validation and the commands
share this one place, so no other module talks to torch.distributed directly.

Not here: what is trained (objectives.py) or the loop (trainer.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from smdlm_cli.core.config import TrainConfig
from smdlm_cli.core.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class BatchLayout:
    """How train.batch_size splits: per rank, per micro-batch, accumulation steps per update.

    Recorded in the run (trainer state and the step-0 metrics record) so reports read it instead of
    re-deriving it from the recipe.
    """
    world: int
    per_rank: int
    micro: int
    accum: int

    def as_dict(self) -> dict:
        return {"world": self.world, "per_rank": self.per_rank, "micro": self.micro,
                "accum": self.accum}


def batch_layout(cfg: TrainConfig, world: int) -> BatchLayout:
    """The layout of cfg's global batch over `world` ranks, or a UserError naming the numbers."""
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size = {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"train.micro_batch_size = {micro} does not divide the per-rank batch "
                        f"{per_rank} (train.batch_size {cfg.batch_size} over {world} ranks)")
    return BatchLayout(world=world, per_rank=per_rank, micro=micro, accum=per_rank // micro)


def validation_batch(cfg: TrainConfig) -> int:
    """Rows per validation batch: the single-process micro-batch, whatever the number of ranks,
    so the validation set (and `evaluate elbo`) is the same for 1 and N ranks."""
    return cfg.micro_batch_size or cfg.batch_size


def cpu_threads(setting: int, world: int = 1) -> tuple[int, str | None]:
    """(threads per process, a note to print or None); 0 threads: leave torch's setting alone.
    With `setting` 0: the cores this process may use, less the load other work puts on them,
    shared by the `world` ranks on this machine, unless OMP_NUM_THREADS says otherwise (issue 19
    reported the quickstart at 156 tokens/s with torch's default threads on a busy 2-core
    machine, 413 with one thread)."""
    if setting:
        return setting, None
    if os.environ.get("OMP_NUM_THREADS"):
        return 0, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, round(cores - load)))
    threads = max(1, free // world)
    if free < cores:
        return threads, (f"the machine is busy (load {load:.1f} on {cores} cores): {threads} "
                         f"thread(s) per process; train.threads sets it")
    return threads, None


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """auto, cpu, cuda or cuda:N -> a device that exists here, or a UserError naming `flag`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine")
    return device


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun group if there is one and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device == "auto":
        device = local if cuda else "cpu"
    elif device == "cuda" and world > 1:
        device = local
    dev = resolve_device(device, flag="train.device =")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Dist(rank=rank, world=dist.get_world_size() if dist.is_initialized() else 1, device=dev)


@contextmanager
def distributed(device: str = "auto") -> Iterator[Dist]:
    """setup_distributed for the length of a command, then the process group is taken down.

    torch asks every process to destroy its group before it exits (with NCCL it warns of leaked
    resources otherwise). On success every rank first waits for the others; on an error there is no
    barrier, which could wait forever for a rank that has failed. A group the caller set up
    before is left to the caller.
    """
    existed = dist.is_initialized()
    ctx = setup_distributed(device)
    owned = dist.is_initialized() and not existed
    try:
        yield ctx
        if owned:
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def check_ranks_agree(params: list[torch.nn.Parameter], ctx: Dist) -> None:
    """DDP keeps replicas identical; a cheap checksum comparison catches it if anything broke that."""
    if ctx.world == 1 or not params:
        return
    local = torch.stack([p.detach().double().sum() for p in params]).sum().view(1)
    gathered = [torch.zeros_like(local) for _ in range(ctx.world)]
    dist.all_gather(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"ranks hold different weights after training: {[g.item() for g in gathered]}")
