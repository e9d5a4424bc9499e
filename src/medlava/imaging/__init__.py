"""Medical image input: DICOM, NIfTI, PNG and JPEG to a `Study` of 8-bit key images.

Never imports torch: this package must stay usable without the model.
"""

from medlava.imaging.deid import UIDMap, deidentify_dataset, deidentify_file, deidentify_tree
from medlava.imaging.loader import SUPPORTED, load_study
from medlava.imaging.study import MAX_PIXELS, Study, key_slice_indices, key_slices
from medlava.imaging.windowing import WINDOW_PRESETS, apply_window, minmax_to_uint8

__all__ = [
    "MAX_PIXELS",
    "SUPPORTED",
    "WINDOW_PRESETS",
    "Study",
    "UIDMap",
    "apply_window",
    "deidentify_dataset",
    "deidentify_file",
    "deidentify_tree",
    "key_slice_indices",
    "key_slices",
    "load_study",
    "minmax_to_uint8",
]
