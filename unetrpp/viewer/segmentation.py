"""Segmenting the scan of a viewer session: the limits a shared server sets (window passes, ZeroGPU seconds),
the run and the files it hands out, stopping runs at shutdown, and the warnings said about the scan and the run."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import io
from .results import organ_choices
from .session import Session, _check_nifti_path

logger = logging.getLogger(__name__)

# Said when a scan is loaded for CT weights (see scan_warnings); the run's own words (inference.ct_warning)
# then stay unsaid, as they come minutes later and say the same.
NOT_CT_NOTE = ("its values are not CT in Hounsfield units (an MRI?), so it is shown with a window fitted to them; "
               "these weights expect CT, so their masks on it may be meaningless")


def env_int(name: str, default: int) -> int:
    """A positive whole number from the environment variable `name` (`default` when unset or empty); a
    one-line ValueError otherwise (a Space variable set to "2k" must not end in a traceback)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={text!r}: must be a whole number of at least 1, e.g. {name}={default} "
                         "(the default, also used when it is unset)")
    return value


# Window passes (windows x mirrorings) one segmentation may take in the viewer, a shared server: a
# chest-abdomen-pelvis CT takes about 700 at overlap 0.5, a whole-body CT about 1500. A tiny file with a
# wrong voxel spacing can ask for thousands (and gigabytes); the command line has no such limit.
MAX_WINDOWS = env_int("UNETRPP_MAX_WINDOWS", 2000)

# What to ask a ZeroGPU Space for (spaces.GPU(duration=...)): the request must cover the whole call or
# the Space stops it, but a shorter one queues first and fits into more visitors' remaining quota.
# Measured on an H200 (benchmarks/README.md, CUDA): about 5 ms per window and 1 s for the example CT;
# the allowance covers a fresh GPU worker (CUDA start, weights onto the GPU), reading a large CT,
# writing the mask, and a slower GPU, with margin.
GPU_SETUP_SECONDS = 30
GPU_SECONDS_PER_WINDOW = 0.05
GPU_MAX_SECONDS = 300  # the longest a ZeroGPU call may ask for


def scan_windows(path: str | os.PathLike, config: Any, overlap: float = 0.5) -> tuple[int, tuple[int, int, int], str]:
    """Sliding-window positions for the NIfTI at `path`, the target grid they cover and the scan's extent
    ("Z x Y x X" mm), from its header alone (ValueError/OSError as `io.load` for a file it cannot read)."""
    from ..inference import check_overlap, count_windows
    from ..preprocess import target_shape

    overlap = check_overlap(overlap)
    prep = config.preprocessing
    shape, spacing = io.header_grid(path, prep.orientation)
    grid = target_shape(shape, spacing, prep.spacing)
    extent = " x ".join(f"{n * s:.0f}" for n, s in zip(shape, spacing))
    return count_windows(grid, config.patch_size, overlap), grid, extent


def check_workload(path: str | os.PathLike, config: Any, overlap: float = 0.5, tta: bool = False,
                   limit: int | None = None) -> int:
    """The window passes segmenting the scan at `path` takes; ValueError (one line, with what would work)
    when they are more than `limit` (default `MAX_WINDOWS`)."""
    limit = MAX_WINDOWS if limit is None else limit
    windows, grid, extent = scan_windows(path, config, overlap)
    passes = windows * (8 if tta else 1)
    if passes <= limit:
        return passes
    fixes = ["check the voxel spacing in the header"] + (["switch off test-time augmentation"] if tta else []) + (
        ["lower the overlap"] if overlap > 0.25 else []) + ["crop the scan", "run `python -m unetrpp predict`"]
    raise ValueError(f"{Path(path).name} spans {extent} mm (z, y, x): {passes:,} window passes on a "
                     f"{' x '.join(map(str, grid))} grid, above this viewer's limit of {limit:,} (UNETRPP_MAX_WINDOWS); "
                     + ", ".join(fixes[:-1]) + " or " + fixes[-1] + io.unit_note(path))


def gpu_seconds(path: str | os.PathLike | None, config: Any, overlap: float = 0.5, tta: bool = False) -> int:
    """Seconds of GPU time one segmentation of the NIfTI at `path` asks for, from its header alone:
    the window passes on the weights' target grid (`check_workload`). A file that cannot be read, or
    that the viewer refuses (too many passes, a bad overlap), asks for the setup allowance: the call
    then says what is wrong at once."""
    try:
        passes = check_workload(path, config, overlap, tta)
    except (TypeError, ValueError, OSError):  # segment_scan says what is wrong, inside the call
        return GPU_SETUP_SECONDS
    return int(min(GPU_MAX_SECONDS, GPU_SETUP_SECONDS + passes * GPU_SECONDS_PER_WINDOW))


def segment_scan(path: str | os.PathLike, model: Any, out_dir: str | os.PathLike, overlap: float = 0.5,
                 tta: bool = False, device: str | None = None,
                 progress: Callable[[float, str], None] | None = None,
                 write_csv: bool = True, precision: str = "auto",
                 max_windows: int | None = None, held: Session | None = None) -> tuple[Session, str, str | None]:
    """Segment the NIfTI at `path`: the session with its mask, and the paths of the mask (.nii.gz,
    on the upload's exact grid) and statistics CSV (None unless `write_csv`) written in a fresh
    folder under `out_dir`. Nothing else is written: the caller hands both files out (or deletes them).
    `precision` as for `unetrpp.segment` ("auto", "fp32" or "bf16"). A scan that takes more than
    `max_windows` window passes (default `MAX_WINDOWS`) is refused before the model runs. `held`: a session
    of this file (from `load_scan` or an earlier run), whose scan is segmented as it is held, not read again."""
    from ..inference import segment

    p = _check_nifti_path(path)
    check_workload(p, model.config, overlap, tta, max_windows)
    image: str | io.Volume = str(p)
    if (held is not None and held.read is not None and held.path == str(p)
            and held.orientation == model.config.preprocessing.orientation.upper()):
        # What reading the file again gives (see session.compact: the held voxels are its float32 values exactly, in a
        # copy the run may change), without decompressing the file again: 1-2 s for a 512 x 512 x 300 CT, GPU time
        # on ZeroGPU, where this runs in the GPU worker.
        image = dataclasses.replace(held.read, array=np.array(held.volume, dtype=np.float32),
                                    warnings=list(held.read.warnings))
    result = segment(image, model=model, device=device, overlap=float(overlap), tta=bool(tta), progress=progress,
                     precision=precision)
    if progress is not None:  # after segment()'s "done", 2-3 s for a 512 x 512 x 200 CT's mask (gzip) and table
        progress(1.0, "writing the mask and statistics")
    folder = Path(out_dir) / f"unetrpp-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True, exist_ok=False)
    stem = io.nifti_stem(p)  # _check_nifti_path has made sure the name ends in .nii or .nii.gz
    mask_path = folder / f"{stem}_unetrpp_mask.nii.gz"
    csv_path = folder / f"{stem}_unetrpp_statistics.csv"
    result.save(mask_path)
    if write_csv:
        result.statistics_csv(csv_path)
    for extra in folder.iterdir():  # e.g. a label-name sidecar: only what the page offers may be written
        if extra not in (mask_path, csv_path):
            extra.unlink()
    # the scan held is the one segmented: kept as it is, not compacted again from the run's float32 copy
    scan = held.volume if isinstance(image, io.Volume) else np.asarray(result.volume.array, dtype=np.float32)
    session = Session(scan, tuple(result.volume.spacing), p.name, str(p),
                      mask=np.asarray(result.mask, dtype=np.uint8), class_names=tuple(result.class_names),
                      statistics=list(result.statistics), files=[str(f) for f in (mask_path, csv_path) if f.exists()],
                      warnings=list(result.warnings), orientation=result.volume.orientation,
                      ct=getattr(result, "in_hu", None),  # found by segment(): not again (about 0.1 s each)
                      read=dataclasses.replace(result.volume, array=None))
    session.position = centre_of_mask(session.mask)
    windows = getattr(result, "windows", "?")
    session.summary = (f"{len(organ_choices(session))} organs found, {windows} window{'' if windows == 1 else 's'} in "
                       f"{getattr(result, 'seconds', 0.0):.1f} s on {getattr(result, 'device', device)}"
                       + (" by SYNTHETIC teaching weights (not real anatomy)" if getattr(result, "synthetic", False) else ""))
    for w in session.warnings:
        logger.warning("%s: %s", p.name, w)
    return session, str(mask_path), str(csv_path) if write_csv else None


class Superseded(Exception):
    """Raised from a segmentation's progress callback when its scan is no longer the one on the page, or the
    server is shutting down (`ModelRuns.check`)."""


class ModelRuns:
    """The model runs in progress in the server's handler threads, so that a server shutting down stops them
    first: a process that ends while such a thread is inside torch aborts ("terminate called without an active
    exception", exit status 134) instead of exiting."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._count, self._changed = 0, threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around a call into the model."""
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def check(self, *_: object) -> None:
        """For a progress callback: once the server is shutting down, the run stops at its next report."""
        if self.stopping.is_set():
            raise Superseded("the server is shutting down")

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the runs to stop at their next report and wait for them, at most `timeout` s; whether all ended."""
        self.stopping.set()
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


def scan_warnings(session: Session | None, config: Any = None) -> list[str]:
    """What reading the scan's file found or changed (nibabel's header repairs, NaN voxels, a shear, units other
    than mm) and, given the weights' `config`, that CT weights were given a scan whose values are not CT (an
    MRI): the viewer says it as soon as the scan shows, not minutes later when the segmentation ends."""
    if session is None:
        return []
    said = list(session.read.warnings) if session.read is not None else []
    if config is not None and not session.ct and config.preprocessing.normalization == "ct":
        said.append(NOT_CT_NOTE)
    return said


def scan_warnings_text(session: Session | None, config: Any = None) -> str:
    """`scan_warnings` as markdown for the box under the status line ("" when there are none)."""
    return "\n\n".join(f"**Warning**: {w}" for w in scan_warnings(session, config))


def run_warnings(session: Session) -> list[str]:
    """The segmentation's own warnings (e.g. a scan too small for the network), less the scan's, said since it
    was loaded, and less "does not look like CT" for a scan found not to be CT when loaded (`NOT_CT_NOTE`)."""
    from ..inference import NOT_CT

    said = set(scan_warnings(session))
    return [w for w in session.warnings if w not in said and not (NOT_CT in w and not session.ct)]


def warnings_text(session: Session) -> str:
    """The run's warnings for the status line, where they stay (toasts fade); the SYNTHETIC-weights one is
    left out, as the summary says it, and so are the scan's, which stay in their own box from the upload on."""
    from ..inference import SYNTHETIC_WEIGHTS_WARNING

    kept = [w for w in run_warnings(session) if w != SYNTHETIC_WEIGHTS_WARNING]
    return "".join(f"\n\n**Warning**: {w}" for w in kept)


def centre_of_mask(mask: np.ndarray) -> list[int]:
    """A crosshair that lands on an organ: the centre of the foreground's bounding box, or the organ voxel nearest
    it when that centre is background (organs around the spine leave it there, and the line under the views
    said "background" on every first look); the middle of the volume when no organ was found."""
    found = mask > 0
    # The box from the foreground's projections on the axes: np.argwhere over a 300 x 512 x 512 mask with 12 M
    # organ voxels took 3.5 s of each segmentation, this takes 0.05 s.
    spans = [np.flatnonzero(found.any(axis=tuple(a for a in range(found.ndim) if a != axis)))
             for axis in range(found.ndim)]
    if not spans[0].size:
        return [n // 2 for n in mask.shape]
    centre = np.array([(span[0] + span[-1]) // 2 for span in spans])
    radius = 0
    while True:  # cubes around the centre, doubled until one holds an organ voxel no farther than its half-side:
        low = np.maximum(centre - radius, 0)  # every voxel outside the cube is farther than that
        near = np.argwhere(found[tuple(slice(a, c + radius + 1) for a, c in zip(low, centre))]) + low
        if len(near) and (squared := ((near - centre) ** 2).sum(axis=1)).min() <= radius ** 2:
            return [int(v) for v in near[np.argmin(squared)]]
        radius = max(1, 2 * radius)
