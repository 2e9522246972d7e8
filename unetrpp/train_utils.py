"""Training plumbing: the torchrun / DDP context, atomic checkpoint writes and the curve plot."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import atomic_write

log = logging.getLogger(__name__)

VALIDATION_TIMEOUT_MIN = 120  # process-group timeout: validating a share of many large cases takes a while


def torchrun_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; (0, 1, 0) in a plain run."""
    env = os.environ if environ is None else environ
    try:
        rank, world, local = (int(env.get(key, default)) for key, default in
                              (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE (launch with torchrun)")
    return rank, world, local


@dataclass
class DistributedContext:
    """Rank, world size and device of this process. Under torchrun (WORLD_SIZE > 1) it joins the
    process group: NCCL with one GPU per LOCAL_RANK on CUDA, gloo on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> DistributedContext:
        from .devices import resolve_device

        rank, world, local = torchrun_ranks()
        dev = resolve_device(device)
        if dev.type == "cuda" and world > 1:
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if world > 1 and not torch.distributed.is_initialized():
            # Ranks wait for the slowest one's validation share: allow more than NCCL's 10 minutes.
            torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(minutes=VALIDATION_TIMEOUT_MIN))
            log.info("rank %d of %d on %s", rank, world, dev)
        return cls(rank, world, dev)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (one small all-reduce under DDP)."""
        if self.world_size == 1:
            return flag
        votes = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        return bool(votes.item())

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks, on every rank (one small all-reduce under DDP)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return float(total.item()) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss and validation mean Dice against step, as a PNG, under `title`.

    Uses a bare matplotlib Figure, not pyplot: switching the global backend to Agg here would stop a
    notebook that calls `train` from showing its own figures.
    """
    from matplotlib.figure import Figure

    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    vals = [(h["step"], h["val_mean_dice"]) for h in history if "val_mean_dice" in h]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if losses:
        ax.plot(*zip(*losses), color="tab:blue", label="training loss (Dice + CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if vals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vals), "o-", color="tab:orange", label="validation mean Dice")
        ax2.set_ylabel("mean Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
