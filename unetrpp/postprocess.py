"""After the network: largest-connected-component clean-up per organ, per-organ statistics, CSV.

All arrays are (Z, Y, X) on the same grid; spacing is (z, y, x) in mm.
"""

from __future__ import annotations

import csv
import io as _stringio
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .io import SYNTHETIC_NOTE, atomic_write, check_folder_can_be_written, check_replaceable

STATISTICS_FIELDS = ("label", "name", "voxels", "volume_ml")  # then the mean, in one of MEAN_FIELDS
# The mean's column: in HU for a CT, in the scan's own units for a scan whose values are not CT (an MRI).
MEAN_FIELDS = ("mean_hu", "mean_intensity")
STATISTICS_SLAB = 2**22  # voxels counted at a time by `organ_statistics`


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep, for each label, only its largest 26-connected component; the rest becomes background.

    `mask` (Z, Y, X) non-negative integer labels. Returns a new array of the same shape and dtype.
    """
    out = mask.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    # one pass gives every label's bounding box; each label is then cleaned inside its own box
    for label, box in enumerate(ndimage.find_objects(mask), start=1):
        if box is None:
            continue
        components, count = ndimage.label(mask[box] == label, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            region = out[box]
            region[(components > 0) & (components != sizes.argmax())] = 0
    return out


def organ_statistics(mask: np.ndarray, intensities: np.ndarray, spacing: tuple[float, float, float],
                     class_names: Sequence[str], in_hu: bool = True) -> list[dict]:
    """One dict per foreground class present: label, name, voxels, volume_ml, mean_hu (mean_intensity
    unless `in_hu`: an MRI has no Hounsfield units).

    `mask` (Z, Y, X) labels, `intensities` (Z, Y, X) original values (HU for CT), `spacing` (z, y, x) mm.
    """
    mean_field = MEAN_FIELDS[0] if in_hu else MEAN_FIELDS[1]
    if mask.shape != intensities.shape:
        raise ValueError(f"mask shape {mask.shape} differs from intensities shape {intensities.shape}; "
                         "give both on one grid")
    # Counted a slab at a time: bincount makes an 8-byte copy of what it is given (labels as intp, weights as
    # float64), 1.7 GB at once for a 512 x 512 x 400 CT, the peak of a whole segmentation and slow to fault in.
    flat, values = mask.reshape(-1), intensities.reshape(-1)
    size = max(len(class_names), int(flat.max(initial=0)) + 1)
    counts, sums = np.zeros(size, np.int64), np.zeros(size, np.float64)
    for start in range(0, flat.size, STATISTICS_SLAB):
        labels = flat[start:start + STATISTICS_SLAB]
        counts += np.bincount(labels, minlength=size)
        sums += np.bincount(labels, weights=values[start:start + STATISTICS_SLAB], minlength=size)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    stats = []
    for label in range(1, len(counts)):
        if counts[label] == 0:
            continue
        name = class_names[label] if label < len(class_names) else f"label {label}"
        stats.append({"label": label, "name": name, "voxels": int(counts[label]),
                      "volume_ml": float(counts[label] * voxel_ml), mean_field: float(sums[label] / counts[label])})
    return stats


def statistics_csv_text(rows: Sequence[dict], leading: Sequence[str] = (), synthetic: bool = False,
                        in_hu: bool = True) -> str:
    """The statistics as CSV text, header line first; `leading` columns (e.g. "file") go in front. With
    `synthetic` (weights trained on phantoms), a last column "note" says so on every row: the table
    travels without the page or the mask that would say it. `in_hu`: whether the scan is CT in HU, which
    names the mean's column of a table without rows (no organ found), as the rows would have."""
    buffer = _stringio.StringIO()
    # mean_hu, mean_intensity (a scan that is not CT, e.g. an MRI) or, for a folder holding both, the two
    # columns, each row filling its own; with no row, the one `in_hu` says (an MRI's empty table said mean_hu)
    means = [m for m in MEAN_FIELDS if any(m in row for row in rows)] or [MEAN_FIELDS[0 if in_hu else 1]]
    fields = (*leading, *STATISTICS_FIELDS, *means, *(("note",) if synthetic else ()))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                        | ({"note": SYNTHETIC_NOTE} if synthetic else {}))
    return buffer.getvalue()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (temporary file in the same folder, then rename), as UTF-8 whatever the locale:
    Windows' usual code page (cp1252) cannot hold every file name a table lists, and tables are read back as UTF-8.
    A file name the system gave as bytes its locale cannot decode (Linux) is written back as those bytes."""
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))
    return path


def _is_statistics_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            header = set(f.readline().strip().split(","))
        return set(STATISTICS_FIELDS) <= header and bool(set(MEAN_FIELDS) & header)
    except (OSError, UnicodeDecodeError):
        return False


def check_statistics_path(path: str | os.PathLike, folder_to_come: str | os.PathLike | None = None) -> Path:
    """`path` if a statistics CSV may be written there (ValueError / FileNotFoundError, one line, if not):
    a name ending in .csv in an existing folder (or in `folder_to_come`, which the caller creates), new
    or a statistics table written before. Any other file, a scan given as input above all, is never
    overwritten."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"statistics file {path} is a folder; give a file name ending with .csv")
    if not path.name.lower().endswith(".csv"):
        raise ValueError(f"statistics file {path}: the name must end with .csv")
    check_replaceable(path, _is_statistics_csv, "a statistics table")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() and not (folder_to_come is not None and parent.resolve() == Path(folder_to_come).resolve()):
        raise FileNotFoundError(f"folder {path.parent} for the statistics does not exist; create it or choose "
                                "another path")
    # a read-only folder is found now, not after every file of a long run has been segmented
    check_folder_can_be_written(parent, "statistics folder")
    return path


def write_statistics(path: str | os.PathLike, text: str) -> Path:
    """Write statistics CSV text (see `statistics_csv_text`) to `path`, checked by `check_statistics_path`."""
    return write_text(check_statistics_path(path), text)
