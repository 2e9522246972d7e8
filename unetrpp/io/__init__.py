"""The only package that touches NIfTI files (nibabel): `reading` checks and loads scans into a `Volume`;
`writing` puts masks and arrays back on a scan's grid, atomically, with their label tables.
"""

from .reading import (MAX_VOXELS, NIFTI_SUFFIXES, SHEAR_DEGREES, Volume, check_image, from_image, header_grid, load,
                      sniff, to_source_grid, unit_note)
from .writing import (LABEL_TABLE_DESCRIPTION, MASK_DESCRIPTION, SYNTHETIC_NOTE, atomic_write,
                      check_folder_can_be_written, check_replaceable, finished_mask, label_table, nifti_stem,
                      read_label_names, read_label_table, save_array, save_mask, sidecar_path, usual_permissions,
                      written_by_save_mask)

__all__ = [
    "MAX_VOXELS", "NIFTI_SUFFIXES", "SHEAR_DEGREES", "Volume", "check_image", "from_image", "header_grid", "load",
    "sniff", "to_source_grid", "unit_note",
    "LABEL_TABLE_DESCRIPTION", "MASK_DESCRIPTION", "SYNTHETIC_NOTE", "atomic_write", "check_folder_can_be_written",
    "check_replaceable", "finished_mask", "label_table", "nifti_stem", "read_label_names", "read_label_table",
    "save_array", "save_mask", "sidecar_path", "usual_permissions", "written_by_save_mask",
]
