"""Weights: the released UNETR++ checkpoints (read safely), our Hugging Face style folders, and where
to find them (a local folder, the repository's `weights/` folder, or a Hugging Face repo id).

With `hub.py` (fetching a repo id, the Hub's failures), the only modules that know about checkpoint
formats, files and hubs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch

from .config import Preprocessing, UNETRPPConfig, get_config
from .io import usual_permissions
from .model import UNETRPP

log = logging.getLogger(__name__)

# The repository's weights/ in a checkout; in an installed wheel, its packaged copy (teaching weights only).
_CHECKOUT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_DIR = _CHECKOUT_WEIGHTS if _CHECKOUT_WEIGHTS.is_dir() else Path(__file__).resolve().parent / "weights"
ORIGINAL_VARIANTS = ("unetrpp_synapse", "unetrpp_acdc", "unetrpp_tumor", "unetrpp_lung")
_CHECKPOINT_SUFFIXES = (".model", ".pth", ".pt")


def _numpy_allow_list() -> list[Any]:
    """The only non-torch globals a released checkpoint legitimately holds: numpy scalars and arrays
    in `plot_stuff` / `best_stuff`, pickled under numpy 1 (`numpy.core`) or numpy 2 (`numpy._core`)."""
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [np.dtype, np.ndarray]
    for fn in ("scalar", "_reconstruct"):
        obj = getattr(core.multiarray, fn)
        allowed += [(obj, f"numpy.core.multiarray.{fn}"), (obj, f"numpy._core.multiarray.{fn}")]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def shortened(text: str, limit: int = 300) -> str:
    """A library's error text as the parenthesis of one of ours: at most `limit` characters, marked when cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a released `model_final_checkpoint.model` without unpickling arbitrary objects.

    Returns the checkpoint dict (a bare state_dict comes back as {"state_dict": ...}). Raises
    FileNotFoundError when there is no such file, and ValueError with a one-line reason for anything that
    is not a UNETR++ / nnU-Net v1 checkpoint (a folder, wrong file, truncated file, unexpected pickled objects).
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.rglob("model_final_checkpoint.model"))
        hint = f"e.g. {inside[0]}" if inside else "the model_final_checkpoint.model file of the release"
        raise ValueError(f"{path} is a folder; give the checkpoint file itself, {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; expected a released model_final_checkpoint.model")
    expected = "expected a released UNETR++ model_final_checkpoint.model (a torch.save of a dict with 'state_dict')"
    if path.name in ("model.safetensors", "config.json") and (path.parent / "config.json").is_file():
        raise ValueError(f"{path} is part of the weights folder {path.parent} (already converted); give the "
                         f"folder: --weights {path.parent}")
    if hint := training_run_hint(path.parent):
        raise ValueError(f"{path} is the checkpoint of a training run, not a weights file; {hint}")
    if path.name.endswith(".model.pkl"):
        raise ValueError(f"{path} is the nnU-Net plans file that sits beside a checkpoint; give the .model file "
                         f"next to it ({path.name[:-len('.pkl')]})")
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        raise ValueError(f"{path}: the file is empty; {expected}")
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive, or a pickle (old format)
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); {expected}")
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's notes on old pickle protocols: the outcome is said below
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise ValueError(f"{path}: refused to load, it would unpickle {unsafe.group(1)}, which is not on the "
                             f"allow-list (tensors, numpy scalars); {expected}") from None
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}); {expected}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError,
            struct.error, IndexError) as exc:  # the last two: a legacy (non-zip) file cut short
        reason = shortened((str(exc).strip().splitlines() or [type(exc).__name__])[0])
        raise ValueError(f"{path}: not a readable PyTorch checkpoint, maybe truncated ({reason}); {expected}") from None
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        if not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
            raise ValueError(f"{path}: its state_dict holds values that are not tensors; {expected}")
        return dict(ckpt)
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": dict(ckpt)}  # a bare state_dict, as some re-exports are
    raise ValueError(f"{path}: holds {type(ckpt).__name__} without a 'state_dict'; {expected}")


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP's, torch.compile's; nested either way round


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys without the prefixes a model saved from inside DataParallel/DDP ("module.") or from
    torch.compile ("_orig_mod.") gives them, both if it was wrapped in both."""
    def bare(key: str) -> str:
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    return {bare(k): v for k, v in state_dict.items()}


def _expected_shapes(cfg: UNETRPPConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the network `cfg` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = UNETRPP(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_mismatch(expected: Mapping[str, tuple], state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first way `state_dict` differs from `expected` (a missing key, a shape, an extra key), or None."""
    for k, shape in expected.items():
        if k not in state_dict:
            return f"missing key {k}"
        if tuple(state_dict[k].shape) != shape:
            return f"{k} has shape {tuple(state_dict[k].shape)}, expected {shape}"
    extra = sorted(set(state_dict) - set(expected))
    return f"unexpected key {extra[0]}" if extra else None


def identify_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name of the original network whose keys and shapes `state_dict` has exactly."""
    closest = []
    for name in ORIGINAL_VARIANTS:
        expected = _expected_shapes(get_config(name, deep_supervision=True))
        mismatch = _first_mismatch(expected, state_dict)
        if mismatch is None:
            return name
        agree = sum(tuple(state_dict[k].shape) == shape for k, shape in expected.items() if k in state_dict)
        closest.append((len(expected) + len(state_dict) - 2 * agree, name, mismatch))  # tensors not in both alike
    differences, name, mismatch = min(closest)
    raise ValueError(f"not the weights of a released UNETR++ network (closest: {name}, {differences} tensor(s) "
                     f"missing, extra or of another shape; first: {mismatch})")


def load_original_checkpoint(path: str | os.PathLike, name: str | None = None,
                             deep_supervision: bool = False) -> UNETRPP:
    """Build the network of a released UNETR++ checkpoint and load its weights, in eval mode.

    `name` is a preset ("unetrpp_synapse", ...) or None to recognise it from the keys and shapes.
    With `deep_supervision` the forward returns the three decoder outputs, else the full-res logits.
    """
    state_dict = _strip_prefix(read_original_checkpoint(path)["state_dict"])
    if name is None:
        try:
            name = identify_variant(state_dict)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    cfg = get_config(name, deep_supervision=True)  # released files always carry out2/out3
    mismatch = _first_mismatch(_expected_shapes(cfg), state_dict)
    if mismatch is not None:
        raise ValueError(f"{path}: not a {name} checkpoint ({mismatch}); give no name (no --name in the command "
                         "line) to detect which network it is")
    if cfg.kv_projection == "shared":
        for k in [k for k in state_dict if ".epa_block.E." in k]:
            if not torch.equal(state_dict[k], state_dict[k.replace(".E.", ".F.")]):
                raise ValueError(f"{path}: {k} differs from its F twin, but {name} shares one E/F projection")
    model = UNETRPP(cfg)
    model.load_state_dict(state_dict, strict=True)
    model.deep_supervision = deep_supervision
    return model.eval()


def local_weights() -> dict[str, Path]:
    """Weight folders by name: those shipped or converted into the repository's `weights/` folder
    (`WEIGHTS_DIR`), then those in `weights/` of the current folder, where `convert --out
    weights/NAME` puts them when the package was installed with pip (the first of a name wins)."""
    found: dict[str, Path] = {}
    for folder in (WEIGHTS_DIR, Path("weights").resolve()):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if (p / "config.json").is_file():
                    found.setdefault(p.name, p)
    return found


def load_pretrained(spec: str | os.PathLike, device: str | torch.device | None = None) -> UNETRPP:
    """Load weights for inference (eval mode, single output) from, in this order: a folder holding
    config.json + model.safetensors; a released `.model` checkpoint; a folder name under `weights/`;
    a Hugging Face repo id "owner/name" (downloaded with huggingface_hub, honouring HF_HUB_OFFLINE)."""
    text = str(spec)
    local = local_weights()
    if not text.strip():
        raise ValueError(f"weights {text!r}: empty; give a weights folder, a .model checkpoint, a Hugging Face repo "
                         f"id (owner/name), or one of the local weights {sorted(local) or '(none)'}")
    path = Path(text).expanduser()
    if path.is_dir():
        model = load_folder(path)
    elif path.is_file():  # a released checkpoint (model_final_checkpoint.model), whatever its name
        model = load_original_checkpoint(path)
        if reason := _missing_preprocessing(model.config.name, ()):
            raise ValueError(reason)
    elif text.rstrip("/\\") in local:  # a name under weights/, perhaps with a trailing slash
        model = load_folder(local[text.rstrip("/\\")])
    elif text.lower().endswith((*_CHECKPOINT_SUFFIXES, ".safetensors")):  # a file, not a folder to make with convert
        what = "weights file" if text.lower().endswith(".safetensors") else "checkpoint file"
        raise ValueError(f"weights {text!r}: no such {what}; check the path, or give a weights folder or one "
                         f"of the local weights {sorted(local) or '(none)'}")
    elif looks_like_path(text) and (hint := training_run_hint(path.parent)):
        raise ValueError(f"weights {text!r}: no such folder; {hint}")
    elif looks_like_path(text):
        # a repo id "owner/name" whose owner is also a folder here is read as a path (weights/NAME: a folder
        # convert has not yet written, the usual case)
        owner = text.split("/")[0]
        repo = (f"; it is read as a path since the folder {owner} exists here: for the Hugging Face repo {text}, run "
                f"from another folder" if text.count("/") == 1 and not text.startswith((".", "/", "~"))
                and not text.endswith("/") and owner != "weights" and Path(owner).is_dir() else "")
        raise ValueError(f"weights {text!r}: no such folder or file; make a weights folder from a released "
                         f"checkpoint with `python -m unetrpp convert CHECKPOINT --out {text}`, or give one of the "
                         f"local weights {sorted(local) or '(none)'}{repo}")
    elif text.count("/") == 1:
        from .hub import load_from_hub  # here, not at the top: hub.py imports load_folder from this module

        model = load_from_hub(text)
    else:
        raise ValueError(f"weights {text!r} not found: give a weights folder, a .model checkpoint, a Hugging Face "
                         f"repo id (owner/name), or one of the local weights {sorted(local) or '(none)'}")
    model.deep_supervision = False
    model.eval()
    return model.to(device) if device is not None else model


def looks_like_path(text: str) -> bool:
    """A local path rather than a Hub repo id "owner/name": it starts like one, ends with a checkpoint
    suffix, or its first folder exists here (`weights/unetrpp_synapse` before conversion)."""
    first = text.replace("\\", "/").split("/")[0]
    return (text.startswith((".", "/", "~", "\\"))
            or text.endswith((*_CHECKPOINT_SUFFIXES, ".safetensors", "/", "\\"))
            or (first != "" and Path(first).expanduser().is_dir()))


_FOLDER_HINT = "a weights folder holds config.json + model.safetensors (make one with `python -m unetrpp convert`)"


def read_config(folder: str | os.PathLike) -> UNETRPPConfig:
    """The config of a save_pretrained folder (its config.json), without loading the weights."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; {_FOLDER_HINT}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return UNETRPPConfig.from_dict(config)  # names a wrong field
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path / 'config.json'}: not a UNETR++ config ({reason}); correct that value, or make the "
                         "folder again with `python -m unetrpp convert` (or `save_pretrained`)") from None


def _shell_word(text: str) -> str:
    """`text` quoted for a command the user copies: POSIX quoting, or on Windows double quotes where needed
    (cmd.exe keeps single quotes as part of the word; PowerShell reads double quotes too)."""
    return subprocess.list2cmdline([text]) if sys.platform == "win32" else shlex.quote(text)


def training_run_hint(folder: Path) -> str | None:
    """Where the weights of the `python -m unetrpp train` run in `folder` are (its checkpoint.pt and
    options.json tell one), or how to write them when it stopped before its end; None for other folders."""
    if not ((folder / "checkpoint.pt").is_file() and (folder / "options.json").is_file()):
        return None
    model = folder / "model"
    if (model / "config.json").is_file():
        return f"the run's weights folder is {model}: give --weights {model}"
    try:
        data = str(json.loads((folder / "options.json").read_text(encoding="utf-8"))["data"])
    except (OSError, ValueError, KeyError, TypeError):
        data = "DATA"
    # a resume already at --max-steps trains nothing and saves the model of its last checkpoint
    return (f"the run {folder} stopped before its end, so it has no weights folder {model} yet; write one from its "
            f"last checkpoint, without training, with `python -m unetrpp train --data {_shell_word(data)} --out "
            f"{_shell_word(str(folder))} --resume --max-steps 1`, or resume it to its end")


def load_folder(path: Path) -> UNETRPP:
    """The network of a save_pretrained folder (config.json + model.safetensors), in eval mode; every way
    the folder can be broken is answered in one line."""
    if not (path / "config.json").is_file() and (hint := training_run_hint(path)):
        raise ValueError(f"{path}: not a weights folder; {hint}")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise ValueError(f"{path}: no {name}; {_FOLDER_HINT}")
    config = read_config(path)
    try:
        # What UNETRPP.from_pretrained(path) does, without its print to stdout (swallowing that with
        # redirect_stdout would swallow every thread's output while the weights load, the viewer's URL too).
        model = UNETRPP(config)
        safetensors.torch.load_model(model, path / "model.safetensors", strict=True)  # missing tensor: an error
        return model.eval()
    except Exception as exc:  # safetensors raises its own error types for truncated or mismatched files
        reason = shortened(" ".join(str(exc).split()) or type(exc).__name__)  # one line, e.g. the missing keys
        raise ValueError(f"{path / 'model.safetensors'}: unreadable or not the weights of its config.json "
                         f"({reason}); {_FOLDER_HINT}") from None


def save_for_inference(model: UNETRPP, folder: str | os.PathLike, config: UNETRPPConfig | None = None,
                       card: str | None = None) -> Path:
    """Save `model` as a weights folder (config.json + model.safetensors) without its deep-supervision
    heads, which inference never uses; `config` replaces the model's (e.g. other preprocessing).
    `card`: the text of the folder's README.md (markdown under the Hub's metadata) instead of `model_card`'s."""
    config = (config or model.config).replace(deep_supervision=False)
    clean = UNETRPP(config)
    state = _strip_prefix(model.state_dict())  # a torch.compile'd model's keys start with "_orig_mod."
    clean.load_state_dict({k: v for k, v in state.items() if not k.startswith(("out2.", "out3."))})
    folder = Path(folder)
    clean.save_pretrained(folder)
    usual_permissions(folder / "model.safetensors")  # safetensors writes 0600
    if card is not None:  # under the metadata save_pretrained writes: its tags say synthetic-data where they must
        readme = clean.generate_model_card()
        readme.text = f"\n{card.strip()}\n"
        readme.save(folder / "README.md")  # in UTF-8, whatever the locale
    return folder


# Presets whose preprocessing numbers are placeholders: their checkpoints are converted only with
# these fields given (from the nnU-Net plans of the training run, model_final_checkpoint.model.pkl).
UNKNOWN_PREPROCESSING = {"unetrpp_lung": ("spacing", "clip", "mean", "std")}


def _missing_preprocessing(name: str, given: Any) -> str | None:
    """Why weights of preset `name` cannot be used with only the preprocessing fields `given` (their release
    does not state the others, `UNKNOWN_PREPROCESSING`) and where to find them; None when nothing is missing."""
    missing = [f for f in UNKNOWN_PREPROCESSING.get(name, ()) if f not in given]
    if not missing:
        return None
    flags = " ".join(f"--{f}" for f in missing)
    return (f"{name}: the release does not state the preprocessing of these weights; convert the checkpoint "
            f"with {flags} taken from the nnU-Net plans of its training run (model_final_checkpoint.model.pkl: "
            "plans['plans_per_stage'][stage]['current_spacing'], and mean, sd, percentile_00_5 and "
            "percentile_99_5 of plans['dataset_properties']['intensityproperties'][0]; read that pickle only "
            "if you trust its source)")


def how_to_use(cfg: UNETRPPConfig) -> str:
    """One line for a weights folder's card and for `convert`: how these weights are run. `predict`,
    `segment()` and the viewer read one NIfTI volume, one channel; more channels (unetrpp_tumor's four
    MRI sequences) are for the network itself."""
    if cfg.in_channels == 1:
        return (f"Use: `python -m unetrpp predict SCAN.nii.gz -o out --weights THIS_FOLDER` "
                f"(a {cfg.preprocessing.modality} scan).")
    return (f"Use from Python: `UNETRPP.from_pretrained(THIS_FOLDER)` on (B, {cfg.in_channels}, "
            f"{', '.join(map(str, cfg.patch_size))}) windows of {cfg.in_channels} co-registered "
            f"{cfg.preprocessing.modality} sequences preprocessed as its config.json says; "
            "`python -m unetrpp predict`, `segment()` and the viewer take single-channel weights only.")


def _card_table(cfg: UNETRPPConfig) -> str:
    """What a weights folder's card says about the network, its classes and the input it expects."""
    prep = cfg.preprocessing
    intensities = (f", clip {prep.clip[0]:g}..{prep.clip[1]:g}, mean {prep.mean:g}, std {prep.std:g}"
                   if prep.normalization == "ct" else "")
    return f"""| | |
|---|---|
| network | `{cfg.name}` preset, patch {" x ".join(map(str, cfg.patch_size))}, {cfg.in_channels} input channel(s) |
| classes | {", ".join(cfg.class_names)} |
| preprocessing | {prep.modality}, spacing {" x ".join(f"{v:g}" for v in prep.spacing)} mm (z, y, x), orientation \
{prep.orientation}, normalization {prep.normalization}{intensities} |"""


def model_card(cfg: UNETRPPConfig) -> str:
    """The README.md that `save_pretrained` and `push_to_hub` write (markdown after the Hub's metadata), in place
    of the Hub's blank template: a Hub page of teaching weights would not have said they are SYNTHETIC."""
    synthetic = ("**SYNTHETIC teaching weights**: trained only on synthetic phantoms (`python -m unetrpp phantom`), "
                 "not on patient scans; on a real scan they segment poorly or not at all.\n\n" if cfg.synthetic else "")
    return f"""# {cfg.name}: UNETR++ weights

{synthetic}UNETR++ (Shaker et al., *UNETR++: Delving into Efficient and Accurate 3D Medical Image Segmentation*,
arXiv 2212.04497, IEEE TMI 2024), saved with the `unetrpp` package as config.json + model.safetensors.
Licence: that of the weights' source (converted released weights keep the original release's terms).

{_card_table(cfg)}

{how_to_use(cfg)} A Hugging Face repo id works wherever a folder does (`--weights OWNER/NAME`,
`unetrpp.pretrained.load_pretrained("OWNER/NAME")`). Not a medical device.
"""


def convert_original(path: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None,
                     **preprocessing: Any) -> Path:
    """Write a released checkpoint as a weights folder (config.json + model.safetensors) for inference.

    `preprocessing` overrides fields of the preset's `Preprocessing` (spacing, clip, mean, std, ...);
    the lung preset needs spacing, clip, mean and std (`UNKNOWN_PREPROCESSING`).
    """
    out = Path(out_dir)  # save_pretrained would replace another's config.json and README.md in it
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not {'empty' if out.is_dir() else 'a folder'}; choose a new --out "
                         "folder or remove it first")
    fields = {f.name for f in dataclasses.fields(Preprocessing)}  # a misspelt one, before the checkpoint is read
    if unknown := sorted(set(preprocessing) - fields):
        raise ValueError(f"unknown preprocessing keys {unknown}; valid keys: {sorted(fields)}")
    if name is not None:  # a wrong name or preprocessing is answered before the checkpoint is read (seconds)
        if reason := _missing_preprocessing(name, preprocessing):
            raise ValueError(reason)
        dataclasses.replace(get_config(name).preprocessing, **preprocessing)
    model = load_original_checkpoint(path, name=name, deep_supervision=False)
    if reason := _missing_preprocessing(model.config.name, preprocessing):
        raise ValueError(reason)
    cfg = model.config
    if preprocessing:
        cfg = cfg.replace(preprocessing=dataclasses.replace(cfg.preprocessing, **preprocessing))
    card = f"""# {cfg.name}: converted UNETR++ weights

Converted by `python -m unetrpp convert` from `{Path(path).name}`, a checkpoint released with UNETR++
(Shaker et al., arXiv 2212.04497); its terms of use are those of the original release.
Deep-supervision heads dropped (inference does not use them); every other tensor as released.

{_card_table(cfg)}

{how_to_use(cfg)} Not a medical device.
"""
    out_dir = save_for_inference(model, out_dir, cfg, card=card)
    log.debug("wrote %s to %s", cfg.name, out_dir)
    return out_dir
