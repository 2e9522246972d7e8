"""Training loop in the nnU-Net style of the original: class-balanced patches, Dice + CE with deep
supervision weighted 4/7, 2/7, 1/7 (as the original), AdamW (default, suited to short CPU runs) or
SGD with Nesterov momentum 0.99 (the original's optimiser) with a polynomial schedule, AMP on CUDA
(float16, or bfloat16), gradient clipping, steps with a non-finite loss or gradient skipped, sliding-window validation,
resumable checkpoints (never of non-finite weights), DDP under torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from .config import PRESETS, UNETRPPConfig, get_config
from .data.btcv import Case, check_cases, check_label_names, is_synthetic, read_datalist, split_cases
from .devices import true_float32
from .evaluate import dice
from .fast import reuse_freed_memory
from .inference import sliding_window_probabilities
from .io import check_folder_can_be_written
from .model import UNETRPP
from .pretrained import save_for_inference
from .train_data import PatchDataset, PreparedCase, build_transforms, prepare_cases
from .train_utils import (DistributedContext, TrainingDiverged, first_non_finite, load_rng, load_run_file, plot_curves,
                          read_history, save_atomic, save_rng, stop_between_steps)

log = logging.getLogger(__name__)

DEEP_SUPERVISION_WEIGHTS = (4 / 7, 2 / 7, 1 / 7)  # full resolution, 1/stem, 1/(2 stem): the original's
CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("options.json", "metrics.jsonl", "training_curve.png", CHECKPOINT, "model")  # and rng_rank<N>.pt
DEFAULT_LR = {"adamw": 2e-3, "sgd": 1e-2}  # peak learning rate by optimiser
DEFAULT_MAX_STEPS = 1000
PRECISIONS = ("auto", "fp32", "bf16")  # as inference's, see TrainOptions.precision
# Skipped steps in a row (non-finite loss or gradient) after which a run has diverged and stops. float16 loss
# scaling skips a few steps in a row while it finds its scale (each halves it); 20 would mean a scale 2**20 lower.
MAX_SKIPPED_IN_A_ROW = 20


@dataclass
class TrainOptions:
    """Everything a run needs; saved in every checkpoint and in RUN_DIR/options.json."""

    data: str
    out: str
    name: str = "unetrpp_tiny"
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"preprocessing": {"spacing": [4, 2.5, 2.5]}}
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS for a new run, the run's own when resuming
    batch_size: int = 2
    optimizer: str = "adamw"  # or "sgd" (the original's nnU-Net choice: momentum 0.99, Nesterov)
    lr: float = DEFAULT_LR["adamw"]
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 12.0
    val_cases: float = 0.2  # fraction (float < 1) or count (>= 1) of cases held out, by case
    val_every: int = 200
    checkpoint_every: int = 100
    log_every: int = 10
    samples_per_case: int = 8
    flip_prob: float = 0.0
    seed: int = 0
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: CUDA when present
    # "auto": float16 autocast with loss scaling on CUDA, float32 on the CPU; "fp32": float32 (no TF32 on
    # CUDA); "bf16": bfloat16 autocast on CUDA (no loss scaling needed), see _check_precision for the CPU.
    # None: "auto" for a new run, the run's own when resuming (given, it may change: a run moved to the CPU).
    precision: str | None = None
    resume: bool = False
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None  # RUN_DIR/model (save_pretrained folder) when the run finished
    step: int
    history: list[dict] = field(default_factory=list)


def poly_lr(step: int, max_steps: int, warmup: int, exponent: float = 0.9) -> float:
    """LR factor: linear warm-up, then nnU-Net's (1 - step / max_steps) ** 0.9."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / max_steps) ** exponent


def deep_supervision_loss(outputs: list[torch.Tensor] | torch.Tensor, label: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    """Weighted Dice+CE over the outputs [full, 1/2, 1/4]; the label (B, 1, Z, Y, X) is downsampled
    (nearest) to each output grid."""
    if isinstance(outputs, torch.Tensor):
        return loss_fn(outputs, label)
    weights = DEEP_SUPERVISION_WEIGHTS[: len(outputs)]
    total = 0.0
    for w, out in zip(weights, outputs):
        target = label if out.shape[2:] == label.shape[2:] else F.interpolate(label.float(), size=out.shape[2:], mode="nearest")
        total = total + w * loss_fn(out, target)
    return total / sum(weights)


def validate(model: UNETRPP, cases: list[PreparedCase], device: torch.device, class_names: tuple[str, ...],
             overlap: float = 0.25, ctx: DistributedContext | None = None) -> dict[str, float]:
    """Sliding-window Dice per organ on the prepared validation cases (blended as inference blends
    them, `inference.sliding_window_probabilities`, at a cheaper overlap than inference's 0.5),
    averaged over cases. Under DDP (`ctx`) every rank scores its share, cases[rank::world_size], on
    the unwrapped model with rank 0's buffers (the model rank 0 saves), and the sums are added up
    across ranks: all ranks get the same result."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    if world > 1:
        # Each rank's last training step moved its batch-norm running statistics by its own batch; DDP
        # gives every rank rank 0's buffers again at the next forward, so this changes no training step.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    was_training, was_ds = model.training, model.deep_supervision
    model.eval()
    model.deep_supervision = False
    sums = torch.zeros(len(class_names) - 1, dtype=torch.float64)  # Dice summed over this rank's cases
    try:
        with torch.no_grad():
            for case in cases[rank::world]:
                probs = sliding_window_probabilities(model, case.image[0], device, overlap, sw_batch_size=2)
                pred = probs.argmax(0).cpu().numpy()  # (Z, Y, X)
                for label in range(1, len(class_names)):
                    sums[label - 1] += dice(pred == label, case.label[0] == label)
    finally:
        model.train(was_training)
        model.deep_supervision = was_ds
    if world > 1:
        log.info("rank %d validated %d case(s)", rank, len(cases[rank::world]))
        total = sums.to(device)  # NCCL reduces tensors on the GPU
        torch.distributed.all_reduce(total)
        sums = total.cpu()
    return {name: float(v) / len(cases) for name, v in zip(class_names[1:], sums)}


def build_config(name: str, overrides: dict[str, Any]) -> UNETRPPConfig:
    """The preset with `overrides` and deep supervision on; a partial "preprocessing" dict is merged
    into the preset's preprocessing (so {"spacing": [...]} keeps its orientation and CT numbers)."""
    overrides = dict(overrides)
    if "name" in overrides:  # get_config(name, name=...) would fail with "got multiple values for argument"
        raise ValueError(f"--set name={overrides['name']!r}: the network is chosen with --name (valid names: "
                         f"{', '.join(PRESETS)}); --set changes the fields of that preset")
    if isinstance(overrides.get("preprocessing"), dict):
        overrides["preprocessing"] = {**dataclasses.asdict(get_config(name).preprocessing), **overrides["preprocessing"]}
    return get_config(name, **{**overrides, "deep_supervision": True})


def _build(options: TrainOptions, config: UNETRPPConfig, device: torch.device, max_steps: int):
    model = UNETRPP(config).to(device)
    if options.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    elif options.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=0.99, nesterov=True,
                              weight_decay=options.weight_decay)
    else:
        raise ValueError(f"optimizer={options.optimizer!r}: use 'adamw' or 'sgd'")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_lr(s, max_steps, options.warmup_steps))
    return model, opt, sched


def _check_options(o: TrainOptions) -> None:
    for name in ("max_steps", "batch_size", "val_every", "checkpoint_every", "log_every", "samples_per_case"):
        if name == "max_steps" and o.max_steps is None:  # the default: see TrainOptions
            continue
        if not (isinstance(getattr(o, name), int) and getattr(o, name) > 0):
            raise ValueError(f"{name}={getattr(o, name)!r}: must be a positive integer")
    if not 0 < o.lr < 1e30:  # also not inf or beyond float32 (torch then fails with a traceback at the first step)
        raise ValueError(f"lr={o.lr}: must be a positive number, e.g. {DEFAULT_LR['adamw']} for AdamW or "
                         f"{DEFAULT_LR['sgd']} for SGD")
    if not o.grad_clip > 0:  # a negative norm would reverse every gradient, zero would erase them
        raise ValueError(f"grad_clip={o.grad_clip}: must be a positive gradient norm, e.g. 12")
    if not o.weight_decay >= 0:
        raise ValueError(f"weight_decay={o.weight_decay}: must be 0 or positive, e.g. 1e-4")
    if not (isinstance(o.warmup_steps, int) and o.warmup_steps >= 0):
        raise ValueError(f"warmup_steps={o.warmup_steps!r}: must be 0 or a positive integer, e.g. 20")
    if o.precision is not None and o.precision not in PRECISIONS:
        raise ValueError(f"precision={o.precision!r}: must be one of {', '.join(PRECISIONS)}")
    if not 0.0 <= o.flip_prob <= 1.0:
        raise ValueError(f"flip_prob={o.flip_prob}: must be a probability in [0, 1]")
    if not o.val_cases >= 0 or (o.val_cases >= 1 and o.val_cases != int(o.val_cases)):
        raise ValueError(f"val_cases={o.val_cases}: a count (>= 1) or a fraction in [0, 1) of the cases")


def _check_precision(precision: str, device: torch.device) -> None:
    """bfloat16 training on the CPU is refused: oneDNN's bfloat16 3-D convolution (torch 2.13, a CPU with
    AVX512-BF16) gives NaN weight gradients now and then on grids as small as this network's deepest
    (2 x 2 x 2 or 2 x 4 x 4 voxels), and one NaN gradient makes every weight NaN for the rest of the run."""
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision='bf16' on {device}: bfloat16 training runs on CUDA only (on the CPU, torch's "
                         "bfloat16 3-D convolutions give NaN gradients on small grids); train on the CPU with "
                         "precision 'auto' or 'fp32'")


def _check_one_channel(config: UNETRPPConfig) -> None:
    """The reader gives each case one image (a 3-D NIfTI): a network taking more channels (unetrpp_tumor's
    four MRI sequences) would fail at its first step, with a message about window sizes."""
    if config.in_channels != 1:
        raise ValueError(f"{config.name} takes in_channels={config.in_channels} image channels, but training reads one "
                         "image (a 3-D NIfTI) per case; train a single-channel network, e.g. --name unetrpp_synapse, "
                         "or this one on one channel with --set in_channels=1")


def _check_batch_norm(config: UNETRPPConfig, batch_size: int) -> None:
    """Batch norm in training needs more than one value per channel on the coarsest grid."""
    if batch_size * math.prod(config.stage_grid(3)) < 2:
        raise ValueError(f"batch_size={batch_size} with patch {config.patch_size}: the coarsest grid "
                         f"{config.stage_grid(3)} then holds one value per channel, too few for batch norm; "
                         "use a batch of 2 or more, or a larger patch")


# Options a resumed run takes as given (the data may have moved); all others come from its checkpoint.
_CHANGEABLE_ON_RESUME = ("max_steps", "device", "precision", "resume", "progress", "data", "out")


def _resumed_options(given: TrainOptions, saved: dict) -> TrainOptions:
    """The checkpoint's options with the changeable ones from `given`; says which others were asked for
    and ignored (a value left at its default was not asked for)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainOptions)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    defaults["lr"] = DEFAULT_LR.get(given.optimizer, defaults["lr"])
    ignored = [f"{k}={getattr(given, k)!r} (the run has {v!r})" for k, v in saved.items()
               if k not in _CHANGEABLE_ON_RESUME and getattr(given, k) != v and getattr(given, k) != defaults.get(k)]
    if ignored:
        log.warning("resuming with the run's own options; these given ones differ and are ignored: %s",
                    ", ".join(ignored))
    # max_steps not given (None) is the run's own: a 2400-step run resumed with a bare --resume once ran to
    # the default 1000 instead, on a learning-rate schedule for 1000 steps from then on
    changed = {k: getattr(given, k) for k in _CHANGEABLE_ON_RESUME
               if not (k in ("max_steps", "precision") and getattr(given, k) is None)}
    return TrainOptions(**{**saved, **changed})


def _model_card(config: UNETRPPConfig, options: TrainOptions, history: list[dict], step: int, n_train: int,
                validation: list[str]) -> str:
    """The README.md of RUN_DIR/model: what was trained on what, and how to use it."""
    vals = [h["val_mean_dice"] for h in history if "val_mean_dice" in h]
    dice = f"; last validation mean Dice {vals[-1]:.3f}" if vals else ""
    data = ("**SYNTHETIC phantoms** (`python -m unetrpp phantom`): teaching weights, not a segmentation of real "
            "anatomy" if config.synthetic else f"`{options.data}`")
    return (f"# UNETR++ `{config.name}` trained with `python -m unetrpp train`\n\n"
            f"Data: {data}. {n_train} training and {len(validation)} validation cases, {step} steps{dice}.\n\n"
            + (f"Validation cases (held out; score the weights on these): {', '.join(validation)}.\n\n"
               if validation else "") +
            "Use: `python -m unetrpp predict SCAN -o OUT --weights THIS_FOLDER`, or "
            "`unetrpp.pretrained.load_pretrained(\"THIS_FOLDER\")`. Not a medical device.\n")


def _check_new_run_folder(run_dir: Path, ctx: DistributedContext) -> None:
    """A new run writes only where it overwrites nothing: a folder without a run's files, or what is
    left of a run of ours that stopped before its first checkpoint (its options.json and
    metrics.jsonl), which starts again. A run with a checkpoint needs --resume."""
    if (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"{run_dir} already holds a training run; add --resume to continue it, "
                         "or give another --out folder (nothing was changed)")
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    present += sorted(p.name for p in run_dir.glob("rng_rank*.pt")) if run_dir.is_dir() else []
    if not present:
        return
    if set(present) <= {"options.json", "metrics.jsonl"} and _holds_run_options(run_dir / "options.json"):
        if ctx.is_main:
            log.warning("%s holds a run that stopped before its first checkpoint; starting it again", run_dir)
        return
    raise ValueError(f"{run_dir} already holds {', '.join(present)}, which a new run would overwrite; give a "
                     "new or empty --out folder (nothing was changed)")


def _holds_run_options(path: Path) -> bool:
    """Whether `path` is the options.json a run of this package wrote."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # A subset: a run written before an option was added (precision) has no entry for it.
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    return isinstance(saved, dict) and {"data", "out", "name"} <= set(saved) <= fields


def train(options: TrainOptions, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `options.name` on the BTCV-layout folder `options.data`; write RUN_DIR = `options.out`.

    RUN_DIR gets options.json, metrics.jsonl (one JSON object per logged step / validation),
    training_curve.png, checkpoint.pt plus rng_rank<N>.pt (resume with `resume=True`; a folder that
    holds a run is refused otherwise) and, at the end, model/ (a `save_pretrained` folder that
    `unetrpp.pretrained.load_pretrained` and inference read). `on_step(record)` is called on rank 0
    with each logged record ({"step", "loss", "lr", ...}; validation records carry "val_dice" and
    "val_mean_dice"). Ctrl-C finishes the step, saves a checkpoint, then raises KeyboardInterrupt.
    A step with a non-finite loss or gradient norm changes nothing but the schedule (records count them in
    "skipped"); MAX_SKIPPED_IN_A_ROW of them, or non-finite weights, raise TrainingDiverged, leaving the
    last checkpoint and model/ as they were.
    """
    _check_options(options)
    ctx = DistributedContext.from_env(options.device)
    run_dir = Path(options.out)
    ckpt_path = run_dir / CHECKPOINT
    start_step, state = 0, None
    if options.resume:
        if not ckpt_path.is_file():
            started = (run_dir / "metrics.jsonl").is_file()
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume; " + (
                "the run there stopped before its first checkpoint: run the same command without --resume to "
                "start it again" if started else "run once without --resume first"))
        state = load_run_file(ckpt_path, "training checkpoint")
        if bad := first_non_finite(state["model"]):  # every step would be skipped, or the resume would stop at once
            raise TrainingDiverged(f"{ckpt_path}: its weights are not finite ({bad}), from a run that diverged; restore "
                                   "an earlier copy of it, or start a new run (another --out) with a lower --lr")
        options = _resumed_options(options, dict(state["options"]))
        start_step = int(state["step"])
    else:
        _check_new_run_folder(run_dir, ctx)
    if options.max_steps is None:
        options = dataclasses.replace(options, max_steps=DEFAULT_MAX_STEPS)
    if options.precision is None:  # a new run, or one from before the option
        options = dataclasses.replace(options, precision="auto")
    check_folder_can_be_written(run_dir)  # before the data is prepared, not after
    if start_step >= options.max_steps and ctx.is_main:
        log.warning("the run is already at step %d, not below max_steps=%d: nothing to train (raise --max-steps to "
                    "go on); the model is saved again", start_step, options.max_steps)
    # What the run folder keeps: a resume that trains nothing (how an interrupted run writes model/, see
    # pretrained.training_run_hint) leaves the run's own max_steps, or a later bare --resume would stop there.
    saved = options
    if state is not None and start_step >= options.max_steps:
        saved = dataclasses.replace(options, max_steps=int(state["options"]["max_steps"]))
    _check_precision(options.precision, ctx.device)
    config = build_config(options.name, options.config_overrides)
    check_label_names(options.data, config.class_names)  # the data's classes are the network's outputs
    _check_one_channel(config)
    _check_batch_norm(config, options.batch_size)
    if is_synthetic(options.data):  # the saved weights say so wherever they are used
        config = config.replace(synthetic=True)
    data_name = "SYNTHETIC phantoms" if config.synthetic else Path(options.data).name
    curve_title = f"Training {config.name} on {data_name}"
    torch.manual_seed(options.seed + ctx.rank)
    torch.set_flush_denormal(True)  # layer scale starts at 1e-6: denormal gradients make CPU steps crawl

    train_cases, val_cases = training_split(options)
    per_rank = len(train_cases) * options.samples_per_case // ctx.world_size  # DistributedSampler drops the rest
    if per_rank < options.batch_size:
        raise ValueError(f"batch_size={options.batch_size}, but an epoch holds only {per_rank} training patches"
                         f"{' per process' if ctx.world_size > 1 else ''} ({len(train_cases)} case(s) x "
                         f"samples_per_case={options.samples_per_case}); lower --batch-size or raise "
                         "--samples-per-case")
    check_cases(train_cases + val_cases)
    prepared = prepare_cases(train_cases + val_cases, config)  # every case checked before any step
    train_data, val_data = prepared[: len(train_cases)], prepared[len(train_cases):]
    val_names = [case.name for case in val_cases]
    log.info("rank %d: %d training and %d validation cases%s", ctx.rank, len(train_data), len(val_data),
             f" ({', '.join(val_names)})" if val_names else "")
    if ctx.is_main and not val_cases:
        log.warning("no validation cases (%d case(s) in all): the run reports no validation Dice; give more "
                    "cases or --val-cases", len(train_cases))
    if ctx.is_main and options.max_steps < options.warmup_steps:
        log.warning("max_steps=%d ends inside the %d warm-up steps: the learning rate never reaches its peak",
                    options.max_steps, options.warmup_steps)

    model, opt, sched = _build(options, config, ctx.device, options.max_steps)
    cuda = ctx.device.type == "cuda"
    amp_dtype = {"auto": torch.float16 if cuda else None, "fp32": None, "bf16": torch.bfloat16}[options.precision]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # bfloat16 has float32's range
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():  # a float16 run saved one; one moved to CPU needs none
            scaler.load_state_dict(state["scaler"])
        load_rng(ctx, run_dir, start_step, options.seed)
    net = ctx.wrap(model)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    dataset = PatchDataset(train_data, build_transforms(config, options.flip_prob), config.out_channels,
                           options.samples_per_case, options.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                                  shuffle=True, seed=options.seed, drop_last=True)
    per_epoch = max(1, len(sampler) // options.batch_size)

    history: list[dict] = []
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "options.json").write_text(json.dumps(dataclasses.asdict(saved), indent=2), encoding="utf-8")
        # On resume, forget what was logged after the checkpoint: those steps run again.
        history = [h for h in read_history(run_dir / "metrics.jsonl") if h["step"] <= start_step]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")

    def checkpoint(step: int) -> None:
        """Every rank saves its random state; rank 0 the rest (random state last, so a checkpoint
        never points to a random state of another step). Non-finite weights stop the run instead: the
        last checkpoint stays as it was (every rank checks, so all stop together)."""
        nonlocal last_checkpoint
        bad = first_non_finite(model.state_dict())
        if ctx.any(bad is not None):
            raise _diverged(step, f"the weights are no longer finite ({bad or 'on another rank'})", options,
                            last_checkpoint, ckpt_path)
        if ctx.is_main:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "elapsed_s": time.time() - t0,
                         "running": running,  # mean losses over the ranks since the last logged step
                         "skipped": {"since_log": skipped_since_log, "in_a_row": skipped_in_a_row},
                         "options": dataclasses.asdict(saved), "config": config.to_dict()}, ckpt_path)
        save_rng(ctx, run_dir, step)
        last_checkpoint = step

    def skip(step: int, loss_value: float, norm_value: float) -> None:
        """Count a skipped step, say so, and stop the run when it has diverged."""
        nonlocal skipped_since_log, skipped_in_a_row
        skipped_since_log, skipped_in_a_row = skipped_since_log + 1, skipped_in_a_row + 1
        if ctx.is_main:  # float16 loss scaling overflows now and then while it finds its scale: no warning
            level = logging.INFO if scaler.is_enabled() and math.isfinite(loss_value) else logging.WARNING
            log.log(level, "step %d skipped: loss %g, gradient norm %g, not finite; the weights were not updated "
                    "(%d in a row, the run stops at %d)", step, loss_value, norm_value, skipped_in_a_row,
                    MAX_SKIPPED_IN_A_ROW)
        # A skipped step leaves the weights as they were: non-finite ones came from the step before (a finite
        # gradient times a learning rate far too high), and every later step would be skipped too.
        bad = first_non_finite(dict(model.named_parameters()))
        if ctx.any(bad is not None):
            raise _diverged(step, f"the weights are no longer finite ({bad or 'on another rank'})", options,
                            last_checkpoint, ckpt_path)
        if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise _diverged(step, f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient norm and "
                            f"were skipped (last: loss {loss_value:g}, gradient norm {norm_value:g})", options,
                            last_checkpoint, ckpt_path)

    def record(entry: dict) -> None:
        history.append(entry)
        with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if on_step is not None:
            on_step(entry)

    bar, above_the_bar = None, contextlib.nullcontext()
    if ctx.is_main and options.progress:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=options.max_steps, initial=start_step, desc="train", unit="step")
        above_the_bar = logging_redirect_tqdm()  # log lines print above the bar, not glued to its end
    # elapsed_s counts training time over all sessions of a resumed run
    step, t0 = start_step, time.time() - (float(state.get("elapsed_s", 0.0)) if state else 0.0)
    running = list(state.get("running", [])) if state else []
    counts = dict(state.get("skipped", {})) if state else {}  # none in a checkpoint from before skipping
    skipped_since_log, skipped_in_a_row = int(counts.get("since_log", 0)), int(counts.get("in_a_row", 0))
    last_checkpoint = start_step if state else None
    checkpoint_due = False
    # Batch norm's running statistics before the step: a skipped step puts them back (a NaN batch made them NaN).
    buffers = [b.detach().clone() for b in model.buffers()]
    net.train()
    whole_step = True  # False while a step is half done: no checkpoint may be taken then
    # Every step frees and allocates the same large activations again: keep that memory in between.
    exact = true_float32() if cuda and options.precision == "fp32" else contextlib.nullcontext()
    with reuse_freed_memory(), stop_between_steps(ctx) as stop, above_the_bar, exact:
        try:
            while step < options.max_steps:
                epoch, offset = divmod(step, per_epoch)
                sampler.set_epoch(epoch)
                dataset.epoch = epoch
                order = list(sampler)
                for b in range(offset, per_epoch):
                    if step >= options.max_steps:
                        break
                    items = [dataset[i] for i in order[b * options.batch_size:(b + 1) * options.batch_size]]
                    whole_step = False
                    image = torch.stack([i[0] for i in items]).to(ctx.device)  # (B, 1, *patch)
                    label = torch.stack([i[1] for i in items]).to(ctx.device)  # (B, 1, *patch)
                    for kept, buffer in zip(buffers, model.buffers()):
                        kept.copy_(buffer)
                    with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float16,
                                        enabled=amp_dtype is not None):
                        loss = deep_supervision_loss(net(image), label, loss_fn)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
                    # One non-finite gradient would make every weight NaN. The mean over the ranks is NaN if one
                    # rank's loss is; DDP all-reduces the gradients, so the ranks see one norm, but they agree
                    # anyway (one rank stepping alone would set the ranks' weights apart for good): all skip or none.
                    loss_value, norm_value = ctx.mean(float(loss.detach())), float(norm)
                    took = not ctx.any(not (math.isfinite(loss_value) and math.isfinite(norm_value)))
                    if took:
                        scaler.step(opt)
                    else:
                        for kept, buffer in zip(buffers, model.buffers()):
                            buffer.copy_(kept)
                    scaler.update()
                    sched.step()  # also after a skipped step, as under loss scaling: the schedule is by step
                    step += 1
                    whole_step = True
                    if took:
                        # The mean over the ranks now, not at the log step: the checkpoint then holds every rank's
                        # losses since the last log, and a resumed run logs the mean an uninterrupted one does.
                        running.append(loss_value)
                        skipped_in_a_row = 0
                    else:
                        skip(step, loss_value, norm_value)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{running[-1]:.3f}" if took else "skipped")
                    if step % options.log_every == 0 or step == options.max_steps:
                        if ctx.is_main:  # the loss is NaN when every step since the last record was skipped
                            record({"step": step, "loss": float(np.mean(running)) if running else math.nan,
                                    "skipped": skipped_since_log, "lr": sched.get_last_lr()[0],
                                    "elapsed_s": round(time.time() - t0, 1), "epoch": epoch})
                        running = []
                        skipped_since_log = 0
                    if (step % options.val_every == 0 or step == options.max_steps) and val_data:
                        scores = validate(model, val_data, ctx.device, config.class_names, ctx=ctx)  # all ranks
                        if ctx.is_main:
                            record({"step": step, "val_dice": scores, "val_mean_dice": float(np.mean(list(scores.values())))})
                            log.info("step %d: validation mean Dice %.3f", step, history[-1]["val_mean_dice"])
                            if step < options.max_steps:  # the last step's plot and checkpoint come below
                                plot_curves(history, run_dir / "training_curve.png", curve_title)
                        ctx.barrier()
                    checkpoint_due |= step % options.checkpoint_every == 0
                    # Not at a skipped step, which may begin a divergence: at the next step taken.
                    if checkpoint_due and took and step < options.max_steps:
                        checkpoint(step)
                        checkpoint_due = False
                    if ctx.any(stop["asked"]):  # under torchrun all ranks stop after the same step
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if whole_step:
                checkpoint(step)
                log.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
            elif ckpt_path.is_file():
                log.warning("interrupted during step %d; no checkpoint taken (the last one stays valid)", step + 1)
            else:
                log.warning("interrupted during step %d, before any checkpoint; run the same command again to start "
                            "afresh", step + 1)
            raise
        finally:
            if bar is not None:
                bar.close()
    checkpoint(step)
    model_dir = None
    if ctx.is_main:
        plot_curves(history, run_dir / "training_curve.png", curve_title)
        model_dir = save_for_inference(model, run_dir / "model", card=_model_card(config, options, history, step,
                                                                                  len(train_data), val_names))
    ctx.close()
    return TrainResult(run_dir, model_dir, step, history)


def _diverged(step: int, what: str, options: TrainOptions, last_checkpoint: int | None,
              ckpt_path: Path) -> TrainingDiverged:
    """The one-line error that stops a diverged run: where, what was kept, and what would work instead."""
    kept = (f"{ckpt_path} of step {last_checkpoint} is kept as it was" if last_checkpoint is not None
            else "there is no checkpoint yet")
    # bfloat16 keeps 8 bits of mantissa; float16 with loss scaling or float32 may train where it does not
    precision = ", or another --precision than bf16 (auto on CUDA)" if options.precision == "bf16" else ""
    return TrainingDiverged(f"step {step}: {what}, so the run has diverged and stops without saving anything "
                            f"non-finite ({kept}); start a new run (another --out) with a lower --lr than "
                            f"{options.lr:g}{precision}")


def training_split(options: TrainOptions) -> tuple[list[Case], list[Case]]:
    """(training, validation) cases of a run: the data's own validation list, else `options.val_cases`
    of its training cases drawn with `options.seed` (so a finished run's validation cases can be named)."""
    lists = read_datalist(options.data)
    if lists["validation"]:
        return lists["training"], lists["validation"]
    count = int(options.val_cases) if options.val_cases >= 1 else float(options.val_cases)
    return split_cases(lists["training"], count, options.seed)
