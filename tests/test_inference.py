"""unetrpp.inference / preprocess / postprocess: grids, orientations, encodings, warnings, options.

Networks are tiny, randomly initialised (torch.manual_seed(0)) and fixed: the tests check geometry and
plumbing, not anatomy. Volumes are synthetic phantoms built here, plus the real CT fixture.
"""

from __future__ import annotations

import csv
import itertools
import json
import types

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_io import write_nifti, write_scaled

from unetrpp import Preprocessing, create_model, io
from unetrpp.devices import resolve_device
from unetrpp.inference import count_windows, ct_warning, large_scan_warning, segment, window_starts
from unetrpp.postprocess import largest_component, organ_statistics, statistics_csv_text
from unetrpp.preprocess import normalize, prepare, resample, resample_torch

ISO = np.diag([3.0, 3.0, 3.0, 1.0])
ISO[:3, 3] = (-20.0, 10.0, 5.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(spacing=(2.0, 2.0, 2.0), **overrides):
    """A fixed tiny UNETR++ (random weights, seed 0) with a 16x32x32 window: fast on CPU."""
    torch.manual_seed(0)
    return create_model("unetrpp_tiny", patch_size=(16, 32, 32), preprocessing=Preprocessing(spacing=spacing),
                        **overrides)


@pytest.fixture(scope="module")
def model():
    return small_model()


def phantom_ras(shape=(10, 12, 14), seed=3) -> np.ndarray:
    """Synthetic (X, Y, Z) CT-like volume (HU) with asymmetric blobs, so every flip shows. Not real data."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000.0, np.float32)
    data[1:-1, 2:-1, 1:-2] = 30
    data[2:5, 3:9, 2:6] = 250
    data[6:9, 4:7, 8:12] = -200
    return (data + rng.normal(0, 40, shape)).astype(np.float32)


# ---- geometry --------------------------------------------------------------------------------------
def test_real_ct_mask_has_the_input_grid(tmp_path, fixtures):
    source = fixtures / "example_ct_sm.nii.gz"
    torch.manual_seed(0)
    coarse = create_model("unetrpp_tiny", preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)))
    result = segment(source, model=coarse)
    out = nib.load(str(result.save(tmp_path / "mask.nii.gz")))
    src = nib.load(str(source))
    assert out.shape == src.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, src.affine)
    assert result.mask.shape == result.volume.shape and result.warnings == []
    np.testing.assert_array_equal(result.affine, src.affine)
    np.testing.assert_array_equal(result.mask_on_source_grid(), np.asarray(out.dataobj))
    assert io.read_label_names(tmp_path / "mask.nii.gz") == result.class_names
    scrap = io.save_array(np.full((15, 15, 15), 40, np.int16), (1.0, 1.0, 1.0), tmp_path / "scrap.nii.gz")
    assert any("spans only 15 x 15 x 15 mm (z, y, x), under half of one network window (192 x 384 x 384 mm)" in w
               for w in segment(scrap, model=coarse).warnings)
    synthetic = create_model("unetrpp_tiny", preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)), synthetic=True)
    made_up = segment(source, model=synthetic)
    assert any("SYNTHETIC phantoms" in w for w in made_up.warnings)
    made_up.save(tmp_path / "synthetic_mask.nii.gz")  # the files say so too, side-car and NIfTI extension
    assert json.loads((tmp_path / "synthetic_mask.json").read_text())["synthetic"] is True
    extension = nib.load(str(tmp_path / "synthetic_mask.nii.gz")).header.extensions[0].get_content()
    assert json.loads(extension)["synthetic"] is True
    assert "synthetic" not in json.loads((tmp_path / "mask.json").read_text())


def test_anisotropic_volume_smaller_than_the_window(tmp_path, model):
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    path = write_nifti(tmp_path / "thin.nii.gz", phantom_ras((20, 18, 3)), affine)
    result = segment(path, model=model)
    assert result.mask.shape == (3, 18, 20) and result.windows == 1
    assert nib.load(str(result.save(tmp_path / "m.nii.gz"))).shape == (20, 18, 3)


ORIENTATIONS = [(perm, flips) for perm in itertools.permutations(range(3))
                for flips in itertools.product((1, -1), repeat=3)]  # all 48


def _reoriented(data_ras: np.ndarray, perm, flips, base=ISO):
    """The same world content stored with voxel axes permuted/flipped; returns data and affine."""
    ornt = np.array([[p, f] for p, f in zip(perm, flips)], float)  # RAS voxel axis a -> new axis perm[a]
    data = nib.orientations.apply_orientation(data_ras, ornt)
    affine = base @ nib.orientations.inv_ornt_aff(ornt, data_ras.shape)
    return data, affine


def _world_to_ras_index(affine: np.ndarray, shape, base=ISO) -> tuple[np.ndarray, ...]:
    """For each voxel of a grid with `affine`, the (i, j, k) index of the same point on the `base` grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    ras = np.rint((world - base[:3, 3]) @ np.linalg.inv(base[:3, :3]).T).astype(int)
    return tuple(ras.T)


ANISO = np.diag([2.0, 3.0, 4.5, 1.0])  # a different spacing on every axis: swapped spacings would show
ANISO[:3, 3] = (-20.0, 10.0, 5.0)


@pytest.mark.parametrize("base", [ISO, ANISO], ids=["isotropic", "anisotropic"])
def test_same_world_content_in_48_orientations_gives_the_same_world_mask(tmp_path, model, base):
    data_ras = phantom_ras()
    reference = segment(write_nifti(tmp_path / "ras.nii.gz", data_ras, base), model=model)
    ref_ijk = io.to_source_grid(reference.mask, reference.volume)  # on the RAS file's (i, j, k) grid
    assert len(np.unique(ref_ijk)) > 2  # a mask with structure, so a wrong flip would show
    for n, (perm, flips) in enumerate(ORIENTATIONS):
        data, affine = _reoriented(data_ras, perm, flips, base)
        index = _world_to_ras_index(affine, data.shape, base)
        np.testing.assert_array_equal(data.reshape(-1), data_ras[index])  # world content identical
        path = write_nifti(tmp_path / f"o{n}.nii.gz", data, affine)
        result = segment(path, model=model)
        out = nib.load(str(result.save(tmp_path / f"m{n}.nii.gz")))
        assert out.shape == data.shape
        np.testing.assert_array_equal(out.affine, affine)
        np.testing.assert_array_equal(np.asarray(out.dataobj).reshape(-1), ref_ijk[index], err_msg=str((perm, flips)))


@pytest.mark.parametrize("encoding", ["int32", "float32", "float64", "scaled_int16"])
def test_on_disk_encoding_changes_nothing(encoding, tmp_path, model):
    hu = np.rint(phantom_ras() / 2) * 2  # even integers: exact in every encoding below
    reference = segment(write_nifti(tmp_path / "int16.nii.gz", hu.astype(np.int16), ISO), model=model)
    if encoding == "scaled_int16":
        path = write_scaled(tmp_path / "s.nii.gz", ((hu + 1024) / 2).astype(np.int16), 2.0, -1024.0, ISO)
    else:
        path = write_nifti(tmp_path / f"{encoding}.nii.gz", hu.astype(encoding), ISO)
    result = segment(path, model=model)
    np.testing.assert_array_equal(result.mask, reference.mask)
    assert result.statistics == reference.statistics


# ---- warnings and refusals -------------------------------------------------------------------------
def test_mri_input_runs_with_a_warning(fixtures, tmp_path):
    result = segment(fixtures / "example_mr_sm.nii.gz", model=small_model(spacing=(6.0, 6.0, 6.0)))
    assert result.mask.shape == result.volume.shape == (20, 91, 117)
    assert any("do not look like CT" in w for w in result.warnings)
    # CT weights (the teaching weights) on an MRI: its values have no HU, so its table says mean_intensity,
    # as the viewer's does ("mean intensity"); it said mean_hu, the weights' modality
    assert result.statistics and all("mean_intensity" in s and "mean_hu" not in s for s in result.statistics)
    header = result.statistics_csv(tmp_path / "mri.csv").read_text().splitlines()[0]
    assert header == "label,name,voxels,volume_ml,mean_intensity"


def test_mri_weights_warn_about_a_ct_and_not_about_an_mri(fixtures, tmp_path):
    torch.manual_seed(0)
    mri_weights = create_model("unetrpp_tiny", patch_size=(16, 32, 32), preprocessing=Preprocessing(
        spacing=(6.0, 6.0, 6.0), modality="MRI", normalization="zscore"))
    on_ct = segment(fixtures / "example_ct_sm.nii.gz", model=mri_weights)
    assert any("as air does in a CT" in w and "weights expect MRI" in w for w in on_ct.warnings), on_ct.warnings
    on_mri = segment(fixtures / "example_mr_sm.nii.gz", model=mri_weights)
    assert not any("CT" in w for w in on_mri.warnings), on_mri.warnings
    # An MRI has no Hounsfield units: the mean is "mean_intensity" in the statistics and their table.
    assert on_mri.statistics and all("mean_intensity" in s and "mean_hu" not in s for s in on_mri.statistics)
    table = on_mri.statistics_csv(tmp_path / "mri.csv")
    assert table.read_text().splitlines()[0] == "label,name,voxels,volume_ml,mean_intensity"
    on_mri.statistics_csv(table)  # its own table is replaced on a rerun


def test_nan_voxels_are_reported_in_the_result(tmp_path, model):
    data = phantom_ras()
    data[0, 0, 0] = np.nan
    result = segment(write_nifti(tmp_path / "nan.nii.gz", data, ISO), model=model)
    assert any("non-finite" in w for w in result.warnings)


def test_weights_for_four_channels_are_refused(tmp_path):
    torch.manual_seed(0)
    four = create_model("unetrpp_tiny", in_channels=4, dims=(16, 32, 64, 128))
    with pytest.raises(ValueError, match="4 input channels"):
        segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO), model=four)


def test_device_resolution(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    for other in ("mps", "meta"):
        with pytest.raises(ValueError, match=f"runs on the CPU or on CUDA GPUs, not on '{other}' devices"):
            resolve_device(other)
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None).type == "cuda"  # CUDA is chosen whenever present


def test_a_result_is_never_saved_over_the_scan_or_a_foreign_table(tmp_path, model):
    path = write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO)
    (tmp_path / "mine.csv").write_text("patient,notes\n")
    before = path.read_bytes()
    result = segment(path, model=model)
    with pytest.raises(ValueError, match="not a mask written by unetrpp"):
        result.save(path)
    for name, words in (("a.nii.gz", "must end with .csv"), ("mine.csv", "not a statistics table")):
        with pytest.raises(ValueError, match=words):
            result.statistics_csv(tmp_path / name)
    assert path.read_bytes() == before and (tmp_path / "mine.csv").read_text() == "patient,notes\n"
    result.statistics_csv(tmp_path / "stats.csv")
    result.statistics_csv(tmp_path / "stats.csv")  # its own table is replaced


@pytest.mark.parametrize("kwargs, words", [({"overlap": 1.0}, "overlap"), ({"overlap": "a"}, "overlap='a': must be a number"),
                                           ({"overlap": None}, "overlap=None: must be a number"),
                                           ({"overlap": float("nan")}, "overlap"), ({"sw_batch_size": 0}, "sw_batch_size")])
def test_bad_options_are_refused(kwargs, words, tmp_path, model):
    with pytest.raises(ValueError, match=words):
        segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO), model=model, **kwargs)


def test_a_nibabel_image_that_is_not_nifti_is_refused_with_the_conversion(tmp_path, model):
    """A .hdr/.img pair loaded with nibabel is a Nifti1Pair: "give a nibabel image" was no answer to it."""
    path = tmp_path / "pair.img"
    nib.save(nib.Nifti1Pair(phantom_ras(), ISO), str(path))
    pair = nib.load(str(path))
    with pytest.raises(TypeError, match=r"Nifti1Pair: give a nibabel Nifti1Image .*Nifti1Image\.from_image"):
        segment(pair, model=model)
    with pytest.raises(TypeError, match="image of type list: give a path"):
        segment([1, 2], model=model)
    result = segment(nib.Nifti1Image.from_image(pair), model=model)  # the fix it names works
    assert result.mask.shape == phantom_ras().shape[::-1]


def test_needs_model_or_weights(tmp_path):
    with pytest.raises(ValueError, match="model= .* or weights="):
        segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO))


# ---- options ---------------------------------------------------------------------------------------
def test_progress_tta_and_window_count(tmp_path, model):
    calls, forwards = [], []
    hook = model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    try:
        path = write_nifti(tmp_path / "long.nii.gz", phantom_ras((14, 14, 24)), ISO)  # z: 36 voxels at 2 mm
        result = segment(path, model=model, tta=True, sw_batch_size=2, progress=lambda f, m: calls.append((f, m)))
    finally:
        hook.remove()
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert result.windows == count_windows((36, 21, 21), (16, 32, 32), 0.5) == 4
    assert f"window {result.windows}/{result.windows}" in [m for _, m in calls]
    assert sum(forwards) == 8 * result.windows  # 8 mirrorings per window


def test_resampling_back_reports_each_class(tmp_path, model):
    """Resampling the probabilities back to the scan's grid takes about a minute for a 512 x 512 x 300 CT on two
    cores: the bar moves on with each class instead of standing at 90 % as if hung."""
    calls = []
    path = write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO)
    segment(path, model=model, progress=lambda f, m: calls.append((f, m)))
    messages = [m for _, m in calls]
    after = calls[messages.index("resampling back") + 1:messages.index("done")]
    classes = model.config.out_channels
    assert [m for _, m in after] == [f"resampling back: class {c}/{classes}" for c in range(1, classes + 1)]
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and 0.9 < after[0][0] and after[-1][0] < 1.0


def test_resampling_back_holds_no_class_map_of_the_scans_size(monkeypatch):
    """The argmax on the scan's grid keeps the best value so far (float32) and the mask (uint8), and resamples
    each class map a few slices at a time: 5 bytes per voxel and those slices, not 10 with a whole class map (400
    MB more for a 512 x 512 x 400 CT, at the peak of its segmentation); the mask is the argmax of all the maps
    resampled back."""
    import tracemalloc

    from unetrpp import inference
    from unetrpp.inference import probabilities_to_mask
    from unetrpp.preprocess import Prepared, restore

    monkeypatch.setattr(inference, "_RESTORE_VOXELS", 4 * 128 * 128)  # 4 of the 64 slices at a time
    interpolate, made = F.interpolate, []  # torch's arrays are not traced: their sizes are counted here

    def counted(*args, **kwargs):
        out = interpolate(*args, **kwargs)
        made.append(out.numel())
        return out

    monkeypatch.setattr(F, "interpolate", counted)
    probabilities = torch.softmax(torch.randn(14, 8, 16, 16, generator=torch.Generator().manual_seed(0)), 0)
    prepared = Prepared(np.zeros((8, 16, 16), np.float32), (64, 128, 128), (1.0, 1.0, 1.0), (8.0, 8.0, 8.0))
    tracemalloc.start()
    try:
        mask = probabilities_to_mask(probabilities, prepared)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 6 * mask.size, f"{peak / mask.size:.1f} bytes per voxel"
    assert made and max(made) <= 4 * 128 * 128
    every = np.stack([restore(probabilities[c].numpy(), prepared) for c in range(14)])  # scipy's zoom
    top_two = np.sort(every, 0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-5  # torch's interpolation is scipy's to float32 rounding
    assert clear.mean() > 0.999 and np.array_equal(mask[clear], every.argmax(0)[clear])


def test_resampling_back_gives_ties_to_the_lower_class():
    """The running argmax on the scan's grid equals numpy's argmax, ties included (the first class wins), for
    every label up to 20 classes; here the grids are the same, so resampling changes no value."""
    from unetrpp.inference import probabilities_to_mask
    from unetrpp.preprocess import Prepared

    quantised = torch.randint(0, 4, (20, 6, 7, 8), generator=torch.Generator().manual_seed(1)).float() / 4  # many ties
    prepared = Prepared(np.zeros((6, 7, 8), np.float32), (6, 7, 8), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0))
    mask = probabilities_to_mask(quantised, prepared)
    assert mask.dtype == np.uint8 and len(np.unique(mask)) > 10
    np.testing.assert_array_equal(mask, quantised.numpy().argmax(0))


def test_largest_component_keeps_one_blob_per_label():
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1:4, 1:5, 1:5] = 1
    mask[5, 8, 8] = 1  # a stray voxel of label 1
    mask[1:3, 6:9, 6:9] = 2
    mask[5, 0, 9] = 2
    cleaned = largest_component(mask)
    assert (cleaned == 1).sum() == 3 * 4 * 4 and (cleaned == 2).sum() == 2 * 3 * 3
    assert cleaned[5, 8, 8] == 0 and cleaned[5, 0, 9] == 0


def test_largest_component_counts_voxels_touching_at_a_corner_as_connected():
    """26-connectivity: an organ's thin part that meets the rest only diagonally (at an edge or a corner)
    belongs to it, and is kept; a blob one voxel away is not."""
    mask = np.zeros((6, 8, 8), np.uint8)
    mask[0:2, 0:2, 0:2] = 1
    mask[2, 2, 2] = mask[3, 3, 3] = 1  # a chain meeting the block at corners only
    mask[4, 4, 3] = 1  # then at an edge
    mask[5, 7, 7] = 1  # apart
    cleaned = largest_component(mask)
    assert (cleaned == 1).sum() == 8 + 3 and cleaned[5, 7, 7] == 0


def test_segment_applies_largest_component(tmp_path, model):
    path = write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO)
    plain = segment(path, model=model)
    cleaned = segment(path, model=model, largest_component=True)
    np.testing.assert_array_equal(cleaned.mask, largest_component(plain.mask))


def test_statistics_count_volume_and_mean_intensity(tmp_path):
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[0, :2, :3] = 2
    hu = np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    stats = organ_statistics(mask, hu, (2.0, 1.0, 0.5), ("background", "a", "b"))
    assert stats == [{"label": 2, "name": "b", "voxels": 6, "volume_ml": 6 * 1.0 / 1000,
                      "mean_hu": float(hu[mask == 2].mean())}]


def test_statistics_are_counted_in_slabs_without_a_copy_of_the_scan(monkeypatch):
    """A 512 x 512 x 400 CT's statistics held 1.7 GB of copies at once (labels as intp, intensities as float64),
    the peak of its whole segmentation: now a slab at a time, with the same counts and means."""
    import tracemalloc

    from unetrpp import postprocess

    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, (16, 64, 64), dtype=np.uint8)  # 65536 voxels
    hu = rng.normal(0, 300, mask.shape).astype(np.float32)
    names = ("background", "a", "b")  # label 3 has no name: reported as "label 3", as before
    monkeypatch.setattr(postprocess, "STATISTICS_SLAB", 5000)  # 14 slabs, the last one short
    tracemalloc.start()
    stats = organ_statistics(mask, hu, (2.0, 1.0, 0.5), names)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * mask.size  # it was 16 bytes a voxel
    assert [s["name"] for s in stats] == ["a", "b", "label 3"]
    for s in stats:
        inside = mask == s["label"]
        assert s["voxels"] == int(inside.sum())
        assert s["mean_hu"] == pytest.approx(float(hu[inside].astype(np.float64).mean()), rel=1e-12, abs=1e-9)


def test_statistics_csv(tmp_path, model):
    result = segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO), model=model)
    lines = result.statistics_csv(tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "label,name,voxels,volume_ml,mean_hu" and len(lines) == len(result.statistics) + 1
    assert sum(int(line.split(",")[2]) for line in lines[1:]) == int((result.mask > 0).sum())


def test_an_empty_statistics_csv_names_the_mean_as_its_scan_would(tmp_path, fixtures):
    """No organ found in an MRI: the header says mean_intensity, as its rows would have (it said mean_hu)."""
    assert statistics_csv_text([], in_hu=False) == "label,name,voxels,volume_ml,mean_intensity\n"
    assert statistics_csv_text([]) == "label,name,voxels,volume_ml,mean_hu\n"
    model = small_model(spacing=(6.0, 6.0, 6.0))
    model.register_forward_hook(lambda module, args, out: torch.cat([out[:, :1] + 100.0, out[:, 1:]], 1))
    result = segment(fixtures / "example_mr_sm.nii.gz", model=model)
    assert result.statistics == [] and not result.in_hu
    assert result.statistics_csv(tmp_path / "mri.csv").read_text() == "label,name,voxels,volume_ml,mean_intensity\n"


def test_a_statistics_csv_from_weights_trained_on_phantoms_says_so_on_every_row(tmp_path):
    """The table is often read without the page or the mask that say SYNTHETIC: it says so itself."""
    result = segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO), model=small_model(synthetic=True))
    rows = list(csv.DictReader(result.statistics_csv(tmp_path / "s.csv").open()))
    assert rows and all(row["note"] == io.SYNTHETIC_NOTE and "SYNTHETIC" in row["note"] for row in rows)
    assert [int(row["voxels"]) for row in rows] == [s["voxels"] for s in result.statistics]
    result.statistics_csv(tmp_path / "s.csv")  # its own table, note and all, is replaced on a rerun


# ---- preprocessing ---------------------------------------------------------------------------------
def test_preprocessing_follows_the_config():
    volume = io.Volume(np.linspace(-2000, 2000, 4 * 10 * 10, dtype=np.float32).reshape(4, 10, 10), (4.0, 1.0, 1.0),
                       np.eye(4))
    ct = Preprocessing(spacing=(2.0, 2.0, 2.0), clip=(-500.0, 500.0), mean=100.0, std=50.0)
    prepared = prepare(volume, ct)
    assert prepared.target_shape == (8, 5, 5)
    assert prepared.image.min() == pytest.approx((-500 - 100) / 50) and prepared.image.max() == pytest.approx(8.0)
    z = normalize(volume.array, Preprocessing(modality="MRI", normalization="zscore"))
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1.0, rel=1e-4)


def test_resampling_is_nearest_along_the_coarse_axis():
    array = np.zeros((3, 8, 8), np.float32)
    array[1] = 1.0
    up = resample(array, (9, 8, 8), order=3, coarse_axis=0)
    assert set(np.unique(up)) == {0.0, 1.0}  # no blending between slices 5 mm apart
    smooth = resample(array, (9, 8, 8), order=1, coarse_axis=None)
    assert len(np.unique(smooth)) > 2


@pytest.mark.parametrize("original_spacing, original_shape", [
    ((2.5, 0.8, 0.8), (14, 19, 21)),  # a thick-slice CT: z is coarse, and gains slices
    ((0.8, 3.1, 0.8), (20, 5, 30)),  # y coarse (a scan stored sideways), losing slices
    ((3.2, 3.0, 3.0), (11, 7, 9)),  # as coarse as the target everywhere: trilinear, no axis coarse
])
def test_resampling_back_in_two_steps_equals_scipys_zoom(original_spacing, original_shape):
    """The CPU path back to the scan's grid interpolates with torch, then repeats slices along a coarse axis:
    the values of `restore` (scipy's zoom) to float32 rounding, and the repetition commutes with an argmax."""
    from scipy import ndimage

    from unetrpp.inference import probabilities_to_mask
    from unetrpp.preprocess import Prepared, repeat_nearest, restore, restore_steps

    target = (3.0, 0.7578, 0.7578)
    target_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(original_shape, original_spacing, target))
    prepared = Prepared(np.zeros(target_shape, np.float32), original_shape, original_spacing, target)
    maps = np.random.default_rng(4).random((5,) + target_shape, dtype=np.float32)
    axis, across, in_plane, repeat = restore_steps(prepared)

    def interpolate(m: np.ndarray) -> np.ndarray:  # every slice at once, `axis` back in its place
        return in_plane(across(torch.from_numpy(m))).movedim(0, axis).contiguous().numpy()

    for m in maps:
        # torch places the samples in float32, scipy in float64: the weights differ by a rounding of the position
        np.testing.assert_allclose(repeat(interpolate(m)), restore(m, prepared), rtol=0, atol=1e-5)
    every = np.stack([restore(m, prepared) for m in maps])
    top_two = np.sort(every, 0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-5
    np.testing.assert_array_equal(probabilities_to_mask(torch.from_numpy(maps), prepared)[clear], every.argmax(0)[clear])
    labels = np.arange(np.prod(target_shape)).reshape(target_shape) % 251  # nearest neighbour along any axis
    for axis in range(3):
        size = original_shape[axis]
        zoomed = ndimage.zoom(labels, [size / n if a == axis else 1 for a, n in enumerate(target_shape)], order=0,
                              mode="nearest", grid_mode=True)
        np.testing.assert_array_equal(repeat_nearest(labels, axis, size), zoomed)


@pytest.mark.parametrize("shape, order, coarse_axis", [
    ((12, 40, 48), 3, 0),  # z keeps its size: slice by slice, as for a 3 mm CT going to 3 x 0.76 x 0.76 mm
    ((12, 40, 48), 1, None),
    ((10, 7, 9), 3, None),  # y keeps its size: slices along y
    ((9, 14, 16), 3, None),  # no axis keeps its size: slices along z in-plane, then one product along z
    ((9, 14, 16), 1, None),  # no axis keeps its size, linear: one 3-D zoom
])
def test_resampling_slice_by_slice_equals_one_3d_zoom(shape, order, coarse_axis):
    from scipy import ndimage

    array = np.random.default_rng(0).normal(size=(12, 7, 8)).astype(np.float32) * 300
    factors = [n / m for n, m in zip(shape, array.shape)]
    expected = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    if order > 1:  # clipped as scikit-image's resize: to the volume's range, or each slice's in nnU-Net's separate z
        if coarse_axis is None:
            expected = np.clip(expected, array.min(), array.max())
        else:
            expected = np.stack([np.clip(e, a.min(), a.max()) for e, a in zip(expected, array)])
    # matrix products in float64, as scipy computes: the same float32 values but for a last-bit rounding
    np.testing.assert_allclose(resample(array, shape, order=order, coarse_axis=coarse_axis), expected,
                               rtol=1e-6, atol=1e-6)


def test_cubic_resampling_of_every_axis_holds_no_copy_of_the_volume():
    """A 512 x 512 x 400 CT at 0.7 x 0.7 x 1 mm going to the teaching weights' 4 x 2.5 x 2.5 mm changes every axis:
    scipy's 3-D zoom held its padded float64 spline coefficients, 1.5 GB (14 bytes a voxel), on one thread."""
    import tracemalloc

    from scipy import ndimage

    array = np.random.default_rng(1).normal(size=(40, 96, 96)).astype(np.float32) * 300
    shape = (10, 27, 27)
    tracemalloc.start()
    got = resample(array, shape, order=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < array.nbytes / 2
    expected = ndimage.zoom(array, [n / m for n, m in zip(shape, array.shape)], order=3, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(got, np.clip(expected, array.min(), array.max()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, coarse_axis", [((12, 40, 48), 0), ((9, 14, 16), None), ((10, 7, 9), None),
                                                ((25, 5, 11), 0)])
def test_cubic_resampling_as_matrix_products_equals_scipy(shape, coarse_axis):
    """The GPU path of prepare(): one float64 product per axis gives scipy's values (run here on the CPU)."""
    array = np.random.default_rng(2).normal(size=(12, 7, 8)).astype(np.float32) * 300
    expected = resample(array, shape, order=3, coarse_axis=coarse_axis)
    got = resample_torch(torch.from_numpy(array), shape, coarse_axis, order=3)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape, coarse_axis", [((25, 5, 11), None), ((5, 9, 4), 1), ((12, 7, 8), None)])
def test_nearest_resampling_in_torch_equals_scipy_and_other_orders_are_refused(shape, coarse_axis):
    array = np.arange(12 * 7 * 8, dtype=np.float32).reshape(12, 7, 8)
    expected = resample(array, shape, order=0, coarse_axis=coarse_axis)
    np.testing.assert_array_equal(resample_torch(torch.from_numpy(array), shape, coarse_axis, order=0).numpy(), expected)
    with pytest.raises(ValueError, match="order=2"):
        resample_torch(torch.from_numpy(array), shape, coarse_axis, order=2)


def test_resampling_maps_voxels_as_nnunet_does():
    """nnU-Net v1 resamples with scikit-image's resize (order 3, edge mode, no anti-aliasing) in-plane and
    nearest neighbour along an anisotropic z: voxels are cells, source = (i + 0.5) x n_in / n_out - 0.5."""
    from skimage.transform import resize

    ramp = np.arange(4, dtype=np.float32)[None, None]  # (1, 1, 4): 0, 1, 2, 3 along x
    np.testing.assert_allclose(resample(ramp, (1, 1, 8), order=1)[0, 0],
                               [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
    image = np.random.default_rng(1).normal(size=(5, 12, 14)).astype(np.float32) * 300
    expected = np.stack([resize(s, (17, 9), order=3, mode="edge", anti_aliasing=False) for s in image])
    expected = expected[np.clip(np.floor((np.arange(9) + 0.5) * 5 / 9), 0, 4).astype(int)]  # nearest along z
    np.testing.assert_allclose(resample(image, (9, 17, 9), order=3, coarse_axis=0), expected, rtol=1e-4, atol=1e-2)


def test_prepare_resamples_the_scan_cubic_then_clips_and_normalises_as_nnunet_does():
    """nnU-Net v1 resizes the image (order 3) and only then clips and normalises: clipping first would
    interpolate between already clipped values, and linear resampling would smooth what training saw."""
    from skimage.transform import resize

    array = np.random.default_rng(7).normal(size=(6, 8, 10)).astype(np.float32) * 300
    volume = io.Volume(array, (1.5, 1.5, 1.5), np.eye(4))
    ct = Preprocessing(spacing=(1.0, 1.0, 1.0), clip=(-200.0, 250.0), mean=20.0, std=50.0)
    expected = (np.clip(resize(array, (9, 12, 15), order=3, mode="edge", anti_aliasing=False), -200, 250) - 20) / 50
    np.testing.assert_allclose(prepare(volume, ct).image, expected, rtol=1e-4, atol=1e-3)


def test_a_scan_of_thick_slices_is_resampled_nearest_along_z_and_smoothly_in_plane():
    """5 mm slices to 1 mm: nnU-Net's "separate z" copies slices along the thick axis (no blending of
    tissue 5 mm apart) and interpolates within each slice only."""
    rng = np.random.default_rng(8)
    array = rng.normal(size=(3, 6, 6)).astype(np.float32)
    volume = io.Volume(array, (5.0, 1.0, 1.0), np.eye(4))
    image = prepare(volume, Preprocessing(spacing=(1.0, 0.5, 0.5), normalization="none")).image  # (15, 12, 12)
    assert image.shape == (15, 12, 12)
    in_plane = [resample(s[None], (1, 12, 12), order=3)[0] for s in array]  # each source slice, upsampled
    for z, plane in enumerate(image):
        np.testing.assert_allclose(plane, in_plane[z * 3 // 15], rtol=1e-5, atol=1e-5)


def test_training_labels_are_resampled_as_nnunet_resizes_segmentations():
    from skimage.transform import resize

    from unetrpp.preprocess import resample_labels

    labels = np.zeros((10, 12, 14), np.uint8)
    labels[2:8, 3:9, 2:10], labels[4:6, 5:11, 6:13], labels[1:3, 1:4, 9:13] = 1, 2, 3
    expected = np.zeros((13, 9, 20), np.uint8)
    for value in (1, 2, 3):
        expected[resize((labels == value).astype(float), (13, 9, 20), order=1, mode="edge", anti_aliasing=False) >= 0.5] = value
    got = resample_labels(labels, (13, 9, 20), (1.0, 1.0, 1.0), (0.77, 1.33, 0.7))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def _nnunet_steps(size: int, patch: int, step_size: float = 0.5) -> list[int]:
    """nnU-Net v1's window starts along one axis (_compute_steps_for_sliding_window), as it writes them."""
    num_steps = int(np.ceil((size - patch) / (patch * step_size))) + 1
    actual = (size - patch) / (num_steps - 1) if num_steps > 1 else 99999999999
    return [int(np.round(actual * i)) for i in range(num_steps)]


@pytest.mark.parametrize("size, patch", [(112, 64), (400, 128), (483, 128), (64, 64), (65, 64), (200, 32),
                                         (129, 128), (96, 64)])
def test_windows_are_placed_as_nnunet_places_them(size, patch):
    assert window_starts(size, patch, 0.5) == _nnunet_steps(size, patch)
    assert window_starts(size, patch, 0.25) == _nnunet_steps(size, patch, 0.75)


class _VoxelWise(torch.nn.Module):
    """Logits that depend on each voxel's own value only (class c: c x value), so every window that
    covers a voxel predicts the same there, and the blend must give softmax(c x value) back exactly."""

    def __init__(self, patch):
        super().__init__()
        self.config = types.SimpleNamespace(patch_size=patch, out_channels=3)
        self.scale = torch.nn.Parameter(torch.arange(3.0).view(1, 3, 1, 1, 1))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("shape", [(20, 30, 25), (5, 30, 7)])  # the second is smaller than a window: padded
def test_blended_windows_land_where_they_were_cut(shape):
    from unetrpp.inference import sliding_window_probabilities

    image = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    with torch.inference_mode():
        probs = sliding_window_probabilities(_VoxelWise((8, 16, 16)), image, torch.device("cpu"), sw_batch_size=2)
    expected = torch.softmax(torch.from_numpy(image)[None] * torch.arange(3.0).view(3, 1, 1, 1), dim=0)
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


class _WindowMean(torch.nn.Module):
    """Two-class logits (0, mean of the whole window): one prediction per window, so a voxel covered by
    two windows shows how the blend weighs them."""

    def __init__(self, patch):
        super().__init__()
        self.config = types.SimpleNamespace(patch_size=patch, out_channels=2)
        self.scale = torch.nn.Parameter(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1))

    def forward(self, x):
        return x.mean(dim=(2, 3, 4), keepdim=True).expand(-1, -1, *self.config.patch_size) * self.scale


def test_overlapping_windows_are_weighted_by_a_gaussian_around_their_centres():
    """Two windows along x (starts 0 and 8, centres at 7.5 and 15.5): next to one window's centre its own
    prediction wins (the other's Gaussian weight there is 1e-3 of it), rather than the two being averaged."""
    from unetrpp.inference import sliding_window_probabilities

    image = np.broadcast_to((np.arange(24, dtype=np.float32) - 12) / 2, (8, 16, 24)).copy()  # a ramp along x
    with torch.inference_mode():
        probs = sliding_window_probabilities(_WindowMean((8, 16, 16)), image, torch.device("cpu"))[1, 4, 8]  # (X,)
    own = torch.sigmoid(torch.tensor([image[..., :16].mean(), image[..., 8:].mean()]))  # each window's p(class 1)
    gap = float(own[1] - own[0])
    assert gap > 0.5
    torch.testing.assert_close(probs[:8], own[0].expand(8))  # one window only
    torch.testing.assert_close(probs[16:], own[1].expand(8))
    assert abs(float(probs[8] - own[0])) < 0.01 * gap  # overlap, beside the first window's centre
    assert abs(float(probs[15] - own[1])) < 0.01 * gap  # overlap, beside the second's
    assert torch.all(probs[8:16].diff() > 0)  # handing over from one window to the other


def test_mask_is_the_argmax_of_the_resampled_maps_ties_going_to_the_lower_class():
    """Classes with equal probabilities (a bfloat16 network's logits tie often) go to the lower class, as
    np.argmax and the GPU path (`argmax_restored_torch`) decide: CPU and GPU masks agree."""
    from unetrpp.inference import argmax_restored_torch, probabilities_to_mask
    from unetrpp.preprocess import Prepared, restore

    probs = torch.from_numpy(np.random.default_rng(9).dirichlet(np.ones(4), size=(4, 5, 6))).float().permute(3, 0, 1, 2)
    probs[2, :2] = probs[1, :2] = probs[:, :2].max(0).values  # classes 1 and 2 tie for first in two slices
    prepared = Prepared(np.zeros((4, 5, 6), np.float32), (7, 9, 11), (1.0, 1.0, 1.0), (1.75, 1.8, 1.83))
    expected = np.argmax(np.stack([restore(p.numpy(), prepared) for p in probs]), axis=0)
    mask = probabilities_to_mask(probs, prepared)
    assert mask.dtype == np.uint8 and {1, 2} <= set(np.unique(mask))
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(argmax_restored_torch(probs, prepared).numpy(), expected)


class _Positional(torch.nn.Module):
    """Logits c x (value + R) with R a fixed pattern on the window: not mirror-symmetric, so each
    mirroring of test-time augmentation predicts differently, and un-flipped gives c x (value + flipped R)."""

    def __init__(self, patch):
        super().__init__()
        self.config = types.SimpleNamespace(patch_size=patch, out_channels=3)
        self.scale = torch.nn.Parameter(torch.arange(3.0).view(1, 3, 1, 1, 1))
        self.pattern = torch.randn(patch, generator=torch.Generator().manual_seed(5))

    def forward(self, x):
        return (x + self.pattern) * self.scale


def test_tta_averages_the_eight_mirrorings_over_z_y_x_each_flipped_back():
    from unetrpp.inference import sliding_window_probabilities

    patch = (4, 6, 8)  # one window: the blend returns that window's probabilities
    image = np.random.default_rng(6).normal(size=patch).astype(np.float32)
    model = _Positional(patch)
    with torch.inference_mode():
        probs = sliding_window_probabilities(model, image, torch.device("cpu"), tta=True)
    value, scale = torch.from_numpy(image), torch.arange(3.0).view(3, 1, 1, 1)
    mirrorings = [axes for n in range(4) for axes in itertools.combinations((0, 1, 2), n)]
    expected = sum(torch.softmax((value + model.pattern.flip(axes)) * scale, dim=0) for axes in mirrorings) / 8
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_a_scan_that_would_explode_at_the_weights_spacing_is_refused_before_resampling(tmp_path, model):
    """A small header with absurd spacing (50 mm voxels) would become billions of voxels at 1 mm."""
    affine = np.diag([50.0, 50.0, 50.0, 1.0])
    path = write_nifti(tmp_path / "huge_spacing.nii.gz", np.zeros((64, 64, 64), np.int16), affine)
    fine = create_model("unetrpp_tiny", preprocessing=Preprocessing(spacing=(0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match="MAX_TARGET_VOXELS.*check the voxel spacing"):
        segment(path, model=fine)


def test_a_scan_thinner_than_one_voxel_of_the_weights_grid_is_refused(tmp_path, model):
    """0.01 mm voxels (a header in the wrong unit, say): the scan would become a single voxel."""
    path = write_nifti(tmp_path / "tiny_voxels.nii.gz", phantom_ras(), np.diag([0.01, 0.01, 0.01, 1.0]))
    with pytest.raises(ValueError, match=r"spans only .* a single slice; check the voxel spacing"):
        segment(path, model=model)


def test_a_scan_wider_than_a_body_along_two_axes_is_warned_about():
    assert large_scan_warning((56, 48, 40), (30.0, 30.0, 30.0)).startswith("the scan spans 1680 x 1440 x 1200 mm")
    assert large_scan_warning((1900, 512, 512), (1.0, 0.98, 0.98)) is None  # a whole-body CT
    assert large_scan_warning((100, 1200, 10), (1.0, 1.0, 1.0)) is None  # long along one axis only


def test_ct_warning_spares_a_crop_inside_the_body_but_not_mri_or_a_missing_intercept():
    rng = np.random.default_rng(0)
    inside = rng.choice([-100.0, 40.0, 60.0, 400.0], size=(10, 12, 8))  # fat, soft tissue, bone: no air
    assert ct_warning(inside) is None
    assert ct_warning(inside + 1024) is not None  # CT stored without its -1024 intercept
    assert ct_warning(rng.uniform(0, 900, size=(10, 12, 8))) is not None  # MRI-like, non-negative
    assert ct_warning(rng.standard_normal((10, 12, 8))) is not None  # z-scored


def test_statistics_tables_are_utf8_whatever_the_locale(non_utf8_locale, tmp_path):
    """A table lists file names: written in the locale's encoding, a Windows PC's cp1252 (ASCII here) failed
    on names it cannot hold ("'charmap' codec can't encode" after every scan was segmented), and held others
    as bytes that tables are not read back with (UTF-8)."""
    non_utf8_locale(
        "from unetrpp.postprocess import statistics_csv_text, write_statistics\n"
        "row = {'label': 1, 'name': 'spleen', 'voxels': 8, 'volume_ml': 0.1, 'mean_hu': 40.0}\n"
        # the second name as Linux hands over a UTF-8 name under an ASCII locale: bytes it cannot decode
        "rows = [{'file': 'scans/\\u0141\\u00f3d\\u017a scan.nii.gz', **row}, {'file': 'M\\udcc3\\udcbcller.nii', **row}]\n"
        "text = statistics_csv_text(rows, leading=('file',))\n"
        "write_statistics('s.csv', text)\n"
        "write_statistics('s.csv', text)\n")  # its own table is replaced on a rerun
    table = (tmp_path / "s.csv").read_text(encoding="utf-8")
    assert "scans/Łódź scan.nii.gz,1,spleen" in table and "Müller.nii,1,spleen" in table, table
