"""Whole-volume inference: any NIfTI in, an organ mask on its exact grid out (spec "Preprocessing
and inference"): preprocessing from the weights' config, sliding window with Gaussian blending,
optional mirror test-time augmentation, probabilities resampled back, argmax, statistics.

Memory: the sliding window stitches into one (C, Z', Y', X') float32 probability buffer on the
target grid plus a one-channel weight map (MONAI), kept on the GPU only when it fits comfortably
in free GPU memory, otherwise on the CPU. Mapping back to the original grid then goes one class at
a time with a running maximum, so the peak is about (C + 3) x N' + 5 x N float32 values, where N'
and N are the voxel counts of the target and the original grid. No second full-size probability
volume is ever made.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from . import io, postprocess
from .fast import optimize_for_inference
from .postprocess import organ_statistics, statistics_csv_text, write_text
from .preprocess import ImageLike, Prepared, load_volume, prepare, restore

if TYPE_CHECKING:
    from .model import UNETRPP

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
_WINDOWS_START, _WINDOWS_END = 0.1, 0.9  # share of the progress bar spent on windows


@dataclasses.dataclass
class SegmentationResult:
    """A mask on the grid of `volume` (the input in the model's orientation), with its statistics."""

    volume: io.Volume  # the input reoriented, array (Z, Y, X) float32 (HU for CT)
    mask: np.ndarray  # uint8 (Z, Y, X), aligned with volume.array
    class_names: tuple[str, ...]  # background first
    statistics: list[dict]  # label, name, voxels, volume_ml, mean_hu; one per foreground class present
    warnings: list[str]
    affine: np.ndarray  # 4x4 affine of the source file
    device: str = "cpu"  # where the network ran
    windows: int = 0  # sliding-window positions evaluated
    seconds: float = 0.0

    def save(self, path: str | Path) -> Path:
        """Write the mask as NIfTI on the exact source grid, label names in `<name>.json` beside it."""
        return io.save_mask(self.mask, self.volume, path, label_names=self.class_names)

    def statistics_csv(self, path: str | Path) -> Path:
        """Write `statistics` as CSV (label, name, voxels, volume_ml, mean_hu)."""
        return write_text(path, statistics_csv_text(self.statistics))


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, or CUDA when available, else CPU; refuses CUDA devices that are not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Number of sliding-window positions MONAI uses for a (Z, Y, X) grid (padded up to the patch)."""
    total = 1
    for size, roi in zip(shape, patch):
        size = max(size, roi)
        step = roi if size == roi else max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / step) + 1
    return total


def ct_warning(array: np.ndarray) -> str | None:
    """A warning when intensities do not look like CT in HU (no air near -1000, or a huge range)."""
    sample = array[::2, ::2, ::2] if min(array.shape) > 8 else array
    p1, p99 = (float(v) for v in np.percentile(sample, (1, 99)))
    if p1 > -500 or p99 > 4000:
        return (f"intensities (1st-99th percentile {p1:.0f}..{p99:.0f}) do not look like CT in Hounsfield units "
                "(air near -1000 HU); these weights expect CT, so the mask may be meaningless")
    return None


def _predict(model: torch.nn.Module, windows: torch.Tensor, tta: bool, amp: bool) -> torch.Tensor:
    """Softmax probabilities (B, C, *patch) for windows (B, 1, *patch), averaged over mirrorings."""
    flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)] if tta else [()]
    total = None
    for axes in flips:
        x = windows.flip(axes) if axes else windows
        x = x.to(next(model.parameters()).dtype)  # bfloat16 networks take bfloat16 windows
        with torch.autocast(device_type=windows.device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        if isinstance(logits, (list, tuple)):  # deep supervision: full resolution first
            logits = logits[0]
        p = torch.softmax(logits.float(), dim=1)
        p = p.flip(axes) if axes else p
        total = p if total is None else total.add_(p)
    return total / len(flips)


def _stitch_device(device: torch.device, voxels: int, channels: int) -> torch.device:
    """Stitch on the GPU only when the buffers take under half of its free memory, else on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if (channels + 3) * voxels * 4 < 0.5 * free else torch.device("cpu")


def sliding_window_probabilities(model: torch.nn.Module, image: np.ndarray, device: torch.device,
                                 overlap: float = 0.5, sw_batch_size: int = 1, tta: bool = False,
                                 progress: Progress | None = None, amp: bool = False) -> torch.Tensor:
    """Blended softmax probabilities (C, Z', Y', X') float32 for a normalised (Z', Y', X') image.

    Windows of `model.config.patch_size` with Gaussian weights (sigma = patch / 8), padded with 0
    (the normalised mean) where the image is smaller than a window.
    """
    from monai.inferers import sliding_window_inference

    patch = tuple(model.config.patch_size)
    total = count_windows(image.shape, patch, overlap)
    stitch = _stitch_device(device, image.size, model.config.out_channels)
    done = 0

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        probs = _predict(model, windows, tta, amp=amp)
        done += windows.shape[0]
        if progress is not None:
            fraction = _WINDOWS_START + (_WINDOWS_END - _WINDOWS_START) * min(done / total, 1.0)
            progress(fraction, f"window {min(done, total)}/{total}")
        return probs

    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(stitch)
    out = sliding_window_inference(inputs, patch, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
                                   sigma_scale=0.125, padding_mode="constant", cval=0.0, sw_device=device,
                                   device=stitch)
    return torch.as_tensor(out)[0]


def probabilities_to_mask(probabilities: torch.Tensor, prepared: Prepared) -> np.ndarray:
    """Argmax on the original grid: each class map (Z', Y', X') resampled back (linear) in turn.

    Returns uint8 (Z, Y, X); equal to argmax over all resampled maps, without holding them all.
    """
    best = None
    mask = np.zeros(prepared.original_shape, dtype=np.uint8)
    for c in range(probabilities.shape[0]):
        p = restore(probabilities[c].float().cpu().numpy(), prepared, order=1)
        if best is None:
            best = p.copy()
            continue
        better = p > best
        mask[better] = c
        np.maximum(best, p, out=best)
    return mask


def _resolve_model(model: Optional["UNETRPP"], weights: str | Path | None, device: torch.device) -> "UNETRPP":
    if model is None:
        if weights is None:
            raise ValueError("segment() needs model= (a UNETRPP) or weights= (a name, folder or Hugging Face repo id)")
        from .pretrained import load_pretrained

        model = load_pretrained(weights, device=device)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "preprocessing"):
        raise TypeError(f"model of type {type(model).__name__} has no UNETRPPConfig .config; "
                        "give a UNETRPP from create_model() or load_pretrained()")
    if config.in_channels != 1:
        raise ValueError(f"weights {config.name!r} expect {config.in_channels} input channels; segment() takes one "
                         "single-channel volume, so use single-channel weights such as unetrpp_synapse")
    # Same layers through faster CPU kernels; parameters, state_dict and training are unaffected.
    return optimize_for_inference(model.to(device))


def segment(image: ImageLike, model: Optional["UNETRPP"] = None, weights: str | Path | None = None,
            device: str | torch.device | None = None, overlap: float = 0.5, tta: bool = False,
            largest_component: bool = False, sw_batch_size: int = 1,
            progress: Progress | None = None, precision: str = "auto") -> SegmentationResult:
    """Segment one volume (a path, a nibabel image or a `unetrpp.io.Volume`).

    `model` (a UNETRPP, moved to `device`) or `weights` (for `unetrpp.pretrained.load_pretrained`);
    `device` None picks CUDA when present (with float16 autocast), else CPU; `overlap` in [0, 1)
    between windows; `tta` averages the 8 mirrorings over (z, y, x); `largest_component` keeps
    one connected component per organ; `progress(fraction, message)` is called as work proceeds.
    `precision`: "auto" (float32 on the CPU, float16 autocast on CUDA), "fp32", or "bf16" (a
    bfloat16 copy of the network: about 2x faster on CPUs with AVX512-BF16 or AMX, logits within
    about 1e-2; see benchmarks/README.md for the measured agreement).
    Returns a `SegmentationResult` whose mask is (Z, Y, X) uint8 on the grid of `result.volume`.
    """
    start = time.perf_counter()
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap={overlap}: must be in [0, 1); 0.5 is the usual choice")
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size={sw_batch_size!r}: must be a positive integer, e.g. 1 on CPU, 4 on a GPU")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    report = progress or (lambda fraction, message: None)
    dev = resolve_device(device)
    net = _resolve_model(model, weights, dev)
    if precision == "bf16":  # a copy, so the caller's model keeps its float32 weights
        net = copy.deepcopy(net).to(torch.bfloat16)
    config = net.config
    prep = config.preprocessing

    report(0.0, "reading")
    volume = load_volume(image, prep)
    warnings = list(volume.warnings)
    if prep.normalization == "ct" and (message := ct_warning(volume.array)):
        warnings.append(message)
        logger.warning(message)

    report(0.05, "resampling")
    prepared = prepare(volume, prep)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            probabilities = sliding_window_probabilities(net, prepared.image, dev, float(overlap), sw_batch_size,
                                                         tta, report, amp=dev.type == "cuda" and precision == "auto")
            report(_WINDOWS_END, "resampling back")
            mask = probabilities_to_mask(probabilities, prepared)
    finally:
        net.train(was_training)
    del probabilities
    if largest_component:
        mask = postprocess.largest_component(mask)
    stats = organ_statistics(mask, volume.array, volume.spacing, config.class_names)
    affine = volume.source.affine if volume.source is not None else volume.affine
    windows = count_windows(prepared.target_shape, config.patch_size, float(overlap))
    seconds = time.perf_counter() - start
    logger.debug("segmented %s: %d windows on %s in %.1f s", volume.path or "image", windows, dev, seconds)
    report(1.0, "done")
    return SegmentationResult(volume, mask, tuple(config.class_names), stats, warnings, np.array(affine),
                              str(dev), windows, seconds)

