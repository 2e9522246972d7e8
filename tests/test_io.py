"""unetrpp.io: checked NIfTI reading (every kind of bad input), encodings, exact write-back.

The bad files are built here (`BAD_CASES`) and reused by tests/test_predict_cli.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unetrpp import io

AFFINE = np.array([[0.0, 0.0, -2.0, 10.0], [0.0, 3.0, 0.0, -5.0], [1.5, 0.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _phantom(shape=(10, 12, 14), seed=0) -> np.ndarray:
    """Synthetic (i, j, k) int16 'CT': air around a soft-tissue box with a bright blob. Not real data."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000, np.int16)
    data[2:-2, 2:-2, 2:-2] = 40
    data[3:6, 4:8, 5:9] = 300
    return (data + rng.integers(-20, 20, shape)).astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, cls=nib.Nifti1Image, **header) -> Path:
    img = cls(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 2)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def write_scaled(path: Path, stored: np.ndarray, slope: float, inter: float, affine: np.ndarray = AFFINE) -> Path:
    """A .nii.gz whose voxels are `stored` with scl_slope/scl_inter set (nibabel would rescale on save)."""
    plain = write_nifti(path.with_name("plain.tmp.nii"), stored, affine)
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    raw[112:120] = np.array([slope, inter], "<f4").tobytes()  # scl_slope, scl_inter
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- bad inputs: name -> (builder(folder) -> path, words the one-line message must contain) ------
def _png(d: Path) -> Path:
    (d / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return d / "photo.png"


def _text(d: Path) -> Path:
    (d / "notes.nii").write_text("patient 1: abdomen CT, see PACS\n" * 30)
    return d / "notes.nii"


def _dicom(d: Path) -> Path:
    (d / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(600))
    return d / "slice.dcm"


def _empty(d: Path) -> Path:
    (d / "empty.nii.gz").write_bytes(b"")
    return d / "empty.nii.gz"


def _truncated(d: Path) -> Path:
    noisy = _phantom((30, 30, 30)).astype(np.float32) + np.random.default_rng(0).random((30, 30, 30), np.float32)
    full = write_nifti(d / "full.tmp.nii.gz", noisy)  # noise: so the gzip stream is long enough to cut
    data = full.read_bytes()
    full.unlink()
    (d / "truncated.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    return d / "truncated.nii.gz"


def _truncated_plain(d: Path) -> Path:
    full = write_nifti(d / "full.tmp.nii", _phantom())
    data = full.read_bytes()
    full.unlink()
    (d / "short.nii").write_bytes(data[:700])
    return d / "short.nii"


def _gzip_garbage(d: Path) -> Path:
    (d / "garbage.nii.gz").write_bytes(gzip.compress(np.random.default_rng(1).bytes(4000)))
    return d / "garbage.nii.gz"


def _two_d(d: Path) -> Path:
    return write_nifti(d / "slice2d.nii.gz", np.zeros((16, 16), np.int16))


def _four_d(d: Path) -> Path:
    return write_nifti(d / "series4d.nii.gz", np.zeros((8, 8, 8, 3), np.int16))


def _five_d(d: Path) -> Path:
    return write_nifti(d / "vector5d.nii.gz", np.zeros((8, 8, 8, 1, 3), np.float32))


def _zero_axis(d: Path) -> Path:
    return write_nifti(d / "zero.nii.gz", np.zeros((8, 0, 8), np.int16))


def _singular(d: Path) -> Path:
    affine = AFFINE.copy()
    affine[:3, 1] = affine[:3, 0]  # two voxel axes pointing the same way
    return write_nifti(d / "singular.nii.gz", _phantom(), affine)


def _zero_spacing(d: Path) -> Path:
    img = nib.Nifti1Image(_phantom(), None)
    img.header.set_zooms((1.0, 0.0, 1.0))
    img.header.set_qform(None, 0)
    img.header.set_sform(None, 0)
    nib.save(img, str(d / "flat.nii.gz"))
    return d / "flat.nii.gz"


def _all_nan(d: Path) -> Path:
    return write_nifti(d / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32))


def _huge(d: Path) -> Path:
    """A valid small file whose header claims 30000^3 voxels (about 108 TB as float32)."""
    path = write_nifti(d / "huge.nii", _phantom())
    raw = bytearray(path.read_bytes())
    raw[40:56] = np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], "<i2").tobytes()  # dim[0..7]
    path.write_bytes(bytes(raw))
    return path


def _patched_header(d: Path, name: str, offset: int, values: np.ndarray) -> Path:
    """A valid small file with header bytes from `offset` replaced by `values` (a corrupt header)."""
    path = write_nifti(d / name, _phantom())
    raw = bytearray(path.read_bytes())
    raw[offset:offset + values.nbytes] = values.tobytes()
    path.write_bytes(bytes(raw))
    return path


def _negative_axis(d: Path) -> Path:
    return _patched_header(d, "negative.nii", 42, np.array([-10], "<i2"))  # dim[1]


def _bad_dim0(d: Path) -> Path:
    # dim[0] = 9: nibabel would take the header for byte-swapped and complain about other fields
    return _patched_header(d, "dim0.nii", 40, np.array([9], "<i2"))


def _vox_offset_zero(d: Path) -> Path:
    # vox_offset 0 (an "unset" some writers leave): nibabel would read the header bytes as the first voxels
    return _patched_header(d, "offset0.nii", 108, np.array([0.0], "<f4"))


def _bad_quaternion(d: Path) -> Path:
    path = write_nifti(d / "quaternion.nii", _phantom())
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([1, 0], "<i2").tobytes()  # qform_code 1, sform_code 0: the qform alone places it
    raw[256:268] = np.array([0.9, 0.9, 0.9], "<f4").tobytes()  # quatern_b, c, d: length 1.56, above 1
    path.write_bytes(bytes(raw))
    return path


def _infinite_pixdim(d: Path) -> Path:
    path = write_nifti(d / "infinite.nii", _phantom())
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([1, 0], "<i2").tobytes()  # qform_code 1, sform_code 0: pixdim gives the spacing
    raw[80:84] = np.array([np.inf], "<f4").tobytes()  # pixdim[1]: numpy warned on stderr as nibabel used it
    path.write_bytes(bytes(raw))
    return path


def _datatype(d: Path, name: str, code: int, bitpix: int) -> Path:
    # A type nibabel does not read (binary, float128: "data code 1 not supported") or one we do not (complex, RGB)
    return _patched_header(d, name, 70, np.array([code, bitpix], "<i2"))  # datatype, bitpix


def _nan_intercept(d: Path) -> Path:
    return _patched_header(d, "nan_inter.nii", 112, np.array([1.0, np.nan], "<f4"))  # scl_slope, scl_inter


BAD_CASES = {
    "png": (_png, "PNG"),
    "text": (_text, "text file"),
    "dicom": (_dicom, "DICOM"),
    "empty": (_empty, "empty"),
    "truncated_gz": (_truncated, "truncated"),
    "truncated_nii": (_truncated_plain, "truncated"),
    "gzip_garbage": (_gzip_garbage, "not a NIfTI"),
    "2d": (_two_d, "2-D"),
    "4d": (_four_d, "4-D"),
    "5d": (_five_d, "5-D"),
    "zero_axis": (_zero_axis, "zero-length"),
    "singular": (_singular, "singular"),
    "zero_spacing": (_zero_spacing, "singular"),
    "all_nan": (_all_nan, "NaN"),
    "huge": (_huge, "MAX_VOXELS"),
    "negative_axis": (_negative_axis, "negative axis length"),
    "bad_dim0": (_bad_dim0, "dim[0]"),
    "vox_offset_zero": (_vox_offset_zero, "vox_offset"),
    "bad_quaternion": (_bad_quaternion, "quaternion"),
    "infinite_pixdim": (_infinite_pixdim, "voxel spacing is not finite"),
    "binary": (lambda d: _datatype(d, "binary.nii", 1, 1), "binary (NIfTI datatype 1) is not supported; re-export"),
    "float128": (lambda d: _datatype(d, "f128.nii", 1536, 128), "float128 (NIfTI datatype 1536) is not supported; "
                                                                 "re-export the image with one integer or float"),
    "complex64": (lambda d: _datatype(d, "complex.nii", 32, 64), "complex64 (NIfTI datatype 32) is not supported; "
                                                                 "re-export"),
    "rgb24": (lambda d: _datatype(d, "rgb.nii", 128, 24), "RGB (NIfTI datatype 128) is not supported; re-export"),
    "nan_scl_inter": (_nan_intercept, "scl_inter is nan (scl_slope 1), so the voxel values are unknown; set scl_inter"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_refused_with_one_line_and_left_untouched(case, tmp_path):
    build, words = BAD_CASES[case]
    path = build(tmp_path)
    before = sha(path)
    tracemalloc.start()
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy or nibabel warning would be a second line on stderr
        io.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(info.value)
    assert words in message and "\n" not in message
    assert str(path) in message  # says which file
    assert peak < 50e6  # refused before allocating the claimed volume
    assert sha(path) == before


@pytest.mark.parametrize("orientation", ["RRS", "XYZ", "RA", "RASL", ""])
def test_an_orientation_without_one_code_per_axis_is_refused(orientation, tmp_path):
    path = write_nifti(tmp_path / "ct.nii.gz", _phantom())
    for call in (io.load, io.header_grid):
        with pytest.raises(ValueError, match="one each of L/R, A/P and S/I"):
            call(path, orientation=orientation)
    assert io.load(path, orientation="lpi").orientation == "LPI"


def test_header_repairs_by_nibabel_become_one_warning_not_stderr_lines(tmp_path, capfd):
    path = write_nifti(tmp_path / "negative_pixdim.nii", _phantom(), sform_code=0)
    raw = bytearray(path.read_bytes())
    raw[80:84] = np.array([-2.0], "<f4").tobytes()  # pixdim[1] < 0, with the qform alone giving the grid
    path.write_bytes(bytes(raw))
    volume = io.load(path)
    assert capfd.readouterr().err == ""
    assert [w for w in volume.warnings if "nibabel repaired the header (pixdim" in w], volume.warnings


def test_a_slope_beyond_float32_gives_no_numpy_warning_only_ours(tmp_path):
    stored = _phantom()
    stored[:2] = 0  # zero stays finite at any slope; the rest overflows
    path = write_scaled(tmp_path / "overflow.nii.gz", stored, 1e38, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered" would fail here
        volume = io.load(path)
    assert any("non-finite voxels" in w for w in volume.warnings)


@pytest.mark.parametrize("slope, inter", [(1.0, -1024.0), (0.37, -1000.3)])
def test_a_scaled_int16_ct_is_read_without_a_float64_copy_of_it(tmp_path, monkeypatch, slope, inter):
    """Scanners store CT as int16 with scl_slope/scl_inter. nibabel scales such voxels in float64 under numpy 2:
    read in one go, that was 8 bytes a voxel beside the float32 result (12 bytes a voxel at the peak, 900 MB for
    a 512 x 512 x 300 CT on a shared viewer). A slab at a time: the same values, bit for bit, in 6 bytes a voxel."""
    monkeypatch.setattr(io.reading, "_SCALE_VOXELS", 2**14)  # many slabs in a small file; where _read_scaled reads it
    stored = np.random.default_rng(0).integers(-1024, 3000, size=(64, 64, 200)).astype(np.int16)
    path = write_scaled(tmp_path / "ct.nii.gz", stored, slope, inter, np.diag([0.8, 0.8, 1.5, 1.0]))  # RAS
    io.load(path)  # imports and caches out of the count
    tracemalloc.start()
    try:
        volume = io.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * stored.size, f"{peak / stored.size:.1f} bytes per voxel"
    expected = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)  # nibabel's own, all at once
    assert volume.array.dtype == np.float32
    assert volume.array.tobytes() == np.ascontiguousarray(expected.transpose(2, 1, 0)).tobytes()


def test_data_that_ends_early_is_named_without_a_dangling_from(tmp_path):
    path = write_nifti(tmp_path / "offset.nii", _phantom())
    raw = bytearray(path.read_bytes())
    raw[108:112] = np.array([1e6], "<f4").tobytes()  # vox_offset past the end of the file
    path.with_suffix(".nii.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        io.load(path.with_suffix(".nii.gz"))
    assert "from )" not in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.load(tmp_path / "absent.nii.gz")


def test_nifti_content_with_wrong_name_is_refused(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", _phantom())
    renamed = path.rename(tmp_path / "scan.nii")  # gzip data behind a .nii name
    with pytest.raises(ValueError, match="rename it"):
        io.load(renamed)


def test_four_d_with_one_volume_is_squeezed_with_a_warning(tmp_path):
    data = _phantom()
    path = write_nifti(tmp_path / "one.nii.gz", data[..., None])
    volume = io.load(path)
    np.testing.assert_array_equal(volume.array, io.load(write_nifti(tmp_path / "three.nii.gz", data)).array)
    assert any("4-D" in w for w in volume.warnings)


def test_non_finite_voxels_are_replaced_by_the_minimum_and_reported(tmp_path):
    data = _phantom().astype(np.float32)
    data[1, 1, 1], data[2, 2, 2], data[3, 3, 3] = np.nan, np.inf, -np.inf
    volume = io.load(write_nifti(tmp_path / "nan.nii.gz", data))
    assert np.isfinite(volume.array).all()
    finite_min = np.nanmin(np.where(np.isfinite(data), data, np.nan))
    assert volume.array.min() == finite_min
    assert (volume.array == finite_min).sum() == (data == finite_min).sum() + 3
    assert any("replaced 3 non-finite voxels (NaN/Inf)" in w for w in volume.warnings)
    single = data.copy()
    single[2, 2, 2] = single[3, 3, 3] = 0
    one = io.load(write_nifti(tmp_path / "one_nan.nii.gz", single))
    assert any("replaced 1 non-finite voxel (NaN/Inf) by" in w for w in one.warnings), one.warnings
    # An uncompressed file opened as a read-only memory map: the replacement goes to a copy.
    plain = write_nifti(tmp_path / "nan.nii", data)
    before = sha(plain)
    mapped = io.from_image(nib.load(str(plain), mmap="r"))
    np.testing.assert_array_equal(mapped.array, volume.array)
    assert sha(plain) == before


def test_a_header_without_orientation_codes_is_warned_about(tmp_path):
    path = write_nifti(tmp_path / "ok.nii.gz", _phantom())
    assert not any("qform_code" in w for w in io.load(path).warnings)
    img = nib.load(str(path))
    header = img.header.copy()
    header["qform_code"] = header["sform_code"] = 0  # nibabel then guesses from pixdim alone
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), str(tmp_path / "nocodes.nii.gz"))
    assert nib.load(str(tmp_path / "nocodes.nii.gz")).header["sform_code"] == 0
    assert any("left and right may be swapped" in w for w in io.load(tmp_path / "nocodes.nii.gz").warnings)


def test_a_sheared_grid_is_warned_about_and_a_rotated_one_is_not(tmp_path):
    """Gantry tilt left in the affine: the slices slide along y. Everything downstream takes the grid as
    rectangular, and the statistics' volumes come out 1/cos(tilt) too large."""
    tilt = np.radians(20)
    sheared = np.diag([2.0, 2.0, 3.0, 1.0])
    sheared[:3, 2] = (0.0, 3.0 * np.sin(tilt), 3.0 * np.cos(tilt))  # slice 3 mm apart along z, shifted along y
    volume = io.load(write_nifti(tmp_path / "tilted.nii.gz", _phantom(), sheared))
    said = [w for w in volume.warnings if "not perpendicular" in w]
    assert len(said) == 1 and "20.0 degrees" in said[0] and "6% too large" in said[0], volume.warnings
    rotation = np.eye(4)
    rotation[:3, :3] = [[np.cos(tilt), -np.sin(tilt), 0], [np.sin(tilt), np.cos(tilt), 0], [0, 0, 1]]
    for affine in (AFFINE, rotation @ AFFINE):  # permuted, flipped, oblique: all still perpendicular
        assert not any("perpendicular" in w for w in io.load(write_nifti(tmp_path / "ok.nii.gz", _phantom(),
                                                                          affine)).warnings)


@pytest.mark.parametrize("unit, scale", [("meter", 1e-3), ("micron", 1e3)])
def test_spatial_units_other_than_millimetres_are_converted(unit, scale, tmp_path):
    img = nib.Nifti1Image(_phantom().transpose(2, 1, 0), np.diag([2.5 * scale, 2.0 * scale, 3.0 * scale, 1.0]))
    img.header.set_xyzt_units(unit)
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(img, str(path))
    volume = io.load(path)
    np.testing.assert_allclose(volume.spacing, (3.0, 2.0, 2.5))
    assert any(f"distances in {unit}s; converted to millimetres" in w for w in volume.warnings)


@pytest.mark.parametrize("unit, words", [("micron", "spans only"), ("meter", "MAX_TARGET_VOXELS")])
def test_a_size_refused_for_a_header_in_another_unit_names_the_unit(unit, words, tmp_path):
    """A CT in mm whose header says microns (xyzt_units) spans a fraction of a millimetre, one in meters kilometres:
    the one-line refusal says the unit is the likely cause (the warning that says so was lost when it raised)."""
    from unetrpp.preprocess import Preprocessing, prepare

    img = nib.Nifti1Image(_phantom(), AFFINE)
    img.header.set_xyzt_units(unit)
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(ValueError) as info:
        prepare(io.load(path), Preprocessing())
    message = str(info.value)
    assert words in message and f"distances in {unit}s (xyzt_units)" in message, message
    assert "set xyzt_units to mm" in message and "\n" not in message
    assert io.unit_note(path) == io.unit_note(io.load(path)) and unit in io.unit_note(path)
    assert io.unit_note(write_nifti(tmp_path / "mm.nii.gz", _phantom())) == ""  # a header in mm: nothing to add


@pytest.mark.parametrize("encoding", ["int16", "int32", "float32", "float64", "scaled_int16", "nifti2", "plain_nii"])
def test_on_disk_encoding_does_not_change_the_values(encoding, tmp_path):
    hu = _phantom()
    reference = io.load(write_nifti(tmp_path / "ref.nii.gz", hu))
    name = "case.nii" if encoding == "plain_nii" else "case.nii.gz"
    if encoding == "scaled_int16":
        stored = ((hu.astype(np.int32) + 1024) // 2).astype(np.int16)  # HU = 2 * stored - 1024
        hu_even = stored.astype(np.float64) * 2 - 1024
        reference = io.load(write_nifti(tmp_path / "even.nii.gz", hu_even.astype(np.int16)))
        write_scaled(tmp_path / name, stored, 2.0, -1024.0)
        proxy = nib.load(str(tmp_path / name)).dataobj
        assert (proxy.slope, proxy.inter, proxy.dtype) == (2.0, -1024.0, np.int16)
    elif encoding == "nifti2":
        write_nifti(tmp_path / name, hu, cls=nib.Nifti2Image)
    else:
        write_nifti(tmp_path / name, hu.astype(encoding if encoding != "plain_nii" else np.int16))
    volume = io.load(tmp_path / name)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)


def test_load_reorients_to_the_requested_axes(tmp_path):
    data = _phantom()
    volume = io.load(write_nifti(tmp_path / "a.nii.gz", data), orientation="RAS")
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.spacing == (1.5, 3.0, 2.0)  # (z, y, x): AFFINE maps i->S 1.5 mm, j->A 3 mm, k->L 2 mm
    # every voxel keeps its world position: compare world coordinates of the maxima
    src_world = AFFINE @ np.r_[np.unravel_index(np.argmax(data), data.shape), 1]
    zyx = np.unravel_index(np.argmax(volume.array), volume.shape)
    np.testing.assert_allclose(volume.affine @ np.r_[zyx[::-1], 1], src_world)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_header_grid_is_the_grid_load_gives(orientation, tmp_path):
    """Shape and spacing from the header alone (what the Space sizes its GPU request by), for axes
    permuted and flipped, an oblique affine and a header in microns."""
    rng = np.random.default_rng(1)
    rotation = np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]])
    for case in range(6):
        affine = np.eye(4)
        affine[:3, :3] = np.zeros((3, 3))
        for i, (axis, sign) in enumerate(zip(rng.permutation(3), rng.choice([-1, 1], 3))):
            affine[axis, i] = sign * rng.uniform(0.5, 4.0)
        if case % 2:
            affine[:3, :3] = rotation @ affine[:3, :3]
        img = nib.Nifti1Image(_phantom(tuple(int(n) for n in rng.integers(3, 12, 3)), seed=case), affine)
        if case == 4:
            img.header.set_xyzt_units("micron")
        path = tmp_path / f"case{case}.nii.gz"
        nib.save(img, path)
        volume = io.load(path, orientation=orientation)
        shape, spacing = io.header_grid(path, orientation)
        assert shape == volume.shape
        np.testing.assert_allclose(spacing, volume.spacing, rtol=1e-6)


def test_header_grid_refuses_what_load_refuses(tmp_path):
    flat = _zero_spacing(tmp_path)  # nibabel would invent 1 mm
    odd = write_nifti(tmp_path / "odd.nii", _phantom())
    raw = bytearray(odd.read_bytes())
    raw[70:72] = np.array([12345], "<i2").tobytes()  # datatype: no such code
    odd.write_bytes(bytes(raw))
    for path, words in ((flat, "zero voxel spacing"), (odd, "cannot read the NIfTI header"),
                        (_vox_offset_zero(tmp_path), "vox_offset"), (_bad_quaternion(tmp_path), "quaternion"),
                        (_datatype(tmp_path, "binary.nii", 1, 1), "voxel type binary"),
                        (_nan_intercept(tmp_path), "scl_inter is nan")):
        for read in (io.load, io.header_grid):
            with pytest.raises(ValueError, match=words):
                read(path)


def test_save_mask_never_replaces_a_file_it_did_not_write(tmp_path):
    """Not the scan itself, not someone's JSON beside it; its own mask and side-car, yes (a rerun)."""
    path = write_nifti(tmp_path / "ct.nii.gz", _phantom())
    volume = io.load(path)
    mask = (volume.array > 100).astype(np.uint8)
    before = sha(path)
    with pytest.raises(ValueError, match=r"ct.nii.gz exists and is not a mask written by unetrpp \(the scan itself\?\)"):
        io.save_mask(mask, volume, path, label_names=("background", "bone"))
    assert sha(path) == before and not (tmp_path / "ct.json").exists()
    (tmp_path / "mask.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="mask.json exists and is not a label side-car"):
        io.save_mask(mask, volume, tmp_path / "mask.nii.gz", label_names=("background", "bone"))
    assert (tmp_path / "mask.json").read_text() == '{"mine": true}' and not (tmp_path / "mask.nii.gz").exists()
    io.save_mask(mask, volume, tmp_path / "mask.nii.gz")  # no side-car asked for: the JSON is not touched
    io.save_mask(mask, volume, tmp_path / "mask.nii.gz")  # its own mask is replaced
    assert (tmp_path / "mask.json").read_text() == '{"mine": true}'


def test_save_mask_keeps_grid_header_codes_and_records_labels(tmp_path):
    data = _phantom()
    path = write_nifti(tmp_path / "ct.nii", data)
    path_hdr = nib.load(str(path)).header
    volume = io.load(path)
    mask = (volume.array > 100).astype(np.uint8) * 2 + (volume.array > 0)
    out = io.save_mask(mask, volume, tmp_path / "mask.nii.gz", label_names=("background", "tissue", "bright"))
    img = nib.load(str(out))
    assert img.shape == data.shape and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, nib.load(str(path)).affine)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x", "srow_y", "srow_z",
                "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(img.header[key], path_hdr[key])
    on_disk = np.asarray(img.dataobj)
    np.testing.assert_array_equal(on_disk, (data > 100) * 2 + (data > 0))  # back on the (i, j, k) grid
    side = json.loads((tmp_path / "mask.json").read_text())
    assert [e["name"] for e in side["labels"]] == ["background", "tissue", "bright"]
    (tmp_path / "mask.json").unlink()
    assert io.read_label_names(out) == ("background", "tissue", "bright")  # from the NIfTI extension
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii", "mask.nii.gz"]  # no temporary files


def test_an_image_in_memory_without_an_affine_is_told_to_get_one_not_to_fix_a_header():
    with pytest.raises(ValueError, match=r"no affine \(made with affine=None\).*Nifti1Image\(data, affine\)"):
        io.from_image(nib.Nifti1Image(_phantom(), None))


def test_an_image_in_memory_gets_its_mask_on_its_affine_even_when_its_header_lags_behind(tmp_path):
    """img.affine is what the image was read with and what nibabel saves it with; a header changed apart
    from it (or an affine changed in place) must not carry the mask somewhere else."""
    flipped = AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[:3, 3] += 40.0
    changed_header = nib.Nifti1Image(_phantom(), AFFINE)
    changed_header.header.set_sform(flipped, 1)
    changed_affine = nib.Nifti1Image(_phantom(), AFFINE)
    changed_affine.affine[:] = flipped
    for name, img in (("header", changed_header), ("affine", changed_affine)):
        volume = io.from_image(img)
        out = io.save_mask((volume.array > 0).astype(np.uint8), volume, tmp_path / f"{name}.nii.gz")
        nib.save(img, str(tmp_path / f"{name}_scan.nii.gz"))
        np.testing.assert_allclose(nib.load(str(out)).affine, img.affine, err_msg=name)
        np.testing.assert_allclose(nib.load(str(tmp_path / f"{name}_scan.nii.gz")).affine, img.affine)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), _phantom() > 0)


def test_a_written_mask_with_many_label_names_reads_back(tmp_path):
    """The label-name extension can be longer than the header's 544 bytes; reading must not choke on it."""
    volume = io.load(write_nifti(tmp_path / "ct.nii.gz", _phantom()))
    names = ("background",) + tuple(f"organ number {i}" for i in range(1, 14))
    mask = (np.arange(volume.array.size).reshape(volume.shape) % 14).astype(np.uint8)
    out = io.save_mask(mask, volume, tmp_path / "mask.nii.gz", label_names=names)
    np.testing.assert_array_equal(io.load(out, dtype=np.uint8).array, mask)
    assert io.read_label_names(out) == names


@pytest.mark.parametrize("name", ["mask.Nii", "mask.Nii.Gz", "MASK.NII", "mask.nii.GZ"])
def test_a_mask_named_with_an_extension_in_any_case_holds_the_mask(name, tmp_path):
    """nibabel lowercases a mixed-case extension: it wrote beside the temporary file, and the empty temporary
    file became the mask (0 bytes, the real one left as a hidden .tmp.nii)."""
    data = _phantom()
    volume = io.load(write_nifti(tmp_path / "ct.nii.gz", data))
    out = io.save_mask((volume.array > 0).astype(np.uint8), volume, tmp_path / name, label_names=("bg", "body"))
    raw = out.read_bytes()
    img = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if name.lower().endswith(".gz") else raw)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data > 0)
    assert {p.name for p in tmp_path.iterdir()} == {"ct.nii.gz", name, io.sidecar_path(out).name}  # no stray file


@pytest.mark.parametrize("name", ["scan.Nii", "scan.Nii.Gz", "SCAN.NII.gz"])
def test_a_scan_named_with_an_extension_in_any_case_is_read_and_its_mask_replaced_on_a_rerun(name, tmp_path):
    """nib.load lowercases a mixed-case extension and then looked for scan.nii, a file that is not there."""
    data = _phantom()
    plain = write_nifti(tmp_path / "plain.nii", data)
    path = tmp_path / name
    path.write_bytes(gzip.compress(plain.read_bytes()) if name.lower().endswith(".gz") else plain.read_bytes())
    plain.unlink()
    volume = io.load(path)
    assert io.header_grid(path) == (volume.shape, volume.spacing)
    mask = (volume.array > 0).astype(np.uint8)
    for _ in range(2):  # the rerun replaces its own mask, which it must recognise
        out = io.save_mask(mask, volume, tmp_path / name.replace("scan", "mask").replace("SCAN", "MASK"),
                           label_names=("bg", "body"))
    np.testing.assert_array_equal(io.load(out).array, mask)
    assert io.read_label_names(out) == ("bg", "body") and io.written_by_save_mask(out)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    volume = io.load(write_nifti(tmp_path / "ct.nii.gz", _phantom()))
    mask = np.zeros(volume.shape, np.uint8)

    def full_disk(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.writing.nib, "save", full_disk)
    with pytest.raises(ValueError, match="No space left") as info:
        io.save_mask(mask, volume, tmp_path / "mask.nii.gz", label_names=("a",))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_a_file_windows_will_not_replace_is_named_with_the_fix(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (a statistics table open in Excel): the
    error said to choose a writable output folder with free space; the old table and nothing else stays."""
    from unetrpp.postprocess import write_statistics

    table = write_statistics(tmp_path / "stats.csv", "label,name,voxels,volume_ml,mean_hu\n")
    before = table.read_bytes()

    def held_open(src, dst):  # what os.replace raises on Windows (WinError 32) for a file open elsewhere
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(io.writing.os, "replace", held_open)
    with pytest.raises(ValueError, match="stats.csv .*being used by another process.*; close it in the program "
                                         "that has it open") as info:
        write_statistics(table, "label,name,voxels,volume_ml,mean_hu\n1,spleen,8,0.1,40.0\n")
    assert "\n" not in str(info.value) and "free space" not in str(info.value)
    assert table.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv"]


@pytest.mark.parametrize("target, words", [("missing_dir/mask.nii.gz", "does not exist"),
                                           ("ct.nii.gz/mask.nii.gz", "does not exist"),
                                           ("mask.png", "must end with")])
def test_unwritable_output_paths_are_refused(target, words, tmp_path):
    source = write_nifti(tmp_path / "ct.nii.gz", _phantom())
    before = sha(source)
    volume = io.load(source)
    with pytest.raises((ValueError, FileNotFoundError), match=words):
        io.save_mask(np.zeros(volume.shape, np.uint8), volume, tmp_path / target)
    assert sha(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc as an unwritable folder")
def test_read_only_folder_is_refused(tmp_path):
    volume = io.load(write_nifti(tmp_path / "ct.nii.gz", _phantom()))
    with pytest.raises(ValueError, match="writable"):
        io.save_mask(np.zeros(volume.shape, np.uint8), volume, Path("/proc/mask.nii.gz"))


def test_mask_must_match_the_volume_grid(tmp_path):
    volume = io.load(write_nifti(tmp_path / "ct.nii.gz", _phantom()))
    with pytest.raises(ValueError, match="differs"):
        io.save_mask(np.zeros((3, 3, 3), np.uint8), volume, tmp_path / "m.nii.gz")


def test_a_short_uncompressed_file_is_refused_before_its_voxels_are_allocated(tmp_path):
    """A 1 KB .nii whose header claims 400 x 512 x 512 float32 voxels (400 MB): on a shared server the reader
    allocated the header's array before finding the data missing."""
    import tracemalloc

    path = write_nifti(tmp_path / "small.nii", _phantom())
    raw = bytearray(path.read_bytes()[:1024])
    raw[40:56] = np.array([3, 400, 512, 512, 1, 1, 1, 1], "<i2").tobytes()  # dim
    raw[70:72] = np.array([16], "<i2").tobytes()  # datatype float32
    raw[72:74] = np.array([32], "<i2").tobytes()  # bitpix
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="truncated or corrupt") as info:
            io.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "the file holds 1,024" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated for a 1 KB file"


@pytest.mark.parametrize("killed_in", ["mask", "label side-car"])
def test_a_save_killed_part_way_leaves_no_finished_mask(tmp_path, killed_in):
    """predict --skip-existing takes a mask as done when `finished_mask` says so: a run killed while writing (SIGKILL,
    a reboot, a job's time limit: no Python cleanup runs) must leave nothing that passes for one."""
    import os
    import subprocess
    import sys

    scan = write_nifti(tmp_path / "ct.nii.gz", _phantom())
    mask = tmp_path / "out" / "ct.nii.gz"
    mask.parent.mkdir()
    # the real writer writes the whole temporary file, then the process dies before it is moved into place
    code = (f"import os, signal, nibabel as nib, numpy as np\nfrom unetrpp import io\n"
            f"volume = io.load({str(scan)!r})\n"
            f"real_save, real_text = nib.save, io.writing.Path.write_text\n"
            f"def killed(write):\n"
            f"    def wrapper(*a, **k):\n        write(*a, **k)\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"    return wrapper\n"
            f"if {killed_in == 'mask'}:\n    nib.save = killed(real_save)\n"
            f"else:\n    io.writing.Path.write_text = killed(real_text)\n"
            f"io.save_mask((volume.array > 100).astype(np.uint8), volume, {str(mask)!r}, ('background', 'bone'))\n")
    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == -9, done.stderr[-2000:]
    left = sorted(p.name for p in mask.parent.iterdir())
    expected = ["ct.nii.gz"] if killed_in == "label side-car" else []  # the mask was in place, its side-car not
    assert [name for name in left if not name.startswith(".")] == expected, left
    assert any(name.startswith(".ct.") and ".tmp" in name for name in left)  # the temporary file it was writing
    assert not io.finished_mask(mask, scan)


def test_finished_mask_is_a_whole_mask_of_that_scan(tmp_path):
    """A finished mask: ours, with its side-car, on the scan's grid; not someone's file, nor a mask of another scan."""
    scan = write_nifti(tmp_path / "ct.nii.gz", _phantom())
    volume = io.load(scan)
    out = tmp_path / "out"
    out.mkdir()
    mask = io.save_mask((volume.array > 100).astype(np.uint8), volume, out / "ct.nii.gz", ("background", "bone"))
    assert io.finished_mask(mask, scan)
    assert not io.finished_mask(out / "missing.nii.gz", scan) and not io.finished_mask(mask, tmp_path / "gone.nii.gz")
    other = io.load(write_nifti(tmp_path / "other.nii.gz", _phantom()[:-1]))  # another scan, saved under this name
    io.save_mask(np.zeros(other.shape, np.uint8), other, mask, ("background", "bone"))
    assert not io.finished_mask(mask, scan)
    foreign = write_nifti(out / "ct.nii.gz", np.zeros(_phantom().shape, np.uint8))  # a mask some other tool wrote
    assert not io.finished_mask(foreign, scan)


def test_finished_mask_of_a_scan_named_with_a_mixed_case_extension(tmp_path):
    """scan.Nii.Gz is read by its own name (nib.load would look for scan.nii.gz), so its mask counts as finished."""
    scan = write_nifti(tmp_path / "ct.nii.gz", _phantom()).rename(tmp_path / "CT.Nii.Gz")
    volume = io.load(scan)
    mask = io.save_mask((volume.array > 100).astype(np.uint8), volume, tmp_path / "ct_mask.nii.gz", ("background", "bone"))
    assert io.finished_mask(mask, scan)
