"""BTCV-layout datasets: find the cases (imagesTr/labelsTr, an MSD `dataset.json` or the MONAI
tutorial split `dataset_0.json`), split them by case, and check every case before training."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import io
from ..labels import BTCV_ABBREVIATIONS

log = logging.getLogger(__name__)

LAYOUT_HINT = ("expected imagesTr/img0001.nii.gz + labelsTr/label0001.nii.gz, an MSD dataset.json or a MONAI "
               "dataset_0.json; `python -m unetrpp phantom --out DIR --cases 4` writes a SYNTHETIC example")


@dataclass(frozen=True)
class Case:
    """One image and its label file; `name` identifies the case in messages (e.g. "img0003")."""

    name: str
    image: Path
    label: Path | None


def _stem(path: Path) -> str:
    return io.nifti_stem(path) or path.name


def nifti_files_by_case(folder: Path) -> dict[str, Path]:
    """The .nii/.nii.gz files of `folder` by case id, in name order ({} when there is no such folder)."""
    if not folder.is_dir():
        return {}
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(io.NIFTI_SUFFIXES):
            if (case := _case_id(path)) in files:
                raise ValueError(f"{files[case].name} and {path.name} in {folder} have the same case number {case}; "
                                 "give each case's file a distinct number (e.g. img0001, img0002)")
            files[case] = path
    return files


def _case_id(path: Path) -> str:
    """"img0003", "label0003" and "img0003_seg" share the id "0003", "patient001_frame01" and
    "patient001_frame01_gt" the id "001_01" (the runs of digits); a name without digits is its own id."""
    digits = re.findall(r"\d+", _stem(path))
    return "_".join(digits) if digits else _stem(path)


SPLIT_FILES = ("dataset_0.json", "dataset.json")  # MONAI's, then MSD's, looked for in this order
ENTRY_EXAMPLE = '{"image": "./imagesTr/img0001.nii.gz", "label": "./labelsTr/label0001.nii.gz"}'


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages ("object", "string", "null", ...)."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _read_split_file(path: Path) -> dict:
    """The JSON object of a dataset.json / dataset_0.json; one-line ValueError when it is not one."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: a JSON {_json_type(meta)}, not an object; it must be an object with a "training" '
                         f"list of entries like {ENTRY_EXAMPLE}")
    return meta


def _from_list(source: Path, key: str, entries: object) -> list[Case]:
    """The cases of the `key` list ("training", "validation") of the split file `source`."""
    if not isinstance(entries, list):
        raise ValueError(f'{source}: "{key}" is a JSON {_json_type(entries)}, not a list; it must be a list of '
                         f"entries like {ENTRY_EXAMPLE}")
    root = source.parent
    cases = []
    for entry in entries:
        if isinstance(entry, str):  # MSD "test" entries are bare image paths
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{source}: \"{key}\" entry {entry!r} has no 'image'; entries look like {ENTRY_EXAMPLE}")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        cases.append(Case(_stem(image), image, label))
    return cases


def is_synthetic(root: str | os.PathLike) -> bool:
    """Whether the dataset folder's dataset.json says its cases are synthetic (as phantom folders do)."""
    try:
        return json.loads((Path(root) / "dataset.json").read_text(encoding="utf-8")).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        return False


def read_datalist(root: str | os.PathLike) -> dict[str, list[Case]]:
    """The cases of a dataset folder, as {"training": [...], "validation": [...]}.

    Looks for `dataset_0.json` (MONAI split: "training" and "validation"), then `dataset.json`
    (MSD: "training"), then pairs imagesTr/*.nii.gz with labelsTr/* by their trailing number.
    "validation" is empty unless the split file gives one.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder; {LAYOUT_HINT}")
    for name in SPLIT_FILES:
        if (root / name).is_file():
            meta = _read_split_file(root / name)
            training = _from_list(root / name, "training", meta.get("training", []))
            validation = _from_list(root / name, "validation", meta.get("validation", []))
            if training or validation:
                return {"training": training, "validation": validation}
    images = sorted(p for p in (root / "imagesTr").glob("*") if p.name.endswith(io.NIFTI_SUFFIXES)) \
        if (root / "imagesTr").is_dir() else []
    if not images:
        raise ValueError(f"{root}: no cases found; {LAYOUT_HINT}")
    labels = nifti_files_by_case(root / "labelsTr")
    cases = [Case(_stem(p), p, labels.get(_case_id(p))) for p in images]
    return {"training": cases, "validation": []}


def check_label_names(data: str | os.PathLike, class_names: Sequence[str]) -> None:
    """Refuse a dataset whose split file names other classes than `class_names` (background first),
    so that class 1 of a liver/tumour dataset is never trained and reported as "spleen".

    Reads "labels" from dataset_0.json, else dataset.json (MSD {"0": "background", "1": "liver"} or
    nnU-Net v2 {"background": 0, "liver": 1}); a folder with neither, or without "labels", passes.
    The number of classes must match; names are compared from class 1 on (background goes by many
    names), ignoring case, separators and word order ("kidney_right" is "right kidney", "gall bladder"
    "gallbladder"), and BTCV's own abbreviations ("rkid", "sto", ...: labels.BTCV_ABBREVIATIONS) stand
    for the organ they abbreviate, so BTCV's dataset.json passes with the BTCV names. The one-line
    ValueError names the difference and the `--set` options that train on the dataset's classes.
    """
    found = dataset_label_names(Path(data))
    if found is None:
        return
    path, names = found
    ours = list(class_names)
    if len(names) != len(ours):
        shown = ", ".join(ours[:6]) + (", ..." if len(ours) > 6 else "")
        difference = f"names {len(names)} classes ({', '.join(names)}) but the model has {len(ours)} ({shown})"
    else:
        wrong = [i for i in range(1, len(ours)) if not same_class(names[i], ours[i])]
        if not wrong:
            return
        difference = "names " + ", ".join(f"class {i} {names[i]!r} where the model has {ours[i]!r}" for i in wrong)
    fix = f"--set out_channels={len(names)} --set " + shlex.quote("class_names=" + json.dumps(names, ensure_ascii=False))
    raise ValueError(f'{path}: "labels" {difference}; to train on its classes add {fix} (or correct "labels" '
                     "if they are wrong)")


def dataset_label_names(root: Path) -> tuple[Path, list[str]] | None:
    """The split file of the dataset folder `root` (dataset_0.json, else dataset.json) that has "labels",
    and its class names by id (background first), or None."""
    for name in SPLIT_FILES:
        if (root / name).is_file() and "labels" in (meta := _read_split_file(root / name)):
            return root / name, _names_by_id(root / name, meta["labels"])
    return None


def _names_by_id(path: Path, labels: object) -> list[str]:
    """The names of "labels" in id order 0..N-1; one-line ValueError for another shape or gaps in the ids."""
    by_id: dict[int, str] = {}
    if isinstance(labels, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        by_id = {v: str(k) for k, v in labels.items()}  # nnU-Net v2: name -> id
    elif isinstance(labels, dict) and all(str(k).isdigit() for k in labels):
        by_id = {int(k): str(v) for k, v in labels.items()}  # MSD: id -> name
    if not by_id or len(by_id) != len(labels) or sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f'{path}: "labels" {json.dumps(labels)[:120]} does not name the classes 0..N-1 once each; '
                         'write it as {"0": "background", "1": "liver", ...} or remove it')
    return [by_id[i] for i in range(len(by_id))]


def same_class(theirs: str, ours: str) -> bool:
    """Whether two class names are the same class in other words (see `check_label_names`)."""
    a, b = _name_words(theirs), _name_words(ours)
    return set(a) == set(b) or "".join(a) == "".join(b)


def _name_words(name: str) -> list[str]:
    """Lower-case words of a class name, a BTCV abbreviation spelt out ("rkid" -> ["right", "kidney"])."""
    name = BTCV_ABBREVIATIONS.get(name.strip().lower(), name)
    return re.findall(r"[a-z0-9]+", name.lower())


def split_cases(cases: list[Case], val_cases: float = 0.2, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Split by case, never by patch: a shuffled `val_cases` count (int) or fraction (float) goes
    to validation, at least one case when there are two or more."""
    if isinstance(val_cases, float):
        if not 0.0 <= val_cases < 1.0:
            raise ValueError(f"val_cases={val_cases}: a fraction must be in [0, 1), e.g. 0.2")
        count = max(1, round(len(cases) * val_cases)) if val_cases > 0 and len(cases) > 1 else 0
        if count and count == len(cases):  # 0.9 of 3 cases rounds to all 3: nothing would be left to train on
            raise ValueError(f"val_cases={val_cases}: that fraction of {len(cases)} cases holds out all of them, "
                             f"leaving none to train on; use a smaller fraction (e.g. 0.2) or a count below {len(cases)}")
    else:
        count = int(val_cases)
        if not 0 <= count < len(cases):
            raise ValueError(f"val_cases={val_cases}: need 0 <= count < number of cases ({len(cases)})")
    order = np.random.default_rng(seed).permutation(len(cases))
    val = sorted((cases[i] for i in order[:count]), key=lambda c: c.name)
    train = sorted((cases[i] for i in order[count:]), key=lambda c: c.name)
    return train, val


def load_case(case: Case, orientation: str = "RAS", num_classes: int = 14) -> tuple[io.Volume, np.ndarray]:
    """Read one case and check it; returns the image `Volume` (Z, Y, X) and labels (Z, Y, X) uint8.

    Raises ValueError naming the case when the label file is missing or unreadable, the grids
    differ, or a label is outside 0..num_classes-1 or not an integer.
    """
    if case.label is None or not case.label.is_file():
        raise ValueError(f"case {case.name}: label file missing ({case.label or 'none listed'}); every training "
                         "image needs labelsTr/labelNNNN.nii.gz with the same number")
    volumes = []
    for kind, path, dtype in (("image", case.image, np.float32), ("label", case.label, None)):
        try:
            volumes.append(io.load(path, orientation=orientation, dtype=dtype))
        except Exception as exc:  # nibabel raises many types for broken files; name the case
            raise ValueError(f"case {case.name}: cannot read {kind} {path} ({type(exc).__name__}: {exc})") from exc
    image, label = volumes
    if differences := grid_differences(image, label):
        raise ValueError(f"case {case.name}: image and label grids differ in {'; '.join(differences)}; the label "
                         "must be on the image's grid (same shape, spacing, origin and axis directions)")
    values = np.unique(label.array)
    bad = values[(values < 0) | (values > num_classes - 1) | (values != np.round(values))]
    if bad.size:
        raise ValueError(f"case {case.name}: label values {bad[:8].tolist()} outside the integers 0..{num_classes - 1}; "
                         "use the BTCV label map (unetrpp.labels.BTCV_LABELS)")
    return image, label.array.astype(np.uint8)


def grid_differences(a: io.Volume, b: io.Volume) -> list[str]:
    """What differs between the voxel grids of `a` and `b` (loaded in the same orientation), e.g.
    ["origin (x, y, z) [0.0, 0.0, 0.0] vs [5.0, 0.0, 0.0] mm"]; [] when they are the same grid, to
    0.001 mm in spacing and origin and in where one voxel step of `a` lands."""
    steps = a.affine[:3, :3], b.affine[:3, :3]  # (3, 3) world mm of one voxel step along each axis (columns)
    units = [m / np.linalg.norm(m, axis=0) for m in steps]
    found = []
    if a.shape != b.shape:
        found.append(f"shape (Z, Y, X) {a.shape} vs {b.shape}")
    if not np.allclose(a.spacing, b.spacing, rtol=0, atol=1e-3):
        found.append(f"spacing (z, y, x) {np.round(a.spacing, 3).tolist()} vs {np.round(b.spacing, 3).tolist()} mm")
    if not np.allclose(a.affine[:3, 3], b.affine[:3, 3], rtol=0, atol=1e-3):  # world RAS mm of the first voxel
        found.append(f"origin (x, y, z) {np.round(a.affine[:3, 3], 3).tolist()} vs "
                     f"{np.round(b.affine[:3, 3], 3).tolist()} mm")
    if not np.allclose(steps[0], units[1] * np.linalg.norm(steps[0], axis=0), rtol=0, atol=1e-3):
        angle = np.degrees(np.arccos(np.clip(np.sum(units[0] * units[1], axis=0).min(), -1.0, 1.0)))
        found.append(f"axis directions, up to {angle:.2g} degrees apart")
    return found


def check_cases(cases: list[Case]) -> None:
    """Fail early on an empty list or image files that do not exist (naming every such case)."""
    if not cases:
        raise ValueError(f"no training cases; {LAYOUT_HINT}")
    missing = [f"case {c.name}: image file missing ({c.image})" for c in cases if not c.image.is_file()]
    if missing:
        raise ValueError("; ".join(missing))
