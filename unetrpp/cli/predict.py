"""`python -m unetrpp predict INPUT... -o OUT --weights NAME_OR_DIR`: segment NIfTI files and folders.

Each input file gives `OUT/<name>.nii.gz` (uint8 mask on the input's exact grid) and `OUT/<name>.json`
(label names). A bad file is skipped with one `error:` line and the others are still written; the
exit status is then 2. With --skip-existing, inputs whose finished mask is already there are skipped (a stopped
run goes on where it ended). Under `torchrun --nproc_per_node N` (RANK, WORLD_SIZE, LOCAL_RANK set) each
rank takes files[rank::world_size] and, with CUDA, GPU LOCAL_RANK; the ranks meet at the end, over a CPU
(gloo) group: rank 0 writes the one statistics table and the summary, and all exit together. With --skip-existing they
also meet at the start, where rank 0 says which scans are done, so that the rest is shared out evenly.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI files (.nii, .nii.gz) or folders of them")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder (created if needed); for a single input file also a .nii.gz path")
    parser.add_argument("--weights", required=True,
                        help="weights: a name under weights/, a folder with config.json + model.safetensors, "
                             "a released model_final_checkpoint.model, or a Hugging Face repo id")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap in [0, 1) (default 0.5, as the original); time follows the "
                             "window count: with the synapse weights, tests/fixtures/example_ct.nii.gz takes 32 "
                             "windows at 0, 40 at 0.25, 126 at 0.5, 520 at 0.75")
    parser.add_argument("--sw-batch-size", default="auto",
                        help="windows per forward pass, or auto: 1 on CPU, up to 16 on a GPU as its memory "
                             "allows (default auto)")
    parser.add_argument("--tta", action="store_true",
                        help="mirror test-time augmentation: averages 8 mirrored passes, 8x the time (the "
                             "original's evaluation uses it; off by default for speed)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto (default): float32 on CPU, float16 autocast on CUDA; fp32: float32 everywhere (no TF32 "
                             "on CUDA); bf16: bfloat16 weights on CPU (faster on CPUs with BF16 support), "
                             "bfloat16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true",
                        help="CUDA only: torch.compile the network with CUDA graphs (the first file waits for the "
                             "compilation, tens of seconds; the others run faster)")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep only the largest connected component of each organ")
    parser.add_argument("--stats", metavar="FILE", default=None,
                        help="write per-organ statistics of all files to this .csv (replaces only a statistics "
                             "table written before)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip the inputs whose mask and label side-car an earlier run already wrote in the "
                             "output folder, to go on with a run that was stopped (nnU-Net's --continue_prediction); "
                             "--stats still lists them, read from those masks. Without it, earlier masks are replaced")


def sw_batch_size(value: int | str) -> int | str:
    """--sw-batch-size as segment() takes it: "auto" or a positive integer (ValueError otherwise)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"--sw-batch-size {value}: must be a positive integer or auto, e.g. 1 on CPU, 16 on a GPU")
    return number


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """Files as given (missing paths kept, to be reported), plus the .nii/.nii.gz files inside given
    folders (sorted), each once; and the other files of those folders, which are skipped (the .json side-cars
    dcm2niix writes, .bval/.bvec, notes). A folder with no NIfTI file at all is refused (subfolders
    are not searched).
    """
    from ..io import nifti_stem

    def is_nifti(p: Path) -> bool:
        return p.is_file() and nifti_stem(p) is not None

    files: list[Path] = []
    skipped: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            files.append(path)
            continue
        members = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not any(map(is_nifti, members)):
            inside = [d for d in sorted(path.iterdir()) if d.is_dir() and any(map(is_nifti, d.iterdir()))]
            hint = f"; {inside[0]} holds some, give that folder" if inside else ""
            raise ValueError(f"{path}: no .nii/.nii.gz files in this folder (subfolders are not searched){hint}")
        files.extend(p for p in members if is_nifti(p))
        skipped.extend(p for p in members if not is_nifti(p))
    # `predict scans/ct.nii.gz scans/` names ct.nii.gz twice: one scan, not a second input whose mask would
    # overwrite the first's (it was counted as a failed file, exit status 2)
    once = {os.path.realpath(p): p for p in reversed(files)}
    return [p for p in files if once[os.path.realpath(p)] is p], skipped


# Names that look like a file rather than a folder: -o with one of these is a typo, not a new folder.
_FILE_LIKE = (".txt", ".csv", ".json", ".png", ".jpg", ".gz", ".zip", ".nrrd", ".mha", ".mhd", ".dcm", ".npy", ".npz")


def output_paths(files: list[Path], output: Path) -> list[Path]:
    """`output/<stem>.nii.gz` per file, or `output` itself for one file and a .nii/.nii.gz output."""
    from ..io import NIFTI_SUFFIXES, nifti_stem

    name = output.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        if len(files) == 1:
            return [output]
        raise ValueError(f"-o {output}: {len(files)} inputs need an output folder, not a file name; "
                         f"e.g. -o {output.parent / nifti_stem(output)}")
    if not output.is_dir() and (".nii" in name or name.endswith(_FILE_LIKE)):
        raise ValueError(f"-o {output}: neither a folder nor a .nii/.nii.gz file name; give a folder, or for one "
                         "input a name ending with .nii.gz")
    return [output / f"{nifti_stem(f) or f.stem}.nii.gz" for f in files]


def clobbers(target: Path, inputs: set[Path]) -> str | None:
    """Why writing the mask `target` and its label side-car would destroy a file the user has, or None."""
    from ..io import sidecar_path, written_by_save_mask

    side = sidecar_path(target)
    for path, what in ((target, "mask"), (side, "label side-car")):
        if path.resolve() in inputs:
            return f"its {what} {path} would overwrite an input file; choose another output folder"
    if target.exists() and not written_by_save_mask(target):
        return (f"its mask {target} would overwrite an existing file that is not a UNETR++ mask; "
                "choose another output folder")
    if side.exists() and not written_by_save_mask(side):
        return (f"its label side-car {side} would overwrite an existing file that is not a UNETR++ label table; "
                "choose another output folder")
    return None


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, else None (also where the file system gives no inode, as some
    network shares do on Windows): one file under every spelling of its name. The file systems of macOS and
    Windows ignore case by default, so out/CT.nii.gz and out/ct.nii.gz are one file there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else None


def output_keys(target: Path) -> set:
    """What tells a written output apart from every other: its resolved path and, once it exists, `file_id`."""
    return {target.resolve(), *filter(None, [file_id(target)])}


def make_output_folder(output: Path) -> bool:
    """Create the output folder if needed; True when it was created here (ValueError when it cannot be)."""
    if output.is_dir():
        return False
    if output.exists():
        raise ValueError(f"-o {output}: a file of that name exists; give a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)  # another torchrun rank may create it at the same time
    except OSError as exc:
        raise ValueError(f"-o {output}: cannot create this folder ({exc.strerror}); choose a writable one") from None
    return True


def _line(kind: str, source: Path, text: str) -> str:
    """`kind: FILE: text`, without repeating the file when the text already starts with it."""
    return f"{kind}: {text}" if text.startswith(str(source)) else f"{kind}: {source}: {text}"


def distributed_share(files: list, environ: dict | None = None) -> tuple[list, int, int, int]:
    """(files[rank::world_size], rank, world_size, local_rank) from torchrun's environment variables."""
    from ..train_utils import torchrun_ranks

    rank, world, local = torchrun_ranks(environ)
    return files[rank::world], rank, world, local


def repeated_outputs(targets: list[Path]) -> dict[int, int]:
    """{i: j} for each output `targets[i]` that an earlier input `j` also has (a/ct.nii.gz and b/ct.nii.gz both give
    OUT/ct.nii.gz). Found over all files before they are shared out: under torchrun the two may fall to different
    ranks, which would each write the file, the later one silently replacing the other's mask."""
    first: dict[Path, int] = {}
    repeated = {}
    for i, target in enumerate(targets):
        key = Path(os.path.abspath(target))
        if key in first:
            repeated[i] = first[key]
        else:
            first[key] = i
    return repeated


@contextmanager
def ranks_meet(local: object, world: int) -> Iterator[list]:
    """Every rank's `local`, in rank order, once every rank has finished its share (`[local]` in one process);
    the ranks leave the block together.

    torchrun stops all ranks as soon as one exits with a nonzero status: a rank whose share held a bad file (exit
    status 2) used to stop the others in the middle of theirs, losing the scans they had still to segment. So ranks
    meet here, over a CPU (gloo) group (`join_group`), and none exits before rank 0 has written what the
    block writes. Ranks started by hand without torchrun (RANK and WORLD_SIZE set, no MASTER_ADDR: e.g. one per
    machine) have nobody to meet: their caller gives `world` 1, and gets `[local]`.
    """
    if world == 1:
        yield [local]
        return
    import torch.distributed as dist

    def gather() -> list:
        join_group()
        shares: list = [None] * world
        dist.all_gather_object(shares, local)
        return shares

    shares = interruptible(gather)  # hours of waiting, maybe: Ctrl-C must still stop it
    try:
        yield shares
        interruptible(dist.barrier)
    except KeyboardInterrupt:
        raise  # the process ends now, and the group with it; the helper may still be inside it
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        dist.destroy_process_group()


def join_group() -> None:
    """Join the ranks' CPU (gloo) group, unless this rank already has: `ranks_agree` keeps it for `ranks_meet`, as a
    group once left cannot be joined again (gloo looks for the ranks at their old addresses)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # One rank's share may take hours longer than another's (a whole-body CT among small ones): gloo's
        # 30-minute default would end the run there. A rank that fails makes torchrun stop the others anyway.
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))


def ranks_agree(value: T) -> T:
    """Rank 0's `value`, on every rank under torchrun (the others pass None): the ranks meet at the start."""
    import torch.distributed as dist

    def agree() -> T:
        join_group()
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return interruptible(agree)


def interruptible(call: Callable[[], T]) -> T:
    """`call()` run in a helper thread while this (the main) thread waits for it, so that Ctrl-C still stops it.

    A rank waiting at the meeting for the others (for hours, when another rank's share holds a whole-body CT) sits
    inside gloo, where Python runs no signal handler: Ctrl-C reached it only when torchrun killed it, 30 s later,
    after a warning. The waiting main thread takes KeyboardInterrupt at once; the helper, a daemon, ends with the
    process.
    """
    done: list = []

    def run_call() -> None:
        try:
            done.append((True, call()))
        except BaseException as exc:  # handed to the main thread, which raises it
            done.append((False, exc))

    helper = threading.Thread(target=run_call, name="unetrpp-ranks-meet", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.2)  # a short wait: the signal may have gone to the helper thread, which cannot take it
    ok, value = done[0]
    if not ok:
        raise value
    return value


def some_names(names: list[str], shown: int = 5) -> str:
    """`a, b, c, d, e and 7 more`: files to look at again, at the end of a long run's output."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def failure_summary(failed: list[str], total: int) -> str:
    """`k of n files failed: a, b, ...`."""
    return f"{len(failed)} of {total} files failed: {some_names(failed)}"


def volume_text(ml: float) -> str:
    """A volume for the console: whole mL from 10 mL up, one decimal below, so a few stray voxels do not
    read as an organ of '0 mL'."""
    if ml >= 10:
        return f"{ml:.0f} mL"
    return f"{ml:.1f} mL" if ml >= 0.05 else "<0.1 mL"


def run(args: argparse.Namespace) -> int:
    # A job's time limit (SLURM, Kubernetes; torchrun passes it on to the ranks) ends a run with SIGTERM, which killed
    # the process without a word, leaving the file it was writing under a temporary name: taken as Ctrl-C instead.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        return segment_files(args)
    except KeyboardInterrupt:  # the dispatcher's "interrupted" line then says how to go on
        raise KeyboardInterrupt("the masks already written are kept; the same command with --skip-existing goes "
                                "on from there") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def segment_files(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..devices import resolve_device
    from .. import io
    from ..inference import (SYNTHETIC_WEIGHTS_WARNING, check_single_channel, count_windows, large_scan_warning,
                             saved_mask_statistics, segment)
    from ..preprocess import target_shape
    from ..postprocess import check_statistics_path, statistics_csv_text, write_statistics
    from ..pretrained import load_pretrained

    debug = getattr(args, "debug", False)
    # Warnings reach the user once, as "warning: FILE: ..." lines below, not also through logging.
    for name in ("unetrpp.io", "unetrpp.inference"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap {args.overlap}: must be in [0, 1); 0.5 is the usual choice")
    batch = sw_batch_size(args.sw_batch_size)
    files, skipped = collect_inputs(args.inputs)
    if not files:
        raise ValueError(f"no input files in {args.inputs}; give .nii/.nii.gz files or folders holding them")
    output = Path(args.output)
    targets = output_paths(files, output)
    repeated = repeated_outputs(targets)
    pairs, rank, world, local_rank = distributed_share(list(enumerate(zip(files, targets))), None)
    together = world > 1 and "MASTER_ADDR" in os.environ  # torchrun: the ranks meet at the end (ranks_meet)
    device = args.device
    if device in (None, "cuda") and world > 1 and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per rank
    device = resolve_device(device)
    stats_path = None
    if args.stats:  # checked before the work, so a bad name does not wait for every file to be segmented
        stats_path = Path(args.stats)
        if world > 1 and not together:  # ranks started by hand: each writes its own share
            stats_path = stats_path.with_name(f"{stats_path.stem}.rank{rank}{stats_path.suffix}")
        check_statistics_path(stats_path, folder_to_come=output)  # -o masks/ --stats masks/s.csv on a first run
    folder = targets[0].parent  # where every mask goes: -o itself, or the folder of -o NAME.nii.gz
    if folder != output and not folder.is_dir():
        raise ValueError(f"-o {output}: {folder} is not an existing folder; create it or choose another output path")
    if folder.is_dir():  # a read-only folder is found now, not after each file has been segmented
        io.check_folder_can_be_written(folder, "-o")
    model = load_pretrained(args.weights, device=device)  # before creating anything: bad weights leave no trace
    check_single_channel(model.config)
    created = make_output_folder(output) if targets and targets[0].parent == output else False
    inputs = {f.resolve() for f in files} | {f.resolve() for f in skipped}
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    if skipped and rank == 0:
        print(f"note: skipped {len(skipped)} file(s) without a .nii/.nii.gz name in the input folder(s): "
              f"{some_names([p.name for p in skipped], 3)}", file=sys.stderr)

    finished: set[int] = set()
    if args.skip_existing:
        def finished_of(candidates: list) -> set[int]:
            return {index for index, (source, target) in candidates
                    if index not in repeated and io.finished_mask(target, source)}

        if together:
            # Found before the files are shared out, so each rank gets an even part of what is left: a run stopped
            # while one rank had many scans to go and the others none went on with that one rank alone. Rank 0
            # looks and tells the others before any rank writes: ranks looking for themselves could see a mask
            # another rank had just written, and their shares would overlap or leave scans to nobody.
            everyone = list(enumerate(zip(files, targets)))
            finished = ranks_agree(finished_of(everyone) if rank == 0 else None)
            pairs = ([p for p in everyone if p[0] not in finished][rank::world]
                     + [p for p in everyone if p[0] in finished][rank::world])  # the kept ones: --stats reads them
        else:  # one process, or ranks started by hand, which meet nobody: each looks at its own share
            finished = finished_of(pairs)
        if finished and (rank == 0 or not together):
            print(f"{'' if together else tag}note: {len(finished)} of {len(files) if together else len(pairs)} scans "
                  f"already have their mask in {folder} and are skipped (--skip-existing)"
                  f"{'; their statistics are read from those masks' if stats_path else ''}")
    failed, rows, seen, in_hu, kept, told_synthetic = [], [], set(), [], [], False
    # disable=None: bars only on a terminal, so logs and pipes get plain lines. Under torchrun every rank writes to
    # the one terminal, where the bars of several ranks redrew one another's line: rank 0 alone shows them, as in
    # training; the other ranks' "wrote" lines still report their progress.
    bars = None if rank == 0 or not together else True
    files_bar = tqdm(pairs, desc=f"{tag}files", unit="file", disable=bars if len(pairs) > 1 else True)
    for index, (source, target) in files_bar:
        try:
            if index in repeated:
                raise ValueError(f"output {target} would overwrite another result, the mask of "
                                 f"{files[repeated[index]]}; choose another output folder or rename the input")
            if output_keys(target) & seen:  # its own mask, or another spelling of it
                raise ValueError(f"output {target} would overwrite another result; "
                                 "choose another output folder or rename the input")
            if reason := clobbers(target, inputs):
                raise ValueError(reason)
            if index in finished:
                if stats_path is not None:
                    statistics, ct = saved_mask_statistics(source, target, model.config.preprocessing)
                    rows.append((index, str(source), statistics))
                    in_hu.append(ct)
                kept.append(index)
                seen |= output_keys(target)
                continue
            # A voxel size that is wrong in the header can make a run last hours: say so before it starts.
            prep = model.config.preprocessing
            shape, spacing = io.header_grid(source, prep.orientation)
            said = large_scan_warning(shape, spacing)
            if said:
                windows = count_windows(target_shape(shape, spacing, prep.spacing), model.config.patch_size, args.overlap)
                tqdm.write(_line("warning", source, f"{said} ({windows:,} windows to run)"), file=sys.stderr)
            with tqdm(total=100, desc=f"{tag}{source.name}", leave=False, disable=bars,
                      bar_format="{l_bar}{bar}| {postfix}") as bar:
                def progress(fraction: float, message: str) -> None:
                    bar.n = round(100 * fraction)
                    bar.set_postfix_str(message, refresh=True)

                result = segment(source, model=model, device=device, overlap=args.overlap, tta=args.tta,
                                 precision=args.precision, largest_component=args.largest_component,
                                 sw_batch_size=batch, compile=args.compile,
                                 progress=progress)
            result.save(target)
            seen |= output_keys(target)
        except (ValueError, TypeError, OSError) as exc:
            if debug:
                raise
            failed.append((index, str(source)))
            tqdm.write(_line("error", source, str(exc)), file=sys.stderr)
            continue
        except Exception as exc:  # an unexpected failure on one file must not lose the others
            if debug:
                raise
            failed.append((index, str(source)))
            first = str(exc).splitlines()[0] if str(exc) else ""
            tqdm.write(_line("error", source, f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)"),
                       file=sys.stderr)
            continue
        for warning in result.warnings:
            if warning != said and not (warning == SYNTHETIC_WEIGHTS_WARNING and told_synthetic):
                tqdm.write(_line("warning", source, warning), file=sys.stderr)
        # the same for every file of the run: said once, not 500 times (each mask's side-car still says it)
        told_synthetic = told_synthetic or SYNTHETIC_WEIGHTS_WARNING in result.warnings
        organs = ", ".join(f"{s['name']} {volume_text(s['volume_ml'])}" for s in result.statistics) or "no organs found"
        tqdm.write(f"{tag}wrote {target} ({result.windows} windows, {result.seconds:.1f} s): {organs}")
        rows.append((index, str(source), result.statistics))
        in_hu.append(getattr(result, "in_hu", True))

    with ranks_meet((rows, failed, in_hu, kept), world if together else 1) as shares:
        if together:  # input order whichever rank segmented a file: the table and summary one process gives
            rows, failed, in_hu, kept = (sorted(sum((share[k] for share in shares), [])) for k in range(4))
            total, tag = len(files), ""
        else:
            total = len(pairs)
        main = rank == 0 or not together
        if stats_path is not None and main:
            text = statistics_csv_text([{"file": name, **row} for _, name, stats in rows for row in stats],
                                       leading=("file",), synthetic=bool(model.config.synthetic),
                                       in_hu=all(in_hu))  # no organ in any scan
            write_statistics(stats_path, text)
            tqdm.write(f"{tag}wrote {stats_path}")
            # one row per organ found: a scan with none has no row, and would be missed in a table of 500
            if empty := [name for _, name, stats in rows if not stats]:
                tqdm.write(f"{tag}note: no organ found in {len(empty)} of {len(rows)} scan(s), which therefore have "
                           f"no row in {stats_path.name}: {some_names(empty)}")
        if kept and main:
            tqdm.write(f"{tag}skipped {len(kept)} of {total} scans: their masks were already in {folder} "
                       "(--skip-existing)")
        if failed and total > 1 and main:  # a single file's error line says it all
            print(f"{tag}{failure_summary([name for _, name in failed], total)}", file=sys.stderr)
    if created and world == 1 and not any(output.iterdir()):
        output.rmdir()  # nothing was written: leave no trace
    return 2 if failed else 0
