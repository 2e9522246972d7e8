"""The core commands: complexity and convert, as a user runs them."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from unetrpp.cli import COMMANDS, build_parser, main
from unetrpp.pretrained import load_pretrained

from golden import save_released_style


def _macs_by_hand(model, shape):
    """Multiply-accumulates of one forward, summed layer by layer from weight shapes and the sizes hooks
    see: every Conv3d (output voxels x in/groups x kernel), ConvTranspose3d (input voxels x in x out x
    kernel), Linear (rows x in x out; E and F included), and per EPA block the two N x P x C products of
    its spatial attention plus the two N x C x d of its channel attention (unetrpp.attention).
    Norms, softmax and additions count nothing, as in torch.utils.flop_counter."""
    from unetrpp.attention import EPA

    total = []

    def hook(module, inputs, output):
        x = inputs[0]
        if isinstance(module, torch.nn.Conv3d):
            total.append(output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size))
        elif isinstance(module, torch.nn.ConvTranspose3d):
            total.append(x.numel() * module.out_channels // module.groups * math.prod(module.kernel_size))
        elif isinstance(module, torch.nn.Linear):
            total.append(x.numel() * module.out_features)
        elif isinstance(module, EPA):  # its E/F Linear calls are counted above; a "single" EF is a matmul
            B, N, C = x.shape
            P, d = module.EF.shape[1] if module.kv_projection == "single" else module.E.out_features, C // module.heads
            projections = 2 * N * P * C if module.kv_projection == "single" else 0
            total.append(B * (projections + 2 * N * P * C + 2 * N * C * d))

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.Linear, EPA)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(shape, device="meta"))
    return sum(total)


def test_complexity_macs_equal_the_sum_over_layers_by_hand(capsys):
    """The CLI's MACs (flop_counter / 2) against an independent layer-by-layer count on the same network
    (synapse, deep supervision on, 64 x 128 x 128); ~47.5 G, the paper's 47.98 G counted by fvcore also
    holds some element-wise ops (unetrpp/complexity.py)."""
    from unetrpp import create_model
    with torch.device("meta"):
        model = create_model("unetrpp_synapse", deep_supervision=True).eval()
    expected = _macs_by_hand(model, (1, 1, 64, 128, 128))
    assert abs(expected / 1e9 - 47.98) / 47.98 < 0.02  # near the paper's
    assert main(["complexity", "--name", "unetrpp_synapse"]) == 0
    out = capsys.readouterr().out
    assert f"MACs:  {expected / 1e9:.2f} G" in out
    assert "42,952,850" in out and "EPA spatial projections E/F" in out
    assert main(["complexity", "--name", "unetrpp_synapse", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == expected  # integer sums, so exactly


def test_complexity_options_reach_the_count(capsys):
    """--no-deep-supervision drops the two heads, --input sets the patch, --network counts a MONAI peer."""
    from monai.networks.nets import UNETR

    from unetrpp import create_model
    with torch.device("meta"):
        plain = create_model("unetrpp_tiny", patch_size=(32, 128, 128)).eval()
    assert main(["complexity", "--name", "unetrpp_tiny", "--no-deep-supervision", "--input", "1", "1", "32", "128",
                 "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"] == [1, 1, 32, 128, 128] and report["macs"] == _macs_by_hand(plain, (1, 1, 32, 128, 128))
    assert report["params"] == sum(p.numel() for p in plain.parameters())
    assert main(["complexity", "--network", "unetr", "--input", "1", "1", "32", "64", "64", "--json"]) == 0
    peer = json.loads(capsys.readouterr().out)
    unetr = UNETR(1, 14, img_size=(32, 64, 64), feature_size=16, hidden_size=768)
    assert peer["network"] == "unetr" and peer["params"] == sum(p.numel() for p in unetr.parameters())


def test_complexity_timing_on_windows_says_the_peak_memory_is_not_reported(capsys, monkeypatch):
    """Windows has no `resource` module: the report printed "peak RSS nan MB"."""
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource -> ImportError, as on Windows
    assert main(["complexity", "--name", "unetrpp_tiny", "--input", "1", "1", "16", "32", "32", "--time", "1",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "peak RSS not reported on this system" in out and "nan" not in out


@pytest.mark.parametrize("network, fit", [("unetr", "48 x 64 x 64"), ("swin_unetr", "64 x 64 x 64")])
def test_complexity_refuses_an_input_a_peer_cannot_take_in_one_line(network, fit, capsys):
    """Notebook 02's exercise 1: UNETR failed with an 88-line tensor-size traceback (exit 1), Swin-UNETR
    with MONAI's line that gave no size that works."""
    assert main(["complexity", "--network", network, "--input", "1", "1", "40", "64", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "(40, 64, 64)" in err
    assert "multiple of" in err and f"try {fit}" in err


@pytest.mark.parametrize("network", ["unetrpp", "unetr"])
def test_complexity_refuses_an_empty_batch_or_no_channels_in_one_line(network, capsys):
    """A batch of 0 ended in a ZeroDivisionError traceback, 0 channels in UNETR's broadcasting error."""
    for shape in (["0", "1", "32", "64", "64"], ["1", "0", "32", "64", "64"]):
        assert main(["complexity", "--network", network, "--input", *shape]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--input {' '.join(shape)}: " in err and "at least 1" in err


def test_convert_writes_a_folder_that_reproduces_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    with torch.device("cpu"):
        from unetrpp import create_model
        original = create_model("unetrpp_synapse", deep_supervision=True).eval()
    ckpt = save_released_style(original.state_dict(), tmp_path / "model_final_checkpoint.model")
    out = tmp_path / "weights" / "unetrpp_synapse"
    assert main(["convert", str(ckpt), "--out", str(out), "--spacing", "3", "0.8", "0.8"]) == 0
    model = load_pretrained(out)
    assert model.config.preprocessing.spacing == (3.0, 0.8, 0.8)
    x = torch.randn(1, 1, 64, 128, 128)
    original.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    card = (out / "README.md").read_text()
    assert "from `model_final_checkpoint.model`, a checkpoint released with UNETR++" in card and "spacing 3 x 0.8 x 0.8 mm" in card
    assert "More Information Needed" not in card  # not the Hub's blank template
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable as config.json is
    assert main(["convert", str(ckpt), "--out", str(out / "config.json")]) == 2  # an existing file as --out


def test_converted_tumor_weights_say_how_they_are_used_not_predict(tmp_path, capsys):
    """predict refuses 4-channel weights; the card and the command once sent people there all the same."""
    from unetrpp import create_model

    ckpt = save_released_style(create_model("unetrpp_tumor", deep_supervision=True).state_dict(), tmp_path / "t.model")
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "tumor")]) == 0
    said = capsys.readouterr().out
    card = (tmp_path / "tumor" / "README.md").read_text()
    for text in (said, card):
        assert "UNETRPP.from_pretrained(" in text and "(B, 4, 128, 128, 128)" in text
        assert "take single-channel weights only" in text and "--weights" not in text


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    bad = tmp_path / "notes.model"
    bad.write_text("not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "unetrpp", "convert", str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model_final_checkpoint.model" in lines[0]
    assert not (tmp_path / "o").exists()


def test_convert_checks_its_output_folder_before_reading_the_checkpoint(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "not_read.model"), "--out", "/proc/unetrpp_weights"]) == 2
    err = capsys.readouterr().err
    assert "--out /proc/unetrpp_weights: cannot write in /proc" in err and "not_read" not in err


def test_convert_checks_the_name_before_reading_the_checkpoint(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "not_read.model"), "--out", str(tmp_path / "o"), "--name", "synapse"]) == 2
    err = capsys.readouterr().err
    assert "unknown UNETR++ model name 'synapse'" in err and "not_read" not in err


def test_a_file_of_a_weights_folder_is_answered_with_the_folder(tmp_path):
    from unetrpp import create_model

    create_model("unetrpp_tiny").save_pretrained(tmp_path / "w")
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(ValueError, match=f"part of the weights folder {tmp_path / 'w'}.*--weights {tmp_path / 'w'}"):
            load_pretrained(tmp_path / "w" / name)


def test_lung_checkpoint_needs_its_preprocessing_numbers(tmp_path, capsys):
    """The spec gives no lung preprocessing: converting without them would silently use the synapse CT ones."""
    from unetrpp import create_model

    ckpt = save_released_style(create_model("unetrpp_lung", deep_supervision=True).state_dict(), tmp_path / "lung.model")
    out = tmp_path / "weights" / "unetrpp_lung"
    assert main(["convert", str(ckpt), "--out", str(out), "--spacing", "1.5", "0.8", "0.8"]) == 2
    assert "unetrpp_lung: the release does not state the preprocessing" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert", str(ckpt), "--out", str(out), "--spacing", "1.5", "0.8", "0.8", "--clip", "-1000", "500",
                 "--mean", "nan", "--std", "400"]) == 2  # would write "mean": NaN, which is not JSON
    assert "a finite mean" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="--spacing --clip --mean --std"):
        load_pretrained(ckpt)
    assert main(["convert", str(ckpt), "--out", str(out), "--spacing", "1.5", "0.8", "0.8", "--clip", "-1000", "500",
                 "--mean", "-300", "--std", "400"]) == 0
    pre = load_pretrained(out).config.preprocessing
    assert (pre.spacing, pre.clip, pre.mean, pre.std) == ((1.5, 0.8, 0.8), (-1000.0, 500.0), -300.0, 400.0)


def test_help_and_configs_do_not_import_torch():
    """`python -m unetrpp --help` answers at once: torch and MONAI load only when the network is used;
    the lazily loaded names and the submodules are still attributes of the package."""
    probe = ("import sys, unetrpp; from unetrpp import get_config; get_config('unetrpp_synapse'); "
             "from unetrpp.cli import build_parser; build_parser(['predict']).format_help(); "
             "heavy = sorted({'torch', 'monai'} & set(sys.modules)); "
             "from unetrpp import segment, UNETRPP; print(heavy, segment.__module__, UNETRPP.__module__, "
             "unetrpp.evaluate.__name__, hasattr(unetrpp, 'nope'))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "unetrpp.inference", "unetrpp.model", "unetrpp.evaluate", "False"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_with_a_default_says_it_in_its_help(command):
    """`python -m unetrpp COMMAND --help` is where a user looks up what a run will do unasked: an option
    whose default is a value (not off, not absent) names that value in its help."""
    import argparse

    sub = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        default = action.default
        if action.help == argparse.SUPPRESS or default in (None, False, [], argparse.SUPPRESS):
            continue
        spelled = {str(default)} if isinstance(default, str) else {
            str(default), f"{default:g}", f"{default:.0e}".replace("e-0", "e-")}
        assert "default" in (action.help or "") and any(v in action.help for v in spelled), (
            f"{command} {action.option_strings}: default {default!r} not in help {action.help!r}")


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_train_refuses_a_non_positive_thread_count_before_reading_data(tmp_path, capsys, threads):
    """--threads -1 was a RuntimeError traceback from torch, --threads 0 silently meant torch's default."""
    before = torch.get_num_threads()
    args = ["train", "--data", str(tmp_path / "no such data"), "--out", str(tmp_path / "run"), "--threads", threads]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: --threads {threads}: need a positive number of CPU threads, e.g. --threads 4, or leave " \
                  "it out for torch's default\n"  # one line, and about the threads, not the missing data
    assert torch.get_num_threads() == before and not (tmp_path / "run").exists()


def test_train_says_synthetic_in_its_last_line_when_trained_on_phantoms(tmp_path, capsys, monkeypatch):
    """The console's last word on a phantom run said nothing of the data ("... mean Dice 0.003"), unlike
    the model card; it now says SYNTHETIC as the card does, and a run on other data still does not."""
    from unetrpp import create_model
    from unetrpp.data.phantom import write_phantom_dataset
    from unetrpp.pretrained import save_for_inference
    from unetrpp.train import TrainResult

    data = write_phantom_dataset(tmp_path / "ph", cases=2, seed=3, size="small")
    tiny = ["--patch-size", "16", "32", "32", "--spacing", "10", "6", "6", "--max-steps", "2", "--val-every", "2",
            "--val-cases", "1", "--samples-per-case", "2", "--warmup-steps", "1", "--threads", "1", "--no-progress"]
    before = torch.get_num_threads()
    try:
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *tiny]) == 0
    finally:
        torch.set_num_threads(before)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"trained 2 steps on SYNTHETIC phantoms; model saved to {tmp_path / 'run/model'} "
                           "(teaching weights, not a segmentation of real anatomy); last validation mean Dice ")

    real = save_for_inference(create_model("unetrpp_tiny"), tmp_path / "real")  # not synthetic
    monkeypatch.setattr("unetrpp.train.train", lambda options: TrainResult(tmp_path, real, 5, []))
    assert main(["train", "--data", str(tmp_path / "scans"), "--out", str(tmp_path / "run2")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trained 5 steps; model saved to {real}"


def test_train_options_reach_the_run(tmp_path, monkeypatch):
    """--optimizer sgd takes SGD's own default lr, --set/--spacing/--patch-size merge into the config the run
    records, and --flip-prob reaches the run's options."""
    from unetrpp.train import TrainResult, build_config

    seen = []
    monkeypatch.setattr("unetrpp.train.train", lambda options: seen.append(options) or TrainResult(tmp_path, None, 0, []))
    assert main(["train", "--data", "d", "--out", str(tmp_path / "run"), "--optimizer", "sgd", "--flip-prob", "0.5",
                 "--set", "feature_size=8", "--set", 'preprocessing={"orientation": "LPS"}', "--spacing", "3", "2", "2",
                 "--patch-size", "32", "64", "64"]) == 0
    options = seen[0]
    assert (options.optimizer, options.lr, options.flip_prob) == ("sgd", 1e-2, 0.5)
    config = build_config(options.name, options.config_overrides)
    assert config.feature_size == 8 and config.patch_size == (32, 64, 64)
    assert config.preprocessing.spacing == (3.0, 2.0, 2.0) and config.preprocessing.orientation == "LPS"
    assert main(["train", "--data", "d", "--out", str(tmp_path / "run")]) == 0
    assert (seen[1].optimizer, seen[1].lr) == ("adamw", 2e-3)
