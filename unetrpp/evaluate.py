"""Per-organ Dice and HD95 (in mm, from the voxel spacing) of predicted masks against ground truth.

Conventions: an organ empty in both prediction and truth scores Dice 1 and HD95 0 (as the original
evaluation); empty in only one scores Dice 0 and HD95 nan (left out of the HD95 mean). HD95 follows
medpy's `hd95`: the 95th percentile of both directed surface distances pooled, but in millimetres
(the original papers report it in voxels, without the spacing: `hd95_unit="voxels"` gives that).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable
from io import StringIO
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import io
from .data.btcv import dataset_label_names, nifti_files_by_case, same_class
from .labels import BTCV_LABELS
from .postprocess import write_text

log = logging.getLogger(__name__)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th-percentile symmetric surface distance in mm between boolean masks (Z, Y, X) at
    `spacing` (z, y, x); 0.0 when both are empty, nan when only one is."""
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return math.nan
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in box)  # room for the distance transform
    p, t = pred[box], truth[box]
    sp, st = _surface(p), _surface(t)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.concatenate([to_truth[sp], to_pred[st]]), 95))


def evaluate_case(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                  labels: dict[int, str] = BTCV_LABELS, with_hd95: bool = True) -> dict[str, dict[str, float]]:
    """Per-label metrics of two label maps (Z, Y, X): {name: {"dice": d, "hd95": mm}}."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}; "
                         "write predictions on the truth's grid (python -m unetrpp predict does)")
    out = {}
    for label, name in labels.items():
        p, t = pred == label, truth == label
        out[name] = {"dice": dice(p, t), "hd95": hd95(p, t, spacing) if with_hd95 else math.nan}
    return out


def mean_metrics(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average over cases per organ (nan-aware for HD95), plus a "mean" row over organs."""
    names = list(next(iter(per_case.values())))
    rows = {}
    for name in names:
        d = [per_case[c][name]["dice"] for c in per_case]
        h = [per_case[c][name]["hd95"] for c in per_case]
        rows[name] = {"dice": float(np.mean(d)), "hd95": _nanmean(h)}
    rows["mean"] = {"dice": float(np.mean([r["dice"] for r in rows.values()])),
                    "hd95": _nanmean([r["hd95"] for r in rows.values()])}
    return rows


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _nifti_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; give a folder of .nii/.nii.gz masks")
    files = nifti_files_by_case(folder)
    if not files:
        raise ValueError(f"{folder}: no .nii/.nii.gz files; give a folder of label masks")
    return files


HD95_UNITS = ("mm", "voxels")


def evaluate_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike,
                     labels: dict[int, str] | None = None, hd95_unit: str = "mm") -> dict:
    """Match masks by their case number (img0003 <-> label0003 <-> 0003; nnU-Net's img0003_0000 <-> img0003)
    and score them.

    `labels` {id: name} to score; None: those the predictions' label table names (masks written by
    `unetrpp`, e.g. the ACDC classes), else the 13 BTCV organs.
    `hd95_unit` "mm" uses the truth's voxel spacing; "voxels" counts voxel steps, as the original evaluation
    (medpy without the spacing) whose HD95 the paper reports.
    Returns {"cases": {case: {organ: {"dice", "hd95"}}}, "mean": {organ: {...}, "mean": {...}}, "hd95_unit",
    "absent_in_truth": [organs no truth mask holds, whose Dice is 1 or 0 by convention alone]}, and a
    "note" saying SYNTHETIC when the masks were made by weights trained on phantoms (their label tables say so).
    Every truth case needs a prediction; the truth's spacing is used.
    """
    if hd95_unit not in HD95_UNITS:
        raise ValueError(f"hd95_unit={hd95_unit!r}: must be one of {', '.join(HD95_UNITS)}")
    preds, truths = _nifti_files(Path(pred_dir)), _nifti_files(Path(truth_dir))
    # nnU-Net's layout (the original's) names an image CASE_0000 (channel 0) and its label CASE; a mask
    # predicted from that image keeps the image's name
    for case in set(truths) - set(preds):
        if f"{case}_0000" in preds:
            preds[case] = preds.pop(f"{case}_0000")
    missing = sorted(set(truths) - set(preds))
    if missing:
        raise ValueError(f"no prediction for truth case(s) {_some(missing)} in {pred_dir} (it holds {_some(preds)}; "
                         "predictions are matched to truth by the numbers in their file names); predict those cases "
                         f"too (`python -m unetrpp predict` their images into {pred_dir}), or give a --truth folder "
                         "holding only the labels of the predicted cases")
    tables = {case: io.read_label_table(preds[case]) for case in truths}
    first = next(iter(tables.values()), None)
    names = first["names"] if first else None
    if labels is None:
        labels = dict(enumerate(names)) if names else dict(BTCV_LABELS)
        labels.pop(0, None)  # background
    elif names:  # e.g. synapse8 on masks of a liver/spleen model: its class 1 would be scored as the spleen
        _check_mask_classes(names, labels, preds[next(iter(truths))])
    _check_truth_classes(Path(truth_dir), labels)
    per_case = {}
    in_truth: set[int] = set()  # the scored labels some truth mask holds
    highest = max(max(labels), max(BTCV_LABELS))  # a subset of the organs still allows every BTCV label
    for case_id, truth_path in truths.items():
        truth = io.load(truth_path, dtype=None)
        pred = io.load(preds[case_id], dtype=None)
        if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=1e-3):
            raise ValueError(f"case {case_id}: prediction grid {_file_shape(pred)} differs from truth grid "
                             f"{_file_shape(truth)} (shape or affine); predict on the truth's image so the mask "
                             "lands on its grid")
        maps = {}
        for what, volume in (("prediction", pred), ("truth", truth)):
            maps[what] = np.rint(volume.array).astype(np.int64)
            if maps[what].max(initial=0) > highest or maps[what].min(initial=0) < 0:
                raise ValueError(f"case {case_id}: the {what} {volume.path} holds labels "
                                 f"{maps[what].min()}..{maps[what].max()}, outside 0..{highest} of the organs scored; "
                                 "map it to the BTCV labels first (unetrpp.labels.BTCV_LABELS lists them)")
        held = np.bincount(maps["truth"].ravel(), minlength=highest + 1)  # linear, where np.unique sorts
        in_truth.update(label for label in labels if held[label])
        spacing = truth.spacing if hd95_unit == "mm" else (1.0, 1.0, 1.0)
        per_case[case_id] = evaluate_case(maps["prediction"], maps["truth"], spacing, labels)
        log.info("case %s: mean Dice %.3f", case_id, np.mean([m["dice"] for m in per_case[case_id].values()]))
    result = {"cases": per_case, "mean": mean_metrics(per_case), "hd95_unit": hd95_unit,
              "absent_in_truth": [name for label, name in labels.items() if label not in in_truth]}
    if any(table and table.get("synthetic") for table in tables.values()):  # the scores travel without the masks
        result["note"] = "scores of masks " + io.SYNTHETIC_NOTE
    return result


def _check_mask_classes(names: tuple[str, ...], labels: dict[int, str], path: Path) -> None:
    """One-line ValueError when the predictions' label table (`names`, by id) names other classes than
    the ids of `labels` to score: their Dice would be reported under the wrong organs' names."""
    wrong = [f"class {i} is {names[i]!r}, not {name!r}" if i < len(names) else f"it has no class {i} ({name!r})"
             for i, name in labels.items() if i >= len(names) or not same_class(names[i], name)]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ValueError(f"{path}: its label table does not hold the organs to score ({'; '.join(wrong[:3])}{more}); "
                         "--organs synapse8 scores masks with the BTCV labels: use --organs all to score the classes "
                         "these masks name")


def _check_truth_classes(truth_dir: Path, labels: dict[int, str]) -> None:
    """One-line ValueError when the truth's dataset names another class under an id scored: FLARE22's 13 ids
    fit in BTCV's 0..13, but its 1 is the liver, so every Dice would be reported under another organ's name.
    Reads "labels" of dataset_0.json / dataset.json in `truth_dir` or, when it is a labelsTr / labelsTs folder
    (MSD's and nnU-Net's layout), in the dataset folder above it; ids it does not name are not checked, nor is a
    file whose "labels" give no one class per id (nnU-Net v2's regions) or that is not JSON: it only guards."""
    folders = [truth_dir, truth_dir.parent] if truth_dir.name.lower().startswith("labels") else [truth_dir]
    try:
        found = next(filter(None, map(dataset_label_names, folders)), None)
    except ValueError as exc:  # e.g. nnU-Net v2's regions ("whole tumour": [1, 2, 3]): no one class per id to compare
        log.info("truth classes not checked against the dataset's labels: %s", exc)
        return
    if found is None:
        return
    path, names = found
    wrong = [f"class {i} is {names[i]!r}, not {name!r}" for i, name in labels.items()
             if i < len(names) and not same_class(names[i], name)]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ValueError(f"{path}: its \"labels\" number the truth's classes otherwise than the organs scored "
                         f"({'; '.join(wrong[:3])}{more}); renumber the truth masks to the scored ids first "
                         "(unetrpp.labels.BTCV_LABELS lists the BTCV ones), or correct \"labels\" if only they are wrong")


def _some(case_ids: Iterable[str], limit: int = 10) -> str:
    """Case ids for a message: "0003, 0004", or the first `limit` and how many more."""
    ids = sorted(case_ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _file_shape(volume: io.Volume) -> tuple[int, ...]:
    """The shape as the file stores it (what nibabel and other tools show), not our (Z, Y, X)."""
    return tuple(volume.source.shape) if volume.source is not None else tuple(volume.shape[::-1])


def format_table(summary: dict[str, dict[str, float]], hd95_unit: str = "mm") -> str:
    """A fixed-width text table of organ, Dice, HD95 (in `hd95_unit`)."""
    lines = [f"{'organ':<26}{'Dice':>8}{'HD95 ' + ('mm' if hd95_unit == 'mm' else 'vox'):>10}"]
    for name, m in summary.items():
        lines.append(f"{name:<26}{m['dice']:>8.4f}{m['hd95']:>10.2f}")
    return "\n".join(lines)


def check_results_path(path: str | os.PathLike) -> Path:
    """`path` if results can be written there (a .csv or .json name in an existing folder), checked
    before any case is scored."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {path}: unknown format; use a .csv or .json file name")
    if not path.parent.is_dir():
        raise ValueError(f"--out {path}: the folder {path.parent} does not exist; create it or choose another")
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a .csv or .json file name")
    io.check_replaceable(path, _is_results_file, "evaluation results")
    io.check_folder_can_be_written(path.parent)
    return path


def _is_results_file(path: Path) -> bool:
    """Whether `path` holds results `write_results` wrote (safe to replace on a rerun)."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".csv":
            return text.split("\n", 1)[0] in {f"case,organ,dice,hd95_{unit}{note}" for unit in HD95_UNITS
                                              for note in ("", ",note")}
        return {"cases", "mean"} <= set(json.loads(text))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(result: dict, path: str | os.PathLike) -> Path:
    """JSON (everything; an undefined HD95 as null) or CSV (one row per case and organ, plus the means;
    an undefined HD95 as nan; the column hd95_mm or hd95_voxels), by the file suffix; written whole or not at all."""
    path = check_results_path(path)
    if path.suffix.lower() == ".csv":
        note = [result["note"]] if "note" in result else []  # on every row, as in the statistics tables
        rows = [["case", "organ", "dice", f"hd95_{result.get('hd95_unit', 'mm')}", *(["note"] if note else [])]]
        rows += [[case, name, f"{m['dice']:.6f}", f"{m['hd95']:.4f}", *note]
                 for case, organs in result["cases"].items() for name, m in organs.items()]
        rows += [["mean", name, f"{m['dice']:.6f}", f"{m['hd95']:.4f}", *note] for name, m in result["mean"].items()]
        text = StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        return write_text(path, text.getvalue())
    return write_text(path, json.dumps(_nan_to_none(result), indent=2))
