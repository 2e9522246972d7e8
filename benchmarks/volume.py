"""Whole-volume inference benchmark (issues 3 and 7): the synapse network on a real CT, CPU and CUDA.

Runs `unetrpp.inference.segment` on tests/fixtures/example_ct.nii.gz (122x101x112 at 3 mm) with the
synapse configuration (64x128x128 windows, spacing 3 x 0.7578 x 0.7578 mm, overlap 0.5, no TTA) and
RANDOM weights (speed and memory do not depend on the weight values; the mask is meaningless).
Prints wall time, windows, windows/s, the time of one forward pass, the ratio
wall / (windows x one forward) (goal: at most 1.2) and the peak resident memory (goal: below 3 GB).
Issue 7's goals for the wall time: under 60 s on 2 CPU cores, under 1.5 s on one H200.

    python benchmarks/volume.py                 # CPU, 2 threads
    python benchmarks/volume.py --device cuda   # also runs by default when CUDA is present
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unetrpp import create_model  # noqa: E402
from unetrpp.complexity import peak_rss_mb  # noqa: E402
from unetrpp.fast import optimize_for_inference, reuse_freed_memory  # noqa: E402
from unetrpp.inference import segment  # noqa: E402
from unetrpp.preprocess import target_shape  # noqa: E402


def one_forward_seconds(model: torch.nn.Module, device: torch.device, repeats: int) -> float:
    """Median time of one forward pass on one window (after a warm-up pass), softmax included."""
    x = torch.randn(1, 1, *model.config.patch_size, device=device)
    times = []
    # as segment() runs it: with freed memory kept for reuse (unetrpp.fast.reuse_freed_memory)
    with (torch.inference_mode(), reuse_freed_memory(),
          torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.softmax(model(x).float(), dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first pass is warm-up
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(device_name: str, image: Path, overlap: float, tta: bool, repeats: int) -> None:
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = create_model("unetrpp_synapse").eval().to(device)  # random weights: timing only
    optimize_for_inference(model)  # segment() does this too; time the same network it runs
    forward = one_forward_seconds(model, device, repeats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        if time.perf_counter() - last[0] > 10 or fraction >= 1.0:
            last[0] = time.perf_counter()
            print(f"  {fraction:5.1%} {message}", file=sys.stderr, flush=True)

    # Time spent inside the network during the run, measured by hooks: on a shared machine the
    # load changes between the single-forward measurement and the run, this ratio does not care.
    inside = {"seconds": 0.0, "calls": 0, "start": 0.0}

    def before(module, inputs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        inside["start"] = time.perf_counter()

    def after(module, inputs, output):
        if device.type == "cuda":
            torch.cuda.synchronize()
        inside["seconds"] += time.perf_counter() - inside["start"]
        inside["calls"] += 1

    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    start = time.perf_counter()
    result = segment(image, model=model, device=device, overlap=overlap, tta=tta, progress=progress)
    wall = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    passes = result.windows * (8 if tta else 1)
    target = target_shape(result.volume.shape, result.volume.spacing, model.config.preprocessing.spacing)
    print(f"device {device}  threads {torch.get_num_threads()}  image {image.name} {result.volume.shape} "
          f"-> target grid {target}")
    goal = "< 1.5 s on an H200" if device.type == "cuda" else "< 60 s on 2 cores"
    print(f"  wall time           {wall:8.1f} s   (goal {goal})")
    print(f"  windows             {result.windows:8d}" + (" (x8 passes, TTA)" if tta else ""))
    print(f"  windows/s           {result.windows / wall:8.3f}")
    print(f"  one forward         {forward:8.3f} s   (measured before the run)")
    print(f"  wall / (passes x one forward)       {wall / (passes * forward):6.2f}   (goal <= 1.20)")
    print(f"  in network          {inside['seconds']:8.1f} s over {inside['calls']} forward passes "
          f"({inside['seconds'] / max(inside['calls'], 1):.3f} s each)")
    print(f"  wall / time in network              {wall / max(inside['seconds'], 1e-9):6.2f}   "
          "(the same ratio, immune to load changes)")
    print(f"  peak RSS            {peak_rss_mb() / 1024:8.2f} GB   (goal < 3 GB)")
    if device.type == "cuda":
        print(f"  peak GPU memory     {torch.cuda.max_memory_allocated(device) / 1024**3:8.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "fixtures" / "example_ct.nii.gz")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed single forward passes (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for name in devices:
        run(name, args.image, args.overlap, args.tta, args.repeats)


if __name__ == "__main__":
    main()
