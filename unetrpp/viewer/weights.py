"""Which weights the viewer loads (`--weights`, `UNETRPP_WEIGHTS`, the best folder in weights/, or random
init), the notice the page shows about them, and the model, loaded once on first use."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

NOT_A_DEVICE = ("**Not a medical device.** For research and teaching only; never use these masks for "
                "diagnosis or treatment.")
SYNTHETIC_NOTICE = ("These weights were trained only on **synthetic phantoms** (teaching weights): they show how "
                    "the viewer works, but on a real CT their masks are not the real organs (Dice 0 on the bundled "
                    "real CT). Whoever runs this viewer can give it the released UNETR++ synapse weights for real "
                    "CT: `python -m unetrpp convert`, then `--weights` (see the README).")
UNTRAINED_NOTICE = ("**UNTRAINED MODEL: random weights.** No weights were found (`--weights`, `UNETRPP_WEIGHTS`, "
                    "`weights/`), so the masks below are noise. Train the teaching weights or convert the "
                    "released synapse weights into `weights/`.")


def resolve_weights(spec: str | None = None, weights_dir: str | os.PathLike = "weights") -> tuple[str | None, str]:
    """Which weights the viewer loads, and the notice to show: (spec or None for random init, markdown).

    Order: `spec` (from --weights / UNETRPP_WEIGHTS), else the best folder in `weights_dir` (real
    weights such as unetrpp_synapse before anything trained on phantoms; only single-channel CT
    weights, so converted ACDC or BraTS weights beside them are never picked), else random init.
    A local `spec` whose network takes more than one channel is refused (ValueError).
    """
    root = Path(weights_dir)
    if spec:
        folder = next((p for p in (Path(spec), root / str(spec)) if (p / "config.json").is_file()), None)
        if folder is None:  # a Hub repo id the local cache holds: its config tells SYNTHETIC weights before they load
            from ..hub import cached_hub_folder

            folder = cached_hub_folder(str(spec))
        config = _config(folder) if folder is not None else {}
        if config.get("in_channels", 1) != 1:
            raise ValueError(f"weights {spec}: the network takes {config['in_channels']} input channels, "
                             "but the viewer shows one scan; use single-channel CT weights such as unetrpp_synapse")
        synthetic = "phantom" in str(spec).lower() or (folder is not None and _synthetic(folder, config))
        return str(spec), (SYNTHETIC_NOTICE if synthetic else f"Weights: `{spec}`.")
    folders = sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
    usable = [(p, config) for p in folders if _single_channel_ct(p, config := _config(p))]
    real = sorted((p for p, config in usable if not _synthetic(p, config)),
                  key=lambda p: (p.name != "unetrpp_synapse", p.name))
    if real:
        return str(real[0]), f"Weights: `{real[0]}`."
    phantom = [p for p, config in usable if _synthetic(p, config)]
    if phantom:
        return str(phantom[0]), SYNTHETIC_NOTICE
    return None, UNTRAINED_NOTICE


def _config(folder: Path) -> dict:
    """The folder's config.json as a dict ({} when unreadable: loading it later says why)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _synthetic(folder: Path, config: dict) -> bool:
    """Weights trained on phantoms: their config.json says so (`synthetic`), or the folder's name does."""
    return config.get("synthetic") is True or "phantom" in folder.name.lower()


def _single_channel_ct(folder: Path, config: dict) -> bool:
    """Weights the viewer can use unasked: one input channel, CT preprocessing."""
    prep = config.get("preprocessing")
    modality = prep.get("modality", "CT") if isinstance(prep, dict) else "CT"
    usable = config.get("in_channels", 1) == 1 and modality == "CT"
    if not usable:
        logger.info("%s: not used by default (the viewer picks single-channel CT weights)", folder)
    return usable


class ModelHolder:
    """Loads the model once, on first use (so the page starts without waiting), thread-safely."""

    def __init__(self, spec: str | None, notice: str, device: str | None = None, model=None) -> None:
        from ..devices import resolve_device

        self.spec, self.notice = spec, notice
        self.device = device or str(resolve_device())
        self._model = None if model is None else model.eval().to(self.device)
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._model is None:
                if self.spec is None:
                    from ..model import create_model

                    logger.warning("no weights found: using a randomly initialised unetrpp_tiny (UNTRAINED)")
                    self._model = create_model("unetrpp_tiny").eval().to(self.device)
                else:
                    from ..pretrained import load_pretrained

                    self._model = load_pretrained(self.spec, device=self.device)
            return self._model

    def warm_up(self) -> None:
        """Load the model now (a background thread at start-up); a failure is left for the first request
        to report, with its one-line message."""
        try:
            self.get()
        except Exception as exc:  # any failure: the request that needs the model reports it
            logger.debug("loading the model in advance failed: %s", exc)
