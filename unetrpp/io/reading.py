"""Reading NIfTI files (nibabel): checked loading into a `Volume`, and the way back to the file's grid.
A `Volume` holds the voxels (Z, Y, X) in a named orientation, the spacing (z, y, x) in mm, and what writing a
result back onto the file's exact grid, affine and header codes needs (see `writing.save_mask`)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gzip
import logging
import math
import os
import re
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.arrayproxy import ArrayProxy
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

from ..config import check_orientation

logger = logging.getLogger(__name__)

# Largest volume accepted: 2**29 voxels (2 GiB as float32; e.g. 512 x 512 x 2048). Checked from the
# header, before any voxel is read, so a corrupt or hostile header cannot exhaust memory.
MAX_VOXELS = 2**29
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_NIFTI1_MAGICS = (b"n+1\0",)
_NIFTI2_MAGICS = (b"n+2\0",)
_PAIR_MAGICS = (b"ni1\0", b"ni2\0")
_HINT = "give a 3-D NIfTI image (.nii or .nii.gz)"
_VOXEL_TYPE_FIX = "re-export the image with one integer or float value per voxel (e.g. int16 or float32)"

# nibabel logs each header problem it repairs on its own logger, which prints to stderr and also
# passes the line to any root handler (twice on a command line). While a file is read here, its
# lines become one warning of ours instead; elsewhere nibabel's logging is left as it is.
_NIBABEL_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("_NIBABEL_NOTES", default=None)


class _CollectNibabelNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        notes = _NIBABEL_NOTES.get()
        if notes is None:
            return True
        notes.append(record.getMessage())
        return False


logging.getLogger("nibabel.global").addFilter(_CollectNibabelNotes())


@contextlib.contextmanager
def _nibabel_notes() -> Iterator[list[str]]:
    notes: list[str] = []
    token = _NIBABEL_NOTES.set(notes)
    try:
        yield notes
    finally:
        _NIBABEL_NOTES.reset(token)


@dataclasses.dataclass
class Volume:
    """A 3-D image in (Z, Y, X) order, as `load` and `from_image` give it."""

    array: np.ndarray  # (Z, Y, X)
    spacing: tuple[float, float, float]  # mm along (z, y, x)
    affine: np.ndarray  # 4x4 voxel (i, j, k) -> world (RAS mm) affine of `array` read as (X, Y, Z)
    source: nib.Nifti1Image | None = None  # the image as read (header, grid, codes), for writing back
    orientation: str = "RAS"
    warnings: list[str] = dataclasses.field(default_factory=list)  # what loading changed (NaN, 4-D)
    path: Path | None = None  # the file it was read from, if any

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


def _guess_format(head: bytes) -> str | None:
    """What a non-NIfTI file most likely is, from its first bytes, for the error message (None: unknown)."""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file (convert the series to NIfTI first, e.g. with dcm2niix)"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return "a TIFF image"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c.isspace() for c in text):
            return "a text file"
    except UnicodeDecodeError:
        pass
    return None


def _nifti_version(head: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI header (either byte order), else None."""
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(head[:4], order + "i4")[0]) if len(head) >= 4 else 0
        if sizeof_hdr == 348 and len(head) >= 348 and head[344:348] in _NIFTI1_MAGICS:
            return 1
        if sizeof_hdr == 540 and len(head) >= 540 and head[4:8] in _NIFTI2_MAGICS:
            return 2
    return None


def sniff(path: str | os.PathLike) -> nib.Nifti1Header:
    """Check that `path` is a readable single-file NIfTI; returns its raw header (unfixed by nibabel).

    Raises FileNotFoundError when missing, ValueError (one line: what it is, what works) otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; {_HINT}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; {_HINT} (the predict command also takes folders)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); {_HINT}")
    with open(path, "rb") as f:
        head = f.read(544)
    compressed = head[:2] == b"\x1f\x8b"
    if compressed:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(544)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc}); "
                             "re-export the image as .nii.gz") from None
    version = _nifti_version(head)
    if version is None:
        if head[344:348] in _PAIR_MAGICS or head[4:8] in _PAIR_MAGICS:
            raise ValueError(f"{path}: the header of a .hdr/.img pair; convert it to a single-file .nii or .nii.gz")
        what = _guess_format(head)
        if what is None:
            inside = " inside the gzip stream" if compressed else ""
            raise ValueError(f"{path}: not a NIfTI image (no NIfTI-1/NIfTI-2 header{inside}); {_HINT}")
        raise ValueError(f"{path}: {'its gzip-compressed content is' if compressed else 'this is'} {what}, "
                         f"not a NIfTI image; {_HINT}")
    name = path.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI image without a .nii/.nii.gz name; rename it to end with .nii or .nii.gz")
    if compressed != name.endswith(".gz"):
        raise ValueError(f"{path}: the name says {'.nii.gz' if name.endswith('.gz') else '.nii'} but the file is "
                         f"{'' if compressed else 'not '}gzip-compressed; rename it to end with "
                         f"{'.nii.gz' if compressed else '.nii'}")
    # dim[0], the number of dimensions, also tells readers the byte order: outside 1-7 in both orders,
    # nibabel would read the header byte-swapped and report unrelated problems.
    order = "<" if struct.unpack_from("<i", head)[0] in (348, 540) else ">"
    ndim = struct.unpack_from(order + ("h" if version == 1 else "q"), head, 40 if version == 1 else 16)[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"{path}: the header's dim[0] (the number of dimensions) is {ndim}, not 1 to 7, so the "
                         "header is corrupt; re-export the image")
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    # Only the fixed-size header: extensions lie past these bytes and are read with the image.
    return header_class.from_fileobj(BytesIO(head[:header_class.sizeof_hdr]), check=False)


def check_image(img: nib.Nifti1Image, name: str = "image") -> tuple[int, int, int]:
    """Validate header, shape, data type and affine without reading voxels; returns the (i, j, k) shape.

    Rules: 3-D (a 4-D/5-D image with one volume is accepted), every axis at least 2 voxels (else
    it is 2-D), at most `MAX_VOXELS` voxels, integer or float data, a finite affine with non-zero
    spacing that is not singular.
    """
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise TypeError(f"{name}: got {type(img).__name__}; give a path or a nibabel Nifti1Image/Nifti2Image")
    shape = tuple(int(s) for s in img.header.get_data_shape())
    if len(shape) < 3:
        raise ValueError(f"{name}: a {len(shape)}-D image of shape {shape}; {_HINT}")
    if min(shape) < 0:
        raise ValueError(f"{name}: shape {shape} has a negative axis length, so the header is corrupt; "
                         "re-export the image")
    if 0 in shape:
        raise ValueError(f"{name}: shape {shape} has a zero-length axis (no voxels); {_HINT}")
    if len(shape) > 3 and math.prod(shape[3:]) != 1:
        raise ValueError(f"{name}: a {len(shape)}-D image of shape {shape} ({math.prod(shape[3:])} volumes); "
                         "give one 3-D volume (extract it first, e.g. with fslroi or nibabel slicing)")
    if min(shape[:3]) < 2:
        raise ValueError(f"{name}: shape {shape[:3]} is a single slice (2-D); {_HINT} with at least 2 voxels per axis")
    if math.prod(shape) > MAX_VOXELS:
        raise ValueError(f"{name}: shape {shape} is {math.prod(shape):,} voxels, above the limit of {MAX_VOXELS:,} "
                         "(unetrpp.io.reading.MAX_VOXELS); crop or downsample the image first")
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise ValueError(f"{name}: voxel type {dtype} is not supported; {_VOXEL_TYPE_FIX}")
    affine = img.affine
    if affine is None:  # only an image made in memory: a file always yields one
        raise ValueError(f"{name}: the image has no affine (made with affine=None), so where its voxels lie is "
                         "unknown; make it with one, e.g. nibabel.Nifti1Image(data, affine) with the scan's voxel "
                         "to mm affine")
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"{name}: the affine is not finite (NaN or Inf in the sform/qform); "
                         "fix the header's sform/qform (e.g. re-save in 3D Slicer)")
    spacing = voxel_sizes(affine)
    if spacing.min() <= 1e-6 or abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(spacing)):
        raise ValueError(f"{name}: the affine is singular (voxel spacing {tuple(np.round(spacing, 4).tolist())} mm); "
                         "fix pixdim/sform/qform in the header so each axis has a non-zero, independent direction")
    return shape[:3]


# Voxels scaled at a time when a file is read into a float type (see `_read_scaled`).
_SCALE_VOXELS = 2**22


def _read_scaled(proxy: ArrayProxy, shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """`np.asarray(proxy, dtype)`, value for value, with the scaling done a slab of slices at a time: nibabel
    scales integer voxels in float64 under numpy 2 (a Python-float slope cannot be cast safely to float32), so
    all at once it held 8 bytes a voxel beside the result (630 MB for a 512 x 512 x 300 int16 CT)."""
    raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    # as nibabel's ArrayProxy._get_scaled: the factors take `dtype` where that is a safe cast
    slope = slope.astype(dtype) if np.can_cast(slope, dtype) else slope
    inter = inter.astype(dtype) if np.can_cast(inter, dtype) else inter
    out = np.empty_like(raw, dtype=dtype, subok=False)  # in the file's (Fortran) order, as nibabel gives it
    step = max(1, _SCALE_VOXELS // (shape[0] * shape[1]))
    for k in range(0, shape[2], step):
        out[..., k:k + step] = apply_read_scaling(raw[..., k:k + step], slope, inter)
    return out


def _read_data(img: nib.Nifti1Image, shape: tuple[int, int, int], name: str, dtype: np.dtype | None) -> np.ndarray:
    """Voxels (i, j, k) with slope/intercept applied, as `dtype` (None: nibabel's choice)."""
    try:
        # In-memory arrays are copied (NaN replacement works in place); files are read into a float `dtype`
        # through `_read_scaled`, so a scaled int16 CT never passes through float64 all at once.
        # A slope that overflows float32 gives Inf, which _replace_non_finite reports: no numpy warning.
        with np.errstate(over="ignore", invalid="ignore"):
            if isinstance(img.dataobj, np.ndarray):
                data = np.array(img.dataobj, dtype=dtype)
            elif isinstance(img.dataobj, ArrayProxy) and dtype is not None and np.dtype(dtype).kind == "f":
                data = _read_scaled(img.dataobj, shape, dtype)
            else:
                data = np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        reason = re.sub(r"\s+from\s*$", "", str(exc).splitlines()[0])  # nibabel names no file for a gzip stream
        raise ValueError(f"{name}: the image data is truncated or corrupt ({reason}); "
                         "re-export or re-download the file") from None
    data = np.asarray(data).reshape(shape)
    # A read-only memory map (nib.load(path, mmap="r")) is copied: NaN replacement writes in place.
    return data if data.flags.writeable else data.copy()


def _replace_non_finite(data: np.ndarray, name: str) -> list[str]:
    """Replace NaN/Inf in place by the minimum finite value; returns the warning, if any."""
    if data.dtype.kind != "f":
        return []
    bad = ~np.isfinite(data)
    count = int(bad.sum())
    if not count:
        return []
    if count == data.size:
        raise ValueError(f"{name}: every voxel is NaN or Inf (or beyond float32's range, 3.4e38); "
                         "give an image with finite intensities")
    fill = float(data[~bad].min())
    data[bad] = fill
    voxels = "1 non-finite voxel (NaN/Inf)" if count == 1 else f"{count} non-finite voxels (NaN/Inf)"
    message = f"{name}: replaced {voxels} by the minimum finite value {fill:g}"
    logger.warning(message)
    return [message]


def _to_orientation(data_ijk: np.ndarray, affine: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an (i, j, k) array to `orientation`; returns the array and its affine."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation.upper())))
    data = apply_orientation(data_ijk, transform)
    return data, affine @ inv_ornt_aff(transform, data_ijk.shape)


def _open(path: Path) -> nib.Nifti1Image:
    """The image at `path` with its voxels still on disk, after `sniff`; one-line ValueError otherwise."""
    raw = sniff(path)
    # nibabel silently turns a zero pixdim into 1 mm; without an sform that would invent a spacing.
    if int(raw["sform_code"]) == 0 and np.any(np.asarray(raw["pixdim"][1:4]) == 0):
        raise ValueError(f"{path}: zero voxel spacing (pixdim {tuple(float(v) for v in raw['pixdim'][1:4])}) and no "
                         "sform, so the affine is singular; set the real voxel size in the header")
    # Said here, before nibabel builds the qform from it: an infinite pixdim makes numpy print a RuntimeWarning
    # on stderr, beside the one line the user is promised.
    if int(raw["sform_code"]) == 0 and not np.all(np.isfinite(np.asarray(raw["pixdim"][1:4], dtype=np.float64))):
        raise ValueError(f"{path}: the voxel spacing is not finite (pixdim "
                         f"{tuple(float(v) for v in raw['pixdim'][1:4])}) and there is no sform, so where the voxels "
                         "lie is unknown; set the real voxel size in the header")
    # A single file's voxels follow its header. An offset inside the header (0 is a common "unset") is read by
    # nibabel from that offset, header bytes as voxels and the whole image shifted, and by niftilib (ITK, FSL)
    # from byte 348: the mask would lie on a shifted image without a word.
    offset = float(raw["vox_offset"])
    if offset < raw.sizeof_hdr:
        raise ValueError(f"{path}: the header's vox_offset is {offset:g}, inside the {raw.sizeof_hdr}-byte header, so "
                         "where the voxels start is unknown; re-export the image, or set vox_offset to where they "
                         f"start ({raw.single_vox_offset} in a file without header extensions)")
    # Without an sform the qform's quaternion places the image; nibabel refuses one of length above 1 with a
    # bare "w2 should be positive" that names neither the file nor the field.
    bcd = np.asarray([raw["quatern_b"], raw["quatern_c"], raw["quatern_d"]], dtype=np.float64)
    if int(raw["sform_code"]) == 0 and int(raw["qform_code"]) > 0 \
            and 1.0 - float(bcd @ bcd) < -float(raw.quaternion_threshold):
        raise ValueError(f"{path}: the qform quaternion (quatern_b, c, d = {', '.join(f'{v:g}' for v in bcd)}) has a "
                         f"length above 1 and there is no sform, so how the image lies in the body is unknown; fix "
                         "the qform in the header (or set an sform), or re-export the image")
    # Said here in what would work: nibabel stops at a binary or float128 header with "data code 1 not supported"
    # and at a NaN intercept with "Valid slope but invalid intercept", neither of which names the fix.
    code = int(raw["datatype"])
    codes = nib.nifti1.data_type_codes
    if code in codes.value_set() and codes.label[code] not in ("none", "all") \
            and np.dtype(codes.type[code]).kind not in "iuf":
        raise ValueError(f"{path}: voxel type {codes.label[code]} (NIfTI datatype {code}) is not supported; "
                         f"{_VOXEL_TYPE_FIX}")
    slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    if slope != 0 and math.isfinite(slope) and not math.isfinite(inter):  # slope 0/NaN: unscaled, inter unused
        raise ValueError(f"{path}: the header's scaling intercept scl_inter is {inter:g} (scl_slope {slope:g}), so "
                         "the voxel values are unknown; set scl_inter to the real offset (0 for none), or re-export "
                         "the image")
    # This very file: nib.load lowercases a mixed-case extension (scan.Nii -> scan.nii), then finds no such file.
    klass = nib.Nifti2Image if isinstance(raw, nib.Nifti2Header) else nib.Nifti1Image
    try:
        img = klass.from_file_map(klass.make_file_map({"image": str(path), "header": str(path)}), mmap=False)
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError, HeaderDataError) as exc:
        raise ValueError(f"{path}: cannot read the NIfTI header ({str(exc).splitlines()[0]}); re-export the image "
                         "as a 3-D NIfTI (.nii or .nii.gz)") from None
    # An uncompressed file shorter than its header's voxels: said now, before an array of the header's size
    # is allocated (a 1 KB upload whose header claims 700 x 512 x 512 voxels held 700 MB for nothing).
    if not path.name.lower().endswith(".gz") and check_image(img, str(path)):  # its shape is sane
        needed = int(img.header.get_data_offset()) + math.prod(max(0, int(n)) for n in img.header.get_data_shape()) \
            * img.header.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            raise ValueError(f"{path}: the image data is truncated or corrupt (the header needs {needed:,} bytes, the "
                             f"file holds {path.stat().st_size:,}); re-export or re-download the file")
    return img


def load(path: str | os.PathLike, orientation: str = "RAS", dtype: np.dtype | None = np.float32) -> Volume:
    """Read a NIfTI file into a `Volume` (array (Z, Y, X)) in `orientation`, slope/intercept applied.

    Accepted: single-file NIfTI-1 or NIfTI-2 (`.nii`, `.nii.gz`), any orientation, any integer or float
    data type, a 4-D image holding one volume (squeezed; results are written 3-D on its grid). Everything
    else is refused with a one-line ValueError (FileNotFoundError when missing) before any voxel is read
    (see `check_image`). Non-finite voxels (NaN/Inf) are replaced by the minimum finite value; that, header
    fields nibabel repairs on reading and a sheared grid (voxel axes not perpendicular, e.g. uncorrected
    gantry tilt) are each a warning in `Volume.warnings`. Files are only ever opened for reading.
    """
    path = Path(path)
    with _nibabel_notes() as notes:
        volume = from_image(_open(path), orientation=orientation, dtype=dtype, name=str(path))
    if notes:
        volume.warnings.append(f"{path}: nibabel repaired the header ({'; '.join(dict.fromkeys(notes))})")
    volume.path = path
    return volume


# NIfTI spatial units other than millimetres (xyzt_units), as millimetres.
_TO_MM = {"meter": 1000.0, "micron": 1e-3}


def from_image(img: nib.Nifti1Image, orientation: str = "RAS", dtype: np.dtype | None = np.float32,
               name: str = "image") -> Volume:
    """Like `load`, for a nibabel image already in memory."""
    orientation = check_orientation(orientation)
    shape = check_image(img, name)
    data = _read_data(img, shape, name, dtype)
    warnings = _replace_non_finite(data, name)
    if len(img.shape) > 3:
        warnings.append(f"{name}: a {len(img.shape)}-D image of shape {img.shape} holding one volume; used as 3-D "
                        "(a mask of it is written 3-D, on the same grid)")
    if isinstance(img, nib.Nifti1Pair) and int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0:
        warnings.append(f"{name}: the header does not say how the image lies in the body (qform_code and "
                        "sform_code are 0), so left and right may be swapped; set them if the orientation is known")
    affine, unit = _affine_mm(img)
    if unit is not None:
        warnings.append(f"{name}: the header gives distances in {unit}s; converted to millimetres")
    if sheared := _shear_warning(affine, name):
        warnings.append(sheared)
    data, new_affine = _to_orientation(data, affine, orientation)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (X, Y, Z) -> (Z, Y, X)
    spacing_xyz = voxel_sizes(new_affine)
    return Volume(array, tuple(float(s) for s in spacing_xyz[::-1]), new_affine, img, orientation, warnings)


# Voxel axes further than this from perpendicular are reported (a rotated, oblique grid stays perpendicular).
SHEAR_DEGREES = 1.0


def _shear_warning(affine: np.ndarray, name: str) -> str | None:
    """A warning when the affine's voxel axes are not perpendicular, as in a CT with uncorrected gantry tilt:
    everything downstream (resampling, the network, the views, voxel volumes from the spacing) takes the
    grid as rectangular. The mask still lies voxel for voxel on the scan."""
    columns = affine[:3, :3] / voxel_sizes(affine)
    cosine = float(np.abs(columns.T @ columns - np.eye(3)).max())
    angle = math.degrees(math.asin(min(cosine, 1.0)))
    if angle <= SHEAR_DEGREES:
        return None
    excess = float(np.prod(voxel_sizes(affine)) / abs(np.linalg.det(affine[:3, :3]))) - 1.0
    return (f"{name}: the voxel axes are not perpendicular (sheared by {angle:.1f} degrees, as in a CT with "
            f"uncorrected gantry tilt); the network and the statistics take the grid as rectangular, so shapes "
            f"are slanted and organ volumes {100 * excess:.0f}% too large; resample the scan onto a rectangular "
            "grid first (dcm2niix corrects gantry tilt)")


def _affine_mm(img: nib.Nifti1Image) -> tuple[np.ndarray, str | None]:
    """The image's affine in millimetres, and the header's other spatial unit it was converted from (or None)."""
    unit = img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else "mm"
    if unit in _TO_MM:  # nibabel reports the affine in the header's unit
        return np.diag([_TO_MM[unit]] * 3 + [1.0]) @ img.affine, unit
    return img.affine, None


def unit_note(source: Volume | str | os.PathLike) -> str:
    """For an error about a scan's size in mm: "" or, when the header of `source` (a `Volume` or a NIfTI path) gives
    distances in another unit, a clause naming it and the fix. A CT whose header says microns (xyzt_units) spans a
    fraction of a millimetre; the warning that says so is lost when the size check raises."""
    if isinstance(source, Volume):
        img = source.source
    else:
        with _nibabel_notes():  # `load` reports them
            img = _open(Path(source))
    unit = _affine_mm(img)[1] if img is not None else None
    if unit is None:
        return ""
    return (f"; the header gives distances in {unit}s (xyzt_units), converted to millimetres: if its voxel size is "
            "in mm, set xyzt_units to mm (nibabel: img.header.set_xyzt_units('mm'))")


def header_grid(path: str | os.PathLike,
                orientation: str = "RAS") -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The (Z, Y, X) shape and spacing (mm) that `load(path, orientation)` gives, from the header alone."""
    orientation = check_orientation(orientation)
    with _nibabel_notes():  # `load` reports them
        img = _open(Path(path))  # the voxels stay on disk
    raw_shape = check_image(img, str(path))
    affine, _ = _affine_mm(img)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation)))
    shape = [0, 0, 0]  # (X, Y, Z) after reorientation: input axis i becomes axis transform[i, 0]
    for n, (axis, _) in zip(raw_shape, transform):
        shape[int(axis)] = n
    spacing = voxel_sizes(affine @ inv_ornt_aff(transform, raw_shape))
    return (shape[2], shape[1], shape[0]), tuple(float(s) for s in spacing[::-1])


def to_source_grid(array_zyx: np.ndarray, volume: Volume) -> np.ndarray:
    """Map an array on `volume`'s (Z, Y, X) grid back to the (i, j, k) order of its source file."""
    if volume.source is None:
        return array_zyx.transpose(2, 1, 0)
    data = array_zyx.transpose(2, 1, 0)
    source_ornt = io_orientation(volume.source.affine)
    back = ornt_transform(axcodes2ornt(tuple(volume.orientation)), source_ornt)
    return apply_orientation(data, back)
