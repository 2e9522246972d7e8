"""Median forward time of UNETR++ (synapse, 1x1x64x128x128, no deep supervision) on the CPU against
MONAI's UNETR (feature_size=16, hidden_size=768) and Swin-UNETR (feature_size=48), same input, same run.

    python benchmarks/forward.py [--threads 2] [--repeats 5] [--no-swin] [--bf16] [--plain-allocator] [--cpu-compile]

Prints one line per network: median seconds, ratio to UNETR fp32, peak RSS so far.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-swin", action="store_true", help="skip Swin-UNETR (slow on CPU)")
    parser.add_argument("--bf16", action="store_true", help="also time UNETR++ with bfloat16 weights and input")
    parser.add_argument("--plain-allocator", action="store_true",
                        help="time every network without unetrpp.fast.reuse_freed_memory (segment() uses it)")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="also time the plain network under torch.compile on the CPU (needs a C++ compiler)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from monai.networks.nets import UNETR, SwinUNETR

    from unetrpp import create_model
    from unetrpp.complexity import median_forward_seconds, peak_rss_mb
    from unetrpp.fast import optimize_for_inference

    x = torch.randn(1, 1, 64, 128, 128)
    # the same allocator setting for every network, peers included; one untimed warm-up pass each
    median_time = functools.partial(median_forward_seconds, repeats=args.repeats,
                                    reuse_memory=not args.plain_allocator)
    rows = []
    unetr = UNETR(1, 14, img_size=(64, 128, 128), feature_size=16, hidden_size=768).eval()
    rows.append(("MONAI UNETR fp32", median_time(unetr, x)))
    del unetr
    ours = create_model("unetrpp_synapse").eval()
    rows.append(("UNETR++ synapse fp32, plain", median_time(ours, x)))
    if args.cpu_compile:  # inductor with frozen weights (oneDNN-prepacked convolutions); compiled on first call
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        torch._dynamo.config.recompile_limit = 64  # each block is traced anew; the default 8 leaves some eager
        start = time.perf_counter()
        compiled = torch.compile(ours, dynamic=False)
        with torch.inference_mode():
            compiled(x)
        print(f"torch.compile on the CPU: {time.perf_counter() - start:.0f} s to compile")
        rows.append(("UNETR++ synapse fp32, plain, torch.compile", median_time(compiled, x)))
        del compiled
    optimize_for_inference(ours)  # what unetrpp.segment() runs
    rows.append(("UNETR++ synapse fp32, optimized", median_time(ours, x)))
    if args.bf16:  # what segment(precision="bf16") runs: a bfloat16 copy of the optimized network
        half = median_time(ours.to(torch.bfloat16), x.to(torch.bfloat16))
        rows.append(("UNETR++ synapse bf16 weights, optimized", half))
    del ours
    if not args.no_swin:
        swin = SwinUNETR(in_channels=1, out_channels=14, feature_size=48).eval()
        rows.append(("MONAI Swin-UNETR fp32", median_time(swin, x, repeats=max(1, args.repeats // 2))))
    base = rows[0][1]
    allocator = "plain allocator" if args.plain_allocator else "freed memory reused (unetrpp.fast.reuse_freed_memory)"
    print(f"torch {torch.__version__}, {args.threads} threads, input 1x1x64x128x128, median of {args.repeats}, "
          f"{allocator}")
    for name, t in rows:
        print(f"{name:42s} {t:7.3f} s   {t / base:5.2f}x UNETR")
    print(f"peak RSS {peak_rss_mb() / 1024:.2f} GB")


if __name__ == "__main__":
    main()
