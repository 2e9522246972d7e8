"""One scan on the viewer's page (`Session`): reading the upload, drawing its three views with the page's
`Display` settings, moving the crosshair, and the line under the views."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import io
from .. import visualize as vis


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
    labels: Any = field(default=None, repr=False, compare=False)  # (mask, its labels), see results.present_labels
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


def window_for(session: Session) -> tuple[float, float] | None:
    """A custom (width, level) that shows a scan whose values are not CT in HU (an MRI), from its 1st-99th
    percentiles; None for a CT, which keeps the chosen window. HU presets would show such a scan white."""
    if session.ct:
        return None
    from ..inference import intensity_range

    low, high = intensity_range(session.volume)
    width = max(high - low, 1e-6)
    return float(f"{width:.3g}"), float(f"{(low + high) / 2:.3g}")


def delete_session_files(session: Session | None) -> None:
    """Remove the result files of a session (the State's delete callback)."""
    for f in getattr(session, "files", []) or []:
        try:
            Path(f).unlink(missing_ok=True)
            Path(f).parent.rmdir()
        except OSError:
            pass
