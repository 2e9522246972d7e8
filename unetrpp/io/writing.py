"""Writing results as NIfTI: masks on their scan's exact grid with label tables (side-car and extension, read
back by `read_label_table`), plain arrays, and what every output shares: a writable folder, only our own files
replaced, and atomic writes (a temporary file moved into place, so a failed write leaves nothing behind).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from ..labels import BTCV_COLORS, BTCV_LABELS
from .reading import NIFTI_SUFFIXES, Volume, _open, sniff, to_source_grid

# The umask can only be read by setting it: read once, at import, and put back.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def nifti_stem(path: str | os.PathLike) -> str | None:
    """The file name without .nii.gz / .nii (any case), or None when it has neither."""
    name = Path(path).name
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.lower().endswith(s)), None)


def _nifti_stem(path: Path) -> str:
    stem = nifti_stem(path)
    if stem is None:
        raise ValueError(f"output {path}: the name must end with .nii.gz or .nii")
    return stem


def sidecar_path(mask_path: str | os.PathLike) -> Path:
    """The JSON label side-car of a mask: `case.nii.gz` -> `case.json` in the same folder."""
    path = Path(mask_path)
    return path.with_name(_nifti_stem(path) + ".json")


# Mark label side-cars and masks as written by this package (predict may replace them on a rerun).
LABEL_TABLE_DESCRIPTION = "UNETR++ segmentation label map"
SYNTHETIC_NOTE = "made by weights trained on SYNTHETIC phantoms: not real anatomy"  # in label tables and CSVs
MASK_DESCRIPTION = b"UNETR++ segmentation"
_NIFTI_INTENT_LABEL = 1002


def written_by_save_mask(path: str | os.PathLike) -> bool:
    """Whether `path` is a mask or label side-car that `save_mask` wrote (safe to replace on a rerun)."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".json"):
            return json.loads(path.read_text(encoding="utf-8")).get("description") == LABEL_TABLE_DESCRIPTION
        header = sniff(path)  # the header alone (and read as `load` reads it, whatever the extension's case)
        return (int(header["intent_code"]) == _NIFTI_INTENT_LABEL
                and bytes(header["descrip"]).rstrip(b"\0") == MASK_DESCRIPTION)
    except Exception:  # unreadable, not JSON, not NIfTI: someone else's file
        return False


def finished_mask(mask_path: str | os.PathLike, source: str | os.PathLike) -> bool:
    """Whether `mask_path` already holds a finished mask of the scan `source` (predict --skip-existing): a mask and
    its label side-car that `save_mask` wrote, the mask on the scan's grid. `save_mask` writes each file whole under a
    temporary name and the side-car second, so a run stopped part-way leaves no mask, or one without its side-car:
    unfinished. A mask of another scan of that name (another shape or affine) is not taken for this one's."""
    mask_path = Path(mask_path)
    if not (written_by_save_mask(mask_path) and written_by_save_mask(sidecar_path(mask_path))):
        return False
    try:
        mask, scan = _open(mask_path), _open(Path(source))  # headers only, whatever the extension's case
        return mask.shape == scan.shape[:3] and np.allclose(mask.affine, scan.affine, rtol=0, atol=1e-4)
    except Exception:  # a scan nibabel cannot read is segmented, to be reported in one line as any bad file
        return False


def label_table(label_names: Sequence[str], synthetic: bool = False) -> dict:
    """JSON-ready label table: {"labels": [{"value", "name", "color"}, ...]}, background first; with
    `synthetic`, also {"synthetic": true, "note": ...} (a mask from weights trained on phantoms)."""
    btcv = tuple(label_names[1:]) == tuple(BTCV_LABELS.values())
    labels = []
    for value, name in enumerate(label_names):
        entry = {"value": value, "name": str(name)}
        if btcv and value in BTCV_COLORS:
            entry["color"] = list(BTCV_COLORS[value])
        labels.append(entry)
    table = {"description": LABEL_TABLE_DESCRIPTION, "labels": labels}
    if synthetic:
        table.update(synthetic=True, note=SYNTHETIC_NOTE)
    return table


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain new file gets under the user's umask (writers that make
    0600 files, such as mkstemp or safetensors, would keep others sharing the folder from reading it)."""
    os.chmod(path, 0o666 & ~_UMASK)


def check_folder_can_be_written(folder: str | os.PathLike, option: str = "--out") -> Path:
    """`folder` if it is, or can be created as, a folder this process may write in; else one-line ValueError.
    Nothing is created: the nearest existing ancestor is tested with a temporary file."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {folder}: {existing} is a file, not a folder; give a folder path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".unetrpp-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{option} {folder}: cannot write in {existing} ({exc.strerror}); choose a writable "
                         "folder") from None
    return folder


def check_replaceable(path: Path, written_here: Callable[[Path], bool], what: str, note: str = "") -> None:
    """One-line ValueError when `path` exists and `written_here(path)` says this package did not write it:
    outputs replace only their own earlier selves, never a scan or anyone's other file."""
    if path.exists() and not path.is_dir() and not written_here(path):
        raise ValueError(f"{path} exists and is not {what} written by unetrpp{note}; it is never overwritten: "
                         "choose another name or remove it first")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, then move it into place."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {parent} does not exist; create it or choose another output path")
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name")
    # Lower case: nibabel lowercases a mixed-case extension (.Nii) and would write beside the temporary file,
    # which, empty, was then moved into place as the result.
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else path.suffix.lower()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=parent)
        os.close(fd)
    except OSError as exc:
        raise ValueError(f"cannot write to {parent} ({exc.strerror}); choose a writable output folder") from None
    replacing = False
    try:
        write(Path(tmp))
        with open(tmp, "r+b") as f:  # on disk before the rename: a power cut leaves the old file or the new one
            os.fsync(f.fileno())
        usual_permissions(tmp)  # mkstemp makes 0600
        replacing = path.exists()
        os.replace(tmp, path)
    except OSError as exc:
        # Windows refuses to replace a file another program holds open (a table open in Excel) or marked read-only
        held = replacing and isinstance(exc, PermissionError)
        fix = ("close it in the program that has it open, or clear its read-only flag, then run again" if held
               else "choose a writable output folder with free space")
        raise ValueError(f"cannot write {path} ({exc.strerror or exc}); {fix}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_mask(mask_zyx: np.ndarray, volume: Volume, path: str | os.PathLike,
              label_names: Sequence[str] | None = None, synthetic: bool = False) -> Path:
    """Write a label mask (Z, Y, X) as uint8 on the exact grid, affine and codes of `volume`'s file.

    The header is the source's (qform/sform codes, pixdim, units unchanged) with the data type set
    to uint8 and no scaling. With `label_names` (background first) the names are recorded twice:
    in a JSON side-car `<name>.json` beside the mask (see `label_table`; readable by any script
    and by the viewer) and as a NIfTI comment extension holding the same JSON, so they travel with
    the file. 3D Slicer and ITK-SNAP open the mask as a label map either way. An existing file is only
    replaced if it is a mask (or side-car) written here (`written_by_save_mask`).
    """
    path = Path(path)
    _nifti_stem(path)
    mask_zyx = np.asarray(mask_zyx)
    if mask_zyx.shape != volume.shape:
        raise ValueError(f"mask shape {mask_zyx.shape} differs from the volume's {volume.shape}; "
                         "give a mask on the volume's (Z, Y, X) grid")
    if mask_zyx.size and (mask_zyx.min() < 0 or mask_zyx.max() > 255):
        raise ValueError(f"mask values span {mask_zyx.min()}..{mask_zyx.max()}; labels must be 0..255 for uint8")
    check_replaceable(path, written_by_save_mask, "a mask", " (the scan itself?)")
    if label_names is not None:
        check_replaceable(sidecar_path(path), written_by_save_mask, "a label side-car")
    # NIfTI stores voxels with i fastest: a (Z, Y, X) array is already that order, so the copy (flips) is sequential
    # and nibabel writes it as it is; a C-ordered (i, j, k) copy was a transpose, 0.6 s of 0.85 s at 512 x 512 x 250.
    data = np.asfortranarray(to_source_grid(mask_zyx, volume), dtype=np.uint8)
    if volume.source is not None:
        header = volume.source.header.copy()
        header.set_data_dtype(np.uint8)
        header.extensions.clear()
        # affine=None keeps the copied qform/sform fields and codes byte for byte. An image in memory whose
        # affine was changed after its header was made (img.affine[:] = A; img.header.set_sform(B)) was read with
        # img.affine, and nibabel saves it with img.affine: so is its mask, not with the stale header's.
        stale = not np.allclose(volume.source.affine, header.get_best_affine())
        out = type(volume.source)(data, volume.source.affine if stale else None, header)
        out.header.set_slope_inter(1.0, 0.0)
    else:
        out = nib.Nifti1Image(data, volume.affine)
        out.set_qform(volume.affine, 1)
        out.set_sform(volume.affine, 1)
    out.header["cal_min"], out.header["cal_max"] = 0, int(data.max(initial=0))
    out.header["intent_code"] = _NIFTI_INTENT_LABEL
    out.header["descrip"] = MASK_DESCRIPTION
    table = None
    if label_names is not None:
        table = label_table(label_names, synthetic)
        out.header.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps(table).encode()))
    atomic_write(path, lambda tmp: nib.save(out, str(tmp)))
    if table is not None:
        try:
            atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(table, indent=1), encoding="utf-8"))
        except (ValueError, FileNotFoundError):
            path.unlink(missing_ok=True)  # both or neither
            raise
    return path


def _label_table(text: str | bytes) -> dict | None:
    """A `label_table` JSON as a dict, or None for any other text (another tool's JSON, not JSON)."""
    try:
        table = json.loads(text)
        table["names"] = tuple(str(e["name"]) for e in table["labels"])
        return table
    except (ValueError, KeyError, TypeError):
        return None


def read_label_table(mask_path: str | os.PathLike) -> dict | None:
    """The label table `save_mask` recorded (side-car first, then the NIfTI extension), with its names
    as "names" (by id), or None. A `<name>.json` beside the mask that is not such a table (another tool's
    side-car, e.g. dcm2niix's) is passed over, not an error; a mask that is no NIfTI is one, in one line
    as `load` says it (`evaluate` reads every prediction's table before scoring any)."""
    side = sidecar_path(mask_path)
    if side.is_file() and (table := _label_table(side.read_bytes())):
        return table
    for ext in _open(Path(mask_path)).header.extensions:
        if table := _label_table(ext.get_content()):
            return table
    return None


def read_label_names(mask_path: str | os.PathLike) -> tuple[str, ...] | None:
    """Label names recorded by `save_mask`, by id, or None (see `read_label_table`)."""
    table = read_label_table(mask_path)
    return table["names"] if table else None


def save_array(array_zyx: np.ndarray, spacing: tuple[float, float, float], path: str | os.PathLike,
               origin: tuple[float, float, float] = (0.0, 0.0, 0.0), dtype: np.dtype = np.int16,
               description: str = "") -> Path:
    """Write a (Z, Y, X) array in RAS with the given spacing (z, y, x) and world origin (x, y, z) in mm;
    `description` goes to the header's descrip field (at most 79 characters)."""
    path = Path(path)
    _nifti_stem(path)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    affine[:3, 3] = origin
    img = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)).astype(dtype), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    img.header["descrip"] = description.encode()[:79]
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    return path
