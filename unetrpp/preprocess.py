"""Preprocessing driven by a config's `Preprocessing` (spec "Preprocessing", nnU-Net v1 scheme):
reorientation, resampling to the target spacing, intensity normalisation, and the way back.

Resampling is `scipy.ndimage.zoom` with voxels as cells (`grid_mode=True`: the grids' outer edges
align, source coordinate = (i + 0.5) x n_in / n_out - 0.5, edge values repeated), as nnU-Net v1 resamples
through scikit-image's `resize` and its own map_coordinates along z. As in nnU-Net, when either
spacing is anisotropic (largest / smallest > `ANISOTROPY_RATIO`) the image is resampled with the
given order in the other two axes and with nearest neighbour along the coarse axis. A spline zoom
is separable, so it runs as one matrix product per axis (`_axis_operator`), in float64 as scipy
computes, on the CPU or a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence, Union

import nibabel as nib
import numpy as np
import torch
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
    raise TypeError(f"image of type {type(image).__name__}: "
                    "give a path (str/Path), a nibabel image or a unetrpp.io.Volume")


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    """Grid size (z, y, x) covering the same extent at the `target` spacing (at least 1 voxel)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _coarse_axis(*spacings: tuple[float, float, float]) -> int | None:
    """The axis to treat with nearest neighbour: the coarsest of the first anisotropic spacing."""
    for spacing in spacings:
        if max(spacing) / min(spacing) > ANISOTROPY_RATIO:
            return int(np.argmax(spacing))
    return None


def resample(array: np.ndarray, shape: tuple[int, int, int], order: int, coarse_axis: int | None = None,
             device: str | torch.device = "cpu") -> np.ndarray:
    """Resample a (Z, Y, X) array to `shape`; spline `order`, nearest along `coarse_axis` if given;
    the products run on `device`.

    Returns float32 (Z2, Y2, X2) (the input itself when the shape already matches).
    """
    array = np.asarray(array, dtype=np.float32)
    shape = tuple(int(n) for n in shape)
    if array.shape == shape:
        return array
    if order == 0 or coarse_axis is None:
        return _zoom(array, shape, order, device=device)
    # nnU-Net's "separate z": each slice in-plane (clipped to its own range), then nearest along the axis.
    in_plane = tuple(n if axis == coarse_axis else m for axis, (n, m) in enumerate(zip(array.shape, shape)))
    out = _zoom(array, in_plane, order, slice_axis=coarse_axis, device=device)
    if in_plane != shape:
        nearest = torch.from_numpy(_zoom_indices(array.shape[coarse_axis], shape[coarse_axis], 0)[0])
        out = torch.from_numpy(out).index_select(coarse_axis, nearest).numpy()
    return out


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


_CHUNK_VOXELS = 2**23  # float64 values resampled at a time (64 MB)


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int, order: int) -> torch.Tensor:
    """`ndimage.zoom` along one axis (voxels as cells, edges repeated) as an (n_out, n_in) float64
    matrix: column j is the zoom of a unit sample at j (the spline's prefilter included)."""
    columns = [ndimage.zoom(unit, n_out / n_in, order=order, mode="nearest", grid_mode=True) for unit in np.eye(n_in)]
    assert all(len(c) == n_out for c in columns), (n_in, n_out)
    return torch.from_numpy(np.stack(columns, axis=1))


def _along(x: torch.Tensor, axis: int, n_out: int, order: int) -> torch.Tensor:
    """x resampled along `axis` to n_out samples: one matrix product (nothing to do if the size stays)."""
    if x.shape[axis] == n_out:
        return x
    operator = _axis_operator(x.shape[axis], n_out, order).to(x.device)
    return torch.tensordot(operator, x.movedim(axis, 0), dims=1).movedim(0, axis)


def _zoom(array: np.ndarray, shape: tuple[int, int, int], order: int, slice_axis: int | None = None,
          device: str | torch.device = "cpu") -> np.ndarray:
    """`ndimage.zoom` of a float32 (Z, Y, X) array to `shape` (grids as cells, edges repeated), as
    matrix products on `device`, clipped to the input's range as scikit-image's `resize` does (a
    cubic spline overshoots at edges). With `slice_axis` (whose size must stay) the slices are 2-D
    images of their own, each clipped to its own range.

    A spline through the samples passes through them, so along an axis that keeps its size there is
    nothing to do; the work goes in chunks along the axis done last (or the one that stays), at most
    about 64 MB of float64 at a time, so memory stays near that of the output.
    """
    clip = order > 1 and array.size > 0
    out = np.empty(shape, dtype=np.float32)
    last = slice_axis if slice_axis is not None else next(
        (a for a in range(3) if array.shape[a] == shape[a]), min(range(3), key=lambda a: array.shape[a] / shape[a]))
    others = [a for a in range(3) if a != last]
    low, high = (float(array.min()), float(array.max())) if clip else (None, None)

    def chunks(n: int, voxels_per_step: int):
        step = max(1, _CHUNK_VOXELS // max(voxels_per_step, 1))
        return (slice(i, min(i + step, n)) for i in range(0, n, step))

    source = torch.from_numpy(array)
    plane = math.prod(max(array.shape[a], shape[a]) for a in others)
    middle = None if array.shape[last] == shape[last] else torch.empty(
        tuple(array.shape[last] if a == last else shape[a] for a in range(3)), dtype=torch.float64, device=device)
    for part in chunks(array.shape[last], plane):  # the other two axes, a few slices at a time
        index = tuple(part if a == last else slice(None) for a in range(3))
        x = source[index].to(device, torch.float64)
        for axis in others:
            x = _along(x, axis, shape[axis], order)
        if slice_axis is not None and clip:  # each slice to its own range
            src = source[index]
            x = torch.clamp(x, _slice_bound(src, last, torch.amin).to(x), _slice_bound(src, last, torch.amax).to(x))
        if middle is None:
            if clip and slice_axis is None:
                x = x.clamp_(low, high)
            out[index] = x.float().cpu().numpy()
        else:
            middle[index] = x
    if middle is not None:  # then the last axis, in chunks along another
        along = others[0]
        for part in chunks(shape[along], math.prod(max(array.shape[a], shape[a]) for a in (last, others[1]))):
            index = tuple(part if a == along else slice(None) for a in range(3))
            x = _along(middle[index], last, shape[last], order)
            out[index] = (x.clamp_(low, high) if clip else x).float().cpu().numpy()
    return out


def _slice_bound(x: torch.Tensor, axis: int, reduce) -> torch.Tensor:
    """min or max of each slice along `axis`, shaped to broadcast against x."""
    return reduce(x, dim=[a for a in range(3) if a != axis], keepdim=True)


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
    """Resample `volume` to the target spacing (cubic, nnU-Net order: resample then normalise), the
    products on `device` (a GPU does them in milliseconds)."""
    target = preprocessing.spacing
    shape = target_shape(volume.shape, volume.spacing, target)
    if math.prod(shape) > MAX_TARGET_VOXELS:
        raise ValueError(f"at the weights' spacing {tuple(target)} mm the {volume.shape} scan with spacing "
                         f"{tuple(round(v, 3) for v in volume.spacing)} mm becomes {shape} = {math.prod(shape):,} voxels, "
                         f"above the limit of {MAX_TARGET_VOXELS:,} (unetrpp.preprocess.MAX_TARGET_VOXELS); "
                         "check the voxel spacing in the header, or crop the scan")
    image = resample(volume.array, shape, order=3, coarse_axis=_coarse_axis(volume.spacing, target), device=device)
    return Prepared(normalize(image, preprocessing), volume.shape, volume.spacing, target)


def restore(array: np.ndarray, prepared: Prepared, order: int = 1) -> np.ndarray:
    """Map one (Z', Y', X') map on the target grid back to the original (Z, Y, X) grid (float32)."""
    coarse = _coarse_axis(prepared.original_spacing, prepared.target_spacing)
    return resample(array, prepared.original_shape, order=order, coarse_axis=coarse)


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


def resample_torch(array: torch.Tensor, shape: Sequence[int], coarse_axis: int | None = None) -> torch.Tensor:
    """`resample(..., order=1)` for tensors (..., Z, Y, X) on any device: linear, nearest along
    `coarse_axis` when that axis changes size; equal to scipy's result to float32 rounding."""
    out = array
    for axis in range(3):
        dim = out.ndim - 3 + axis
        n_in, n_out = out.shape[dim], int(shape[axis])
        if n_in == n_out:
            continue
        nearest = coarse_axis == axis
        indices = _zoom_indices(n_in, n_out, 0 if nearest else 1)
        lower, upper, weight = (torch.from_numpy(a).to(out.device) for a in indices)
        low = out.index_select(dim, lower)
        if nearest:
            out = low
            continue
        view = [1] * out.ndim
        view[dim] = n_out
        w = weight.to(out.dtype).view(view)
        out = torch.lerp(low, out.index_select(dim, upper), w)
    return out
