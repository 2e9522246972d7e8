"""Label maps: the 13 BTCV abdominal organs (ids 1..13, background 0) and their display colours.

One place for names, ids and colours, shared by the model presets, the data reader, the
evaluation and the viewer (spec "Label maps").
"""

BTCV_CLASS_NAMES: tuple[str, ...] = (
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
BTCV_LABELS: dict[int, str] = {i + 1: name for i, name in enumerate(BTCV_CLASS_NAMES)}

# The names BTCV's own dataset.json (the UNETR / MONAI tutorial conversion of RawData) gives the organs.
BTCV_ABBREVIATIONS: dict[str, str] = dict(zip(
    ("spleen", "rkid", "lkid", "gall", "eso", "liver", "sto", "aorta", "ivc", "veins", "pancreas", "rad", "lad"),
    BTCV_CLASS_NAMES))

# The 8 organs of the Synapse evaluation protocol (spec "Label maps").
SYNAPSE_EVAL_LABELS: tuple[int, ...] = (1, 2, 3, 4, 6, 7, 8, 11)

# RGB 0..255, chosen to be told apart over a grey CT (the closest two differ by 18 in CIEDE2000;
# 3D Slicer's table puts the right kidney, liver and aorta within 8 of each other), keeping the usual
# cues: aorta red, veins blue, liver brown, spleen purple, kidneys yellow and orange.
BTCV_COLORS: dict[int, tuple[int, int, int]] = {
    1: (157, 108, 162),  # spleen
    2: (241, 214, 69),  # right kidney
    3: (255, 140, 0),  # left kidney
    4: (80, 160, 60),  # gallbladder
    5: (211, 171, 143),  # esophagus
    6: (150, 95, 55),  # liver
    7: (255, 130, 180),  # stomach
    8: (230, 30, 40),  # aorta
    9: (0, 151, 206),  # inferior vena cava
    10: (20, 60, 160),  # portal and splenic vein
    11: (0, 190, 170),  # pancreas
    12: (255, 0, 255),  # right adrenal gland
    13: (200, 200, 235),  # left adrenal gland
}
