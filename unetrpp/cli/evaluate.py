"""`python -m unetrpp evaluate`: per-organ Dice and HD95 (mm, or voxels) of predicted masks against ground truth."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="folder of predicted masks (.nii/.nii.gz)")
    parser.add_argument("--truth", required=True, help="folder of ground-truth masks, e.g. DATA/labelsTr")
    parser.add_argument("--out", default=None, help="write the results to a .csv or .json file")
    parser.add_argument("--organs", choices=("all", "synapse8"), default="all",
                        help="all (default): every class the predictions' label table names (masks written by unetrpp "
                             "predict), else the 13 BTCV organs; synapse8: the 8 BTCV organs of the Synapse "
                             "protocol the paper reports (spleen, kidneys, gallbladder, liver, stomach, aorta, pancreas)")
    parser.add_argument("--hd95-unit", choices=("mm", "voxels"), default="mm",
                        help="mm (default): from the truth's voxel spacing; voxels: voxel steps, as the original "
                             "evaluation (medpy without spacing), the unit of the HD95 the paper reports")


def run(args: argparse.Namespace) -> int:
    from unetrpp.evaluate import check_results_path, evaluate_folders, format_table, write_results
    from unetrpp.labels import BTCV_LABELS, SYNAPSE_EVAL_LABELS

    if args.out:
        check_results_path(args.out)  # before the scoring, not after it
    labels = {k: BTCV_LABELS[k] for k in SYNAPSE_EVAL_LABELS} if args.organs == "synapse8" else None
    result = evaluate_folders(args.pred, args.truth, labels, hd95_unit=args.hd95_unit)
    print(f"{len(result['cases'])} case(s); HD95 in {args.hd95_unit} (nan: organ empty in only one of prediction / truth)")
    print(format_table(result["mean"], args.hd95_unit))
    if absent := result["absent_in_truth"]:  # a table of 13 organs with the esophagus out of view reads 1.0 there
        print(f"note: no truth mask holds {', '.join(absent)}: scored by the empty-organ convention alone (Dice 1 "
              "where the prediction is empty too, else 0), which says nothing of the masks but moves the mean")
    if "note" in result:
        print(f"note: {result['note']}")
    if args.out:
        print(f"wrote {write_results(result, args.out)}")
    return 0
