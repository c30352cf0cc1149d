"""Images in: every loader gives ``float32`` images ``(N, C, H, W)`` in data units
``[0, 1]`` and ``int64`` labels ``(N,)`` or ``None``, and never unpickles data.

The sources: the bundled evaluation digits (:mod:`.bundled`), ``.npz`` archives
(:mod:`.npz`), MNIST IDX files and torchvision folders (:mod:`.mnist_files`) and PNG
images (:mod:`.png`), behind one dispatcher (:mod:`.images`); index specifications such
as ``"0:100"`` (:mod:`.indices`); the checks and conversion every decoded array goes
through (:mod:`.image_arrays`).
"""

from flowverify.io.bundled import BUNDLED_DIGITS, bundled_digits
from flowverify.io.images import load_images
from flowverify.io.indices import parse_indices
from flowverify.io.mnist_files import read_idx
from flowverify.io.png import read_png

__all__ = [
    "BUNDLED_DIGITS",
    "bundled_digits",
    "load_images",
    "parse_indices",
    "read_idx",
    "read_png",
]
