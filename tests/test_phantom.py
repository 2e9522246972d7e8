"""The SYNTHETIC phantom: deterministic, all 13 organs, anatomically plausible in RAS."""

import json

import numpy as np
import pytest

from unetrpp import io
from unetrpp.data.phantom import SIZES, generate_case, write_phantom_dataset
from unetrpp.labels import BTCV_LABELS

ID = {name: label for label, name in BTCV_LABELS.items()}


def centroid(labels, label, spacing, shape):
    """World (x, y, z) mm of a label: x right, y anterior, z superior, in-plane centred."""
    z, y, x = np.nonzero(labels == label)
    return np.array([(x.mean() - (shape[2] - 1) / 2) * spacing[2], (y.mean() - (shape[1] - 1) / 2) * spacing[1],
                     (z.mean() + 0.5) * spacing[0]])


def test_same_seed_same_bytes_other_seed_differs():
    a_img, a_lab, _ = generate_case(7, 1, "small")
    b_img, b_lab, _ = generate_case(7, 1, "small")
    c_img, c_lab, _ = generate_case(8, 1, "small")
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    assert a_img.tobytes() != c_img.tobytes() and a_lab.tobytes() != c_lab.tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_all_organs_present_and_in_anatomical_places(seed):
    image, labels, spacing = generate_case(seed, 1, "small")
    shape = labels.shape
    assert labels.dtype == np.uint8 and image.dtype == np.int16
    assert set(np.unique(labels)) == set(range(14))  # one label per voxel, so organs never overlap
    voxel_ml = np.prod(spacing) / 1000
    counts = np.bincount(labels.ravel(), minlength=14)
    assert counts[ID["liver"]] * voxel_ml > 800 * 0.4  # big organ
    assert min(counts[1:]) * voxel_ml > 3  # even the adrenals are several mL
    c = {name: centroid(labels, label, spacing, shape) for name, label in ID.items()}
    x, y, z = 0, 1, 2
    assert c["liver"][x] > 20 and c["gallbladder"][x] > 10 and c["spleen"][x] < -40  # RAS: x to patient's right
    assert c["right kidney"][x] > 20 > -20 > c["left kidney"][x]
    assert c["right adrenal gland"][x] > 0 > c["left adrenal gland"][x]
    assert c["inferior vena cava"][x] > c["aorta"][x]
    # vertebral body: bone voxels near the midline
    _, yy, xx = np.nonzero(image > 400)
    xs = (xx - (shape[2] - 1) / 2) * spacing[2]
    spine_y = ((yy[np.abs(xs) < 15] - (shape[1] - 1) / 2) * spacing[1]).mean()
    assert c["aorta"][y] > spine_y + 10  # anterior to the spine
    assert c["right kidney"][y] < c["liver"][y] and c["left kidney"][y] < c["stomach"][y]  # posterior
    assert c["gallbladder"][y] > 0 and c["stomach"][y] > 0  # anterior
    for side in ("right", "left"):
        kidney, adrenal = c[f"{side} kidney"], c[f"{side} adrenal gland"]
        assert adrenal[z] > kidney[z] and abs(adrenal[x]) < abs(kidney[x])  # above, medial
    assert c["esophagus"][z] > c["stomach"][z] > c["right kidney"][z]
    # lungs: air-density voxels inside the body fill the top slices, not the bottom ones
    body = np.abs(np.arange(shape[2]) - (shape[2] - 1) / 2) < shape[2] * 0.3
    lungish = ((image > -950) & (image < -700))[:, :, body]
    top, bottom = lungish[-3:].sum(), lungish[:3].sum()
    assert top > 5 * max(bottom, 1)


def test_shapes_vary_between_cases():
    _, a, _ = generate_case(0, 1, "small")
    _, b, _ = generate_case(0, 2, "small")
    liver_a, liver_b = a == ID["liver"], b == ID["liver"]
    overlap = 2 * (liver_a & liver_b).sum() / (liver_a.sum() + liver_b.sum())
    assert 0.5 < overlap < 0.98  # same organ, same place, not the same shape


def test_written_dataset_is_btcv_layout_and_says_synthetic(tmp_path):
    out = write_phantom_dataset(tmp_path / "ph", cases=2, seed=3, size="small")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["synthetic"] is True and "SYNTHETIC" in meta["description"]
    assert meta["labels"]["6"] == "liver" and meta["numTraining"] == 2
    image = io.load(out / "imagesTr/img0002.nii.gz")
    label = io.load(out / "labelsTr/label0002.nii.gz", dtype=None)
    expected_image, expected_labels, spacing = generate_case(3, 2, "small")
    assert image.shape == SIZES["small"][0] and np.allclose(image.spacing, spacing)
    np.testing.assert_array_equal(image.array, expected_image)
    np.testing.assert_array_equal(label.array, expected_labels)
    for volume in (image, label):  # a copied file still says what it is
        assert bytes(volume.source.header["descrip"]).startswith(b"SYNTHETIC phantom")


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid sizes"):
        generate_case(0, 1, "huge")
    with pytest.raises(ValueError, match="cases=0"):
        write_phantom_dataset(tmp_path, cases=0)
    for first in (-1, 9999):  # img-001 or img10000 would not be four-digit case numbers
        with pytest.raises(ValueError, match=f"first_index={first}: case numbers are 4 digits"):
            write_phantom_dataset(tmp_path / "numbers", cases=2, first_index=first)
    assert not (tmp_path / "numbers").exists()


def test_cli_writes_the_layout(tmp_path, capsys):
    from unetrpp.cli import main

    assert main(["phantom", "--out", str(tmp_path / "p"), "--cases", "1", "--seed", "5", "--size", "small",
                 "--first-index", "3"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    # --first-index names the case, and --seed with that index gives the library's case (seed 5, index 3)
    assert sorted(f.name for f in (tmp_path / "p").glob("*/*.nii.gz")) == ["img0003.nii.gz", "label0003.nii.gz"]
    image, labels, _ = generate_case(5, 3, "small")
    assert np.array_equal(io.load(tmp_path / "p/imagesTr/img0003.nii.gz", dtype=None).array, image)
    assert np.array_equal(io.load(tmp_path / "p/labelsTr/label0003.nii.gz", dtype=None).array, labels)
    assert not np.array_equal(generate_case(0, 3, "small")[0], image)  # so another seed would show
    assert main(["phantom", "--out", str(tmp_path / "q"), "--cases", "0", "--size", "small"]) == 2
    assert "cases=0" in capsys.readouterr().err
    # Its own folder may be written again; a folder with anyone else's files never is.
    assert main(["phantom", "--out", str(tmp_path / "p"), "--cases", "1", "--seed", "5", "--size", "small"]) == 0
    real = tmp_path / "real"
    (real / "imagesTr").mkdir(parents=True)
    (real / "imagesTr" / "img0001.nii.gz").write_bytes(b"a real scan")
    (real / "dataset.json").write_text('{"name": "BTCV"}')
    assert main(["phantom", "--out", str(real), "--cases", "1", "--size", "small"]) == 2
    assert "not a phantom folder written by `unetrpp phantom`" in capsys.readouterr().err
    assert (real / "imagesTr" / "img0001.nii.gz").read_bytes() == b"a real scan"
    assert (real / "dataset.json").read_text() == '{"name": "BTCV"}' and not (real / "labelsTr").exists()
    # A run stopped half-way leaves a folder that is still its own.
    calls = []

    def stop_on_the_third_file(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return save_array(*args, **kwargs)

    save_array = io.save_array
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(io, "save_array", stop_on_the_third_file)
        write_phantom_dataset(tmp_path / "half", cases=2, size="small")
    assert write_phantom_dataset(tmp_path / "half", cases=2, size="small") == tmp_path / "half"
    assert json.loads((tmp_path / "half/dataset.json").read_text())["numTraining"] == 2
    (tmp_path / "afile").write_text("x")
    assert main(["phantom", "--out", str(tmp_path / "afile" / "p"), "--cases", "1", "--size", "small"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_rerun_with_the_same_seed_adds_cases_and_another_seed_is_refused(tmp_path, capsys):
    """`phantom --cases 2 --first-index 5` over a folder of img0001-0004 used to rewrite dataset.json
    with only the 2 new cases (training then silently used 2), and another --seed regenerated the
    cases and made "generator" claim it for all of them."""
    from unetrpp.cli import main
    from unetrpp.data.btcv import read_datalist

    out = tmp_path / "p"
    common = ["phantom", "--out", str(out), "--size", "small", "--seed", "4"]
    assert main([*common, "--cases", "2"]) == 0
    assert main([*common, "--cases", "2", "--first-index", "5"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert [c.name for c in read_datalist(out)["training"]] == ["img0001", "img0002", "img0005", "img0006"]
    assert "its dataset.json lists 4 case(s)" in capsys.readouterr().out.splitlines()[-1]
    assert meta["numTraining"] == 4 and meta["generator"]["indices"] == [1, 2, 5, 6]
    assert meta["generator"]["seed"] == 4 and meta["generator"]["size"] == "small"
    assert main([*common, "--cases", "1", "--first-index", "2"]) == 0  # again, the same bytes: still 4 cases
    assert json.loads((out / "dataset.json").read_text()) == meta

    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    for other in (["--seed", "5", "--cases", "1"],  # over an existing case
                  ["--seed", "5", "--cases", "1", "--first-index", "9"]):  # a new case, but mixing seeds
        assert main(["phantom", "--out", str(out), "--size", "small", *other]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: --out {out} holds phantoms made with --seed 4 --size small; add cases with that --seed "
                       f"and --size, or give a new --out for --seed 5 --size small (nothing was written)\n")
    assert main(["phantom", "--out", str(out), "--size", "default", "--seed", "4", "--cases", "1"]) == 2
    assert "made with --seed 4 --size small" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before
    assert not (out / "imagesTr/img0009.nii.gz").exists()


def test_an_interrupted_folder_keeps_its_seed(tmp_path):
    """A run stopped before its first case leaves the folder marked as ours with its seed and size."""
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(io, "save_array", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
        write_phantom_dataset(tmp_path / "half", cases=2, seed=1, size="small")
    with pytest.raises(ValueError, match="made with --seed 1 --size small"):
        write_phantom_dataset(tmp_path / "half", cases=2, seed=2, size="small")
    assert write_phantom_dataset(tmp_path / "half", cases=1, seed=1, size="small").is_dir()
