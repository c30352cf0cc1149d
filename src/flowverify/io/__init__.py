"""Images in and out: the bundled evaluation digits, ``.npz``, MNIST IDX files,
torchvision folders and PNG (:mod:`.datasets`).
"""

from flowverify.io.datasets import (
    BUNDLED_DIGITS,
    bundled_digits,
    load_images,
    parse_indices,
    read_idx,
    read_png,
)

__all__ = [
    "BUNDLED_DIGITS",
    "bundled_digits",
    "load_images",
    "parse_indices",
    "read_idx",
    "read_png",
]
