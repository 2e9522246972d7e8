"""The last step of a segmentation on the CPU: 14 class maps from the network's grid back to a full-size CT.

Times `inference.probabilities_to_mask` against its earlier form, measured in the same run: each
class map resampled to the scan's grid with scipy's zoom (`preprocess.restore`), then a running
argmax. Random probabilities (the time does not depend on the values); prints both times, the ratio
and the fraction of voxels with the same label.

    python benchmarks/resample_back.py [--threads 2] [--shape 200 512 512] [--spacing 2.5 0.8 0.8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unetrpp import get_config  # noqa: E402
from unetrpp.inference import probabilities_to_mask  # noqa: E402
from unetrpp.preprocess import Prepared, restore  # noqa: E402


def scipy_class_by_class(probabilities: torch.Tensor, prepared: Prepared) -> np.ndarray:
    best = mask = None
    for c, p in enumerate(probabilities.numpy()):
        p = restore(p, prepared, order=1)
        if best is None:
            best, mask = p, np.zeros(p.shape, np.uint8)
            continue
        mask[p > best] = c
        np.maximum(best, p, out=best)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512], help="the scan's (z, y, x) voxels")
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], help="the scan's (z, y, x) mm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = get_config("unetrpp_synapse")
    target = config.preprocessing.spacing
    target_shape = tuple(round(n * s / t) for n, s, t in zip(args.shape, args.spacing, target))
    prepared = Prepared(np.zeros(target_shape, np.float32), tuple(args.shape), tuple(args.spacing), target)
    probabilities = torch.softmax(torch.randn((config.out_channels,) + target_shape,
                                              generator=torch.Generator().manual_seed(0)), 0)
    print(f"{config.out_channels} class maps {target_shape} at {target} mm -> {tuple(args.shape)} at "
          f"{tuple(args.spacing)} mm, {args.threads} threads, median of {args.repeats}")
    times = {"scipy, class by class": [], "probabilities_to_mask": []}
    for _ in range(args.repeats):
        for name, run in (("scipy, class by class", scipy_class_by_class), ("probabilities_to_mask", probabilities_to_mask)):
            start = time.perf_counter()
            masks = run(probabilities, prepared)
            times[name].append(time.perf_counter() - start)
            if name == "scipy, class by class":
                reference = masks
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in medians.items():
        print(f"{name:24s} {t:6.2f} s")
    print(f"ratio {medians['probabilities_to_mask'] / medians['scipy, class by class']:.2f}x; "
          f"same label: {100 * float((masks == reference).mean()):.5f} % of voxels")


if __name__ == "__main__":
    main()
