"""The Hugging Face Hub: a repo id's weights folder fetched, or found in the local cache, with each way that
can fail answered in one line; and the checks on `UNETRPP.from_pretrained`, huggingface_hub's own loader.
What a weights folder holds and how it loads is `pretrained.py`'s business.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .model import UNETRPP
from .pretrained import load_folder, local_weights, looks_like_path, shortened


def load_from_hub(repo_id: str) -> UNETRPP:
    """The network of Hub repo `repo_id` (its config.json + model.safetensors), for `load_pretrained`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"weights {repo_id!r}: no such folder or file here, nor a valid Hugging Face repo id "
                         f"(owner/name of letters, digits, '-', '_', '.'); give a weights folder, a .model checkpoint, "
                         f"a repo id, or one of the local weights {sorted(local_weights()) or '(none)'}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    unreachable = None if offline else _hub_unreachable()
    # The two files here rather than through UNETRPP.from_pretrained: its loader logs and drops the Hub's
    # answer for config.json, so a mistyped, private or gated repo id came out as "no config.json", and a
    # damaged cached file missed the one-line answers the folder loader gives. Out of reach,
    # huggingface_hub would retry for half a minute before falling back to its cache.
    folder = None
    for name in ("config.json", "model.safetensors"):
        try:  # model.safetensors from the commit config.json came from (its snapshot folder's name)
            path = hf_hub_download(repo_id, name, revision=folder.name if folder else None,
                                   local_files_only=offline or unreachable is not None)
        except (OSError, EntryNotFoundError, HTTPError) as exc:  # HTTPError: e.g. a proxy's refusal
            raise ValueError(_hub_failure(repo_id, name, exc, offline, unreachable)) from None
        folder = Path(path).parent
    try:
        return load_folder(folder)
    except ValueError as exc:
        raise ValueError(f"weights {repo_id!r} from the Hugging Face Hub: {exc}") from None


def _hub_failure(repo_id: str, filename: str, exc: BaseException, offline: bool, unreachable: str | None) -> str:
    """Why `filename` of `repo_id` could not be had from the Hub and what to do about it, in one line."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    # Not cached, hf_hub_download reports a refusal or a lost connection as "not in the local cache",
    # with the Hub's answer as its cause; a mistyped, private or gated repo comes as itself.
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None else exc
    status = getattr(getattr(cause, "response", None), "status_code", None)
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    download = (f"download them where the Hub is reachable (`hf download {repo_id} --local-dir FOLDER`) and "
                "pass the folder")
    local = (f" (if you meant a local folder: none of that name exists here; local weights: "
             f"{', '.join(sorted(local_weights())) or 'none'})")
    uncached = ("it is not in the local cache" if filename == "config.json" else
                f"its {filename} is not in the local cache, though its config.json is (a download that did not finish)")
    if isinstance(cause, GatedRepoError):
        why, fix = "a gated repo", f"accept its conditions at {constants.ENDPOINT}/{repo_id}, then {login}"
    elif isinstance(cause, RepositoryNotFoundError) or status == 401:
        why, fix = ("no such repo, or a private one", "check the id (owner/name, as in the address of its page); "
                    f"for a private repo, {login} as an account that may read it" + local)
    elif isinstance(cause, RevisionNotFoundError):  # the main branch, which an empty repo lacks
        why, fix = "no such revision", "check the id; weights are read from the repo's main branch" + local
    elif status == 403:
        why, fix = "access refused (403)", f"{login} as an account that may read it"
    elif status == 429:
        why = "too many requests (429)"
        fix = f"wait a few minutes and try again (logged in, the limits are higher), or {download}"
    elif status is not None and status >= 500:
        why, fix = f"the Hub answered {status}", f"try again later, or {download}"
    elif isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        why, fix = (f"the repo has no {filename}", "UNETR++ weights repos hold config.json + model.safetensors "
                    "(as `push_to_hub` sends them); check the id" + local)
    elif offline:
        why, fix = f"HF_HUB_OFFLINE is set and {uncached}", download + local
    elif unreachable:
        why, fix = f"the Hub is out of reach ({unreachable}) and {uncached}", download + local
    else:
        reason = shortened((str(cause).strip().splitlines() or [""])[0], 120)
        why = f"the Hub could not be reached ({type(cause).__name__}{': ' + reason if reason else ''}) and {uncached}"
        fix = f"check the connection and any proxy (HTTPS_PROXY), or {download}"
    return f"could not get weights {repo_id!r} from the Hugging Face Hub ({why}); {fix}"


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub's host cannot be reached (its name does not resolve), or None; None
    behind a proxy, which resolves names for the client."""
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    if getproxies().get("https"):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    return None


def cached_hub_folder(repo_id: str) -> Path | None:
    """The local cache's snapshot folder holding config.json of Hub repo `repo_id`, or None (not cached, or not a
    repo id); nothing is downloaded. Its config can be read before the weights are loaded."""
    if repo_id.count("/") != 1 or looks_like_path(repo_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def check_hub_source(source: Any) -> None:
    """One-line ValueError for what `UNETRPP.from_pretrained` cannot read: a file, such as a released
    checkpoint, would get the Hub's "Repo id must be in the form" instead of what reads it."""
    if Path(str(source)).expanduser().is_file():
        raise ValueError(f"{source} is a file; UNETRPP.from_pretrained takes a weights folder (config.json + "
                         "model.safetensors) or a Hugging Face repo id. Read a released model_final_checkpoint.model "
                         "with unetrpp.load_original_checkpoint(path), or convert it into a folder with "
                         "`python -m unetrpp convert`")


def check_hub_config(loader_kwargs: Mapping[str, Any]) -> None:
    """One-line ValueError when huggingface_hub found no config.json: it only logs that, then builds
    UNETRPP() without one ("missing 1 required positional argument")."""
    if "config" in loader_kwargs:
        return
    model_id = str(loader_kwargs.get("model_id"))
    if not Path(model_id).is_dir():
        # For a repo id it also logs and drops the Hub's answer: ask again, so that a mistyped, private or
        # gated repo raises the Hub's own error (RepositoryNotFoundError, ...), not "no config.json".
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        where = {k: loader_kwargs.get(k) for k in ("revision", "cache_dir", "token")}
        try:
            hf_hub_download(model_id, "config.json", **where,
                            local_files_only=bool(loader_kwargs.get("local_files_only")))
        except EntryNotFoundError as exc:  # on the Hub, the repo has no config.json: answered below
            if isinstance(exc, LocalEntryNotFoundError):
                raise
    raise ValueError(f"{loader_kwargs.get('model_id')}: no config.json; a weights folder holds config.json + "
                     "model.safetensors (make one from a released checkpoint with `python -m unetrpp convert`)")
