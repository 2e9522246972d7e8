"""Training throughput of unetrpp_tiny on the CPU (patches per second), phantom generation time,
and the wall time of a finished run (e.g. the teaching weights).

    python benchmarks/train.py --threads 2 --steps 10 [--run RUN_DIR]

Each step is what `python -m unetrpp train` does per batch: forward with deep supervision, Dice + CE
on the three outputs, backward, gradient clipping and an AdamW step (data loading excluded).
On a shared machine, compare --threads 1 and 2: oversubscribed OpenMP threads spin and can be far
slower than one thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from unetrpp import create_model
from unetrpp.data.phantom import generate_case
from unetrpp.fast import reuse_freed_memory
from unetrpp.train import deep_supervision_loss
from unetrpp.train_utils import read_history


def throughput(threads: int, steps: int, batch_size: int, name: str = "unetrpp_tiny") -> float:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = create_model(name, deep_supervision=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    shape = (batch_size, 1, *model.config.patch_size)
    image = torch.randn(shape)
    label = torch.randint(0, model.config.out_channels, shape)

    def step() -> None:
        loss = deep_supervision_loss(model(image), label, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()

    with reuse_freed_memory():  # as unetrpp.train runs its steps
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch_size / (time.perf_counter() - start)


def run_wall_time(run_dir: Path) -> str:
    lines = read_history(run_dir / "metrics.jsonl")
    losses = [x for x in lines if "loss" in x]
    vals = [x for x in lines if "val_mean_dice" in x]
    last = losses[-1]
    text = f"run {run_dir}: {last['step']} steps, {last['elapsed_s'] / 60:.1f} min of training (all its sessions)"
    if vals:
        text += f", last validation mean Dice {vals[-1]['val_mean_dice']:.3f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--run", type=Path, default=None, help="a finished run folder to report")
    args = parser.parse_args()
    for threads in args.threads:
        rate = throughput(threads, args.steps, args.batch_size)
        print(f"unetrpp_tiny, patch 32x64x64, batch {args.batch_size}, {threads} thread(s): {rate:.2f} patches/s")
    start = time.perf_counter()
    generate_case(0, 1, "default")
    print(f"one default SYNTHETIC phantom case (72 x 384 x 384): {time.perf_counter() - start:.2f} s")
    if args.run:
        print(run_wall_time(args.run))


if __name__ == "__main__":
    main()
