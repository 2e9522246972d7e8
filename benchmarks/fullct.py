"""A full-size CT through the viewer's path, stage by stage: what a visitor waits for besides the network.

Makes a SYNTHETIC CT itself (the `unetrpp.data.phantom` phantom, stretched to `--shape` at `--spacing`, with
scanner-like noise, stored as int16 with a rescale intercept and LPS axes as DICOM converters write it: not patient
data), then runs what the viewer runs on an upload: `load_scan`, `segment_scan` (reading held, `segment()` stage by
stage, writing the mask and the table), the three views, the organ table and the 3-D surfaces. Prints the seconds
and the peak resident memory of each stage (Linux: sampled every 5 ms) and of the whole run.

    python benchmarks/fullct.py                                    # 512 x 512 x 250 at 0.75 x 0.75 x 2 mm
    python benchmarks/fullct.py --shape 400 512 512 --spacing 1 0.7 0.7
    python benchmarks/fullct.py --weights synapse                  # the synapse network, RANDOM weights
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unetrpp import inference, io, preprocess, viewer  # noqa: E402
from unetrpp.complexity import peak_rss_mb  # noqa: E402
from unetrpp.data.phantom import generate_case  # noqa: E402

STAGES: dict[str, list[float]] = {}  # name -> [seconds, peak RSS in bytes]
_current: list[str] = []  # the stages running, outermost first


def _watch_memory() -> None:
    """Record the resident memory of the stages running, every 5 ms (Linux; elsewhere nothing)."""
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        for label in list(_current):  # every stage running, the inner ones and those around them
            entry = STAGES.setdefault(label, [0.0, 0])
            entry[1] = max(entry[1], rss)
        time.sleep(0.005)


def timed(module, name: str, label: str) -> None:
    """Replace `module.name` by the same function timed under `label`."""
    function = getattr(module, name)

    @functools.wraps(function)
    def run(*args, **kwargs):
        _current.append(label)
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            STAGES.setdefault(label, [0.0, 0])[0] += time.perf_counter() - start
            _current.pop()

    setattr(module, name, run)


def timed_stages() -> list[tuple[object, str, str]]:
    """(module, function, label) of each stage, in the order they are printed; indented: inside the one above."""
    return [(viewer, "load_scan", "upload: read, reorient, int16 copy, CT check"),
            (inference, "ct_warning", "  intensity check (CT or not; upload and segment())"),
            (viewer, "segment_scan", "segment_scan in all (segment, files, session)"),
            (inference, "segment", "  segment() in all"),
            (preprocess, "resample", "    resampling to the weights' spacing"),
            (inference, "sliding_window_probabilities", "    windows and stitching (the network)"),
            (inference, "probabilities_to_mask", "    resampling back, argmax"),
            (inference, "organ_statistics", "    statistics"),
            (io, "save_mask", "  writing the mask (.nii.gz)"),
            (viewer, "render_all", "three views (before and after the run)"),
            (viewer, "surfaces", "3-D surfaces")]


def synthetic_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], phantom: str) -> None:
    """A SYNTHETIC phantom stretched to `shape` (Z, Y, X) voxels, labelled with `spacing` (z, y, x) mm, written as
    int16 HU + 1024 with scl_inter -1024 and the x and y axes stored flipped (LPS), as DICOM converters often do."""
    image, _, _ = generate_case(0, 0, phantom)
    hu = ndimage.zoom(image.astype(np.float32), [n / m for n, m in zip(shape, image.shape)], order=1, grid_mode=True,
                      mode="nearest")
    hu += np.random.default_rng(0).normal(0, 12, hu.shape).astype(np.float32)  # noise, so gzip works as on a scan
    stored = np.round(hu + 1024).astype(np.int16).transpose(2, 1, 0)[::-1, ::-1]  # (i, j, k) = (-x, -y, z)
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    img = nib.Nifti1Image(np.asfortranarray(stored), affine)
    img.header.set_slope_inter(1.0, -1024.0)
    img.header["descrip"] = b"SYNTHETIC phantom (unetrpp.data.phantom), not patient data"
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[250, 512, 512], help="the CT's (z, y, x) voxels")
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.0, 0.75, 0.75], help="the CT's (z, y, x) mm")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "unetrpp_tiny_phantom"),
                        help="a weights folder (default: the bundled teaching weights) or 'synapse' (random weights)")
    parser.add_argument("--phantom", choices=("default", "small"), default="default",
                        help="the phantom drawn, then stretched")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.weights == "synapse":
        from unetrpp import create_model

        model = create_model("unetrpp_synapse")
    else:
        from unetrpp.pretrained import load_pretrained

        model = load_pretrained(args.weights)
    folder = Path(tempfile.mkdtemp(prefix="unetrpp-fullct-"))
    path = folder / "synthetic_ct.nii.gz"
    start = time.perf_counter()
    synthetic_ct(path, tuple(args.shape), tuple(args.spacing), args.phantom)
    print(f"SYNTHETIC CT {' x '.join(map(str, args.shape))} (z, y, x) at {' x '.join(map(str, args.spacing))} mm, "
          f"{path.stat().st_size / 1e6:.0f} MB .nii.gz, made in {time.perf_counter() - start:.1f} s; weights "
          f"{args.weights}; {args.threads} threads")
    for module, name, label in timed_stages():
        timed(module, name, label)
    if os.path.exists("/proc/self/statm"):
        threading.Thread(target=_watch_memory, daemon=True).start()
    _current.append("all of it")  # from the upload on: making the CT is not part of it
    start = time.perf_counter()
    session = viewer.load_scan(path)
    viewer.render_all(session, viewer.Display())
    session, mask_path, _ = viewer.segment_scan(path, model, folder, held=session)
    viewer.render_all(session, viewer.Display())
    viewer.statistics_rows(session.statistics)
    viewer.legend_html(session)
    viewer.surfaces(session)
    total = time.perf_counter() - start
    print(f"{session.summary}; mask {Path(mask_path).stat().st_size / 1e6:.1f} MB")
    print(f"{'stage':52s} {'seconds':>8s} {'peak RSS':>9s}")
    for _, _, label in timed_stages():
        seconds, rss = STAGES.get(label, (0.0, 0))
        print(f"{label:52s} {seconds:8.2f} " + (f"{rss / 1e9:7.2f} GB" if rss else "      -"))  # too short to sample
    peak = STAGES.get("all of it", (0.0, peak_rss_mb() * 2**20))[1]  # elsewhere than Linux: the process's
    print(f"{'all of it':52s} {total:8.2f} {peak / 1e9:7.2f} GB")


if __name__ == "__main__":
    main()
