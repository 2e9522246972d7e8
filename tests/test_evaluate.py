"""Dice and HD95 on hand-made masks with known answers, the empty-organ conventions, and the CLI."""

import csv
import json
import math

import numpy as np
import pytest

from unetrpp import io
from unetrpp.cli import main
from unetrpp.evaluate import dice, evaluate_case, evaluate_folders, hd95, mean_metrics
from unetrpp.labels import BTCV_CLASS_NAMES


def test_dice_known_overlap():
    truth = np.zeros((8, 8, 8), bool)
    truth[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = np.zeros_like(truth)
    pred[2:4, 2:6, 2:6] = True  # 32 voxels, all inside
    assert dice(pred, truth) == pytest.approx(2 * 32 / 96)
    assert dice(truth, truth) == 1.0
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert dice(np.zeros_like(truth), truth) == 0.0


def test_hd95_uses_the_spacing():
    truth = np.zeros((10, 6, 6), bool)
    pred = np.zeros_like(truth)
    truth[2], pred[5] = True, True  # parallel slabs 3 slices apart
    assert hd95(pred, truth, (2.5, 1.0, 1.0)) == pytest.approx(7.5)
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    a, b = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    a[0, 0, 0], b[0, 3, 4] = True, True  # single voxels 3 and 4 voxels apart in y and x
    assert hd95(a, b, (1.0, 2.0, 1.5)) == pytest.approx(math.hypot(6.0, 6.0))
    assert hd95(a, a, (1.0, 1.0, 1.0)) == 0.0


def test_hd95_is_the_95th_percentile_not_the_maximum():
    """A thin spur far from the truth moves the plain Hausdorff distance (7) but not HD95 while it holds
    under 5% of the surface points. Single-voxel-thick slabs and columns are all surface, so the pooled
    distances can be counted by hand."""
    truth = np.zeros((12, 10, 10), bool)
    pred = np.zeros_like(truth)
    truth[2], pred[3] = True, True  # 100 + 100 surface voxels, each 1 from the other slab
    pred[6:10, 5, 5] = True  # a spur of 4 voxels, 4, 5, 6, 7 above the truth slab
    # pooled: 200 ones and 4, 5, 6, 7; the 95th percentile (index 0.95 * 203 = 192.85) is a 1
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    small_t, small_p = np.zeros_like(truth), np.zeros_like(truth)
    small_t[2, 4:7, 4:7], small_p[3, 4:7, 4:7] = True, True  # 9 + 9 ones
    small_p[6:10, 5, 5] = True
    # pooled: 18 ones, then 4, 5, 6, 7 at sorted indices 18..21; index 0.95 * 21 = 19.95 lies between 5 and 6
    assert hd95(small_p, small_t, (1.0, 1.0, 1.0)) == pytest.approx(5 + 0.95 * (6 - 5))


def test_empty_conventions():
    truth = np.zeros((6, 6, 6), np.int64)
    pred = np.zeros_like(truth)
    truth[1:3, 1:3, 1:3] = 1  # spleen only in truth
    pred[3:5, 3:5, 3:5] = 2  # right kidney only in prediction
    m = evaluate_case(pred, truth, (1.0, 1.0, 1.0))
    assert m["spleen"]["dice"] == 0.0 and math.isnan(m["spleen"]["hd95"])
    assert m["right kidney"]["dice"] == 0.0 and math.isnan(m["right kidney"]["hd95"])
    assert m["liver"] == {"dice": 1.0, "hd95": 0.0}  # empty in both


def test_an_undefined_hd95_is_left_out_of_the_means_and_dice_is_not():
    """One case that misses the spleen (HD95 nan) must not turn the spleen's mean HD95, or the overall
    one, into nan: it is left out there, while its Dice of 0 counts."""
    per_case = {"0001": {"spleen": {"dice": 0.0, "hd95": math.nan}, "liver": {"dice": 0.9, "hd95": 2.0}},
                "0002": {"spleen": {"dice": 0.8, "hd95": 4.0}, "liver": {"dice": 0.7, "hd95": math.nan}}}
    rows = mean_metrics(per_case)
    assert rows["spleen"] == {"dice": pytest.approx(0.4), "hd95": 4.0}
    assert rows["liver"] == {"dice": pytest.approx(0.8), "hd95": 2.0}
    assert rows["mean"] == {"dice": pytest.approx(0.6), "hd95": 3.0}
    assert math.isnan(mean_metrics({"0001": {"spleen": {"dice": 0.0, "hd95": math.nan}}})["spleen"]["hd95"])


def _half_overlap(folder, label: int) -> tuple[np.ndarray, np.ndarray]:
    """pred/ and truth/ folders under `folder`; truth a 4x4x4 block of `label`, the prediction its upper
    half (Dice 2/3)."""
    (folder / "pred").mkdir()
    (folder / "truth").mkdir()
    truth = np.zeros((10, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = label
    pred = np.zeros_like(truth)
    pred[2:4, 2:6, 2:6] = label
    return truth, pred


def test_cli_table_and_files(tmp_path, capsys):
    truth, pred = _half_overlap(tmp_path, 6)
    spacing = (2.0, 1.0, 1.0)
    io.save_array(truth, spacing, tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    io.save_array(pred, spacing, tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "liver" in out and "0.6667" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["cases"]["0001"]["liver"]["dice"] == pytest.approx(2 / 3)
    # truth surface: 28 voxels in the prediction (0), 12 one slice beyond it (2 mm), 16 two slices (4 mm);
    # prediction (all surface): 28 on the truth's surface (0), 4 over its interior (1 mm in-plane).
    # Pooled 56 zeros, 4 ones, 12 twos, 16 fours: index 0.95 * 87 = 82.65 is a 4, in mm at 2 mm slices
    assert result["cases"]["0001"]["liver"]["hd95"] == pytest.approx(4.0)
    # 12 organs empty in both (Dice 1) and the liver at 2/3
    assert result["mean"]["mean"]["dice"] == pytest.approx((12 + 2 / 3) / 13)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--out", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    liver = next(r for r in rows if r["case"] == "0001" and r["organ"] == "liver")
    assert float(liver["dice"]) == pytest.approx(2 / 3)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--organs", "synapse8", "--out", str(tmp_path / "r8.json")]) == 0
    mean8 = json.loads((tmp_path / "r8.json").read_text())["mean"]
    assert "esophagus" not in mean8 and len(mean8) == 8 + 1  # the paper's 8 organs, and their mean
    assert mean8["mean"]["dice"] == pytest.approx((7 + 2 / 3) / 8)


def test_cli_missing_prediction_is_an_error(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    io.save_array(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), tmp_path / "truth/label0002.nii.gz", dtype=np.uint8)
    io.save_array(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 2
    err = capsys.readouterr().err
    assert "no prediction for truth case(s) 0002 in" in err and "(it holds 0001;" in err
    # and what would work: predict the missing cases, or a truth folder of the predicted cases only
    assert "predict those cases too (`python -m unetrpp predict` their images into" in err
    assert "or give a --truth folder holding only the labels of the predicted cases" in err
    assert err.count("\n") == 1
    for n in range(3, 15):
        io.save_array(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), tmp_path / f"truth/label{n:04d}.nii.gz", dtype=np.uint8)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 2
    assert "case(s) 0002, 0003, 0004, 0005, 0006, 0007, 0008, 0009, 0010, 0011 and 3 more in" in capsys.readouterr().err


def test_cli_a_prediction_that_is_no_nifti_is_one_line(tmp_path, capsys):
    """Every prediction's label table is read before any scoring (for SYNTHETIC and the synapse8 check): a file
    there that is no NIfTI ended evaluate in nibabel's ImageFileError traceback, whichever --organs."""
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    io.save_array(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    (tmp_path / "pred/img0001.nii.gz").write_text("not a NIfTI image\n" * 20)
    for organs in ("all", "synapse8"):
        assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                     "--organs", organs]) == 2, organs
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "img0001.nii.gz: this is a text file" in err and err.count("\n") == 1


def test_cli_checks_the_output_first_and_writes_strict_json(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:3, 1:3, 1:3] = 1  # a spleen the prediction misses: HD95 undefined
    io.save_array(truth, (1, 1, 1), tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    io.save_array(np.zeros_like(truth), (1, 1, 1), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    assert main([*args, "--out", str(tmp_path / "r.txt")]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "nowhere" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text)["cases"]["0001"]["spleen"]["hd95"] is None
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0  # its own results are replaced on a rerun
    for name, mine in (("notes.csv", "my,own\n"), ("dataset.json", '{"name": "my data"}')):
        (tmp_path / name).write_text(mine)  # anything else never is
        assert main([*args, "--out", str(tmp_path / name)]) == 2
        assert "not evaluation results written by unetrpp" in capsys.readouterr().err
        assert (tmp_path / name).read_text() == mine


def test_cli_refuses_another_label_scheme_and_names_grids_as_files_store_them(tmp_path, capsys):
    """Raw TotalSegmentator ids (liver 5, up to 117) scored as BTCV would give meaningless Dice."""
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    truth = np.zeros((6, 8, 10), np.uint8)
    truth[1:3, 1:3, 1:3] = 117
    io.save_array(truth, (1, 1, 1), tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    io.save_array(np.zeros_like(truth), (1, 1, 1), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "case 0001: the truth" in err and "holds labels 0..117, outside 0..13" in err and len(err.splitlines()) == 1
    io.save_array(np.zeros((6, 8, 9), np.uint8), (1, 1, 1), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    assert main(args) == 2
    assert "prediction grid (9, 8, 6) differs from truth grid (10, 8, 6)" in capsys.readouterr().err


def test_cli_scores_the_classes_a_mask_names_not_btcv_organs(tmp_path, capsys):
    """A mask from the ACDC weights (right ventricle, myocardium, left ventricle) is scored on those."""
    truth, pred = _half_overlap(tmp_path, 3)
    spacing = (2.0, 1.0, 1.0)
    io.save_array(truth, spacing, tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    image = io.load(io.save_array(truth, spacing, tmp_path / "img0001.nii.gz", dtype=np.int16))
    io.save_mask(pred, image, tmp_path / "pred/img0001.nii.gz",
                 label_names=("background", "right ventricle", "myocardium", "left ventricle"))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--out", str(tmp_path / "r.json")]) == 0
    mean = json.loads((tmp_path / "r.json").read_text())["mean"]
    assert list(mean) == ["right ventricle", "myocardium", "left ventricle", "mean"]
    assert mean["left ventricle"]["dice"] == pytest.approx(2 / 3)
    assert mean["mean"]["dice"] == pytest.approx((2 + 2 / 3) / 3)  # not inflated by 10 absent BTCV organs
    assert "spleen" not in capsys.readouterr().out


def test_cli_synapse8_refuses_masks_whose_classes_are_not_the_btcv_organs(tmp_path, capsys):
    """Masks of a model trained with --set class_names=[background, liver, spleen]: synapse8 would report
    their liver (class 1) as the spleen, and the six classes they lack as perfect (both empty)."""
    truth, pred = _half_overlap(tmp_path, 1)
    spacing = (2.0, 1.0, 1.0)
    io.save_array(truth, spacing, tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    image = io.load(io.save_array(truth, spacing, tmp_path / "img0001.nii.gz", dtype=np.int16))
    io.save_mask(pred, image, tmp_path / "pred/img0001.nii.gz", label_names=("background", "liver", "spleen"))
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    assert main(args + ["--organs", "synapse8"]) == 2
    err = capsys.readouterr().err
    assert "class 1 is 'liver', not 'spleen'" in err and "use --organs all" in err and err.count("\n") == 1
    assert main(args) == 0 and "liver" in capsys.readouterr().out  # the classes the masks name
    io.save_mask(pred, image, tmp_path / "pred/img0001.nii.gz", label_names=("background",) + BTCV_CLASS_NAMES)
    assert main(args + ["--organs", "synapse8"]) == 0  # BTCV-labelled masks are scored as before


@pytest.mark.parametrize("side_car", ['{"Modality": "CT", "SeriesDescription": "abdomen"}',  # dcm2niix's
                                      '{"labels": {"1": "spleen"}}',  # another tool's label map
                                      "not json"])
def test_cli_passes_over_a_json_beside_a_mask_that_is_not_its_label_table(side_car, tmp_path, capsys):
    """Masks from another tool may sit beside a .json of the same name that is no label table: the
    organs are then the BTCV ones (or those of the mask's own extension), not a traceback."""
    truth, pred = _half_overlap(tmp_path, 6)
    spacing = (2.0, 1.0, 1.0)
    io.save_array(truth, spacing, tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    io.save_array(pred, spacing, tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    (tmp_path / "pred/img0001.json").write_text(side_car)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 0
    captured = capsys.readouterr()
    assert "liver" in captured.out and "0.6667" in captured.out and "Traceback" not in captured.err
    image = io.load(io.save_array(truth, spacing, tmp_path / "img0001.nii.gz", dtype=np.int16))
    io.save_mask(pred, image, tmp_path / "mask.nii.gz", label_names=("background", "tissue", "organ", "liver"))
    (tmp_path / "mask.json").write_text(side_car)  # replaces the table save_mask wrote beside it
    assert io.read_label_names(tmp_path / "mask.nii.gz") == ("background", "tissue", "organ", "liver")


def test_cli_matches_masks_of_nnunet_named_images_to_their_labels(tmp_path, capsys):
    """nnU-Net's layout: imagesTs/img0061_0000.nii.gz (channel 0) and labelsTs/img0061.nii.gz; predict
    names the mask after the image, and evaluate once answered "no prediction for truth case(s) 0061"."""
    truth, pred = _half_overlap(tmp_path, 6)
    spacing = (2.0, 1.0, 1.0)
    io.save_array(truth, spacing, tmp_path / "truth/img0061.nii.gz", dtype=np.uint8)
    io.save_array(pred, spacing, tmp_path / "pred/img0061_0000.nii.gz", dtype=np.uint8)
    io.save_array(truth, spacing, tmp_path / "truth/case_0002.nii.gz", dtype=np.uint8)  # nnU-Net v2's names
    io.save_array(pred, spacing, tmp_path / "pred/case_0002_0000.nii.gz", dtype=np.uint8)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--out", str(tmp_path / "r.json")]) == 0
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert sorted(cases) == ["0002", "0061"] and cases["0061"]["liver"]["dice"] == pytest.approx(2 / 3)


def test_scores_of_masks_from_synthetic_weights_say_so_on_screen_and_in_the_files(tmp_path, capsys):
    """Masks made by the teaching weights record SYNTHETIC in their label tables; their Dice and HD95 travel
    without the masks (a slide, a CSV in a report), so the console, the CSV (every row) and the JSON say it."""
    import csv

    truth, pred = _half_overlap(tmp_path, 1)
    spacing = (2.0, 1.0, 1.0)
    io.save_array(truth, spacing, tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    image = io.load(io.save_array(truth, spacing, tmp_path / "img0001.nii.gz", dtype=np.int16))
    names = ("background", "spleen", "liver")
    io.save_mask(pred, image, tmp_path / "pred/img0001.nii.gz", label_names=names, synthetic=True)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    assert main(args + ["--out", str(tmp_path / "r.csv")]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows and all("SYNTHETIC" in row["note"] for row in rows)
    assert main(args + ["--out", str(tmp_path / "r.csv")]) == 0  # a rerun replaces its own table
    assert main(args + ["--out", str(tmp_path / "r.json")]) == 0
    assert "SYNTHETIC" in json.loads((tmp_path / "r.json").read_text())["note"] and capsys.readouterr()

    io.save_mask(pred, image, tmp_path / "pred/img0001.nii.gz", label_names=names)  # real weights: as before
    assert main(args + ["--out", str(tmp_path / "real.csv")]) == 0
    assert "SYNTHETIC" not in capsys.readouterr().out
    assert next(csv.reader(open(tmp_path / "real.csv"))) == ["case", "organ", "dice", "hd95_mm"]


def test_results_are_utf8_whatever_the_locale(non_utf8_locale, tmp_path):
    """Case names are file names: in the locale's encoding (a Windows PC's cp1252; ASCII here) a name it cannot
    hold failed after every case was scored, and one it holds was written in bytes that a rerun, reading the file
    as UTF-8, took for someone else's file it must not replace."""
    non_utf8_locale(
        "from unetrpp.evaluate import write_results\n"
        "scores = {'dice': 0.9, 'hd95': 1.5}\n"
        "result = {'cases': {'M\\u00fcller \\u0141\\u00f3d\\u017a': {'spleen': scores}}, 'mean': {'spleen': scores}}\n"
        "write_results(result, 'scores.csv')\n"
        "write_results(result, 'scores.csv')\n")  # a rerun replaces its own results
    assert "Müller Łódź,spleen,0.900000,1.5000" in (tmp_path / "scores.csv").read_text(encoding="utf-8")


FLARE22 = ("background", "liver", "right kidney", "spleen", "pancreas", "aorta", "inferior vena cava",
           "right adrenal gland", "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney")


@pytest.mark.parametrize("labels, refused", [
    ({str(i): name for i, name in enumerate(FLARE22)}, True),  # MSD's id -> name, FLARE22's numbering
    ({name: i for i, name in enumerate(FLARE22)}, True),  # nnU-Net v2's name -> id
    ({"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso", "6": "liver", "7": "sto",
      "8": "aorta", "9": "IVC", "10": "veins", "11": "pancreas", "12": "rad", "13": "lad"}, False),  # BTCV's own
    ({"0": "background", "1": "spleen"}, False),  # MSD Task09: the ids it names agree
])
def test_cli_refuses_truth_whose_dataset_numbers_the_organs_otherwise(labels, refused, tmp_path, capsys):
    """FLARE22's labels fit in 0..13 like BTCV's, but its class 1 is the liver and 3 the spleen: scored as BTCV,
    the liver's Dice was reported as the spleen's without a word. The dataset.json beside labelsTr says so."""
    truth, pred = _half_overlap(tmp_path, 6)
    data = tmp_path / "FLARE"
    (data / "labelsTr").mkdir(parents=True)
    io.save_array(truth, (2.0, 1.0, 1.0), data / "labelsTr/label0001.nii.gz", dtype=np.uint8)
    io.save_array(pred, (2.0, 1.0, 1.0), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    (data / "dataset.json").write_text(json.dumps({"name": "test", "labels": labels}))
    for organs in ("all", "synapse8"):
        code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(data / "labelsTr"), "--organs", organs])
        captured = capsys.readouterr()
        if not refused:
            assert code == 0 and "liver" in captured.out
            continue
        assert code == 2 and captured.err.count("\n") == 1, captured.err
        assert f"{data / 'dataset.json'}: its \"labels\" number" in captured.err
        assert "class 1 is 'liver', not 'spleen'" in captured.err and "renumber the truth masks" in captured.err
    # a truth folder of another name does not take a dataset.json above it as its own
    (data / "labelsTr").rename(data / "refs")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(data / "refs")]) == 0


def test_cli_hd95_in_voxels_as_the_paper_reports_it(tmp_path, capsys):
    """The paper's HD95 (7.53 on Synapse) is medpy's without the spacing, in voxels: with only millimetres a
    researcher could not put their HD95 beside it. The unit is named on screen, in the CSV column and the JSON."""
    truth = np.zeros((10, 6, 6), np.uint8)
    pred = np.zeros_like(truth)
    truth[2], pred[5] = 6, 6  # parallel liver slabs 3 slices apart, slices 2.5 mm apart
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    io.save_array(truth, (2.5, 1.0, 1.0), tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    io.save_array(pred, (2.5, 1.0, 1.0), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--organs", "synapse8"]
    for unit, distance in (("mm", 7.5), ("voxels", 3.0)):
        assert main([*args, "--hd95-unit", unit, "--out", str(tmp_path / "r.csv")]) == 0  # replaces its own
        out = capsys.readouterr().out
        assert f"HD95 in {unit}" in out and f"HD95 {unit[:3]}" in out
        rows = list(csv.DictReader((tmp_path / "r.csv").open()))
        liver = next(r for r in rows if r["case"] == "0001" and r["organ"] == "liver")
        assert float(liver[f"hd95_{unit}"]) == pytest.approx(distance)
        assert main([*args, "--hd95-unit", unit, "--out", str(tmp_path / "r.json")]) == 0
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["hd95_unit"] == unit and result["mean"]["liver"]["hd95"] == pytest.approx(distance)
        capsys.readouterr()


def test_organs_no_truth_mask_holds_are_named_since_their_dice_is_a_convention(tmp_path, capsys):
    """TotalSegmentator's labels of the bundled CT have no esophagus (out of view): scored Dice 1 (both empty),
    it lifted the mean over 13 organs from about 0 to 0.08 without a word."""
    truth, pred = _half_overlap(tmp_path, 6)
    io.save_array(truth, (2.0, 1.0, 1.0), tmp_path / "truth/label0001.nii.gz", dtype=np.uint8)
    io.save_array(pred, (2.0, 1.0, 1.0), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    spleen = np.where(truth > 0, 1, 0).astype(np.uint8)
    io.save_array(spleen, (2.0, 1.0, 1.0), tmp_path / "truth/label0002.nii.gz", dtype=np.uint8)
    io.save_array(np.zeros_like(spleen), (2.0, 1.0, 1.0), tmp_path / "pred/img0002.nii.gz", dtype=np.uint8)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]
    assert main([*args, "--organs", "synapse8", "--out", str(tmp_path / "r.json")]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: no truth mask holds"))
    absent = ["right kidney", "left kidney", "gallbladder", "stomach", "aorta", "pancreas"]  # liver, spleen are held
    assert note.startswith(f"note: no truth mask holds {', '.join(absent)}:")
    assert json.loads((tmp_path / "r.json").read_text())["absent_in_truth"] == absent
    result = evaluate_folders(tmp_path / "pred", tmp_path / "truth", {6: "liver", 1: "spleen"})
    assert result["absent_in_truth"] == []


@pytest.mark.parametrize("dataset_json", [
    json.dumps({"name": "BraTS", "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                            "enhancing tumor": 3}, "regions_class_order": [1, 2, 3]}),
    "{not json",
])
def test_cli_scores_truth_whose_dataset_json_names_no_class_per_id(dataset_json, tmp_path, capsys):
    """The dataset.json beside labelsTr only guards against another numbering: nnU-Net v2's region-based "labels"
    (lists of ids) or a broken file was refused with 'does not name the classes', and nothing was scored."""
    truth, pred = _half_overlap(tmp_path, 1)
    data = tmp_path / "Dataset"
    (data / "labelsTr").mkdir(parents=True)
    io.save_array(truth, (2.0, 1.0, 1.0), data / "labelsTr/label0001.nii.gz", dtype=np.uint8)
    io.save_array(pred, (2.0, 1.0, 1.0), tmp_path / "pred/img0001.nii.gz", dtype=np.uint8)
    (data / "dataset.json").write_text(dataset_json)
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(data / "labelsTr")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "spleen" in captured.out and "0.6667" in captured.out  # Dice 2/3
