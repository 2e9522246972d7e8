"""What bfloat16 costs in quality and gains in time, against float32, on the CPU.

- max |logit| difference on the golden input with the golden synapse weights (tests/golden.py);
- fraction of voxels with the same label on the real CT example (tests/fixtures/example_ct.nii.gz),
  whole-volume inference, with the same golden synapse weights and with the bundled teaching weights;
- the wall time of each run.

    python benchmarks/precision.py [--threads 2] [--image tests/fixtures/example_ct.nii.gz]

The golden weights are a deterministic fill, not trained weights: their near-ties make the label
agreement a pessimistic figure; trained weights have larger margins.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from golden import FIXTURES, golden_state_dict  # noqa: E402

from unetrpp import UNETRPP, get_config, segment  # noqa: E402
from unetrpp.fast import optimize_for_inference  # noqa: E402
from unetrpp.pretrained import load_pretrained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image", type=Path, default=FIXTURES / "example_ct.nii.gz")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    synapse = UNETRPP(get_config("unetrpp_synapse", deep_supervision=True))
    synapse.load_state_dict(golden_state_dict("synapse"))
    synapse.deep_supervision = False
    optimize_for_inference(synapse.eval())
    g = np.load(FIXTURES / "official_synapse.npz")
    x = torch.randn(tuple(int(s) for s in g["input_shape"]), generator=torch.Generator().manual_seed(2026))
    with torch.inference_mode():
        ref = synapse(x)
        half = copy.deepcopy(synapse).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    print(f"golden input, golden synapse weights: max |logit fp32 - bf16| = {(ref - half).abs().max():.4f} "
          f"(logit std {ref.std():.2f}); same argmax {(ref.argmax(1) == half.argmax(1)).float().mean():.4%}")

    for label, model in (("golden synapse weights", synapse), ("teaching weights", load_pretrained("unetrpp_tiny_phantom"))):
        runs = {}
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            runs[precision] = segment(args.image, model=model, precision=precision)
            runs[precision].seconds = time.perf_counter() - start
        same = (runs["fp32"].mask == runs["bf16"].mask).mean()
        print(f"{args.image.name}, {label}: same label {same:.4%} of voxels; "
              f"fp32 {runs['fp32'].seconds:.1f} s, bf16 {runs['bf16'].seconds:.1f} s "
              f"({runs['fp32'].windows} windows)")


if __name__ == "__main__":
    main()
