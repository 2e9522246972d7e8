"""`python -m unetrpp convert`: a released model_final_checkpoint.model -> a weights folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="released model_final_checkpoint.model")
    parser.add_argument("--name", default=None,
                        help="unetrpp_synapse, unetrpp_acdc, unetrpp_tumor or unetrpp_lung (default: detect)")
    parser.add_argument("--out", required=True, help="output folder, e.g. weights/unetrpp_synapse")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="target spacing in mm the weights expect (default: the preset's)")
    parser.add_argument("--orientation", help="axis codes the weights expect, e.g. RAS (default: the preset's)")
    parser.add_argument("--clip", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT clip range in HU")
    parser.add_argument("--mean", type=float, help="CT normalisation mean (after clipping)")
    parser.add_argument("--std", type=float, help="CT normalisation standard deviation")


def run(args: argparse.Namespace) -> int:
    from ..io import check_folder_can_be_written
    from ..pretrained import convert_original, how_to_use, read_config

    # before the checkpoint is read (seconds for the large ones); also refuses an --out that is a file
    out = check_folder_can_be_written(args.out)  # convert_original refuses a folder that is not empty
    overrides = {k: getattr(args, k) for k in ("spacing", "orientation", "clip", "mean", "std")
                 if getattr(args, k) is not None}
    path = convert_original(args.checkpoint, out, name=args.name, **overrides)
    config = read_config(path)
    if config.in_channels == 1:
        print(f"wrote {path} (config.json + model.safetensors); use it with --weights {path}")
    else:  # predict would refuse it: say what works instead
        print(f"wrote {path} (config.json + model.safetensors). {how_to_use(config).replace('THIS_FOLDER', str(path))}")
    return 0
