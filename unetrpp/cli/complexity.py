"""`python -m unetrpp complexity`: parameters, MACs/FLOPs and where they sit; optionally the measured
forward time and peak memory of UNETR++ or a MONAI peer (run one network per process for a clean
peak RSS)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="unetrpp_synapse", help="UNETR++ preset (default: unetrpp_synapse)")
    parser.add_argument("--network", default="unetrpp", choices=("unetrpp", "unetr", "swin_unetr"),
                        help="unetrpp (default), or a MONAI peer at the same input")
    parser.add_argument("--input", type=int, nargs=5, metavar=("B", "C", "Z", "Y", "X"),
                        help="input shape (default: 1, in_channels, then the preset's patch size)")
    parser.add_argument("--no-deep-supervision", action="store_true",
                        help="count without the two extra deep-supervision heads (the paper counts them)")
    parser.add_argument("--time", type=int, default=0, metavar="N",
                        help="also run N timed forward passes on the CPU and report the median and peak RSS")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for --time")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def run(args: argparse.Namespace) -> int:
    import json
    import math

    import torch

    from ..complexity import build_network, count_flops, median_forward_seconds, parameter_breakdown, peak_rss_mb
    from ..config import get_config

    if args.input and min(args.input) < 1:  # a batch of 0 counts 0 MACs, and the report divides by the count
        raise ValueError(f"--input {' '.join(map(str, args.input))}: B, C, Z, Y and X must each be at least 1, "
                         "e.g. --input 1 1 64 128 128")
    cfg = get_config(args.name, deep_supervision=not args.no_deep_supervision)
    shape = tuple(args.input) if args.input else (1, cfg.in_channels, *cfg.patch_size)
    if args.network == "unetrpp":
        cfg.replace(patch_size=shape[2:], in_channels=shape[1])  # validates the input against the config
    extra = {"deep_supervision": cfg.deep_supervision} if args.network == "unetrpp" else {}
    model = build_network(args.network, shape, name=args.name, **extra)
    params = parameter_breakdown(model) if args.network == "unetrpp" else {"all": sum(
        p.numel() for p in model.parameters())}
    flops, per_module = count_flops(model, shape)
    report = {"network": args.network if args.network != "unetrpp" else cfg.name, "input": list(shape),
              "params": sum(params.values()), "macs": flops / 2, "flops": flops}
    if args.time:
        if args.threads:
            torch.set_num_threads(args.threads)
        report["seconds"] = median_forward_seconds(model, torch.randn(shape), repeats=args.time)
        report["threads"] = torch.get_num_threads()
        report["peak_rss_mb"] = peak_rss_mb()
    if args.json:
        print(json.dumps({**report, "params_by_component": params, "flops_by_module": per_module}))
        return 0
    total = report["params"]
    print(f"{report['network']}, input {'x'.join(map(str, shape))}"
          + (f", deep supervision {'on' if cfg.deep_supervision else 'off'}" if args.network == "unetrpp" else ""))
    print(f"parameters: {total:,} ({total / 1e6:.2f} M)")
    print(f"MACs:  {flops / 2e9:.2f} G   (the paper's 'FLOPs', multiply-accumulates)")
    print(f"FLOPs: {flops / 1e9:.2f} G   (torch.utils.flop_counter: 2 per multiply-add, norms/softmax not counted)")
    if "seconds" in report:
        rss = report["peak_rss_mb"]  # NaN where the system does not report it (Windows has no `resource`)
        print(f"forward: {report['seconds']:.3f} s median of {args.time} on {report['threads']} CPU threads, "
              + (f"peak RSS {rss:.0f} MB" if not math.isnan(rss) else "peak RSS not reported on this system"))
    if args.network == "unetrpp":
        print("\nparameters by component:")
        for label, n in params.items():
            print(f"  {n / 1e6:8.3f} M  {100 * n / total:5.1f} %  {label}")
    print("\nMACs by module:")
    for name, f in sorted(per_module.items(), key=lambda kv: -kv[1]):
        print(f"  {f / 2e9:8.2f} G  {100 * f / flops:5.1f} %  {name}")
    return 0
