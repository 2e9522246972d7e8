"""Training data: cases resampled and normalised like inference does (`unetrpp.preprocess`), and a
patch dataset with class-balanced crops and nnU-Net-style augmentations (MONAI transforms)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt

from . import preprocess
from .config import UNETRPPConfig
from .data.btcv import Case, load_case

log = logging.getLogger(__name__)


@dataclass
class PreparedCase:
    """One case on the network's grid: image (1, Z, Y, X) float32 normalised, label (1, Z, Y, X) uint8,
    at least as large as the patch (padded with the background intensity and label 0)."""

    name: str
    image: np.ndarray
    label: np.ndarray


def prepare_cases(cases: list[Case], config: UNETRPPConfig) -> list[PreparedCase]:
    """Read, check and resample every case before training starts.

    All problems are collected first, so one ValueError names every bad case and its problem.
    """
    pre = config.preprocessing
    prepared, problems = [], []
    for case in cases:
        try:
            volume, label = load_case(case, pre.orientation, config.out_channels)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        image = preprocess.prepare(volume, pre).image  # (Z', Y', X')
        label = preprocess.resample_labels(label, image.shape, volume.spacing, pre.spacing)
        pad = [(0, max(0, p - s)) for p, s in zip(config.patch_size, image.shape)]
        low = float(image.min())
        image = np.pad(image, pad, constant_values=low)
        label = np.pad(label, pad)
        prepared.append(PreparedCase(case.name, image[None], label[None]))
        log.info("case %s: %s voxels at %s mm", case.name, image.shape, pre.spacing)
    if problems:
        raise ValueError(f"{len(problems)} of {len(cases)} cases are unusable: " + "; ".join(problems))
    return prepared


def build_transforms(config: UNETRPPConfig, flip_prob: float = 0.0, rotate_deg: float = 15.0,
                     scale: float = 0.1, intensity: float = 0.1) -> mt.Compose:
    """Class-balanced patch crop, then augmentation; all on dicts {"image", "label", "indices"}.

    The crop centre is drawn per class with equal ratios (organs and background alike), so small
    organs are seen as often as the liver. Mirroring is off by default: it swaps the left and
    right kidney / adrenal, which a small network then has to untangle from context alone.
    """
    n = config.out_channels
    steps: list = [
        mt.RandCropByLabelClassesd(keys=("image", "label"), label_key="label", spatial_size=config.patch_size,
                                   num_classes=n, ratios=[1.0] * n, num_samples=1, indices_key="indices",
                                   allow_smaller=False),
        mt.RandAffined(keys=("image", "label"), prob=0.3, mode=("bilinear", "nearest"), padding_mode="border",
                       rotate_range=(np.radians(rotate_deg), np.radians(rotate_deg) / 3, np.radians(rotate_deg) / 3),
                       scale_range=(scale, scale, scale)),
    ]
    if flip_prob > 0:
        steps += [mt.RandFlipd(keys=("image", "label"), prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    steps += [
        mt.RandScaleIntensityd(keys="image", factors=intensity, prob=0.5),
        mt.RandShiftIntensityd(keys="image", offsets=intensity, prob=0.5),
        mt.RandGaussianNoised(keys="image", prob=0.15, std=0.05),
    ]
    return mt.Compose(steps)


class PatchDataset(torch.utils.data.Dataset):
    """`samples_per_case` random patches per case per epoch; item i of epoch e is a deterministic
    function of (seed, e, i), so a resumed run draws exactly the patches it would have drawn.

    Items are (image (1, *patch) float32, label (1, *patch) int64) tensors.
    """

    def __init__(self, cases: list[PreparedCase], transforms: mt.Compose, num_classes: int,
                 samples_per_case: int = 8, seed: int = 0):
        self.cases, self.transforms, self.samples_per_case, self.seed = cases, transforms, samples_per_case, seed
        self.epoch = 0
        # Voxel indices per class, computed once per case: cropping then costs no full-volume pass.
        self.indices = [mt.map_classes_to_indices(torch.as_tensor(c.label), num_classes=num_classes) for c in cases]

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = index % len(self.cases)
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        self.transforms.set_random_state(seed=int(state))
        item = {"image": self.cases[case].image, "label": self.cases[case].label, "indices": self.indices[case]}
        out = self.transforms(item)
        out = out[0] if isinstance(out, list) else out
        return _plain(out["image"]).float(), _plain(out["label"]).round().long()


def _plain(x) -> torch.Tensor:
    """A MONAI MetaTensor or array as a plain tensor (no metadata to collate)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))
