"""The device check (benchmarks/gpu.py) runs end to end in its CPU smoke mode, so that the few
minutes of a lent GPU are not lost to a broken script."""

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
