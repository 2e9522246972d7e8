"""`python -m unetrpp evaluate`: per-organ Dice and HD95 (mm) of predicted masks against ground truth."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="folder of predicted masks (.nii/.nii.gz)")
    parser.add_argument("--truth", required=True, help="folder of ground-truth masks, e.g. DATA/labelsTr")
    parser.add_argument("--out", default=None, help="write the results to a .csv or .json file")


def run(args: argparse.Namespace) -> int:
    from unetrpp.evaluate import evaluate_folders, format_table, write_results

    result = evaluate_folders(args.pred, args.truth)
    print(f"{len(result['cases'])} case(s); HD95 in mm (nan: organ empty in only one of prediction / truth)")
    print(format_table(result["mean"]))
    if args.out:
        print(f"wrote {write_results(result, args.out)}")
    return 0
