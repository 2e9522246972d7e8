"""BTCV-layout reading, split by case, and bad data named by case before any training."""

import json
import shlex

import nibabel as nib
import numpy as np
import pytest

from unetrpp import io
from unetrpp.config import get_config
from unetrpp.data.btcv import check_label_names, load_case, read_datalist, split_cases
from unetrpp.data.phantom import write_phantom_dataset
from unetrpp.labels import BTCV_CLASS_NAMES
from unetrpp.train_data import prepare_cases

SPACING = (5.0, 4.0, 4.0)


def write_case(root, number, labels=None, label_shape=None, label_spacing=SPACING, image=None):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(number)
    if image is None:
        image = rng.integers(-100, 200, (8, 16, 16)).astype(np.int16)
    io.save_array(image, SPACING, root / f"imagesTr/img{number:04d}.nii.gz")
    if labels is None:
        labels = np.zeros(label_shape or image.shape, np.uint8)
        labels[2:5, 4:9, 4:9] = 6
    if labels is not False:
        io.save_array(labels, label_spacing, root / f"labelsTr/label{number:04d}.nii.gz", dtype=labels.dtype)


def test_reads_images_and_labels_by_number(tmp_path):
    for n in (1, 2, 3):
        write_case(tmp_path, n)
    cases = read_datalist(tmp_path)["training"]
    assert [c.name for c in cases] == ["img0001", "img0002", "img0003"]
    assert cases[1].label.name == "label0002.nii.gz"
    volume, labels = load_case(cases[0])
    assert volume.shape == (8, 16, 16) and labels.dtype == np.uint8 and labels.max() == 6


def test_case_numbers_pair_images_with_labels_and_must_be_distinct(tmp_path):
    """ACDC-style names pair by all their numbers (patient002_frame01 is not patient001_frame01);
    two files with the same numbers are refused instead of one being dropped."""
    for folder, suffix in (("imagesTr", ""), ("labelsTr", "_gt")):
        (tmp_path / folder).mkdir()
        for patient in (1, 2):
            array = np.full((8, 16, 16), patient, np.uint8)
            io.save_array(array, SPACING, tmp_path / f"{folder}/patient{patient:03d}_frame01{suffix}.nii.gz", dtype=np.uint8)
    cases = read_datalist(tmp_path)["training"]
    assert [(c.image.name, c.label.name) for c in cases] == [
        ("patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz"),
        ("patient002_frame01.nii.gz", "patient002_frame01_gt.nii.gz")]
    io.save_array(np.zeros((8, 16, 16), np.uint8), SPACING, tmp_path / "labelsTr/p001_f01.nii.gz", dtype=np.uint8)
    with pytest.raises(ValueError, match="p001_f01.nii.gz and patient001_frame01_gt.nii.gz .* same case number 001_01"):
        read_datalist(tmp_path)


def test_msd_and_monai_split_files(tmp_path):
    for n in (1, 2, 3):
        write_case(tmp_path, n)
    entry = lambda n: {"image": f"imagesTr/img{n:04d}.nii.gz", "label": f"labelsTr/label{n:04d}.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry(1), entry(2)]}))
    assert [c.name for c in read_datalist(tmp_path)["training"]] == ["img0001", "img0002"]
    (tmp_path / "dataset_0.json").write_text(json.dumps({"training": [entry(1), entry(3)], "validation": [entry(2)]}))
    lists = read_datalist(tmp_path)
    assert [c.name for c in lists["training"]] == ["img0001", "img0003"]
    assert [c.name for c in lists["validation"]] == ["img0002"]


@pytest.mark.parametrize("meta, words", [
    ({"training": {"a": {"image": "imagesTr/img0001.nii.gz"}}}, '"training" is a JSON object, not a list'),
    ({"training": [], "validation": "imagesTr/img0001.nii.gz"}, '"validation" is a JSON string, not a list'),
    ([{"image": "imagesTr/img0001.nii.gz"}], "a JSON list, not an object"),
])
def test_a_split_file_of_another_shape_says_what_it_must_hold(tmp_path, meta, words):
    """A "training" object used to be read as its keys, each one a missing image ("case a: image file missing")."""
    write_case(tmp_path, 1)
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        read_datalist(tmp_path)
    message = str(info.value)
    assert words in message and '{"image": "./imagesTr/img0001.nii.gz", "label": ' in message
    assert "dataset.json" in message and "\n" not in message


BTCV_NAMES = ("background",) + BTCV_CLASS_NAMES
# BTCV's own dataset.json (the UNETR / MONAI tutorials' conversion of RawData)
BTCV_DATASET_LABELS = {"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso",
                       "6": "liver", "7": "sto", "8": "aorta", "9": "IVC", "10": "veins", "11": "pancreas",
                       "12": "rad", "13": "lad"}


def test_label_names_of_phantoms_btcv_and_other_spellings_pass(tmp_path):
    check_label_names(write_phantom_dataset(tmp_path / "ph", cases=1, size="small"), BTCV_NAMES)
    for labels in (BTCV_DATASET_LABELS,  # abbreviations stand for their organs
                   {**BTCV_DATASET_LABELS, "0": "BG", "2": "Kidney_Right", "10": "portal_vein_and_splenic_vein",
                    "4": "gall bladder"},  # case, separators, word order; background by any name
                   {name: i for i, name in enumerate(("clear_label", "Liver", "tumour"))}):  # nnU-Net v2 order
        (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
        names = BTCV_NAMES if len(labels) == 14 else ("background", "liver", "tumour")
        check_label_names(tmp_path, names)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))  # no "labels": nothing to check
    check_label_names(tmp_path, BTCV_NAMES)
    check_label_names(tmp_path / "no dataset.json here", BTCV_NAMES)  # read_datalist reports missing folders


def test_label_names_that_disagree_with_the_model_are_refused_with_the_options_that_work(tmp_path):
    """A liver/tumour dataset trained with the BTCV names used to report class 1 as "spleen"."""
    labels = {"0": "background", "1": "liver", "2": "tumour"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(ValueError) as info:
        check_label_names(tmp_path, BTCV_NAMES)
    message = str(info.value)
    assert "\n" not in message and "names 3 classes (background, liver, tumour) but the model has 14" in message
    fix = message.split(" add ")[1].split(" (or ")[0]  # the options, as a shell would pass them to argparse
    assert shlex.split(fix) == ["--set", "out_channels=3", "--set", 'class_names=["background", "liver", "tumour"]']
    from unetrpp.cli.train import _override
    overrides = dict(_override(arg) for arg in shlex.split(fix)[1::2])
    assert get_config("unetrpp_tiny", **overrides).class_names == ("background", "liver", "tumour")

    swapped = {**BTCV_DATASET_LABELS, "2": "lkid", "3": "rkid"}  # same count, other organs
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": swapped}))
    with pytest.raises(ValueError, match="class 2 'lkid' where the model has 'right kidney', class 3 'rkid' where "
                                         "the model has 'left kidney'; to train on its classes add --set out_channels=14"):
        check_label_names(tmp_path, BTCV_NAMES)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "2": "liver"}}))
    with pytest.raises(ValueError, match="does not name the classes 0..N-1 once each"):
        check_label_names(tmp_path, ("background", "liver"))


def test_split_is_by_case_and_reproducible(tmp_path):
    for n in range(1, 11):
        write_case(tmp_path, n)
    cases = read_datalist(tmp_path)["training"]
    train, val = split_cases(cases, 0.2, seed=5)
    assert len(val) == 2 and len(train) == 8
    assert not {c.name for c in train} & {c.name for c in val}
    assert split_cases(cases, 0.2, seed=5) == (train, val)
    assert len(split_cases(cases, 3, seed=5)[1]) == 3
    with pytest.raises(ValueError, match="val_cases=10"):
        split_cases(cases, 10)
    # a fraction that rounds to every case (0.96 of 10) leaves none to train on: said as such, not as a batch
    # size too large for an epoch of 0 training patches, which is how training met it
    with pytest.raises(ValueError, match="val_cases=0.96: that fraction of 10 cases holds out all of them"):
        split_cases(cases, 0.96)
    assert len(split_cases(cases, 0.9)[0]) == 1


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no cases found"):
        read_datalist(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        read_datalist(tmp_path / "nope")


def test_every_bad_case_is_named_before_training(tmp_path):
    write_case(tmp_path, 1)  # good
    write_case(tmp_path, 2, labels=False)  # missing label
    write_case(tmp_path, 3, label_shape=(8, 16, 12))  # other grid
    bad = np.zeros((8, 16, 16), np.uint8)
    bad[0, 0, 0] = 20
    write_case(tmp_path, 4, labels=bad)  # label outside 0..13
    write_case(tmp_path, 5)
    (tmp_path / "imagesTr/img0005.nii.gz").write_bytes(b"\x1f\x8b not really gzip")  # unreadable
    write_case(tmp_path, 6, label_spacing=(5.0, 4.0, 3.0))  # same shape, other affine
    cases = read_datalist(tmp_path)["training"]
    with pytest.raises(ValueError) as info:
        prepare_cases(cases, get_config("unetrpp_tiny"))
    message = str(info.value)
    assert "5 of 6 cases are unusable" in message
    assert "case img0002: label file missing" in message
    assert "case img0003: image and label grids differ in shape (Z, Y, X) (8, 16, 16) vs (8, 16, 12)" in message
    assert "case img0004: label values [20]" in message
    assert "case img0005: cannot read image" in message
    assert "case img0006: image and label grids differ in spacing (z, y, x) [5.0, 4.0, 4.0] vs [5.0, 4.0, 3.0] mm" \
        in message
    assert "img0001" not in message


def test_a_grid_that_differs_only_in_origin_or_direction_is_named_by_what_differs(tmp_path):
    """Same shape and spacing used to print two identical grids "(8, 16, 16) at [5.0, 4.0, 4.0] mm ... differ"."""
    write_case(tmp_path, 1, labels=False)
    image = nib.load(tmp_path / "imagesTr/img0001.nii.gz")
    labels = np.zeros(image.shape, np.uint8)

    def load_with_label_affine(affine):
        nib.save(nib.Nifti1Image(labels, affine), tmp_path / "labelsTr/label0001.nii.gz")
        return load_case(read_datalist(tmp_path)["training"][0])

    shifted = image.affine.copy()
    shifted[:3, 3] += (7.5, 0.0, -2.0)
    with pytest.raises(ValueError) as info:
        load_with_label_affine(shifted)
    message = str(info.value)
    assert "differ in origin (x, y, z) [0.0, 0.0, 0.0] vs [7.5, 0.0, -2.0] mm; the label must be on the image's grid" \
        in message and "spacing" not in message.split(";")[0] and "\n" not in message
    turn = np.radians(10)  # an oblique label: the same voxel sizes, axes turned 10 degrees about z
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    oblique = image.affine.copy()
    oblique[:3, :3] = rotation @ image.affine[:3, :3]
    with pytest.raises(ValueError, match=r"differ in axis directions, up to 10 degrees apart; the label must"):
        load_with_label_affine(oblique)
    mirrored = image.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # the same grid stored right-to-left
    mirrored[0, 3] = image.affine[0, 3] + (image.shape[0] - 1) * image.affine[0, 0]
    load_with_label_affine(mirrored)  # is still the image's grid once both are read in RAS


def test_prepared_case_is_resampled_normalised_and_padded(tmp_path):
    """The label must stay on the image: a bright block (300 HU on ~0 HU) exactly where an off-centre
    label is must still be under the label after both are resampled, and the label's box must land
    where the physical extents say."""
    image = np.random.default_rng(1).integers(-20, 20, (8, 16, 16)).astype(np.int16)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:4, 3:7, 5:10] = 6
    image[labels == 6] = 300
    write_case(tmp_path, 1, labels=labels, image=image)
    config = get_config("unetrpp_tiny")
    (case,) = prepare_cases(read_datalist(tmp_path)["training"], config)
    # 8 x 16 x 16 voxels at 5 x 4 x 4 mm -> 10 x 26 x 26 at 4 x 2.5 x 2.5 mm, padded to the patch
    assert case.image.shape == (1, 32, 64, 64) and case.label.shape == (1, 32, 64, 64)
    assert case.image.dtype == np.float32 and abs(case.image[0, :10, :26, :26].mean()) < 2
    assert set(np.unique(case.label)) == {0, 6}
    # An output voxel is labelled where its centre lies in the label's extent (linear mask >= 0.5):
    # z [5, 20] mm, centres (i + 0.5) * 4 mm -> i = 1..4; y [12, 28] mm and x [20, 40] mm, centres
    # (i + 0.5) * 64 / 26 mm (16 voxels of 4 mm as 26) -> y i = 5..10, x i = 8..15
    z, y, x = np.nonzero(case.label[0])
    assert (z.min(), z.max(), y.min(), y.max(), x.min(), x.max()) == (1, 4, 5, 10, 8, 15)
    # (300 - 82.95) / 136.95 = 1.58 in the block, (0 - 82.95) / 136.95 = -0.61 around it
    img, inside = case.image[0, :10, :26, :26], case.label[0, :10, :26, :26] == 6
    assert img[inside].mean() > 1.0 and img[~inside].mean() < -0.4


def test_a_split_file_is_read_as_utf8_whatever_the_locale(non_utf8_locale, tmp_path):
    """JSON is UTF-8: read in the locale's encoding (a Windows PC's cp1252; ASCII here), a dataset.json with one
    accented letter in its description was refused as "not valid JSON" (or read garbled)."""
    write_case(tmp_path, 1)
    entry = {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    meta = {"description": "Abdomen CT, Universitätsklinikum Łódź", "training": [entry]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    out = non_utf8_locale("from unetrpp.data.btcv import read_datalist\n"
                          "print([c.name for c in read_datalist('.')['training']])\n")
    assert out.strip() == "['img0001']"
