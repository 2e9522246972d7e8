"""What the viewer (app.py) does, without gradio: choosing and loading weights, reading an upload,
running segmentation, rendering the views of one session, and the tables and files it offers.

Every function here is plain Python on numpy arrays, so tests call it directly and app.py stays a
layout with thin wrappers. Errors are ValueError / FileNotFoundError with one-line messages that
app.py shows in the page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import io
from .. import visualize as vis

logger = logging.getLogger(__name__)

NOT_A_DEVICE = ("**Not a medical device.** For research and teaching only; never use these masks for "
                "diagnosis or treatment.")
SYNTHETIC_NOTICE = ("These weights were trained only on **synthetic phantoms** (teaching weights): they show how "
                    "the viewer works, but on a real CT their masks are not the real organs (Dice 0 on the bundled "
                    "real CT). Whoever runs this viewer can give it the released UNETR++ synapse weights for real "
                    "CT: `python -m unetrpp convert`, then `--weights` (see the README).")
UNTRAINED_NOTICE = ("**UNTRAINED MODEL: random weights.** No weights were found (`--weights`, `UNETRPP_WEIGHTS`, "
                    "`weights/`), so the masks below are noise. Train the teaching weights or convert the "
                    "released synapse weights into `weights/`.")


# Said when a scan is loaded for CT weights (see scan_warnings); the run's own words (inference.ct_warning)
# then stay unsaid, as they come minutes later and say the same.
NOT_CT_NOTE = ("its values are not CT in Hounsfield units (an MRI?), so it is shown with a window fitted to them; "
               "these weights expect CT, so their masks on it may be meaningless")


# ---- weights --------------------------------------------------------------------------------------
def resolve_weights(spec: str | None = None, weights_dir: str | os.PathLike = "weights") -> tuple[str | None, str]:
    """Which weights the viewer loads, and the notice to show: (spec or None for random init, markdown).

    Order: `spec` (from --weights / UNETRPP_WEIGHTS), else the best folder in `weights_dir` (real
    weights such as unetrpp_synapse before anything trained on phantoms; only single-channel CT
    weights, so converted ACDC or BraTS weights beside them are never picked), else random init.
    A local `spec` whose network takes more than one channel is refused (ValueError).
    """
    root = Path(weights_dir)
    if spec:
        folder = next((p for p in (Path(spec), root / str(spec)) if (p / "config.json").is_file()), None)
        if folder is None:  # a Hub repo id the local cache holds: its config tells SYNTHETIC weights before they load
            from ..hub import cached_hub_folder

            folder = cached_hub_folder(str(spec))
        config = _config(folder) if folder is not None else {}
        if config.get("in_channels", 1) != 1:
            raise ValueError(f"weights {spec}: the network takes {config['in_channels']} input channels, "
                             "but the viewer shows one scan; use single-channel CT weights such as unetrpp_synapse")
        synthetic = "phantom" in str(spec).lower() or (folder is not None and _synthetic(folder, config))
        return str(spec), (SYNTHETIC_NOTICE if synthetic else f"Weights: `{spec}`.")
    folders = sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
    usable = [(p, config) for p in folders if _single_channel_ct(p, config := _config(p))]
    real = sorted((p for p, config in usable if not _synthetic(p, config)),
                  key=lambda p: (p.name != "unetrpp_synapse", p.name))
    if real:
        return str(real[0]), f"Weights: `{real[0]}`."
    phantom = [p for p, config in usable if _synthetic(p, config)]
    if phantom:
        return str(phantom[0]), SYNTHETIC_NOTICE
    return None, UNTRAINED_NOTICE


def _config(folder: Path) -> dict:
    """The folder's config.json as a dict ({} when unreadable: loading it later says why)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _synthetic(folder: Path, config: dict) -> bool:
    """Weights trained on phantoms: their config.json says so (`synthetic`), or the folder's name does."""
    return config.get("synthetic") is True or "phantom" in folder.name.lower()


def _single_channel_ct(folder: Path, config: dict) -> bool:
    """Weights the viewer can use unasked: one input channel, CT preprocessing."""
    prep = config.get("preprocessing")
    modality = prep.get("modality", "CT") if isinstance(prep, dict) else "CT"
    usable = config.get("in_channels", 1) == 1 and modality == "CT"
    if not usable:
        logger.info("%s: not used by default (the viewer picks single-channel CT weights)", folder)
    return usable


class ModelHolder:
    """Loads the model once, on first use (so the page starts without waiting), thread-safely."""

    def __init__(self, spec: str | None, notice: str, device: str | None = None, model=None) -> None:
        from ..devices import resolve_device

        self.spec, self.notice = spec, notice
        self.device = device or str(resolve_device())
        self._model = None if model is None else model.eval().to(self.device)
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._model is None:
                if self.spec is None:
                    from ..model import create_model

                    logger.warning("no weights found: using a randomly initialised unetrpp_tiny (UNTRAINED)")
                    self._model = create_model("unetrpp_tiny").eval().to(self.device)
                else:
                    from ..pretrained import load_pretrained

                    self._model = load_pretrained(self.spec, device=self.device)
            return self._model

    def warm_up(self) -> None:
        """Load the model now (a background thread at start-up); a failure is left for the first request
        to report, with its one-line message."""
        try:
            self.get()
        except Exception as exc:  # any failure: the request that needs the model reports it
            logger.debug("loading the model in advance failed: %s", exc)


# ---- one viewing session --------------------------------------------------------------------------
def compact(volume: np.ndarray) -> np.ndarray:
    """The scan as a session holds it, for as long as the page keeps it: int16 when every value is a whole
    number in int16's range, as in a CT in HU as scanners store it (the same values in half the memory of
    float32: 150 MB instead of 300 for 512 x 512 x 300 voxels, per visitor), else float32."""
    if volume.dtype == np.int16:  # held already (the session a segmentation started from)
        return volume
    volume = np.asarray(volume, dtype=np.float32)
    limits = np.iinfo(np.int16)
    if volume.size and limits.min <= volume.min() and volume.max() <= limits.max:
        whole = volume.astype(np.int16)
        if np.array_equal(whole, volume):
            return whole
    return volume


@dataclass
class Session:
    """A scan being viewed: HU volume (Z, Y, X) in RAS (int16 when its values allow, see `compact`), its
    spacing (z, y, x) mm, and results so far."""

    volume: np.ndarray
    spacing: tuple[float, float, float]
    name: str
    path: str
    position: list[int] = field(default_factory=list)  # crosshair voxel (z, y, x)
    mask: np.ndarray | None = None  # (Z, Y, X) uint8 labels
    class_names: tuple[str, ...] = ()
    statistics: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # result files written for this session
    warnings: list[str] = field(default_factory=list)  # from the inference (e.g. "does not look like CT")
    orientation: str = "RAS"  # of the (Z, Y, X) arrays
    summary: str = ""  # one line about the segmentation run
    attention: Any = None  # the last visualize_attention.AttentionView shown, and its centre voxel
    surfaces: Any = None  # the plotly figure of every organ's surface, built once for this mask
    ct: bool | None = None  # whether the values look like CT in HU (None: find out); else no "HU" is shown
    labels: Any = field(default=None, repr=False, compare=False)  # (mask, its labels), see present_labels
    # The io.Volume as read from `path`, less its voxels (array None: they are `volume`): segment_scan segments
    # the scan held here instead of reading the file again.
    read: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.volume = compact(self.volume)
        if not self.position:
            self.position = self.centre()
        if self.ct is None:
            from ..inference import ct_warning

            self.ct = ct_warning(self.volume) is None

    def centre(self) -> list[int]:
        """The voxel a scan is first shown at: the middle of the volume."""
        return [n // 2 for n in self.volume.shape]


@dataclass
class Display:
    """How the views are drawn: window (preset or custom W/L in HU), overlay opacity, shown organs."""

    preset: str = "abdomen"
    width: float | None = 400.0  # custom window only
    level: float | None = 40.0
    opacity: float = 0.5
    visible: Sequence[str] | None = None  # organ names to draw; None draws all
    contour_only: bool = False

    def window(self) -> tuple[float, float]:
        return vis.window_preset(self.preset, self.width, self.level)


def display_settings(preset: str, width: float | None, level: float | None, opacity: float | None,
                     organs: Sequence[str] | None, contour: bool) -> Display:
    """The page's controls as a `Display`: an empty custom W/L stays empty (and is refused when drawn
    with the custom window); 0 HU is a level like any other."""
    return Display(preset, None if width is None else float(width), None if level is None else float(level),
                   0.5 if opacity is None else float(opacity), organs, bool(contour))


def _check_nifti_path(path: str | os.PathLike | None) -> Path:
    if not path:
        raise ValueError("no file given: upload a CT volume as .nii or .nii.gz")
    p = Path(path)
    if not p.name.lower().endswith(io.NIFTI_SUFFIXES):
        raise ValueError(f"{p.name}: not a NIfTI file name; upload a .nii or .nii.gz CT volume")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file; upload the scan again")
    return p


def load_scan(path: str | os.PathLike | None) -> Session:
    """Read an uploaded NIfTI into a Session in RAS, so the scan shows before segmentation."""

    p = _check_nifti_path(path)
    try:
        volume = io.load(p, "RAS")
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # nibabel raises several types for corrupt or non-NIfTI files
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{p.name}: not a readable NIfTI image ({type(exc).__name__}: {reason}); "
                         "upload a .nii or .nii.gz CT volume") from exc
    # io.load has already refused non-3-D images and replaced NaN/Inf (with a warning in volume.warnings).
    return Session(np.asarray(volume.array, dtype=np.float32), tuple(volume.spacing), p.name, str(p),
                   read=dataclasses.replace(volume, array=None))


def describe(session: Session) -> str:
    """One line about the scan: voxels and spacing, (z, y, x) order."""
    z, y, x = session.volume.shape
    return f"{z} x {y} x {x} voxels (z, y, x), spacing {' x '.join(f'{s:g}' for s in session.spacing)} mm"


def visible_labels(session: Session, display: Display) -> list[int] | None:
    if display.visible is None:
        return None
    wanted = set(display.visible)
    return [k for k, name in enumerate(session.class_names) if k > 0 and name in wanted]


def render(session: Session, view: str, display: Display) -> np.ndarray:
    """One view through the session's crosshair -> RGB (H, W, 3) uint8. Only this slice is computed."""
    return vis.render_view(session.volume, view, session.position, session.spacing, display.window(),
                           mask=session.mask, opacity=display.opacity, visible=visible_labels(session, display),
                           contour_only=display.contour_only, orientation=session.orientation, annotate=True)


def render_all(session: Session, display: Display) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial, coronal and sagittal views."""
    return tuple(render(session, view, display) for view in vis.VIEWS)


def set_slice(session: Session, view: str, index: int) -> Session:
    """Move the crosshair along the view's own axis (a slider move); clamps to the volume."""
    axis = vis.VIEW_AXIS[view]
    session.position[axis] = int(np.clip(int(index), 0, session.volume.shape[axis] - 1))
    return session


def click(session: Session, view: str, col: float, row: float) -> Session:
    """Move the crosshair to the voxel under display pixel (col, row) of `view` (what the click gives)."""
    plane_shape = vis.slice_2d(session.volume, view, session.position[vis.VIEW_AXIS[view]], session.orientation).shape
    size = vis.display_shape(plane_shape, vis.view_spacing(session.spacing, view))
    session.position = list(vis.display_to_voxel(view, row, col, session.position, session.volume.shape, size,
                                                 session.orientation))
    return session


def position_text(session: Session) -> str:
    z, y, x = session.position
    size = " x ".join(map(str, session.volume.shape))
    spacing = " x ".join(f"{s:g}" for s in session.spacing)
    value = session.volume[z, y, x]
    value = f"{value:.0f} HU" if session.ct else f"intensity {value:.4g} (not CT)"
    text = f"voxel (z, y, x) = ({z}, {y}, {x}) of {size}, {spacing} mm · {value}"
    if session.mask is not None:
        label = int(session.mask[z, y, x])
        name = session.class_names[label] if label < len(session.class_names) else str(label)
        text += f" · {name}"
    return text


# ---- segmentation and its outputs -----------------------------------------------------------------
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
        # What reading the file again gives (see compact: the held voxels are its float32 values exactly, in a
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


STAT_COLUMNS = ["label", "organ", "volume (mL)", "voxels", "mean HU"]


def window_for(session: Session) -> tuple[float, float] | None:
    """A custom (width, level) that shows a scan whose values are not CT in HU (an MRI), from its 1st-99th
    percentiles; None for a CT, which keeps the chosen window. HU presets would show such a scan white."""
    if session.ct:
        return None
    from ..inference import intensity_range

    low, high = intensity_range(session.volume)
    width = max(high - low, 1e-6)
    return float(f"{width:.3g}"), float(f"{(low + high) / 2:.3g}")


def statistics_columns(session: Session) -> list[str]:
    """The table's headers: the mean is in HU for a CT, in the file's own units otherwise (an MRI)."""
    return STAT_COLUMNS if session.ct else [*STAT_COLUMNS[:-1], "mean intensity"]


def statistics_rows(statistics: Sequence[dict]) -> list[list]:
    """Rows for the per-organ table, in STAT_COLUMNS order; organs that were not found are left out. Volumes
    have two decimals, or two significant digits under 1 mL: six voxels of a fine CT (0.004 mL) read "0" mL."""
    rows = []
    for s in statistics:
        if int(s.get("voxels", 0)) <= 0:
            continue
        mean = s.get("mean_hu", s.get("mean_intensity"))
        volume = float(s["volume_ml"])
        volume = round(volume, 2) if volume >= 1 else float(f"{volume:.2g}")
        rows.append([int(s["label"]), s["name"], volume, int(s["voxels"]),
                     None if mean is None or not np.isfinite(mean) else round(float(mean), 1)])
    return rows


def legend_html(session: Session, shown: Sequence[str] | None = None) -> str:
    """Colour swatches with organ names for the labels present in the mask; organs not in `shown`
    (the "organs shown" boxes; None: all) are faded and struck through."""
    if session.mask is None:
        return "<p class='legend-empty'>Run the segmentation to see the organ legend.</p>"
    entries = vis.legend_entries(session.class_names, present_labels(session))
    if not entries:
        return "<p class='legend-empty'>No organ found in this scan.</p>"
    hidden = set() if shown is None else {name for _, name, _ in entries} - set(shown)
    # faded no further than a name stays readable (4.5:1 on a light page; at 0.4 it was 2.4:1)
    faded = ";opacity:0.65;text-decoration:line-through' title='hidden: tick it under organs shown"
    # the swatch's border is the text's colour, so every swatch shows in light and dark themes (yellow on white
    # and dark blue on a dark page were 1.5:1 and 2:1 against it, with a border only a light page showed)
    items = "".join(
        f"<span class='legend-item' style='display:inline-flex;align-items:center;margin:2px 10px 2px 0"
        f"{faded if name in hidden else ''}'><span style='width:14px;height:14px;border-radius:3px;"
        f"background:{color};display:inline-block;margin-right:5px;border:1px solid currentColor'></span>"
        f"{html.escape(name)}</span>"
        for _, name, color in entries)
    # For eyes that see colours differently (with deuteranopia, liver, gallbladder and aorta look alike) the
    # organs can be told apart without colour: a way to do it, in the legend.
    hint = ("<span class='legend-hint' style='display:block;margin-top:2px'>Colours hard to tell apart? The line "
            "under the views names the organ at the crosshair, and unticking organs shows a few at a time.</span>")
    return f"<div class='organ-legend'>{items}{hint}</div>"


def surfaces(session: Session, shown: Sequence[str] | None = None):
    """The 3-D surfaces of the session's organs (None before segmentation). Marching cubes runs once
    per mask; organs not in `shown` (None: all) stay in the plot's legend, greyed, one click from view."""
    import plotly.graph_objects as go

    from ..inference import SYNTHETIC_WEIGHTS_WARNING
    from ..visualize_3d import surface_figure

    if session.mask is None:
        return None
    if session.surfaces is None:  # the figure says what made it: its camera button saves it without the page
        title = "organs found by SYNTHETIC teaching weights (not real anatomy)" if (
            SYNTHETIC_WEIGHTS_WARNING in session.warnings) else None
        session.surfaces = surface_figure(session.mask, session.spacing, session.class_names, title=title,
                                          orientation=session.orientation, labels_present=present_labels(session))
    figure = go.Figure(session.surfaces)
    if shown is not None:
        figure.for_each_trace(lambda trace: trace.update(visible=True if trace.name in shown else "legendonly"))
    return figure


def present_labels(session: Session) -> frozenset[int]:
    """The labels in the session's mask (none before segmentation), found once per mask: the legend is drawn again
    for every organ box ticked, and np.unique over a 512 x 512 x 300 mask takes 0.3-0.5 s and 78 MB each time."""
    if session.mask is None:
        return frozenset()
    if session.labels is None or session.labels[0] is not session.mask:  # none yet, or a mask set since
        session.labels = (session.mask, frozenset(np.unique(session.mask).tolist()))
    return session.labels[1]


def organ_choices(session: Session) -> list[str]:
    """Names of the organs present in the mask, for the show/hide checkboxes."""
    present = present_labels(session)
    return [name for k, name in enumerate(session.class_names) if k > 0 and k in present]


def delete_session_files(session: Session | None) -> None:
    """Remove the result files of a session (the State's delete callback)."""
    for f in getattr(session, "files", []) or []:
        try:
            Path(f).unlink(missing_ok=True)
            Path(f).parent.rmdir()
        except OSError:
            pass


# ---- attention tab --------------------------------------------------------------------------------
def attention_choices(model) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Dropdown choices (label, value): the model's EPA blocks by index, and heads (0 = mean of heads)."""
    from .. import visualize_attention as va

    names = va.attention_blocks(model)
    blocks = [(va.block_label(n, model.get_submodule(n).grid), i) for i, n in enumerate(names)]
    heads = [("mean of heads", 0)] + [(f"head {h}", h) for h in range(1, model.config.num_heads + 1)]
    return blocks, heads


def attention_view(model, session: Session, block: int | None, head: int | None):
    """The network's part of the attention tab (what a GPU runs): the `visualize_attention.AttentionView`
    of the crosshair voxel. `block` indexes `attention_choices`; `head` 0/None is the mean of heads.
    It leaves `session` as it was, so it may run on a copy (a ZeroGPU worker gets one)."""
    from .. import visualize_attention as va

    names = va.attention_blocks(model)
    if block is not None and not 0 <= int(block) < len(names):
        raise ValueError(f"block={block}: must be in [0, {len(names) - 1}]")
    head_index = None if not head else int(head) - 1
    return va.compute_attention(model, session.volume, session.spacing, session.position, names[int(block or 0)],
                                head_index, session.orientation)


def show_attention(session: Session, view, head: int | None, window: tuple[float, float]) -> list:
    """The attention tab drawn from `attention_view`'s result: three heat-map views (RGB), the
    channel-attention figure and a caption; the session remembers the view for clicks on it."""
    from .. import visualize_attention as va

    # the voxel the maps were computed at, not session.position: the crosshair may have moved meanwhile
    centre = view.centre if view.centre is not None else tuple(session.position)
    session.attention = (view, centre)
    label = va.block_label(view.block, view.grid)
    caption = (f"Query voxel (z, y, x) = {centre} at the centre of the "
               f"{' x '.join(map(str, view.window_hu.shape))} window; {label}; "
               f"{f'head {int(head)}' if head else 'mean of heads'}. Heat-map: the query's "
               "attention weight (no unit), from its minimum (clear) to its maximum in this window (bright yellow).")
    return [*(va.render_attention(view, v, window) for v in vis.VIEWS),
            va.channel_figure(view.channel, f"channel attention<br>{label}"), caption]  # two lines fit a phone


def attention_click(session: Session, view: str, col: float, row: float) -> Session:
    """Move the crosshair to the voxel under a click on an attention view (of the last window shown)."""
    from .. import visualize_attention as va

    if session.attention is None:
        raise ValueError("no attention map shown yet: press 'Show attention at the crosshair' first")
    att, centre = session.attention
    session.position = list(va.window_click_to_voxel(att, view, col, row, centre, session.spacing,
                                                     session.volume.shape))
    return session
