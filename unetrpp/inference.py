"""Whole-volume inference: any NIfTI in, an organ mask on its exact grid out (spec "Preprocessing
and inference"): preprocessing from the weights' config, sliding window with Gaussian blending,
optional mirror test-time augmentation, probabilities resampled back, argmax, statistics.

Memory: the sliding window stitches into one (C, Z', Y', X') float32 probability buffer on the
target grid plus a one-channel weight map, kept on the GPU only when it fits comfortably
in free GPU memory, otherwise on the CPU. Mapping back to the original grid then goes one class at
a time, a few slices at a time, with a running maximum (on a GPU, four classes at a time), so the peak
on the CPU is about (C + 3) x N' float32 values and 5 bytes per voxel of the original grid (the best
value so far and its class) beside the scan, where N' and N are the voxel counts of the target and the
original grid. No full-size probability map is ever made on the CPU.

On CUDA the normalised image is copied to the GPU once, so windows are cut there (no per-window
host-to-device copy), several windows go through each forward pass, and when the buffers stayed on
the GPU the way back to the original grid runs there too.
"""

from __future__ import annotations

import contextlib
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
import torch.nn.functional as F

from . import io, postprocess
from .config import Preprocessing
from .devices import CompiledNetwork, auto_sw_batch_size, compile_network, resolve_device, true_float32
from .fast import optimize_for_inference, reuse_freed_memory
from .postprocess import organ_statistics, statistics_csv_text, write_statistics
from .preprocess import ImageLike, Prepared, load_volume, prepare, restore_steps, restore_torch

if TYPE_CHECKING:
    from .model import UNETRPP

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
_WINDOWS_START, _WINDOWS_END = 0.1, 0.9  # share of the progress bar spent on windows
_RESTORE_VOXELS = 2**21  # voxels of the scan's grid resampled back at a time (8 MB of float32)


@dataclasses.dataclass
class SegmentationResult:
    """A mask on the grid of `volume` (the input in the model's orientation), with its statistics."""

    volume: io.Volume  # the input reoriented, array (Z, Y, X) float32 (HU for CT)
    mask: np.ndarray  # uint8 (Z, Y, X), aligned with volume.array
    class_names: tuple[str, ...]  # background first
    statistics: list[dict]  # label, name, voxels, volume_ml, mean_hu (not CT: mean_intensity); per class
    warnings: list[str]
    affine: np.ndarray  # 4x4 affine of the source file: goes with mask_on_source_grid(), not with mask
    device: str = "cpu"  # where the network ran
    windows: int = 0  # sliding-window positions evaluated
    seconds: float = 0.0
    synthetic: bool = False  # made by weights trained on SYNTHETIC phantoms (config.synthetic)
    in_hu: bool = True  # the volume's values look like CT in HU (`ct_warning`); else the mean is mean_intensity

    def mask_on_source_grid(self) -> np.ndarray:
        """The mask in the source file's voxel order (i, j, k), the grid `affine` describes:
        `nib.Nifti1Image(result.mask_on_source_grid(), result.affine)` lies on the scan."""
        return io.to_source_grid(self.mask, self.volume)

    def save(self, path: str | Path) -> Path:
        """Write the mask as NIfTI on the exact source grid, label names in `<name>.json` beside it
        (both saying "synthetic" when the weights were trained on phantoms). An existing file is only
        replaced if it is a mask written here: the scan itself, or any other file, never is."""
        return io.save_mask(self.mask, self.volume, path, label_names=self.class_names, synthetic=self.synthetic)

    def statistics_csv(self, path: str | Path) -> Path:
        """Write `statistics` as CSV (label, name, voxels, volume_ml, mean_hu or, for a scan that is not CT
        in HU, mean_intensity, and a "note" column saying "SYNTHETIC" when the weights were trained on phantoms);
        an existing file is only replaced if it is such a table (see `postprocess.check_statistics_path`)."""
        return write_statistics(path, statistics_csv_text(self.statistics, synthetic=self.synthetic, in_hu=self.in_hu))


SYNTHETIC_WEIGHTS_WARNING = ("these weights were trained on SYNTHETIC phantoms (teaching weights): the masks "
                             "illustrate the method and are not a segmentation of real anatomy")
PRECISIONS = ("auto", "fp32", "bf16")


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Where the windows start along one axis of `size` voxels (at least `patch`), as nnU-Net v1 places
    them: the fewest windows whose step is at most patch x (1 - overlap), spread evenly from the first
    voxel to the last (so all steps are equal to within a voxel)."""
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * (1.0 - overlap))) + 1
    step = (size - patch) / (count - 1)
    return [int(round(step * i)) for i in range(count)]


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Number of sliding-window positions for a (Z, Y, X) grid (padded up to the patch)."""
    return math.prod(len(window_starts(max(size, p), p, overlap)) for size, p in zip(shape, patch))


def check_overlap(overlap: float) -> float:
    """`overlap` as a float in [0, 1), else a one-line ValueError."""
    try:
        value = float(overlap)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(overlap, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"overlap={overlap!r}: must be a number in [0, 1); 0.5 is the usual choice")
    return value


def intensity_range(array: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentiles of a volume (Z, Y, X), from every second voxel along each axis of a
    volume larger than 8 voxels (about 0.1 s for a 512 x 512 x 300 CT on 2 cores). Computed in float32
    whatever the array's type, so the viewer's int16 copy of a scan gives what its float32 volume gives."""
    sample = array[::2, ::2, ::2] if min(array.shape) > 8 else array
    p1, p99 = np.percentile(np.asarray(sample, dtype=np.float32), (1, 99))
    return float(p1), float(p99)


NOT_CT = "do not look like CT in Hounsfield units"  # in `ct_warning`'s message, which the viewer recognises


def ct_warning(array: np.ndarray) -> str | None:
    """A warning when intensities do not look like CT in HU: nothing as low as fat (-100 HU; a scan that
    reaches out of the body also has air near -1000), or a range far beyond bone. MRI in any scaling,
    or CT stored without its rescale intercept, fails the first test; a crop inside the body passes."""
    p1, p99 = intensity_range(array)
    if p1 > -50 or p99 > 4000:
        return (f"intensities (1st-99th percentile {p1:.0f}..{p99:.0f}) {NOT_CT} "
                "(fat near -100 HU, air near -1000 HU); these weights expect CT, so the mask may be meaningless")
    return None


def mri_weights_warning(array: np.ndarray, modality: str) -> str | None:
    """A warning when weights for MRI (z-scored input) get what looks like a CT: air near -1000 HU. MRI
    intensities are never that negative, whatever their scaling."""
    p1, _ = intensity_range(array)
    if p1 < -500:
        return (f"intensities reach {p1:.0f} (1st percentile), as air does in a CT in Hounsfield units; these "
                f"weights expect {modality}, so the mask may be meaningless")
    return None


def modality_warning(array: np.ndarray, preprocessing: Preprocessing) -> str | None:
    """`ct_warning` for CT weights, `mri_weights_warning` for MRI weights."""
    if preprocessing.normalization == "ct":
        return ct_warning(array)
    if preprocessing.modality.upper().startswith("MR"):
        return mri_weights_warning(array, preprocessing.modality)
    return None


def small_scan_warning(shape: Sequence[int], spacing: Sequence[float], config) -> str | None:
    """A warning when the scan is under half a network window along every axis: the network tells organs
    apart by their surroundings, and a scrap of tissue has too little of them."""
    extent = [n * s for n, s in zip(shape, spacing)]
    window = [p * t for p, t in zip(config.patch_size, config.preprocessing.spacing)]
    if all(e < w / 2 for e, w in zip(extent, window)):
        return (f"the scan spans only {' x '.join(f'{e:.0f}' for e in extent)} mm (z, y, x), under half of one "
                f"network window ({' x '.join(f'{w:.0f}' for w in window)} mm) along every axis; the network "
                "recognises organs in their surroundings, so expect few or none")
    return None


# No body is wider than this along two axes (whole-body CT: about 2000 x 500 x 500 mm).
BODY_WIDTH_MM = 1000.0


def large_scan_warning(shape: Sequence[int], spacing: Sequence[float]) -> str | None:
    """A warning when the scan is wider than a body along two or more axes: usually a voxel size that is
    wrong in the header, which makes the run slow and the mask meaningless."""
    extent = [n * s for n, s in zip(shape, spacing)]
    if sum(e > BODY_WIDTH_MM for e in extent) >= 2:
        return (f"the scan spans {' x '.join(f'{e:.0f}' for e in extent)} mm (z, y, x), wider than a body along "
                "more than one axis; check the voxel spacing in the header (pixdim): if it is wrong, so is the mask")
    return None


def _predict(model: torch.nn.Module, windows: torch.Tensor, tta: bool, autocast: torch.dtype | None = None,
             pad_to: int = 0) -> torch.Tensor:
    """Softmax probabilities (B, C, *patch) for windows (B, 1, *patch), averaged over mirrorings.

    `autocast`: run the network under autocast to that dtype (CUDA); `pad_to`: pad a smaller batch
    with zero windows up to this size, so a compiled network always sees one shape (every sample
    is computed on its own, so the padding does not change the others).
    """
    flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)] if tta else [()]
    count = windows.shape[0]
    if pad_to > count:
        windows = torch.cat([windows, windows.new_zeros((pad_to - count, *windows.shape[1:]))])
    dtype = next(model.parameters()).dtype
    total = None
    for axes in flips:
        x = windows.flip(axes) if axes else windows
        x = x.to(dtype)  # bfloat16 networks take bfloat16 windows
        with torch.autocast(device_type=windows.device.type, dtype=autocast or torch.float16,
                            enabled=autocast is not None):
            logits = model(x)
        if isinstance(logits, (list, tuple)):  # deep supervision: full resolution first
            logits = logits[0]
        p = torch.softmax(logits[:count].float(), dim=1)
        p = p.flip(axes) if axes else p
        total = p if total is None else total.add_(p)
    return total.div_(len(flips)) if len(flips) > 1 else total


def _stitch_device(device: torch.device, voxels: int, channels: int) -> torch.device:
    """Stitch on the GPU only when the buffers take under half of its free memory, else on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if (channels + 3) * voxels * 4 < 0.5 * free else torch.device("cpu")


def _image_to(image: np.ndarray, device: torch.device, stitch: torch.device) -> torch.Tensor:
    """The (1, 1, Z', Y', X') float32 input on the GPU when it takes under a tenth of its free memory,
    so that the windows are cut there, with no host-to-device copy per window; else on the CPU.
    (Pinning it would not help: each window is a strided slice, copied out before it moves.)"""
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if device.type != "cuda":
        return inputs.to(stitch)
    if stitch == device or 4 * image.size < 0.1 * torch.cuda.mem_get_info(device)[0]:
        return inputs.to(device)
    return inputs


def sliding_window_probabilities(model: torch.nn.Module, image: np.ndarray, device: torch.device,
                                 overlap: float = 0.5, sw_batch_size: int = 1, tta: bool = False,
                                 progress: Progress | None = None, autocast: torch.dtype | None = None,
                                 static_batch: bool = False) -> torch.Tensor:
    """Blended softmax probabilities (C, Z', Y', X') float32 for a normalised (Z', Y', X') image.

    Windows of `model.config.patch_size` placed as nnU-Net places them (`window_starts`), each
    prediction weighted by a Gaussian (sigma = patch / 8, MONAI's importance map) and the sums divided
    by the summed weights. Where the image is smaller than a window it is padded on both sides with 0
    (the normalised mean). `static_batch` pads the last, smaller batch of windows to `sw_batch_size`
    (for a compiled network: one shape throughout). The result lies on `device` when it fitted there
    (see `_stitch_device`), else on the CPU.
    """
    from monai.data.utils import compute_importance_map

    patch = tuple(model.config.patch_size)
    pad = [max(p - n, 0) for p, n in zip(patch, image.shape)]
    shape = tuple(n + p for n, p in zip(image.shape, pad))  # (Z', Y', X') padded up to the patch
    starts = list(itertools.product(*(window_starts(n, p, overlap) for n, p in zip(shape, patch))))
    stitch = _stitch_device(device, math.prod(shape), model.config.out_channels)
    inputs = _image_to(image, device, stitch)  # (1, 1, Z', Y', X')
    if any(pad):  # F.pad lists (before, after) from the last axis back
        inputs = F.pad(inputs, [v for p in reversed(pad) for v in (p // 2, p - p // 2)], value=0.0)
    gaussian = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device=stitch)  # (pz, py, px)
    total = torch.zeros((model.config.out_channels, *shape), device=stitch)  # weighted sum of probabilities
    weights = torch.zeros(shape, device=stitch)
    pad_to = sw_batch_size if static_batch else 0
    for first in range(0, len(starts), sw_batch_size):
        batch = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in starts[first:first + sw_batch_size]]
        windows = torch.cat([inputs[(..., *box)] for box in batch]).to(device)  # (b, 1, pz, py, px)
        if progress is not None and first == 0 and isinstance(model, CompiledNetwork) and model.will_compile(
                (max(pad_to, len(batch)), *windows.shape[1:]), next(model.parameters()).dtype, autocast):
            progress(_WINDOWS_START, "compiling the network for the GPU (about a minute, once per process)")
        probs = _predict(model, windows, tta, autocast=autocast, pad_to=pad_to).to(stitch)  # (b, C, pz, py, px)
        for box, p in zip(batch, probs):
            total[(..., *box)].addcmul_(p, gaussian)
            weights[box] += gaussian
        if progress is not None:
            done = first + len(batch)
            progress(_WINDOWS_START + (_WINDOWS_END - _WINDOWS_START) * done / len(starts),
                     f"window {done}/{len(starts)}")
    total /= weights
    return total[(..., *(slice(p // 2, p // 2 + n) for p, n in zip(pad, image.shape)))]


def probabilities_to_mask(probabilities: torch.Tensor, prepared: Prepared, progress: Progress | None = None) -> np.ndarray:
    """Argmax on the original grid: each class map (Z', Y', X') resampled back (linear) in turn.

    Returns uint8 (Z, Y, X); equal to argmax over all resampled maps, without holding any: each class
    map is resampled a few slices at a time (`preprocess.restore_steps`), and the running argmax taken
    on them while they are in cache. Along an anisotropic axis resampling is nearest neighbour, a
    repetition of slices that commutes with the argmax: the argmax is taken on the target grid's
    slices and repeated once, not every map.
    Probabilities on a GPU are resampled there (the same maths in torch), a few classes at a time.
    On the CPU `progress` hears of each class (from 0.9 to 0.99): for a 512 x 512 x 300 CT on two
    cores this step takes several seconds, which a bar standing still at 90 % made look hung.
    """
    if probabilities.device.type == "cuda":
        return argmax_restored_torch(probabilities, prepared).cpu().numpy()
    axis, across, in_plane, repeat = restore_steps(prepared)
    plane = [n for a, n in enumerate(prepared.original_shape) if a != axis]
    step = max(1, _RESTORE_VOXELS // math.prod(plane))  # slices resampled at a time, their argmax taken in cache
    best = mask = None
    classes = probabilities.shape[0]
    for c in range(classes):
        slices = across(probabilities[c].float().cpu())  # (S, H', W'): small, on the network's grid in-plane
        if best is None:
            # the best value so far and its class: 5 bytes a voxel, the only arrays of the scan's size
            best, mask = np.empty((len(slices), *plane), np.float32), np.zeros((len(slices), *plane), np.uint8)
        for start in range(0, len(slices), step):
            p = in_plane(slices[start:start + step]).numpy()  # (k, H, W)
            b, m = best[start:start + len(p)], mask[start:start + len(p)]
            if c == 0:
                b[...] = p
                continue
            # Classes come in increasing order, so c is above every label set so far: where class c is better,
            # max(label, c) is c. Branch-free: `mask[better] = c` took 0.3 s a class for 512 x 512 x 250 voxels.
            better = np.greater(p, b).view(np.uint8)  # 1 where better; ties to the lower class
            better *= np.uint8(c)
            np.maximum(m, better, out=m)
            np.maximum(b, p, out=b)
        if progress is not None:
            progress(_WINDOWS_END + 0.09 * (c + 1) / classes, f"resampling back: class {c + 1}/{classes}")
    return repeat(np.ascontiguousarray(np.moveaxis(mask, 0, axis)))


def argmax_restored_torch(probabilities: torch.Tensor, prepared: Prepared, classes_per_step: int = 4) -> torch.Tensor:
    """`probabilities_to_mask` in torch on the probabilities' device, `classes_per_step` class maps
    resampled at a time (resampling holds about three copies of what it resamples on the original grid,
    too much for a GPU with all 14 maps of a large CT); uint8 (Z, Y, X), ties to the lower class."""
    best = mask = None
    for start in range(0, probabilities.shape[0], classes_per_step):
        maps = restore_torch(probabilities[start:start + classes_per_step].float(), prepared)  # (c, Z, Y, X)
        value, index = maps.max(0)
        index = index.to(torch.uint8) + start
        if best is None:
            best, mask = value, index
            continue
        better = value > best
        mask = torch.where(better, index, mask)
        best = torch.maximum(best, value)
    return mask


def check_single_channel(config) -> None:
    """ValueError unless the weights take one channel: a NIfTI volume is one image, and a multi-channel
    network (unetrpp_tumor's four MRI sequences) cannot be fed from it."""
    if config.in_channels != 1:
        raise ValueError(f"weights {config.name!r} expect {config.in_channels} input channels, but one NIfTI volume "
                         "is one channel; use single-channel weights such as unetrpp_synapse")


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
    check_single_channel(config)
    # Same layers through faster CPU kernels; parameters, state_dict and training are unaffected.
    return optimize_for_inference(model.to(device))


def segment(image: ImageLike, model: Optional["UNETRPP"] = None, weights: str | Path | None = None,
            device: str | torch.device | None = None, overlap: float = 0.5, tta: bool = False,
            largest_component: bool = False, sw_batch_size: int | str | None = "auto",
            progress: Progress | None = None, precision: str = "auto", compile: bool = False) -> SegmentationResult:
    """Segment one volume (a path, a nibabel Nifti1Image/Nifti2Image or a `unetrpp.io.Volume`).

    `model` (a UNETRPP, moved to `device`) or `weights` (for `unetrpp.pretrained.load_pretrained`);
    `device` None picks CUDA when present, else CPU; `overlap` in [0, 1) between windows; `tta`
    averages the 8 mirrorings over (z, y, x); `largest_component` keeps one connected component
    per organ; `progress(fraction, message)` is called as work proceeds.
    `sw_batch_size`: windows per forward pass; "auto" (or None) is 1 on the CPU and
    `devices.CUDA_SW_BATCH` (16) on CUDA, fewer if free GPU memory is short.
    `precision`: "auto" (float32 on the CPU, float16 autocast on CUDA), "fp32" (on CUDA without
    TF32, see `devices.true_float32`), or "bf16": on the
    CPU a bfloat16 copy of the network (about 1.5x faster on CPUs with AVX512-BF16; logits differ by
    up to about 0.5, about 1.5 % of voxels change label; see benchmarks/README.md), on CUDA bfloat16 autocast (no weight copy; matrix
    work in bfloat16, reductions and softmax in float32, as fast as float16 on recent GPUs).
    `compile`: wrap the network in `torch.compile` (mode `devices.COMPILE_MODE`, CUDA graphs) on CUDA; the
    first call compiles (tens of seconds), later calls with the same network reuse it. Off by
    default, as where compiling is not possible (ZeroGPU Spaces, no Triton); elsewhere than CUDA,
    or when compiling fails, it runs without and says so in `result.warnings`.
    Returns a `SegmentationResult` whose mask is (Z, Y, X) uint8 on the grid of `result.volume`.
    """
    start = time.perf_counter()
    overlap = check_overlap(overlap)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r}: must be True or False")
    report = progress or (lambda fraction, message: None)
    dev = resolve_device(device)
    net = _resolve_model(model, weights, dev)
    if precision == "bf16" and dev.type != "cuda":  # a copy, so the caller's model keeps its float32 weights
        net = copy.deepcopy(net).to(torch.bfloat16)
    autocast = {"auto": torch.float16, "bf16": torch.bfloat16}.get(precision) if dev.type == "cuda" else None
    batch = auto_sw_batch_size(sw_batch_size, dev, net.config.patch_size, autocast=autocast is not None)
    runner, why_not = compile_network(net, dev) if compile else (net, None)
    config = net.config
    prep = config.preprocessing

    report(0.0, "reading")
    volume = load_volume(image, prep)
    warnings = list(volume.warnings)
    if why_not:
        warnings.append(why_not)
        logger.warning(why_not)
    # Whether the values are CT in HU, found once (percentiles of the whole volume): the warning for CT
    # weights, the statistics' mean_hu or mean_intensity, and the viewer's session all use it.
    not_ct = ct_warning(volume.array)
    for message in (not_ct if prep.normalization == "ct" else modality_warning(volume.array, prep),
                    small_scan_warning(volume.shape, volume.spacing, config),
                    large_scan_warning(volume.shape, volume.spacing)):
        if message:
            warnings.append(message)
            logger.warning(message)
    if config.synthetic:
        warnings.append(SYNTHETIC_WEIGHTS_WARNING)

    report(0.05, "resampling")
    prepared = prepare(volume, prep, device=dev)
    was_training = net.training
    net.eval()
    try:
        # Feature maps are freed and allocated again for every window: keep the memory in between.
        exact = true_float32() if dev.type == "cuda" and autocast is None else contextlib.nullcontext()
        with torch.inference_mode(), reuse_freed_memory(), exact:
            probabilities = sliding_window_probabilities(runner, prepared.image, dev, float(overlap), batch, tta,
                                                         report, autocast=autocast, static_batch=runner is not net)
            report(_WINDOWS_END, "resampling back")
            mask = probabilities_to_mask(probabilities, prepared, report)
            del probabilities
    finally:
        net.train(was_training)
    if isinstance(runner, CompiledNetwork) and runner.failed and runner.failed not in warnings:
        warnings.append(runner.failed)
    if largest_component:
        mask = postprocess.largest_component(mask)
    # The mean is in HU only when the values look like CT, as the viewer's table decides: an MRI has no
    # HU whichever weights ran on it (the teaching weights are for CT), and a CT under MRI weights keeps them.
    stats = organ_statistics(mask, volume.array, volume.spacing, config.class_names, in_hu=not_ct is None)
    affine = volume.source.affine if volume.source is not None else volume.affine
    windows = count_windows(prepared.target_shape, config.patch_size, float(overlap))
    seconds = time.perf_counter() - start
    logger.debug("segmented %s: %d windows on %s in %.1f s", volume.path or "image", windows, dev, seconds)
    report(1.0, "done")
    return SegmentationResult(volume, mask, tuple(config.class_names), stats, warnings, np.array(affine),
                              str(dev), windows, seconds, config.synthetic, not_ct is None)


def saved_mask_statistics(image: ImageLike, mask_path: str | Path,
                          preprocessing: Preprocessing) -> tuple[list[dict], bool]:
    """The statistics `segment` gave for `image`, computed again from the mask it saved (`predict --skip-existing`
    keeps such masks and still lists them in --stats): the same rows as `SegmentationResult.statistics`, named by
    the mask's label table, and whether the scan is CT in HU (`SegmentationResult.in_hu`)."""
    volume = load_volume(image, preprocessing)
    # the mask lies on the scan's grid: read in the same orientation, it is the (Z, Y, X) mask `segment` made
    mask = io.load(mask_path, orientation=volume.orientation, dtype=np.uint8)
    if mask.shape != volume.shape:
        raise ValueError(f"mask {mask_path} has shape {mask.shape}, the scan {volume.shape}; "
                         "segment the scan again (predict without --skip-existing)")
    in_hu = ct_warning(volume.array) is None
    names = io.read_label_names(mask_path) or ()
    return organ_statistics(mask.array, volume.array, volume.spacing, names, in_hu=in_hu), in_hu
