"""`python -m unetrpp predict`: folders with good and bad files, exit status, no partial output,
inputs untouched, statistics CSV, torchrun sharding. Uses a tiny random network saved to tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_io import BAD_CASES, sha, write_nifti

from unetrpp import Preprocessing, cli, create_model
from unetrpp.cli.predict import distributed_share

AFFINE = np.diag([-6.0, -6.0, 6.0, 1.0])  # LPS storage: exercises reorientation on the way in and out


@pytest.fixture(autouse=True)
def one_thread_and_only_predict(monkeypatch):
    """One torch thread (faster on a shared 2-core machine); only this command in the dispatcher."""
    monkeypatch.setattr(cli, "COMMANDS", {"predict": cli.COMMANDS["predict"]})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random (seed 0) network at 6 mm, saved as a weights folder. Synthetic, not trained."""
    torch.manual_seed(0)
    model = create_model("unetrpp_tiny", patch_size=(16, 32, 32), preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)))
    folder = tmp_path_factory.mktemp("weights")
    model.save_pretrained(folder)
    return folder


def ct_like(seed: int, shape=(20, 18, 12)) -> np.ndarray:
    """A synthetic CT-like int16 volume (air, tissue, a bright block). Not real data."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000, np.int16)
    data[2:-2, 3:-3, 2:-2] = 40
    data[5:9, 6:10, 4:8] = 400
    return (data + rng.integers(-30, 30, shape)).astype(np.int16)


def predict(*args: str) -> int:
    return cli.main(["predict", *map(str, args)])


def test_folder_with_good_and_bad_files(tmp_path, weights, capsys, fixtures):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [write_nifti(inputs / f"case{i}.nii.gz", ct_like(i), AFFINE) for i in range(2)]
    good.append(shutil.copy(fixtures / "example_ct_sm.nii.gz", inputs / "real.nii.gz"))
    bad = [build(inputs) for build, _ in BAD_CASES.values()]
    hashes = {p.name: sha(p) for p in inputs.iterdir()}
    out = tmp_path / "out"

    status = predict(inputs, "-o", out, "--weights", weights, "--stats", tmp_path / "stats.csv")

    assert status == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    named_nifti = [path for path in bad if ".nii" in path.name]  # the rest (a PNG, a DICOM) are skipped
    assert len(error_lines) == len(named_nifti) and len(named_nifti) < len(bad)
    for path in named_nifti:
        assert sum(str(path) in line for line in error_lines) == 1
    note = [line for line in err.splitlines() if line.startswith("note: skipped")]
    assert len(note) == 1 and all(path.name in note[0] for path in bad if path not in named_nifti)
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"case{i}.{ext}" for i in range(2) for ext in ("nii.gz", "json")] + ["real.nii.gz", "real.json"])
    for source in good:
        mask = nib.load(str(out / source.name))
        image = nib.load(str(source))
        assert mask.shape == image.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(mask.affine, image.affine)
    assert {p.name: sha(p) for p in inputs.iterdir()} == hashes  # inputs untouched
    csv_lines = (tmp_path / "stats.csv").read_text().splitlines()
    assert csv_lines[0] == "file,label,name,voxels,volume_ml,mean_hu"
    # one row per organ in each written mask, counted on the mask as written
    rows = {(file, int(label)): int(voxels) for file, label, _, voxels, *_ in (line.split(",") for line in csv_lines[1:])}
    expected = {}
    for source in good:
        mask = np.asarray(nib.load(str(out / source.name)).dataobj)
        expected.update({(str(source), int(k)): int((mask == k).sum()) for k in np.unique(mask) if k > 0})
    assert rows == expected and expected


def test_a_dcm2niix_folder_runs_past_its_side_cars(tmp_path, weights, capsys):
    """dcm2niix writes scan.json (and .bval/.bvec) beside scan.nii.gz: those are skipped, not failures."""
    inputs = tmp_path / "dcm2niix"
    inputs.mkdir()
    write_nifti(inputs / "scan.nii.gz", ct_like(4), AFFINE)
    (inputs / "scan.json").write_text('{"Modality": "CT"}')
    (inputs / "scan.bval").write_text("0\n")
    assert predict(inputs, "-o", tmp_path / "out", "--weights", weights) == 0
    err = capsys.readouterr().err
    assert "note: skipped 2 file(s)" in err and "scan.json" in err and "error:" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.json", "scan.nii.gz"]
    assert (inputs / "scan.json").read_text() == '{"Modality": "CT"}'


def test_statistics_never_replace_a_file_they_did_not_write(tmp_path, weights, capsys):
    """--stats is checked before any work: onto the input scan, onto a non-CSV name, a folder or a missing
    folder it is one line, exit 2, nothing written; a statistics table written before is replaced."""
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(1), AFFINE)
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,table\n")
    before = {p.name: sha(p) for p in (source, notes)}
    for stats, words in ((source, "must end with .csv"), (tmp_path / "stats.txt", "must end with .csv"),
                         (tmp_path, "is a folder"), (tmp_path / "absent" / "s.csv", "does not exist"),
                         (notes, "not a statistics table written by unetrpp")):
        assert predict(source, "-o", tmp_path / "out", "--weights", weights, "--stats", stats) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    assert {p.name: sha(p) for p in (source, notes)} == before
    table = tmp_path / "stats.csv"
    assert predict(source, "-o", tmp_path / "out", "--weights", weights, "--stats", table) == 0
    assert predict(source, "-o", tmp_path / "out", "--weights", weights, "--stats", table) == 0  # a rerun
    inside = tmp_path / "masks" / "statistics.csv"  # in the output folder this very run creates
    assert predict(source, "-o", tmp_path / "masks", "--weights", weights, "--stats", inside) == 0
    assert inside.read_text().startswith("file,label,name")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc as an unwritable folder")
def test_statistics_in_an_unwritable_folder_are_refused_before_any_work(tmp_path, weights, capsys):
    """Once the check was only of the name: every file was segmented, then the table failed to write."""
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(1), AFFINE)
    assert predict(source, "-o", tmp_path / "out", "--weights", weights, "--stats", "/proc/statistics.csv") == 2
    err = capsys.readouterr().err.strip()
    assert "statistics folder /proc: cannot write in /proc" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["mask.nii.gzz", "mask.txt", "mask.csv"])
def test_an_output_name_with_a_typo_is_not_made_a_folder(name, tmp_path, weights, capsys):
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(1), AFFINE)
    assert predict(source, "-o", tmp_path / name, "--weights", weights) == 2
    assert "neither a folder nor a .nii/.nii.gz file name" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_single_bad_file_exits_2_with_one_line_and_writes_nothing(case, tmp_path, weights, capfd):
    build, words = BAD_CASES[case]
    path = build(tmp_path)
    before = sha(path)
    status = predict(path, "-o", tmp_path / "out", "--weights", weights)
    err = capfd.readouterr().err.strip().splitlines()  # file descriptors: nibabel's own handler included
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and words in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
    assert sha(path) == before


def test_single_file_to_a_named_output_with_options(tmp_path, weights, capsys, monkeypatch):
    """The options reach segment() as given, and the mask it returns is the one written."""
    import unetrpp.inference

    calls, real = [], unetrpp.inference.segment
    monkeypatch.setattr(unetrpp.inference, "segment", lambda *a, **k: calls.append(k) or calls.append(real(*a, **k))
                        or calls[-1])
    source = write_nifti(tmp_path / "ct.nii", ct_like(5), AFFINE)
    target = tmp_path / "mask.nii.gz"
    status = predict(source, "-o", target, "--weights", weights, "--tta", "--largest-component", "--overlap", "0.25",
                     "--precision", "bf16")
    assert status == 0, capsys.readouterr().err
    options, result = calls
    assert {k: options[k] for k in ("overlap", "tta", "largest_component", "precision")} == dict(
        overlap=0.25, tta=True, largest_component=True, precision="bf16")
    np.testing.assert_array_equal(np.asarray(nib.load(str(target)).dataobj), result.mask_on_source_grid())
    assert f"wrote {target}" in capsys.readouterr().out


def test_compile_and_batch_options_on_cpu_run_with_a_warning(tmp_path, weights, capsys):
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(2), AFFINE)
    status = predict(source, "-o", tmp_path / "out", "--weights", weights, "--compile", "--sw-batch-size", "2",
                     "--device", "cpu")  # on a GPU machine too
    err = capsys.readouterr().err
    assert status == 0 and "warning:" in err and "compile=True is for CUDA" in err
    assert (tmp_path / "out" / "ct.nii.gz").exists()


def test_mri_prints_a_warning(tmp_path, weights, capsys, fixtures):
    status = predict(fixtures / "example_mr_sm.nii.gz", "-o", tmp_path, "--weights", weights)
    err = capsys.readouterr().err
    assert status == 0 and "warning:" in err and "do not look like CT" in err


@pytest.mark.parametrize("args, words", [(["--device", "cuda:7"], "CUDA"), (["--overlap", "1.5"], "overlap"),
                                         (["--weights", "no/such/weights"], "not found"),
                                         (["--sw-batch-size", "0"], "sw-batch-size"),
                                         (["--device", "mps"], "runs on the CPU or on CUDA GPUs"),
                                         (["--sw-batch-size", "many"], "positive integer or auto")])
def test_bad_options_exit_2_without_output(args, words, tmp_path, weights, capsys):
    if "cuda" in args[-1] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(1), AFFINE)
    full = ["--weights", str(weights), *args] if args[0] != "--weights" else args
    status = predict(source, "-o", tmp_path / "out", *full)
    err = capsys.readouterr().err.strip()
    assert status == 2 and words in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_output_exits_2(tmp_path, weights, capsys):
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(1), AFFINE)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status = predict(source, "-o", blocker / "out.nii.gz", "--weights", weights)
    assert status == 2 and "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "file"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc as an unwritable folder")
def test_an_output_folder_it_cannot_write_is_refused_before_any_file_is_segmented(tmp_path, weights, capsys,
                                                                                   monkeypatch):
    """Once every file was segmented and then failed to be written, one `error:` line each."""
    import unetrpp.inference

    def stop(*args, **kwargs):
        raise AssertionError("segment() was reached")

    monkeypatch.setattr(unetrpp.inference, "segment", stop)
    sources = [write_nifti(tmp_path / f"ct{i}.nii.gz", ct_like(i), AFFINE) for i in range(2)]
    for output, words in (("/proc/self", "-o /proc/self: cannot write in /proc/self"),
                          (tmp_path / "absent" / "mask.nii.gz", "absent is not an existing folder")):
        assert predict(*sources[:1 if str(output).endswith(".gz") else 2], "-o", output, "--weights", weights) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct0.nii.gz", "ct1.nii.gz"]


def test_torchrun_ranks_share_the_files():
    files = list(range(7))
    shares = [distributed_share(files, {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r)})[0] for r in range(3)]
    assert sorted(sum(shares, [])) == files and shares[1] == [1, 4]
    assert distributed_share(files, {})[0] == files
    with pytest.raises(ValueError, match="RANK"):
        distributed_share(files, {"RANK": "3", "WORLD_SIZE": "3"})


def test_outputs_never_overwrite_inputs_or_foreign_side_cars(tmp_path, weights, capsys):
    """-o pointing at the input folder: a.nii's mask would be a.nii.gz (another input, or alone a file
    that is not a mask) and b's label side-car b.json would replace the user's own JSON; all are
    refused, nothing is lost. Several inputs and a file name as the output are refused too."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_nifti(folder / "a.nii", ct_like(1), AFFINE)
    write_nifti(folder / "a.nii.gz", ct_like(2), AFFINE)
    write_nifti(folder / "b.nii", ct_like(3), AFFINE)
    (folder / "b.json").write_text('{"RepetitionTime": 2.0}')
    before = {p.name: sha(p) for p in folder.iterdir()}
    status = predict(folder, "-o", folder, "--weights", weights)
    err = capsys.readouterr().err
    assert status == 2 and "a.nii.gz would overwrite an input file" in err and "b.json would overwrite" in err
    assert {p.name: sha(p) for p in folder.iterdir() if p.name in before} == before
    assert predict(folder / "a.nii", "-o", folder, "--weights", weights) == 2  # a.nii.gz: not an input now
    assert "a.nii.gz would overwrite an existing file that is not a UNETR++ mask" in capsys.readouterr().err
    assert predict(folder / "a.nii", folder / "b.nii", "-o", tmp_path / "both.nii.gz", "--weights", weights) == 2
    assert "2 inputs need an output folder" in capsys.readouterr().err
    assert {p.name: sha(p) for p in folder.iterdir() if p.name in before} == before
    assert not (tmp_path / "both.nii.gz").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.json").write_text('{"mine": true}')
    assert predict(folder / "b.nii", "-o", out, "--weights", weights) == 2
    assert "not a UNETR++ label table" in capsys.readouterr().err
    assert (out / "b.json").read_text() == '{"mine": true}' and not (out / "b.nii.gz").exists()
    (out / "b.json").unlink()
    assert predict(folder / "b.nii", "-o", out, "--weights", weights) == 0
    assert predict(folder / "b.nii", "-o", out, "--weights", weights) == 0  # a rerun replaces its own side-car


def test_two_names_of_one_output_file_are_one_result(tmp_path, weights, capsys, monkeypatch):
    """macOS and Windows file systems ignore case: a/ct.nii.gz and b/CT.nii.gz both go to out/ct.nii.gz, and on a
    Mac the second replaced the first's mask without a word. Simulated here by a hard link: a second name for the
    written mask, as a case-insensitive file system gives every spelling of it."""
    from unetrpp.inference import SegmentationResult

    for folder, name in (("a", "ct.nii.gz"), ("b", "CT.nii.gz")):
        (tmp_path / folder).mkdir()
        write_nifti(tmp_path / folder / name, ct_like(len(folder)), AFFINE)
    save = SegmentationResult.save

    def save_on_a_case_insensitive_disk(self, path, *args, **kwargs):
        written = save(self, path, *args, **kwargs)
        if path.name == "ct.nii.gz":
            path.with_name("CT.nii.gz").hardlink_to(path)
            path.with_name("CT.json").hardlink_to(path.with_name("ct.json"))
        return written

    monkeypatch.setattr(SegmentationResult, "save", save_on_a_case_insensitive_disk)
    out = tmp_path / "out"
    assert predict(tmp_path / "a", tmp_path / "b", "-o", out, "--weights", weights) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'b' / 'CT.nii.gz'}: output {out / 'CT.nii.gz'} would overwrite another result" in err, err
    assert "1 of 2 files failed" in err


def _broken_weights(kind: str, good, folder):
    shutil.copytree(good, folder)
    if kind == "truncated safetensors":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif kind == "missing safetensors":
        (folder / "model.safetensors").unlink()
    elif kind == "corrupt config":
        (folder / "config.json").write_text('{"name": "unetrpp_tiny", ')
    elif kind == "unknown preprocessing key":
        text = (folder / "config.json").read_text().replace('"spacing"', '"spacings"', 1)
        (folder / "config.json").write_text(text)
    elif kind in ("one-value clip", "preprocessing not a table"):  # once a traceback; once blamed on the scan
        config = json.loads((folder / "config.json").read_text())
        if kind == "one-value clip":
            config["preprocessing"]["clip"] = [-958.0]
        else:
            config["preprocessing"] = "ct"
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind, words", [("truncated safetensors", "model.safetensors: unreadable"),
                                         ("missing safetensors", "no model.safetensors"),
                                         ("corrupt config", "config.json: not a UNETR++ config"),
                                         ("unknown preprocessing key", "unknown preprocessing keys ['spacings']"),
                                         ("one-value clip", "need two HU values (low, high), e.g. (-958, 326)); correct that value"),
                                         ("preprocessing not a table", "UNETRPPConfig.preprocessing='ct': needs")])
def test_broken_weights_folder_is_one_line_and_writes_nothing(kind, words, tmp_path, weights, capsys):
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(1), AFFINE)
    broken = _broken_weights(kind, weights, tmp_path / "weights")
    status = predict(source, "-o", tmp_path / "out", "--weights", broken)
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_weights_it_cannot_use_are_refused_once_before_any_work(tmp_path, capsys):
    """Four-channel (BraTS-like) weights: one error line for the whole folder, and no output folder."""
    folder = tmp_path / "tumor_like"
    create_model("unetrpp_tiny", in_channels=4, patch_size=(16, 32, 32)).save_pretrained(folder)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_nifti(inputs / f"case{i}.nii.gz", ct_like(i), AFFINE)
    status = predict(inputs, "-o", tmp_path / "out", "--weights", folder)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("error: weights 'unetrpp_tiny' expect 4 input channels") and "single-channel" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_folder_without_nifti_files_points_to_the_subfolder_holding_them(tmp_path, weights, capsys):
    root = tmp_path / "Task002_Synapse"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text("{}")
    write_nifti(root / "imagesTr" / "img0001.nii.gz", ct_like(0), AFFINE)
    assert predict(root, "-o", tmp_path / "out", "--weights", weights) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {root}: no .nii/.nii.gz files in this folder (subfolders are not searched); "
                   f"{root / 'imagesTr'} holds some, give that folder")
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path, weights, capsys):
    sources = [write_nifti(tmp_path / f"ct{i}.nii.gz", ct_like(i), AFFINE) for i in range(2)]
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert predict(*sources, "-o", taken, "--weights", weights) == 2
    assert capsys.readouterr().err.strip() == f"error: -o {taken}: a file of that name exists; give a folder"
    assert taken.read_text() == "mine"
    assert predict(*sources, "-o", taken / "sub", "--weights", weights) == 2
    assert "cannot create this folder" in capsys.readouterr().err


def test_a_scan_wider_than_a_body_is_warned_about_before_the_run(tmp_path, weights, capsys, monkeypatch):
    """30 mm voxels in the header (a wrong unit, say): the run would take thousands of windows."""
    import unetrpp.inference

    def stop(*args, **kwargs):
        raise ValueError("segment() was reached")

    monkeypatch.setattr(unetrpp.inference, "segment", stop)
    source = write_nifti(tmp_path / "ct.nii.gz", ct_like(3, (40, 48, 56)), np.diag([30.0, 30.0, 30.0, 1.0]))
    assert predict(source, "-o", tmp_path / "mask.nii.gz", "--weights", weights) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "wider than a body" in err[0] and "windows to run)" in err[0], err
    assert "segment() was reached" in err[1]


def test_console_volumes_keep_small_organs_visible():
    """The per-file line names each organ with its volume: a few stray voxels are not '0 mL'."""
    from unetrpp.cli.predict import volume_text

    assert [volume_text(v) for v in (1520.4, 10.0, 9.96, 3.24, 0.05, 0.004)] == [
        "1520 mL", "10 mL", "10.0 mL", "3.2 mL", "0.1 mL", "<0.1 mL"]


def test_statistics_of_weights_trained_on_phantoms_say_synthetic(tmp_path, capsys):
    torch.manual_seed(0)
    folder = tmp_path / "teaching"
    create_model("unetrpp_tiny", patch_size=(16, 32, 32), preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)),
                 synthetic=True).save_pretrained(folder)
    (tmp_path / "scans").mkdir()
    for i in range(3):
        write_nifti(tmp_path / "scans" / f"ct{i}.nii.gz", ct_like(i), AFFINE)
    assert predict(tmp_path / "scans", "-o", tmp_path / "out", "--weights", folder, "--stats", tmp_path / "stats.csv") == 0
    lines = (tmp_path / "stats.csv").read_text().splitlines()
    assert lines[0] == "file,label,name,voxels,volume_ml,mean_hu,note" and len(lines) > 1
    err = capsys.readouterr().err
    assert err.count("trained on SYNTHETIC phantoms") == 1, err  # once for the run, not once per file
    assert all(line.endswith(",made by weights trained on SYNTHETIC phantoms: not real anatomy") for line in lines[1:])


def test_statistics_of_a_folder_holding_a_ct_and_an_mri_keep_both_means(tmp_path, weights, fixtures):
    """The mean is in HU for a CT and mean_intensity for an MRI: a folder of both (one weights) gets the two
    columns, each row filling its own, not a ValueError from the CSV writer after every file was segmented."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "ct.nii.gz", ct_like(1), AFFINE)
    shutil.copy(fixtures / "example_mr_sm.nii.gz", inputs / "mri.nii.gz")
    assert predict(inputs, "-o", tmp_path / "out", "--weights", weights, "--stats", tmp_path / "stats.csv") == 0
    lines = (tmp_path / "stats.csv").read_text().splitlines()
    assert lines[0] == "file,label,name,voxels,volume_ml,mean_hu,mean_intensity"
    by_file = {Path(line.split(",")[0]).name: line for line in lines[1:]}
    assert by_file["ct.nii.gz"].split(",")[-1] == "" and by_file["ct.nii.gz"].split(",")[-2] != ""
    assert by_file["mri.nii.gz"].split(",")[-2] == "" and by_file["mri.nii.gz"].split(",")[-1] != ""
    assert predict(inputs, "-o", tmp_path / "out", "--weights", weights, "--stats", tmp_path / "stats.csv") == 0


def _torchrun_predict(*args, ranks: int = 2):
    """`torchrun --nproc_per_node RANKS -m unetrpp predict ARGS` on the CPU (gloo), as a user on a GPU machine runs it."""
    import subprocess
    import sys

    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "unetrpp", "predict", *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_torchrun_a_bad_file_on_one_rank_does_not_stop_the_others(tmp_path, weights):
    """Rank 1's share is all bad files, done in a moment: its exit status 2 made torchrun stop rank 0 at once,
    and none of rank 0's good scans was written. Ranks now wait for each other and exit together; the one
    statistics table asked for lists every scan in input order (it was split into stats.rank0.csv, stats.rank1.csv)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [write_nifti(inputs / f"c{i}a.nii.gz", ct_like(i, shape=(48, 64, 64)), AFFINE) for i in range(3)]
    for i in range(3):
        (inputs / f"c{i}b.nii.gz").write_bytes(good[0].read_bytes()[:200])  # truncated: fails in a moment
    out, stats = tmp_path / "out", tmp_path / "out" / "stats.csv"
    done = _torchrun_predict(inputs, "-o", out, "--weights", weights, "--stats", stats, "--tta")  # rank 0: seconds
    assert done.returncode != 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [p.name for p in good], done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.csv")) == ["stats.csv"]
    files = [line.split(",")[0] for line in stats.read_text().splitlines()[1:]]
    assert list(dict.fromkeys(files)) == [str(p) for p in good]
    summary = [line for line in done.stderr.splitlines() if "files failed" in line]
    assert len(summary) == 1 and summary[0].startswith("3 of 6 files failed: "), done.stderr[-3000:]
    assert all(f"c{i}b.nii.gz" in summary[0] for i in range(3))


def test_torchrun_two_inputs_with_one_output_name_on_two_ranks(tmp_path, weights):
    """a/ct.nii.gz and b/ct.nii.gz both give out/ct.nii.gz. One process refuses the second; under torchrun they fell to
    two ranks, each wrote out/ct.nii.gz, and b's mask silently replaced a's (exit status 0)."""
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        write_nifti(tmp_path / folder / "ct.nii.gz", ct_like(seed), AFFINE)
    out = tmp_path / "out"
    done = _torchrun_predict(tmp_path / "a", tmp_path / "b", "-o", out, "--weights", weights)
    assert done.returncode != 0
    assert f"error: {tmp_path / 'b' / 'ct.nii.gz'}: output {out / 'ct.nii.gz'}" in done.stderr, done.stderr[-3000:]
    single = tmp_path / "single"
    assert predict(tmp_path / "a" / "ct.nii.gz", "-o", single, "--weights", weights) == 0
    assert sha(out / "ct.nii.gz") == sha(single / "ct.nii.gz")  # a's mask, as one process writes it


def test_a_file_named_twice_is_segmented_once(tmp_path, weights, capsys):
    """`predict scans/ct.nii.gz scans/` (or a shell glob plus one name) names ct.nii.gz twice: it was segmented,
    then counted as a failed second input whose mask would overwrite the first's, with exit status 2."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        write_nifti(scans / f"{name}.nii.gz", ct_like(len(name)), AFFINE)
    out = tmp_path / "out"
    assert predict(scans / "b.nii.gz", scans, scans / ".." / "scans" / "b.nii.gz", "-o", out, "--weights", weights) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err and captured.out.count("wrote") == 2, captured
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="a pseudo-terminal (POSIX)")
def test_torchrun_on_a_terminal_shows_the_bars_of_rank_0_only(tmp_path, weights):
    """In a terminal every rank's tqdm bars drew on the same line, each rank's redraw overwriting the other's (a
    flickering, garbled line); rank 0 alone draws them now, as in training."""
    import fcntl
    import struct
    import subprocess
    import sys
    import termios
    import threading

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        write_nifti(inputs / f"c{i}.nii.gz", ct_like(i), AFFINE)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a terminal 150 columns wide
    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unetrpp",
           "predict", str(inputs), "-o", str(tmp_path / "out"), "--weights", str(weights), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # a terminal's buffer is small: read while the ranks write
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "[rank 1/2] wrote" in shown and "[rank 0/2] files:" in shown, shown[-3000:]
    assert "[rank 1/2] files:" not in shown and "[rank 1/2] c1.nii.gz:" not in shown


def test_scans_with_no_organ_found_are_named_since_the_table_has_no_row_for_them(tmp_path, capsys):
    """--stats has one row per organ found: in a folder run, the scans where nothing was found vanish from it."""
    torch.manual_seed(0)
    folder = tmp_path / "blind"
    model = create_model("unetrpp_tiny", patch_size=(16, 32, 32), preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)))
    with torch.no_grad():
        model.out1.conv.conv.bias[0] = 1e4  # background everywhere
    model.save_pretrained(folder)
    (tmp_path / "scans").mkdir()
    for i in range(3):
        write_nifti(tmp_path / "scans" / f"ct{i}.nii.gz", ct_like(i), AFFINE)
    assert predict(tmp_path / "scans", "-o", tmp_path / "out", "--weights", folder, "--stats", tmp_path / "s.csv") == 0
    out = capsys.readouterr().out
    assert "note: no organ found in 3 of 3 scan(s), which therefore have no row in s.csv:" in out, out
    assert all(str(tmp_path / "scans" / f"ct{i}.nii.gz") in out.splitlines()[-1] for i in range(3))
    assert (tmp_path / "s.csv").read_text().count("\n") == 1  # the header alone


def test_ctrl_c_stops_a_rank_waiting_at_the_meeting_at_once(tmp_path):
    """A rank that has finished its share waits inside gloo for the others, where Python runs no signal handler:
    under torchrun, Ctrl-C left it there until torchrun killed it 30 s later. Here rank 0 of 2 waits for a rank 1
    that never comes, as it waits for one still segmenting a large scan."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)), RANK="0",
               WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = ("import sys, torch.distributed; from unetrpp.cli.predict import ranks_meet\n"
            "print('waiting', flush=True)\n"
            "try:\n    with ranks_meet('share', 2): pass\nexcept KeyboardInterrupt:\n    sys.exit(130)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "waiting\n"
        time.sleep(2)  # inside the meeting by now
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        proc.wait(timeout=20)
        assert proc.returncode == 130 and time.monotonic() - start < 10, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
        proc.wait()


def test_skip_existing_goes_on_where_a_stopped_run_ended(tmp_path, weights, capsys):
    """A run over many scans stopped part-way (Ctrl-C, a reboot, a job's time limit) had to start again from the first
    scan. --skip-existing segments only the scans without a finished mask (a mask without its side-car was stopped
    between the two), and --stats still lists every scan, the kept ones read back from their masks: the table a
    whole run writes."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(4):
        write_nifti(scans / f"ct{i}.nii.gz", ct_like(i), AFFINE)
    whole = tmp_path / "whole"
    assert predict(scans, "-o", whole, "--weights", weights, "--stats", whole / "s.csv") == 0
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ct0.nii.gz", "ct0.json", "ct1.nii.gz", "ct3.nii.gz", "ct3.json"):  # ct1: no side-car; ct2: not begun
        shutil.copy(whole / name, out / name)
        os.utime(out / name, ns=(10**18, 10**18))
    (out / ".ct2.nii.gz.k3j4.tmp.nii.gz").write_bytes(b"\x1f\x8b")  # what a killed write leaves
    capsys.readouterr()

    assert predict(scans, "-o", out, "--weights", weights, "--stats", out / "s.csv", "--skip-existing") == 0

    printed = capsys.readouterr().out
    assert "note: 2 of 4 scans already have their mask in" in printed and printed.count("wrote") == 3, printed
    assert printed.splitlines()[-1] == f"skipped 2 of 4 scans: their masks were already in {out} (--skip-existing)"
    assert [(out / f"ct{i}.nii.gz").stat().st_mtime_ns == 10**18 for i in range(4)] == [True, False, False, True]
    assert (out / "s.csv").read_text() == (whole / "s.csv").read_text()
    for i in range(4):
        assert (np.asarray(nib.load(str(out / f"ct{i}.nii.gz")).dataobj) ==
                np.asarray(nib.load(str(whole / f"ct{i}.nii.gz")).dataobj)).all()
        assert (out / f"ct{i}.json").read_text() == (whole / f"ct{i}.json").read_text()
    assert predict(scans / "ct0.nii.gz", "-o", out, "--weights", weights) == 0  # without it, as before: replaced
    assert (out / "ct0.nii.gz").stat().st_mtime_ns != 10**18


def test_torchrun_skip_existing_shares_out_what_is_left(tmp_path, weights):
    """Under torchrun each rank took the finished scans out of its own share: a run stopped when rank 1 had done its
    share and rank 0 not went on with rank 0 alone. The scans left are now shared out evenly; rank 0 says how many were
    skipped in all, and its one statistics table lists every scan, kept or segmented, in input order."""
    scans, whole, out = tmp_path / "scans", tmp_path / "whole", tmp_path / "out"
    scans.mkdir()
    for i in range(6):
        write_nifti(scans / f"ct{i}.nii.gz", ct_like(i), AFFINE)
    assert predict(scans, "-o", whole, "--weights", weights, "--stats", whole / "s.csv") == 0
    out.mkdir()
    for i in (1, 3, 5):  # rank 1's share, all done
        for name in (f"ct{i}.nii.gz", f"ct{i}.json"):
            shutil.copy(whole / name, out / name)
    done = _torchrun_predict(scans, "-o", out, "--weights", weights, "--stats", out / "s.csv", "--skip-existing")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("skipped 3 of 6 scans: their masks were already in") == 1, done.stdout
    assert done.stdout.count("note: 3 of 6 scans already have their mask in") == 1, done.stdout
    assert f"[rank 1/2] wrote {out / 'ct2.nii.gz'}" in done.stdout, done.stdout  # rank 0 has ct0 and ct4
    assert done.stdout.count("wrote") == 4  # ct0, ct2, ct4 and s.csv
    assert (out / "s.csv").read_text() == (whole / "s.csv").read_text()


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path, weights, capsys, monkeypatch):
    """Ctrl-C in the second of three scans: the first mask stays, nothing half-written is left, and the one line
    printed says how to go on (it said only "interrupted"); the same command with --skip-existing then does the rest."""
    from unetrpp import inference

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for i in range(3):
        write_nifti(scans / f"ct{i}.nii.gz", ct_like(i), AFFINE)
    real, calls = inference.segment, []

    def pressed_in_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "segment", pressed_in_the_second)
    assert predict(scans, "-o", out, "--weights", weights) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("interrupted: the masks already written are kept; the same command with --skip-existing goes on "
                       "from there"), err
    assert sorted(p.name for p in out.iterdir()) == ["ct0.json", "ct0.nii.gz"]
    monkeypatch.setattr(inference, "segment", real)
    assert predict(scans, "-o", out, "--weights", weights, "--skip-existing") == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("skipped 1 of 3 scans")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"ct{i}.{e}" for i in range(3) for e in ("json", "nii.gz"))


def test_a_job_time_limit_sigterm_ends_like_ctrl_c(tmp_path, weights):
    """A job's time limit (SLURM, Kubernetes) sends SIGTERM: the run vanished without a word (status -15), leaving the
    mask it was writing under a temporary name. It now ends as Ctrl-C does, saying how to go on."""
    import signal
    import subprocess
    import sys

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        write_nifti(scans / f"ct{i}.nii.gz", ct_like(i, shape=(40, 64, 64)), AFFINE)
    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)))
    cmd = [sys.executable, "-m", "unetrpp", "predict", str(scans), "-o", str(tmp_path / "out"), "--weights",
           str(weights), "--tta"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("wrote"), proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1].startswith("interrupted: the masks already written are kept"), err[-2000:]
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
