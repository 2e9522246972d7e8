"""`python -m unetrpp train`: train a UNETR++ network on a BTCV-layout folder (also under torchrun)."""

from __future__ import annotations

import argparse
import json


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: use KEY=VALUE with a JSON value, e.g. --set 'patch_size=[32,64,64]'")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="BTCV-layout folder (imagesTr/labelsTr, dataset.json or dataset_0.json)")
    parser.add_argument("--name", default="unetrpp_tiny", help="model preset (default unetrpp_tiny)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, metrics.jsonl, training_curve.png, model/")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="optimiser steps in all (default 1000; with --resume, the run's own); under torchrun "
                             "each step takes --batch-size patches on every rank")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/checkpoint.pt with the run's own options (only --max-steps, "
                             "--device, --precision, --data and --out may change); without it an existing run folder is refused, never overwritten")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="auto (default; with --resume, the run's own): float16 autocast with loss scaling on CUDA, "
                             "float32 on CPU; fp32: float32 everywhere (no TF32 on CUDA); bf16: bfloat16 autocast, CUDA only")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step, per rank under torchrun (default 2)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 for adamw, "
                                                                "1e-2 for sgd)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="adamw (default, suited to short runs) or sgd (Nesterov momentum 0.99, as the original)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="steps of linear learning-rate warm-up before the polynomial decay (default 20)")
    parser.add_argument("--grad-clip", type=float, default=12.0, help="largest gradient norm (default 12, as the original)")
    parser.add_argument("--val-cases", type=float, default=0.2, help="held-out cases: a fraction (< 1) or a count (default 0.2); data whose "
                        "dataset_0.json lists validation cases keep that list instead")
    parser.add_argument("--val-every", type=int, default=200, help="steps between validations (default 200)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines (default 10)")
    parser.add_argument("--samples-per-case", type=int, default=8, help="patches per case per epoch (default 8); an epoch's patches are shared out "
                        "among the torchrun ranks, so it takes cases x this / (ranks x --batch-size) steps, rounded down")
    parser.add_argument("--flip-prob", type=float, default=0.0, help="mirroring probability per axis (default 0: it swaps left and right organs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: split, patches, augmentation (default 0)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="override preprocessing spacing (mm)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="override the patch size")
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field with a JSON value (repeatable); saved in the model's config.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: need a positive number of CPU threads, e.g. --threads 4, or "
                         "leave it out for torch's default")
    import torch

    from unetrpp.pretrained import read_config
    from unetrpp.train import DEFAULT_LR, TrainOptions, build_config, train

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = dict(args.set)
    if args.spacing:
        overrides["preprocessing"] = {**overrides.get("preprocessing", {}), "spacing": list(args.spacing)}
    if args.patch_size:
        overrides["patch_size"] = list(args.patch_size)
    build_config(args.name, overrides)  # fail now on a bad name or override
    options = TrainOptions(
        data=args.data, out=args.out, name=args.name, config_overrides=overrides, max_steps=args.max_steps,
        batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.optimizer], weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, val_cases=args.val_cases, val_every=args.val_every,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, samples_per_case=args.samples_per_case,
        flip_prob=args.flip_prob, seed=args.seed, device=args.device, precision=args.precision, resume=args.resume,
        progress=not args.no_progress,
    )
    result = train(options)
    if result.model_dir is not None:
        vals = [h for h in result.history if "val_mean_dice" in h]
        tail = f"; last validation mean Dice {vals[-1]['val_mean_dice']:.3f}" if vals else ""
        if read_config(result.model_dir).synthetic:  # as its model card says
            print(f"trained {result.step} steps on SYNTHETIC phantoms; model saved to {result.model_dir} (teaching "
                  f"weights, not a segmentation of real anatomy){tail}")
        else:
            print(f"trained {result.step} steps; model saved to {result.model_dir}{tail}")
    return 0
