"""Training plumbing: the torchrun / DDP context, checkpoint and random-state files, stopping between
steps on Ctrl-C, the non-finite check that stops a diverged run, the metrics log and the curve plot."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import threading
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
    process group: NCCL with one GPU per LOCAL_RANK on CUDA (gloo where torch has no NCCL: Windows), gloo on the CPU."""

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
            # NCCL is in Linux builds only; gloo reduces CUDA tensors too (a Windows PC with several GPUs).
            nccl = dev.type == "cuda" and torch.distributed.is_nccl_available()
            # Ranks wait for the slowest one's validation share: allow more than NCCL's 10 minutes.
            torch.distributed.init_process_group(backend="nccl" if nccl else "gloo",
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


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite: the run stopped without saving anything non-finite."""


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None. One transfer from
    the device for all of them (a state_dict has hundreds), not one per tensor."""
    names = [name for name, t in tensors.items() if t.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


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


def load_run_file(path: Path, what: str) -> dict:
    """A checkpoint or random-state file, or a one-line error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, an empty file, another program's pickle
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"{path}: not a readable {what} ({reason}); restore it from a copy, or start a new run "
                         "with another --out folder") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a {what} of `python -m unetrpp train`; restore it from a copy, or start a "
                         "new run with another --out folder")
    return state


def rng_path(run_dir: Path, rank: int) -> Path:
    """Where rank `rank` keeps its random state beside the run's checkpoint."""
    return run_dir / f"rng_rank{rank}.pt"


def save_rng(ctx: DistributedContext, run_dir: Path, step: int) -> None:
    """This rank's random states (CPU and CUDA: dropout, augmentation) for a resume that continues exactly."""
    cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
    save_atomic({"step": step, "cpu": torch.get_rng_state(), "cuda": cuda}, rng_path(run_dir, ctx.rank))


def load_rng(ctx: DistributedContext, run_dir: Path, step: int, seed: int) -> None:
    path = rng_path(run_dir, ctx.rank)
    state = load_run_file(path, "random-state file") if path.is_file() else None
    if state is None or int(state["step"]) != step:
        log.warning("rank %d: no random state saved at step %d; reseeding, so this run will not match an "
                    "uninterrupted one exactly", ctx.rank, step)
        torch.manual_seed(seed + ctx.rank + 1_000_003 * step)
        return
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


@contextlib.contextmanager
def stop_between_steps(ctx: DistributedContext):
    """Run from the main thread, Ctrl-C (or SIGTERM) asks the loop to stop after the current step, so
    the checkpoint it then takes is a whole step. In a single process a second Ctrl-C stops at once.
    Under torchrun every rank gets Ctrl-C, then the same signal again from the launcher, which kills
    the ranks about 30 s later (its shutdown timeout): there each signal only asks, and the ranks
    agree after every step (`DistributedContext.any`) to stop together.
    Yields {"asked": bool}."""
    stop = {"asked": False}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(signum, frame):
        if stop["asked"] and ctx.world_size == 1:
            raise KeyboardInterrupt
        if not stop["asked"] and ctx.is_main:
            log.warning("stopping after this step to save a checkpoint%s",
                        " (Ctrl-C again to stop at once)" if ctx.world_size == 1 else "")
        stop["asked"] = True

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def read_history(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (training loss and validation Dice by step); [] if none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
