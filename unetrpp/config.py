"""One frozen configuration for every UNETR++ network, and the named presets.

The four original networks (synapse, acdc, tumor, lung) differ only in a few numbers and three
quirks (spec table "Variants"); here they are data, not four copies of the code. Token counts are
derived from the patch size, never written down.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .labels import BTCV_CLASS_NAMES

# How EPA projects keys and values from N tokens to P: "separate" Linear(N, P) layers E and F;
# "shared": one Linear(N, P) serves as both (synapse); "single": one bias-free (N, P) parameter EF (tumor).
KV_PROJECTIONS = ("separate", "shared", "single")
BRANCH_FUSIONS = ("concat", "sum")
NORMALIZATIONS = ("ct", "zscore", "none")


def check_orientation(orientation: str, name: str = "orientation") -> str:
    """`orientation` as three upper-case axis codes, one from each of L/R, A/P and S/I (e.g. "RAS"); else a
    one-line ValueError naming `name`."""
    codes = str(orientation).upper()
    if len(codes) != 3 or not all(sum(c in pair for c in codes) == 1 for pair in ("LR", "AP", "SI")):
        raise ValueError(f"{name}={orientation!r}: give three axis codes, one each of L/R, A/P and S/I "
                         "(e.g. 'RAS' or 'LPS')")
    return codes


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect of an input volume (nnU-Net v1 conventions, spec "Preprocessing").

    `spacing` is in mm along (z, y, x); `orientation` names the world directions of the array axes
    (x, y, z) in nibabel's convention, e.g. "RAS"; `normalization` "ct" clips to `clip` (HU) then
    applies (v - mean) / std, "zscore" standardises each volume, "none" leaves intensities alone.
    """

    spacing: tuple[float, float, float] = (3.0, 0.7578, 0.7578)
    # nnU-Net v1 reads images with SimpleITK and never reorients: BTCV as ITK reads it is LPS
    # (i towards the patient's left, j posterior, k superior), so the released synapse weights saw LPS.
    orientation: str = "LPS"
    modality: str = "CT"
    normalization: str = "ct"
    clip: tuple[float, float] = (-958.0, 326.0)
    mean: float = 82.9518
    std: float = 136.9482

    def __post_init__(self) -> None:
        # A config.json or `train --set` can hold anything: a wrong type is answered here, by field, not
        # by a bare "'float' object is not iterable" or an IndexError traceback from the checks below.
        spacing, clip = _numbers(self.spacing), _numbers(self.clip)
        # not `min(...) <= 0`, which NaN passes: a NaN or infinite spacing only fails later, inside resampling
        if spacing is None or len(spacing) != 3 or not all(0 < s < math.inf for s in spacing):
            raise ValueError(f"preprocessing.spacing={self.spacing!r}: need three positive, finite mm values (z, y, x)")
        if clip is None or len(clip) != 2:
            raise ValueError(f"preprocessing.clip={self.clip!r}: need two HU values (low, high), e.g. (-958, 326)")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "clip", clip)
        for name in ("mean", "std"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"preprocessing.{name}={getattr(self, name)!r}: need a number, e.g. "
                                 f"{getattr(Preprocessing, name)}")
        if not isinstance(self.modality, str):
            raise ValueError(f"preprocessing.modality={self.modality!r}: need a name such as 'CT' or 'MRI'")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"preprocessing.normalization={self.normalization!r}: must be one of {NORMALIZATIONS}"
            )
        if self.normalization == "ct" and not (self.clip[0] < self.clip[1] and self.std > 0
                                               and math.isfinite(self.mean) and math.isfinite(self.std)):
            raise ValueError(f"preprocessing clip={self.clip}, mean={self.mean}, std={self.std}: need clip low < "
                             "high, a finite mean and a finite std > 0")
        check_orientation(self.orientation, "preprocessing.orientation")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _sequence(values: Any) -> tuple | None:
    """`values` as a tuple, or None when it is a single value (a number, a string: JSON's 64 for [64, 128, 128])."""
    return None if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) else tuple(values)


def _numbers(values: Any) -> tuple[float, ...] | None:
    """`values` as a tuple of floats, or None when it is not a sequence of numbers."""
    values = _sequence(values)
    return tuple(float(v) for v in values) if values is not None and all(_is_real(v) for v in values) else None


@dataclass(frozen=True)
class UNETRPPConfig:
    """Hyper-parameters of one UNETR++ network plus what inference needs to use it.

    Spatial tuples are ordered (z, y, x) like the tensors (see the package docstring).
    """

    name: str = "custom"
    in_channels: int = 1
    out_channels: int = 14
    patch_size: tuple[int, int, int] = (64, 128, 128)  # training window; fixes the token counts
    stem: tuple[int, int, int] = (2, 4, 4)  # kernel = stride of the first downsampling conv
    feature_size: int = 16  # width of the full-resolution conv path (encoder1 / decoder2)
    dims: tuple[int, int, int, int] = (32, 64, 128, 256)  # width of encoder stages 0..3
    depths: tuple[int, int, int, int] = (3, 3, 3, 3)  # TransformerBlocks per encoder stage
    decoder_depth: int = 3  # TransformerBlocks per decoder stage
    num_heads: int = 4
    proj_sizes: tuple[int, int, int, int] = (64, 64, 64, 32)  # EPA's P per encoder stage
    decoder_proj_size: int = 64
    attn_dropout: float = 0.15  # on both EPA attention maps, training only
    conv_dropout: float = 0.1  # Dropout3d before conv8
    layer_scale_init: float = 1e-6
    kv_projection: str = "shared"  # "separate" (E, F), "shared" (E is F), "single" (tumor's EF)
    branch_fusion: str = "concat"  # "concat" through out_proj/out_proj2, or "sum" (tumor)
    extra_conv: bool = False  # a second ResBlock conv52 in every TransformerBlock (acdc, lung)
    deep_supervision: bool = False
    class_names: tuple[str, ...] = ("background",) + BTCV_CLASS_NAMES
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    synthetic: bool = False  # trained on SYNTHETIC data (phantoms): said wherever its masks are shown

    def __post_init__(self) -> None:
        for key in ("patch_size", "stem", "dims", "depths", "proj_sizes"):  # numpy integers become ints
            values = _sequence(getattr(self, key))
            if values is None:  # e.g. patch_size=64
                example = next(f.default for f in dataclasses.fields(self) if f.name == key)
                raise ValueError(f"UNETRPPConfig.{key}={getattr(self, key)!r}: needs {len(example)} whole numbers, "
                                 f"e.g. {example}")
            object.__setattr__(self, key, tuple(int(v) if isinstance(v, numbers.Integral) else v for v in values))
        names = _sequence(self.class_names)
        if names is None or not all(isinstance(n, str) for n in names):
            raise ValueError(f"UNETRPPConfig.class_names={self.class_names!r}: needs one name (a string) per output "
                             "channel, background first, e.g. ('background', 'spleen', ...)")
        object.__setattr__(self, "class_names", names)
        if not isinstance(self.preprocessing, (Preprocessing, Mapping)):  # a string would fail only at inference
            raise ValueError(f"UNETRPPConfig.preprocessing={self.preprocessing!r}: needs a Preprocessing or a dict of "
                             f"its fields, e.g. {{'spacing': [3.0, 0.7578, 0.7578]}}")
        if isinstance(self.preprocessing, Mapping):
            known = {f.name for f in dataclasses.fields(Preprocessing)}
            if unknown := sorted(set(self.preprocessing) - known):
                raise ValueError(f"unknown preprocessing keys {unknown}; valid keys: {sorted(known)}")
            object.__setattr__(self, "preprocessing", Preprocessing(**self.preprocessing))
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------------
    def stage_grid(self, stage: int) -> tuple[int, int, int]:
        """Token grid (z, y, x) of encoder stage 0..3: the patch divided by the stem, then halved."""
        return tuple(p // s // 2**stage for p, s in zip(self.patch_size, self.stem))

    def tokens(self, stage: int) -> int:
        """Token count N of encoder stage 0..3 (and of the decoder stage on its grid): sizes E/F and pos_embed."""
        return math.prod(self.stage_grid(stage))

    # ---- checks --------------------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(name: str, value: Any, rule: str) -> None:
            raise ValueError(f"UNETRPPConfig.{name}={value!r}: {rule}")

        # bool is an int to Python, and JSON's true would otherwise build a one-head network
        for name in ("in_channels", "out_channels", "feature_size", "num_heads", "decoder_depth", "decoder_proj_size"):
            if not (isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                    and getattr(self, name) > 0):
                fail(name, getattr(self, name), "must be a positive integer")
        for name in ("patch_size", "stem", "dims", "depths", "proj_sizes"):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(self, name)):
                fail(name, getattr(self, name), "needs whole numbers")
        for name in ("patch_size", "stem"):
            if len(getattr(self, name)) != 3 or min(getattr(self, name)) <= 0:
                fail(name, getattr(self, name), "needs three positive values (z, y, x)")
        for p, s in zip(self.patch_size, self.stem):
            if p % (s * 8):
                fail("patch_size", self.patch_size,
                     f"each axis must be divisible by stem x 8 = {tuple(s * 8 for s in self.stem)} "
                     "(the stem, then three 2x downsamplings)")
        for name in ("dims", "depths", "proj_sizes"):
            if len(getattr(self, name)) != 4 or min(getattr(self, name)) <= 0:
                fail(name, getattr(self, name), "needs four positive values, one per encoder stage")
        for i in range(1, 4):
            if self.dims[i] % self.dims[i - 1]:
                fail("dims", self.dims, "each width must be a multiple of the previous one (GroupNorm groups)")
        for d in self.dims:
            if d % self.num_heads:
                fail("num_heads", self.num_heads, f"must divide every width in dims={self.dims}")
            if self.branch_fusion == "concat" and d % 2:
                fail("dims", self.dims, "widths must be even: the two EPA branches each give half")
        if self.dims[0] % self.in_channels:
            fail("in_channels", self.in_channels, f"must divide dims[0]={self.dims[0]} (stem GroupNorm groups)")
        if self.kv_projection not in KV_PROJECTIONS:
            fail("kv_projection", self.kv_projection, f"must be one of {KV_PROJECTIONS}")
        if self.branch_fusion not in BRANCH_FUSIONS:
            fail("branch_fusion", self.branch_fusion, f"must be one of {BRANCH_FUSIONS}")
        for name in ("attn_dropout", "conv_dropout"):
            if not (_is_real(getattr(self, name)) and 0.0 <= getattr(self, name) < 1.0):
                fail(name, getattr(self, name), "a dropout rate must be a number in [0, 1)")
        if not (_is_real(self.layer_scale_init) and math.isfinite(self.layer_scale_init)):
            fail("layer_scale_init", self.layer_scale_init, "must be a finite number, e.g. 1e-6 (the original's)")
        for name in ("deep_supervision", "extra_conv", "synthetic"):  # a string "false" would read as true
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be true or false")
        if len(self.class_names) != self.out_channels:
            fail("class_names", self.class_names,
                 f"needs one name per output channel ({self.out_channels}), background first")

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values (preprocessing as a nested dict): what config.json holds."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNETRPPConfig":
        """Inverse of `to_dict`; accepts lists for tuples (JSON) and rejects unknown keys."""
        cls._check_keys(data)
        return cls(**dict(data))

    def replace(self, **overrides: Any) -> "UNETRPPConfig":
        """A copy with `overrides` as new field values, checked like a new config; unknown keys are refused."""
        self._check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def _check_keys(cls, data: Mapping[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown UNETR++ config keys {unknown}; valid keys: {sorted(known)}")


_MRI = Preprocessing(spacing=(1.0, 1.0, 1.0), modality="MRI", normalization="zscore")

PRESETS: dict[str, UNETRPPConfig] = {
    # Synapse multi-organ CT (BTCV labels); E and F share one Linear.
    "unetrpp_synapse": UNETRPPConfig(name="unetrpp_synapse"),
    # ACDC cardiac cine-MRI: thin stem along z, conv52, separate E/F.
    "unetrpp_acdc": UNETRPPConfig(
        name="unetrpp_acdc", out_channels=4, patch_size=(16, 160, 160), stem=(1, 4, 4),
        attn_dropout=0.1, kv_projection="separate", extra_conv=True,
        class_names=("background", "right ventricle", "myocardium", "left ventricle"),
        preprocessing=dataclasses.replace(_MRI, spacing=(5.0, 1.5625, 1.5625)),
    ),
    # BraTS: four MRI sequences in, one EF matrix, branches summed.
    "unetrpp_tumor": UNETRPPConfig(
        name="unetrpp_tumor", in_channels=4, out_channels=4, patch_size=(128, 128, 128), stem=(4, 4, 4),
        attn_dropout=0.1, kv_projection="single", branch_fusion="sum",
        class_names=("background", "edema", "non-enhancing tumour", "enhancing tumour"),
        preprocessing=_MRI,
    ),
    # MSD lung tumour CT. The spec gives no lung preprocessing numbers: these are the synapse CT
    # ones as a placeholder, so converting a lung checkpoint requires --spacing/--clip/--mean/--std
    # (from the nnU-Net plans of its training run; see pretrained.UNKNOWN_PREPROCESSING).
    "unetrpp_lung": UNETRPPConfig(
        name="unetrpp_lung", out_channels=2, patch_size=(32, 192, 192), stem=(1, 4, 4),
        attn_dropout=0.1, kv_projection="separate", extra_conv=True,
        class_names=("background", "lung tumour"),
    ),
    # Small and fast: tests, notebooks and CPU training on phantoms (BTCV labels).
    "unetrpp_tiny": UNETRPPConfig(
        name="unetrpp_tiny", patch_size=(32, 64, 64), stem=(2, 4, 4), feature_size=8, dims=(16, 32, 64, 128),
        # stage 3 has 8 tokens: its P = 16 lifts rather than compresses (allowed; the teaching weights use it)
        depths=(1, 1, 1, 1), decoder_depth=1, proj_sizes=(32, 32, 32, 16), decoder_proj_size=32,
        attn_dropout=0.1, kv_projection="separate",
        preprocessing=Preprocessing(spacing=(4.0, 2.5, 2.5), orientation="RAS"),
    ),
}


def get_config(name: str, **overrides: Any) -> UNETRPPConfig:
    """The preset called `name`, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNETR++ model name {name!r}; valid names: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

