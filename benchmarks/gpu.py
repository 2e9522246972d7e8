"""Every CUDA figure of issue 7 in one run (a few minutes on an H200): windows per second of the synapse
network at 64x128x128 by precision, windows per pass, eager or torch.compile; the whole
tests/fixtures/example_ct.nii.gz through `unetrpp.segment` end to end (reading and preprocessing
included, after one warm-up call), by stage; peak GPU memory. RANDOM weights: speed does not depend
on the values, and the masks are meaningless.

    python benchmarks/gpu.py                  # on a CUDA machine (benchmarks/gpu_check.sh runs this)
    python benchmarks/gpu.py --smoke          # the same code on the CPU with a tiny network, to test it

Without CUDA (and without --smoke) it prints one line and exits with status 0.
Goals (issue 7): whole example CT under 1.5 s; at least 100 windows/s at 64x128x128 in bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unetrpp import Preprocessing, create_model, devices  # noqa: E402
from unetrpp.devices import COMPILE_MODE, CUDA_SW_BATCH, auto_sw_batch_size, compile_network, true_float32  # noqa: E402
from unetrpp.fast import optimize_for_inference  # noqa: E402
from unetrpp.inference import _predict, segment  # noqa: E402

IMAGE = ROOT / "tests" / "fixtures" / "example_ct.nii.gz"
AUTOCAST = {"fp32": None, "fp16 autocast": torch.float16, "bf16 autocast": torch.bfloat16, "bf16 weights": None}
SEGMENT_PRECISION = {"fp16 autocast": "auto", "bf16 autocast": "bf16"}
START = time.perf_counter()


def say(text: str = "") -> None:
    print(text, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def windows_per_second(net: torch.nn.Module, batch: int, precision: str, device: torch.device,
                       seconds: float, warmup: int = 2) -> tuple[float, float, float]:
    """(windows/s, milliseconds per pass, peak GB) of `_predict` (network and softmax, what segment runs
    per batch) on fresh random windows, timed over at least `seconds` after `warmup` passes."""
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    inputs = [torch.randn(batch, 1, *net.config.patch_size, device=device).to(dtype) for _ in range(2)]
    exact = true_float32() if precision == "fp32" else contextlib.nullcontext()  # as segment(precision="fp32")
    with torch.inference_mode(), exact:
        for i in range(warmup):
            _predict(net, inputs[i % 2], False, autocast=AUTOCAST[precision])
        sync(device)
        reset_peak(device)
        passes, start = 0, time.perf_counter()
        while passes < 3 or time.perf_counter() - start < seconds:
            _predict(net, inputs[passes % 2], False, autocast=AUTOCAST[precision])
            passes += 1
            if passes % 4 == 0:
                sync(device)
        sync(device)
        elapsed = time.perf_counter() - start
    return passes * batch / elapsed, 1000 * elapsed / passes, peak_gb(device)


def table_row(label: str, batch: int, result: tuple[float, float, float] | str) -> str:
    if isinstance(result, str):
        return f"  {label:44s} {batch:5d}   {result}"
    rate, ms, peak = result
    return f"  {label:44s} {batch:5d} {rate:9.1f} {ms:9.1f} {peak:8.2f}"


def run_segment(image: Path, net: torch.nn.Module, device: torch.device, **options) -> dict:
    """One timed `segment` call (wall time from the call to the mask), with its stages from progress."""
    marks: dict[str, float] = {}

    def progress(fraction: float, message: str) -> None:
        if message == "resampling back":  # the last windows may still be running on the GPU
            sync(device)
        if not message.startswith("window") or "first window" not in marks:
            marks.setdefault("first window" if message.startswith("window") else message, time.perf_counter())

    reset_peak(device)
    start = time.perf_counter()
    result = segment(image, model=net, device=device, progress=progress, **options)
    wall = time.perf_counter() - start
    stages = {"read": marks["resampling"] - start,
              "preprocess": marks["first window"] - marks["resampling"],
              "windows": marks["resampling back"] - marks["first window"],
              "back + stats": marks["done"] - marks["resampling back"]}
    return {"wall": wall, "windows": result.windows, "stages": stages, "peak": peak_gb(device),
            "warnings": result.warnings}


def segment_line(label: str, r: dict) -> str:
    stages = "  ".join(f"{k} {v:5.2f}" for k, v in r["stages"].items())
    line = (f"  {label:34s} {r['wall']:6.2f} s  {r['windows'] / max(r['stages']['windows'], 1e-9):7.1f} windows/s "
            f"in the window stage  peak {r['peak']:5.2f} GB  [{stages}]")
    return line + "".join(f"\n      warning: {w}" for w in r["warnings"])


def preprocessing_on(image: Path, net: torch.nn.Module, device: torch.device) -> str:
    """prepare() (cubic resampling as matrix products, then normalisation) on the CPU and on the device."""
    from unetrpp.preprocess import load_volume, prepare

    prep = net.config.preprocessing
    volume = load_volume(image, prep)
    best, images = {}, {}
    for where in (torch.device("cpu"), device):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            images[where.type] = prepare(volume, prep, device=where).image
            times.append(time.perf_counter() - start)
        best[where.type] = min(times)
    difference = float(np.abs(images["cpu"] - images[device.type]).max())
    return (f"prepare() on the CPU {best['cpu']:.3f} s, with its products on {device.type} {best[device.type]:.3f} s "
            f"(best of 3), max |difference| {difference:.1e}")


def agreement(device: torch.device) -> list[str]:
    """Correctness on the device: the bundled (trained) teaching weights on example_ct_sm.nii.gz, the
    mask of each CUDA setting against the float32 CPU mask (the CPU path is the reference)."""
    from unetrpp.pretrained import load_pretrained

    image = ROOT / "tests" / "fixtures" / "example_ct_sm.nii.gz"
    net = load_pretrained("unetrpp_tiny_phantom", device="cpu")
    reference = segment(image, model=net, device="cpu").mask
    lines = []
    for label, options in (("fp32", {"precision": "fp32"}), ("default (fp16 autocast)", {}),
                           ("precision='bf16'", {"precision": "bf16"})):
        mask = segment(image, model=net, device=device, **options).mask
        same = float((mask == reference).mean())
        lines.append(f"  {label:34s} same label as the CPU on {same:8.4%} of voxels, "
                     f"organ voxels {int((mask > 0).sum())} (CPU {int((reference > 0).sum())})")
    return lines


def golden(device: torch.device) -> list[str]:
    """Correctness of the network itself on the device: golden synapse weights and input
    (tests/golden.py), full-resolution logits of each setting against the golden subsample and
    against the float32 CPU logits; then whole-volume masks of the golden weights on the example CT,
    each setting against float32 without TF32 on the same device."""
    sys.path.insert(0, str(ROOT / "tests"))
    from golden import FIXTURES, golden_state_dict

    g = np.load(FIXTURES / "official_synapse.npz")
    net = create_model("unetrpp_synapse", deep_supervision=True).eval()
    net.load_state_dict(golden_state_dict("synapse"))
    optimize_for_inference(net)
    x = torch.randn(tuple(int(s) for s in g["input_shape"]), generator=torch.Generator().manual_seed(int(g["input_seed"])))
    with torch.inference_mode():
        cpu = net(x)[0]
    net.to(device)
    settings = (("fp32, TF32 convolutions (default)", False, None), ("fp32, TF32 off", True, None),
                ("fp16 autocast (segment default)", False, torch.float16), ("bf16 autocast", False, torch.bfloat16))
    lines = [f"  PyTorch's TF32 settings here: {devices._float32_settings()}"]
    for label, exact, autocast in settings:
        with (true_float32() if exact else contextlib.nullcontext()), torch.inference_mode(), \
                torch.autocast("cuda", dtype=autocast or torch.float16, enabled=autocast is not None):
            out = net(x.to(device))[0].float().cpu()
        sub = np.abs(out[:, :, 1::4, 1::4, 1::4].numpy() - g["out0_sub"]).max()
        lines.append(f"  {label:34s} max |logit - golden| {sub:.2e} (tests use 1e-3), max |logit - CPU| "
                     f"{(out - cpu).abs().max():.2e}, same argmax as CPU {(out.argmax(1) == cpu.argmax(1)).float().mean():.4%}")
    net.deep_supervision = False
    masks, times = {}, {}
    for label, precision in (("precision='fp32' (no TF32)", "fp32"), ("fp16 autocast (segment default)", "auto"),
                             ("bf16 autocast", "bf16")):
        start = time.perf_counter()
        masks[label] = segment(IMAGE, model=net, device=device, precision=precision).mask
        times[label] = time.perf_counter() - start
    reference = masks.pop("precision='fp32' (no TF32)")
    lines.append(f"  whole {IMAGE.name}, golden weights, same label as precision='fp32' on this GPU:")
    lines += [f"  {label:34s} {float((mask == reference).mean()):8.4%} of voxels ({times[label]:.2f} s, first call included)"
              for label, mask in masks.items()]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with a tiny network (tests this script)")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--compile-batches", type=int, nargs="*", default=[4, 8],
                        help="windows per pass timed compiled in bf16 autocast (each shape compiles anew)")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile measurement")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per table row")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="skip further compiled rows once the run has taken this many seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        say(f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__}); nothing measured")
        return 0

    if args.smoke:
        device, name = torch.device("cpu"), "unetrpp_tiny"
        overrides = {"patch_size": (16, 32, 32), "preprocessing": Preprocessing(spacing=(6.0, 6.0, 6.0))}
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        args.batches, args.seconds = [b for b in args.batches if b <= 2], min(args.seconds, 0.2)
        if args.image == IMAGE:
            args.image = ROOT / "tests" / "fixtures" / "example_ct_sm.nii.gz"
    else:
        device, name, overrides = torch.device("cuda"), "unetrpp_synapse", {}
    torch.manual_seed(0)
    net = create_model(name, **overrides).eval().to(device)  # random weights: timing only
    net.deep_supervision = False  # as load_pretrained: full-resolution logits only
    optimize_for_inference(net)  # what segment() runs (its rewrites act on the CPU only)
    patch = "x".join(map(str, net.config.patch_size))

    say(f"torch {torch.__version__}  CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}  "
        f"Python {platform.python_version()}  CPU threads {torch.get_num_threads()}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        say(f"GPU {props.name}  {props.total_memory / 1024**3:.0f} GiB  capability {props.major}.{props.minor}")
    say(f"network {name}, window {patch}, RANDOM weights (speed does not depend on the values); "
        f"segment() auto windows per pass here: {auto_sw_batch_size('auto', device, net.config.patch_size)}")

    say(f"\nwindows per second, network + softmax, eager (median-free: mean over >= {args.seconds:g} s)")
    say(f"  {'precision':44s} {'batch':>5s} {'windows/s':>9s} {'ms/pass':>9s} {'peak GB':>8s}")
    rows = []
    bf16_net = copy.deepcopy(net).to(torch.bfloat16)
    for precision in AUTOCAST:
        model = bf16_net if precision == "bf16 weights" else net
        for batch in args.batches:
            rows.append(table_row(precision, batch, windows_per_second(model, batch, precision, device, args.seconds)))
            say(rows[-1])
    del bf16_net
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        batch = max((b for b in args.batches if b <= CUDA_SW_BATCH), default=min(args.batches))
        rows.append(table_row("bf16 autocast, cudnn.benchmark", batch,
                              windows_per_second(net, batch, "bf16 autocast", device, args.seconds, warmup=3)))
        say(rows[-1])
        torch.backends.cudnn.benchmark = False

    say(f"\nwhole {args.image.name} through segment(), after one warm-up call "
        "(seconds; stages: read, preprocess on the CPU, windows, back to the grid + statistics)")
    e2e = []
    for label, options in (("default (fp16 autocast)", {}), ("precision='bf16' (bf16 autocast)", {"precision": "bf16"})):
        run_segment(args.image, net, device, **options)
        e2e.append(segment_line(label, run_segment(args.image, net, device, **options)))
        say(e2e[-1])
    say("  " + preprocessing_on(args.image, net, device))
    say("\nagreement with the CPU, bundled teaching weights, example_ct_sm.nii.gz")
    e2e += agreement(device)
    say("\n".join(e2e[-3:]))
    if device.type == "cuda":
        say("\ngolden check on the GPU (synapse network, golden weights and input of tests/golden.py)")
        try:
            checks = golden(device)
        except Exception as exc:  # a correctness check failing to run must not end the timing run
            checks = [f"  golden check failed to run ({type(exc).__name__}: {str(exc)[:200]})"]
        say("\n".join(checks))
        e2e += checks

    say(f"\ntorch.compile (mode {COMPILE_MODE!r}, as segment(compile=True)); the first pass of each shape compiles")
    runner, why_not = compile_network(net, device) if not args.no_compile else (net, "skipped: --no-compile")
    default_batch = auto_sw_batch_size("auto", device, net.config.patch_size)
    plan = [("fp16 autocast", default_batch)] + [("bf16 autocast", b) for b in args.compile_batches]
    for precision, batch in plan:
        label = f"{precision}, compiled"
        if why_not:
            rows.append(table_row(label, batch, why_not))
        elif time.perf_counter() - START > args.budget:
            rows.append(table_row(label, batch, f"skipped: past the {args.budget:.0f} s budget"))
        else:
            start = time.perf_counter()
            with torch.inference_mode():
                _predict(runner, torch.randn(batch, 1, *net.config.patch_size, device=device), False,
                         autocast=AUTOCAST[precision])
                sync(device)
            compiling = time.perf_counter() - start
            result = windows_per_second(runner, batch, precision, device, args.seconds)
            rows.append(table_row(label, batch, result) + f"   (compile {compiling:.0f} s)"
                        + (f"  {runner.failed}" if runner.failed else ""))
        say(rows[-1])
    for label, options in (("compile=True", {"compile": True}),
                           ("compile=True, precision='bf16'", {"compile": True, "precision": "bf16"})):
        if args.no_compile or time.perf_counter() - START > args.budget + 60:
            e2e.append(f"  {label:34s} skipped: {'--no-compile' if args.no_compile else 'past the time budget'}")
        else:
            run_segment(args.image, net, device, **options)
            e2e.append(segment_line(label, run_segment(args.image, net, device, **options)))
        say(e2e[-1])

    say(f"\nsummary ({time.perf_counter() - START:.0f} s in all); goals: >= 100 windows/s in bf16, whole CT < 1.5 s")
    say(f"  {'precision':44s} {'batch':>5s} {'windows/s':>9s} {'ms/pass':>9s} {'peak GB':>8s}")
    for line in rows + e2e:
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
