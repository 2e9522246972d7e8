"""The golden fill rule of tests/fixtures/README.md (from the golden files' README): the value of
every original state_dict entry, rebuilt from its key and shape."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def golden_fill(key: str, shape: tuple, variant: str) -> torch.Tensor | None:
    canon = key.replace("epa_block.F.", "epa_block.E.") if variant == "synapse" else key
    g = torch.Generator().manual_seed(zlib.crc32(canon.encode()))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return None
    if leaf == "running_mean":
        return 0.1 * torch.randn(shape, generator=g)
    if leaf in ("running_var", "temperature", "temperature2"):
        return 0.5 + torch.rand(shape, generator=g)
    if leaf == "gamma":
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if leaf == "pos_embed":
        return 0.1 * torch.randn(shape, generator=g)
    if leaf == "EF":
        return torch.randn(shape, generator=g) / shape[0] ** 0.5
    if len(shape) == 1 and leaf in ("weight", "bias"):
        return (1.0 + 0.1 * torch.randn(shape, generator=g)) if leaf == "weight" else 0.05 * torch.randn(shape, generator=g)
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=g) / fan_in**0.5


def original_keys(variant: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of the original state_dict (tests/fixtures/keys_<variant>.tsv)."""
    keys = {}
    for line in (FIXTURES / f"keys_{variant}.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        keys[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return keys


def golden_state_dict(variant: str) -> dict[str, torch.Tensor]:
    return {k: (torch.zeros((), dtype=torch.long) if (t := golden_fill(k, s, variant)) is None else t)
            for k, s in original_keys(variant).items()}


def save_released_style(state_dict: dict, path: Path, prefix: str = "") -> Path:
    """Save like nnU-Net v1 does: a dict with state_dict, epoch, optimizer state and numpy plot_stuff."""
    torch.save({
        "epoch": 1000,
        "state_dict": {prefix + k: v for k, v in state_dict.items()},
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "params": [0, 1]}]},
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([np.float64(0.5), np.float64(0.4)], [np.float32(0.6)], [], [np.float64(0.8)]),
        "best_stuff": (999, np.float64(0.81), np.float64(0.82)),
    }, path)
    return path


def as_numpy1_pickle(path: Path) -> Path:
    """Rewrite a torch.save file so its numpy scalars are pickled as numpy 1 wrote them
    (`numpy.core.multiarray.scalar`), as in the released checkpoints; numpy 2 writes `numpy._core`."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"cnumpy._core.multiarray\nscalar\n" in data
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            z.writestr(info, data)
    return path
