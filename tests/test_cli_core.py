"""The core commands: complexity and convert, as a user runs them."""

import subprocess
import sys

import torch

from unetrpp.cli import main
from unetrpp.pretrained import load_pretrained

from golden import save_released_style


def test_complexity_reports_paper_macs(capsys):
    assert main(["complexity", "--name", "unetrpp_synapse"]) == 0
    out = capsys.readouterr().out
    macs = float(out.split("MACs:")[1].split("G")[0])
    assert abs(macs - 47.47) / 47.47 < 0.005
    assert "42,952,850" in out and "EPA spatial projections E/F" in out


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


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    bad = tmp_path / "notes.model"
    bad.write_text("not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "unetrpp", "convert", str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model_final_checkpoint.model" in lines[0]
    assert not (tmp_path / "o").exists()
