"""Data: readers for the BTCV layout (`btcv`) and the SYNTHETIC abdominal CT phantom (`phantom`)."""

from .btcv import Case, check_label_names, load_case, read_datalist, split_cases
from .phantom import SIZES, SYNTHETIC_NOTE, generate_case, write_phantom_dataset

__all__ = [
           "SIZES",
           "SYNTHETIC_NOTE",
           "Case",
           "check_label_names",
           "generate_case",
           "load_case",
           "read_datalist",
           "split_cases",
           "write_phantom_dataset",
]
