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

# The 8 organs of the Synapse evaluation protocol (spec "Label maps").
SYNAPSE_EVAL_LABELS: tuple[int, ...] = (1, 2, 3, 4, 6, 7, 8, 11)

# RGB 0..255, chosen to be distinguishable and close to the conventions of 3D Slicer's
# abdominal colour table (liver brown-red, spleen purple, kidneys yellow, vessels red/blue).
BTCV_COLORS: dict[int, tuple[int, int, int]] = {
    1: (157, 108, 162),  # spleen
    2: (185, 102, 83),  # right kidney
    3: (216, 173, 88),  # left kidney
    4: (139, 150, 98),  # gallbladder
    5: (211, 171, 143),  # esophagus
    6: (221, 130, 101),  # liver
    7: (255, 213, 140),  # stomach
    8: (224, 97, 76),  # aorta
    9: (0, 151, 206),  # inferior vena cava
    10: (0, 112, 165),  # portal and splenic vein
    11: (249, 180, 111),  # pancreas
    12: (244, 214, 49),  # right adrenal gland
    13: (200, 200, 235),  # left adrenal gland
}
