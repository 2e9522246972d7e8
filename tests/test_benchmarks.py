"""The benchmark scripts run end to end on small inputs: the device check (benchmarks/gpu.py) in its CPU smoke
mode, so that the few minutes of a lent GPU are not lost to a broken script, and resample_back.py and fullct.py."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_prints_every_section():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--no-compile"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for section in ("windows per second", "whole example_ct_sm.nii.gz through segment()", "agreement with the CPU",
                    "summary"):
        assert section in out, out
    rates = [float(m) for m in re.findall(r"^  (?:fp32|fp16 autocast|bf16 autocast|bf16 weights) +\d+ +([\d.]+)", out, re.M)]
    assert len(rates) == 2 * 4 and all(r > 0 for r in rates), out  # one batch size per precision, table and summary
    same = {label: float(v) for label, v in re.findall(r"^  (fp32|precision='bf16') +same label as the CPU on +([\d.]+)%",
                                                        out, re.M)}
    assert same["fp32"] == 100.0 and same["precision='bf16'"] > 99.0, out  # the CPU against itself


def test_resample_back_benchmark_times_both_paths_and_they_agree():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "resample_back.py"), "--shape", "12", "40", "44",
                           "--repeats", "1", "--threads", "1"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    times = re.findall(r"^(scipy, class by class|probabilities_to_mask) +([\d.]+) s$", done.stdout, re.M)
    assert [name for name, _ in times] == ["scipy, class by class", "probabilities_to_mask"], done.stdout
    same = re.search(r"same label: ([\d.]+) % of voxels", done.stdout)
    assert same and float(same.group(1)) > 99.9, done.stdout


def test_fullct_benchmark_times_every_stage_of_a_small_synthetic_ct():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fullct.py"), "--shape", "24", "64", "64",
                           "--spacing", "6", "3", "3", "--phantom", "small", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("SYNTHETIC CT 24 x 64 x 64 (z, y, x) at 6.0 x 3.0 x 3.0 mm"), done.stdout
    rows = re.findall(r"^ *(.+?) +([\d.]+) +(?:[\d.]+ GB|-)", done.stdout, re.M)
    names = [name for name, _ in rows]
    for stage in ("upload: read, reorient, int16 copy, CT check", "segment() in all", "windows and stitching (the network)",
                  "resampling back, argmax", "statistics", "writing the mask (.nii.gz)", "3-D surfaces", "all of it"):
        assert stage in names, done.stdout
    seconds = dict(rows)
    assert float(seconds["segment() in all"]) <= float(seconds["all of it"]), done.stdout
