"""Preprocessing driven by a config's `Preprocessing` (spec "Preprocessing", nnU-Net v1 scheme):
reorientation, resampling to the target spacing, intensity normalisation, and the way back.

Resampling uses `scipy.ndimage.zoom` with voxels as cells (`grid_mode=True`: the grids' outer edges
align, source coordinate = (i + 0.5) x n_in / n_out - 0.5, edge values repeated), as nnU-Net v1 resamples
through scikit-image's `resize` and its own map_coordinates along z. As in nnU-Net, when either
spacing is anisotropic (largest / smallest > `ANISOTROPY_RATIO`) the image is resampled with the
given order in the other two axes and with nearest neighbour along the coarse axis. On a GPU the
same resampling runs as one float64 matrix product per axis (`resample_torch`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, Union

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import io
from .config import Preprocessing

ANISOTROPY_RATIO = 3.0
# The network's grid holds (classes + 3) float32 values per voxel during inference (see inference.py):
# 2**27 voxels is about 9 GB with 14 classes; a 512x512x1000 CT at 0.7 x 0.7 x 1 mm needs 75 M.
MAX_TARGET_VOXELS = 2**27
ImageLike = Union[str, os.PathLike, nib.Nifti1Image, io.Volume]


@dataclasses.dataclass
class Prepared:
    """A volume ready for the network, and what is needed to map results back.

    `image` is (Z', Y', X') float32, normalised, on the target grid; `original_shape` and
    `original_spacing` describe the (Z, Y, X) grid of the reoriented input volume.
    """

    image: np.ndarray
    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    target_spacing: tuple[float, float, float]

    @property
    def target_shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)


def load_volume(image: ImageLike, preprocessing: Preprocessing) -> io.Volume:
    """A path, nibabel image or `Volume` as a float32 `Volume` in the preprocessing's orientation."""
    orientation = preprocessing.orientation.upper()
    if isinstance(image, io.Volume):
        if image.orientation != orientation:
            raise ValueError(f"volume is in {image.orientation}, the weights expect {orientation}; "
                             f"load it with unetrpp.io.load(path, orientation={orientation!r}) or pass the path")
        return image
    if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        return io.from_image(image, orientation=orientation)
    if isinstance(image, (str, os.PathLike)):
        return io.load(image, orientation=orientation)
    if isinstance(image, nib.spatialimages.SpatialImage):  # a .hdr/.img pair (Nifti1Pair), Analyze, MGH, ...
        raise TypeError(f"image of type {type(image).__name__}: give a nibabel Nifti1Image or Nifti2Image, e.g. "
                        "nibabel.Nifti1Image.from_image(image) (same voxels, affine and header)")
    raise TypeError(f"image of type {type(image).__name__}: "
                    "give a path (str/Path), a nibabel Nifti1Image/Nifti2Image or a unetrpp.io.Volume")


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    """Grid size (z, y, x) covering the same extent at the `target` spacing (at least 1 voxel)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _coarse_axis(*spacings: tuple[float, float, float]) -> int | None:
    """The axis to treat with nearest neighbour: the coarsest of the first anisotropic spacing."""
    for spacing in spacings:
        if max(spacing) / min(spacing) > ANISOTROPY_RATIO:
            return int(np.argmax(spacing))
    return None


def resample(array: np.ndarray, shape: tuple[int, int, int], order: int, coarse_axis: int | None = None) -> np.ndarray:
    """Resample a (Z, Y, X) array to `shape`; spline `order`, nearest along `coarse_axis` if given.

    Returns float32 (Z2, Y2, X2) (the input itself when the shape already matches).
    """
    array = np.asarray(array, dtype=np.float32)
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [n_out / n_in for n_out, n_in in zip(shape, array.shape)]
    if order == 0 or coarse_axis is None:
        return _zoom(array, factors, order)
    # nnU-Net's "separate z": each slice in-plane (clipped to its own range), then nearest along the axis.
    in_plane = [1.0 if axis == coarse_axis else f for axis, f in enumerate(factors)]
    out = repeat_nearest(_zoom(array, in_plane, order, slice_axis=coarse_axis), coarse_axis, shape[coarse_axis])
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def repeat_nearest(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Nearest-neighbour resampling of `array` along one axis to `size` samples, any dtype: scipy's
    order-0 zoom (grids as cells, edges repeated) as a gather of whole slices, a copy instead of a filter."""
    if array.shape[axis] == size:
        return array
    return np.take(array, _zoom_indices(array.shape[axis], size, 0)[0], axis=axis)


def resample_labels(labels: np.ndarray, shape: tuple[int, int, int], spacing: Sequence[float],
                    target_spacing: Sequence[float]) -> np.ndarray:
    """A label map (Z, Y, X) at `spacing` resampled to `shape` as nnU-Net v1 resamples training labels:
    each label's mask interpolated linearly (nearest along an anisotropic axis) and the label written
    where it reaches 0.5, labels in increasing order. Returns uint8 `shape`."""
    coarse = _coarse_axis(tuple(spacing), tuple(target_spacing))
    out = np.zeros(shape, dtype=np.uint8)
    for value in np.unique(labels):
        if value:
            out[resample((labels == value).astype(np.float32), shape, order=1, coarse_axis=coarse) >= 0.5] = value
    return out


def _zoom(array: np.ndarray, factors: list[float], order: int, slice_axis: int | None = None) -> np.ndarray:
    """`ndimage.zoom` (grids as cells, edges repeated), clipped to the input's range as scikit-image's
    `resize` does (a cubic spline overshoots at edges); slice by slice when an axis keeps its size.

    A spline through the samples passes through them, so along an unchanged axis there is nothing to
    interpolate: 2-D zooms of the slices give the same values as the 3-D zoom (16 instead of 64 taps
    for cubic), and scipy releases the GIL, so the slices run in parallel threads. With `slice_axis`
    (whose factor must be 1) the slices are 2-D images of their own, each clipped to its own range.
    When every axis changes, a spline zoom is still separable: the slices along z are zoomed in-plane
    (kept in float64, as scipy computes) and z follows as one product with its 1-D zoom's matrix.
    """
    low, high = (float(array.min()), float(array.max())) if order > 1 and array.size else (None, None)
    across = 1.0 not in factors and slice_axis is None  # every axis changes
    if across and (order < 2 or array.ndim != 3):  # no spline prefilter: the 3-D zoom needs no large copies
        out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
        return out if low is None else np.clip(out, low, high, out=out)
    # (scipy's 3-D cubic zoom ran on one thread, holding 1.5 GB of float64 coefficients for 512 x 512 x 400 voxels)
    axis = 0 if across else factors.index(1.0) if slice_axis is None else slice_axis
    plane = [f for a, f in enumerate(factors) if a != axis]
    src = np.moveaxis(array, axis, 0)
    out_shape = [n if a == axis else round(n * f) for a, (n, f) in enumerate(zip(array.shape, factors))]
    out = np.empty(out_shape, dtype=np.float64 if across else np.float32)
    dst = np.moveaxis(out, axis, 0)

    def zoom_slice(i: int) -> None:
        ndimage.zoom(src[i], plane, output=dst[i], order=order, mode="nearest", grid_mode=True)
        if low is not None and not across:  # across: clipped once z is resampled too
            bounds = (src[i].min(), src[i].max()) if slice_axis is not None else (low, high)
            np.clip(dst[i], *bounds, out=dst[i])

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(cores, 8)) as pool:
        list(pool.map(zoom_slice, range(src.shape[0])))
    if not across:
        return out
    size = round(array.shape[0] * factors[0])
    zoomed = torch.tensordot(_axis_operator(array.shape[0], size, order), torch.from_numpy(out), dims=1).numpy()
    return np.clip(zoomed, low, high, out=zoomed).astype(np.float32)


def normalize(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Intensity normalisation as the config says: "ct" clip then (v - mean) / std, "zscore", "none".

    Returns a new float32 array of the same shape.
    """
    out = np.array(array, dtype=np.float32)
    if preprocessing.normalization == "ct":
        np.clip(out, *preprocessing.clip, out=out)
        out -= preprocessing.mean
        out /= preprocessing.std
    elif preprocessing.normalization == "zscore":
        out -= out.mean()
        out /= max(float(out.std()), 1e-8)
    return out


def prepare(volume: io.Volume, preprocessing: Preprocessing, device: str | torch.device = "cpu") -> Prepared:
    """Resample `volume` to the target spacing (cubic, nnU-Net order: resample then normalise); on
    a CUDA `device` with the memory free the resampling runs there (milliseconds, not most of a second)."""
    target = preprocessing.spacing
    shape = target_shape(volume.shape, volume.spacing, target)
    if min(shape) < 2:
        extent = " x ".join(f"{n * s:.3g}" for n, s in zip(volume.shape, volume.spacing))
        raise ValueError(f"the scan spans only {extent} mm (z, y, x): at the weights' spacing {tuple(target)} mm "
                         f"that is {shape} voxels, a single slice; check the voxel spacing in the header (pixdim)"
                         + io.unit_note(volume))
    if math.prod(shape) > MAX_TARGET_VOXELS:
        raise ValueError(f"at the weights' spacing {tuple(target)} mm the {volume.shape} scan with spacing "
                         f"{tuple(round(v, 3) for v in volume.spacing)} mm becomes {shape} = {math.prod(shape):,} voxels, "
                         f"above the limit of {MAX_TARGET_VOXELS:,} (unetrpp.preprocess.MAX_TARGET_VOXELS); "
                         "check the voxel spacing in the header, or crop the scan" + io.unit_note(volume))
    coarse = _coarse_axis(volume.spacing, target)
    image = _cubic_on_gpu(volume.array, shape, coarse, torch.device(device))
    if image is None:
        image = resample(volume.array, shape, order=3, coarse_axis=coarse)
    return Prepared(normalize(image, preprocessing), volume.shape, volume.spacing, target)


def _cubic_on_gpu(array: np.ndarray, shape: tuple[int, int, int], coarse_axis: int | None,
                  device: torch.device) -> np.ndarray | None:
    """`resample(array, shape, 3, coarse_axis)` done on a CUDA `device`, or None where that is not
    a GPU, its free memory is short, or it runs out meanwhile (the CPU then gives the same values)."""
    if device.type != "cuda" or _resample_torch_bytes(array.shape, shape, coarse_axis, 3) > (
            0.5 * torch.cuda.mem_get_info(device)[0]):
        return None
    try:
        source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
        return resample_torch(source, shape, coarse_axis, order=3).cpu().numpy()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:  # the products' memory goes back, so that free memory reads true for the windows
        torch.cuda.empty_cache()


def restore(array: np.ndarray, prepared: Prepared, order: int = 1) -> np.ndarray:
    """Map one (Z', Y', X') map on the target grid back to the original (Z, Y, X) grid (float32)."""
    coarse = _coarse_axis(prepared.original_spacing, prepared.target_spacing)
    return resample(array, prepared.original_shape, order=order, coarse_axis=coarse)


def restore_steps(prepared: Prepared) -> tuple[int, Callable[[torch.Tensor], torch.Tensor],
                                               Callable[[torch.Tensor], torch.Tensor],
                                               Callable[[np.ndarray], np.ndarray]]:
    """`restore(..., order=1)` as steps, for a caller that works a few slices at a time: (axis, across, in_plane, repeat).

    `across` takes a float32 (Z', Y', X') tensor to its slices along `axis` (S, H', W'): the coarse axis's as they
    are, or, with no axis coarse, z resampled linearly first, on the network's grid, where it is cheap; what is left
    is a 2-D zoom of each slice (4 taps for each voxel of the scan, where a trilinear zoom takes 8; the same values to
    float32 rounding, as both orders compute the same product of 1-D maps). `in_plane` zooms a stack of those
    slices (k, H', W') bilinearly to the scan's size in-plane (k, H, W), each slice on its own: torch's linear
    interpolation with grids as cells (`align_corners=False`, edges repeated), scipy's order-1 zoom but for sample
    positions rounded to float32 (differences under 1e-5 on probabilities), 3-4x faster on two cores. `repeat` takes
    the (Z, Y, X) array the slices make, `axis` back in its place, along the coarse axis to the scan's size (nearest
    neighbour, any dtype; identity when no axis is coarse). Anything done to each voxel on its own, such as an
    argmax over classes, may go before `repeat`: it then runs on the network grid's slices, repeated once."""
    coarse = _coarse_axis(prepared.original_spacing, prepared.target_spacing)
    shape = list(prepared.original_shape)
    axis = 0 if coarse is None else coarse
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    if coarse is None:
        across_shape = [shape[0], *prepared.target_shape[1:]]  # z at the scan's size, in-plane at the network's

        def across(x: torch.Tensor) -> torch.Tensor:
            return resample_torch(x, across_shape, order=1)  # linear along z only: (Z, Y', X')
        repeat = (lambda a: a)
    else:
        size = shape[coarse]

        def across(x: torch.Tensor) -> torch.Tensor:
            return x.movedim(coarse, 0)
        repeat = (lambda a: repeat_nearest(a, coarse, size))

    def in_plane(slices: torch.Tensor) -> torch.Tensor:
        return F.interpolate(slices[:, None], size=plane, mode="bilinear", align_corners=False)[:, 0]

    return axis, across, in_plane, repeat


def restore_torch(maps: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """`restore(..., order=1)` for a tensor (..., Z', Y', X') on any device (e.g. all class maps on a GPU)."""
    coarse = _coarse_axis(prepared.original_spacing, prepared.target_spacing)
    return resample_torch(maps, prepared.original_shape, coarse)


def _zoom_indices(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lower, upper) and upper weights of `_zoom` along one axis (grid_mode=True,
    mode="nearest": indices clamped to the edges; order 0 or 1), in float64 as scipy."""
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        lower = np.floor(coords + 0.5).astype(np.int64)
        weight = np.zeros(n_out)
    else:
        lower = np.floor(coords).astype(np.int64)
        weight = coords - lower
    return np.clip(lower, 0, n_in - 1), np.clip(lower + 1, 0, n_in - 1), weight


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int, order: int) -> torch.Tensor:
    """`_zoom` along one axis as an (n_out, n_in) float64 matrix: column j is the zoom of a unit sample
    at j, the spline's prefilter and the repeated edges included. A spline zoom is separable, so
    three of these products give the 3-D zoom."""
    columns = [ndimage.zoom(unit, n_out / n_in, order=order, mode="nearest", grid_mode=True) for unit in np.eye(n_in)]
    assert all(len(c) == n_out for c in columns), (n_in, n_out)
    return torch.from_numpy(np.stack(columns, axis=1))


def _torch_plan(shape_in: Sequence[int], shape_out: Sequence[int], coarse_axis: int | None,
                order: int) -> tuple[list[int], list[int], list[int]]:
    """The steps of `resample_torch`: nearest-neighbour axes that shrink (done first, so everything
    after works on less), interpolated axes in z, y, x order (for order > 1 the shrinking ones
    first), nearest-neighbour axes that grow (done last)."""
    changing = [a for a in range(3) if shape_in[a] != shape_out[a]]
    nearest = [a for a in changing if order == 0 or a == coarse_axis]
    smooth = [a for a in changing if a not in nearest]
    if order > 1:
        smooth.sort(key=lambda a: shape_out[a] > shape_in[a])  # stable: z, y, x within each group
    return ([a for a in nearest if shape_out[a] < shape_in[a]], smooth,
            [a for a in nearest if shape_out[a] > shape_in[a]])


def _resample_torch_bytes(shape_in: Sequence[int], shape_out: Sequence[int], coarse_axis: int | None,
                         order: int) -> int:
    """Peak memory of `resample_torch` on one float32 (Z, Y, X) volume, in bytes: the input, and
    for each float64 product its operand, the contiguous copy the product makes, and its result."""
    shrink, smooth, _ = _torch_plan(shape_in, shape_out, coarse_axis, order)
    current = [shape_out[a] if a in shrink else shape_in[a] for a in range(3)]
    peak = 4 * math.prod(shape_in) + 4 * math.prod(current)
    for axis in smooth:
        before = math.prod(current)
        current[axis] = shape_out[axis]
        peak = max(peak, 4 * math.prod(shape_in) + (8 if order > 1 else 4) * (2 * before + math.prod(current)))
    return max(peak, 4 * math.prod(shape_in) + 12 * math.prod(shape_out))  # clipped in place, then float32


def resample_torch(array: torch.Tensor, shape: Sequence[int], coarse_axis: int | None = None,
                   order: int = 1) -> torch.Tensor:
    """`resample` for tensors (..., Z, Y, X) on any device (steps in `_torch_plan`): nearest
    neighbour along `coarse_axis` (every axis for order 0) by gathers; order 1 linear by gathers,
    equal to scipy's result to float32 rounding; order 3 as one float64 matrix product per axis
    (`_axis_operator`), clipped as `_zoom` clips (to the volume's range, or each slice's along
    `coarse_axis`): scipy's values to the last bit, or nearly. GPUs do these dense products fast; on
    the CPU scipy's 4-tap filters are cheaper for large slices."""
    if order not in (0, 1, 3):
        raise ValueError(f"order={order}: resample_torch does 0 (nearest), 1 (linear) or 3 (cubic)")
    lead = array.ndim - 3
    shape = [int(n) for n in shape]
    shrink, smooth, grow = _torch_plan(array.shape[lead:], shape, coarse_axis, order)

    def nearest(x: torch.Tensor, axis: int) -> torch.Tensor:
        index = _zoom_indices(x.shape[lead + axis], shape[axis], 0)[0]
        return x.index_select(lead + axis, torch.from_numpy(index).to(x.device))

    out = array
    for axis in shrink:
        out = nearest(out, axis)
    if order > 1 and smooth:
        planes = [lead + a for a in range(3) if a != coarse_axis]  # the range of each slice, or of the volume
        low, high = out.amin(dim=planes, keepdim=True), out.amax(dim=planes, keepdim=True)
        out = out.double()
        for axis in smooth:
            operator = _axis_operator(out.shape[lead + axis], shape[axis], order).to(out.device)
            out = torch.tensordot(operator, out.movedim(lead + axis, 0), dims=1).movedim(0, lead + axis)
        out = out.clamp_(low.to(out), high.to(out)).to(array.dtype)
    elif order == 1:
        for axis in smooth:
            dim = lead + axis
            lower, upper, weight = (torch.from_numpy(a).to(out.device) for a in _zoom_indices(out.shape[dim], shape[axis], 1))
            view = [1] * out.ndim
            view[dim] = shape[axis]
            out = torch.lerp(out.index_select(dim, lower), out.index_select(dim, upper), weight.to(out.dtype).view(view))
    for axis in grow:
        out = nearest(out, axis)
    return out
