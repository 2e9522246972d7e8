"""`python -m unetrpp phantom`: write SYNTHETIC abdominal CT phantoms in the BTCV layout."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, dataset.json); a phantom "
                        "folder made with the same --seed and --size gets the cases added")
    parser.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed; case i uses (seed, i), so the same seed gives the same bytes")
    parser.add_argument("--size", choices=("default", "small"), default="default",
                        help="default: 72 x 384 x 384 voxels at 2.5 x 0.85 x 0.85 mm (BTCV-like); small: 24 x 96 x 96 for tests")
    parser.add_argument("--first-index", type=int, default=1, help="number of the first case (img0001 by default)")


def run(args: argparse.Namespace) -> int:
    import time

    from unetrpp.data.btcv import read_datalist
    from unetrpp.data.phantom import write_phantom_dataset

    start = time.time()
    out = write_phantom_dataset(args.out, args.cases, args.seed, args.size, args.first_index)
    print(f"wrote {args.cases} SYNTHETIC phantom case(s) (seed {args.seed}, size {args.size}) to {out} "
          f"in {time.time() - start:.1f} s; its dataset.json lists {len(read_datalist(out)['training'])} case(s)")
    return 0
