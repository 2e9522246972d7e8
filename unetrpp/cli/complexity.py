"""`python -m unetrpp complexity`: parameters, MACs/FLOPs and where the parameters sit."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="unetrpp_synapse", help="preset name (default: unetrpp_synapse)")
    parser.add_argument("--input", type=int, nargs="+", metavar="N",
                        help="input shape B C Z Y X (default: 1, in_channels, then the preset's patch size)")
    parser.add_argument("--no-deep-supervision", action="store_true",
                        help="count without the two extra deep-supervision heads (the paper counts them)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..complexity import count_flops, parameter_breakdown
    from ..config import get_config
    from ..model import UNETRPP

    cfg = get_config(args.name, deep_supervision=not args.no_deep_supervision)
    shape = tuple(args.input) if args.input else (1, cfg.in_channels, *cfg.patch_size)
    if len(shape) != 5:
        raise ValueError(f"--input {' '.join(map(str, shape))}: give five numbers B C Z Y X, e.g. 1 1 64 128 128")
    with torch.device("meta"):
        model = UNETRPP(cfg.replace(patch_size=shape[2:], in_channels=shape[1]))
    params = parameter_breakdown(model)
    flops, per_module = count_flops(model, shape)
    total = sum(params.values())
    print(f"{cfg.name}, input {'x'.join(map(str, shape))}, deep supervision {'on' if cfg.deep_supervision else 'off'}")
    print(f"parameters: {total:,} ({total / 1e6:.2f} M)")
    print(f"MACs:  {flops / 2e9:.2f} G   (the paper's 'FLOPs', multiply-accumulates)")
    print(f"FLOPs: {flops / 1e9:.2f} G   (torch.utils.flop_counter: 2 per multiply-add, norms/softmax not counted)")
    print("\nparameters by component:")
    for label, n in params.items():
        print(f"  {n / 1e6:8.3f} M  {100 * n / total:5.1f} %  {label}")
    print("\nMACs by module:")
    for name, f in sorted(per_module.items(), key=lambda kv: -kv[1]):
        print(f"  {f / 2e9:8.2f} G  {100 * f / flops:5.1f} %  {name}")
    return 0
