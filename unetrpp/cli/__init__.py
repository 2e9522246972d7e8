"""Command line: `python -m unetrpp COMMAND`. Each command lives in its own module here, exposing
`add_arguments(parser)` and `run(args) -> int`; this dispatcher turns expected errors (bad input,
missing files) into one line on stderr and exit status 2, with the traceback only under --debug."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module under unetrpp.cli, one-line help)
COMMANDS = {
    "predict": ("predict", "segment NIfTI files or folders with a UNETR++ model"),
    "convert": ("convert", "convert a released model_final_checkpoint.model into a weights folder"),
    "complexity": ("complexity", "print parameters, MACs/FLOPs and where they sit"),
    "phantom": ("phantom", "write synthetic abdominal CT phantoms in the BTCV layout"),
    "train": ("train", "train a UNETR++ network on a BTCV-layout folder"),
    "evaluate": ("evaluate", "per-organ Dice and HD95 of predicted masks against ground truth"),
}

EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError, OSError)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """All commands appear in --help; only the one being run has its module imported."""
    parser = argparse.ArgumentParser(
        prog="python -m unetrpp", description="UNETR++ for 3-D medical segmentation: segment scans, convert released "
        "checkpoints, train, evaluate. Not a medical device. `python -m unetrpp COMMAND --help` for each command.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if name == chosen:
            importlib.import_module(f"{__name__}.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.debug else logging.DEBUG, format="%(message)s")
    module = importlib.import_module(f"{__name__}.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt as exc:  # a command may say what was kept and how to go on
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
