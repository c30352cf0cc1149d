"""The bundled sample of 500 MNIST evaluation digits shipped in ``flowverify/assets``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from flowverify.io.npz import load_npz

__all__ = ["BUNDLED_DIGITS", "BUNDLED_NAMES", "bundled_digits"]

#: File name of the bundled sample inside ``flowverify/assets``.
BUNDLED_DIGITS = "digits500.npz"

#: Sources that :func:`flowverify.io.images.load_images` reads as the bundled sample.
BUNDLED_NAMES = ("bundled", "digits500")


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled sample of 500 MNIST digits.

    The sample is the first 500 digits of the held-out part (the last 2,000)
    of ``mnist10k.npz``; the bundled models were not trained on it. The file
    also stores ``source_index``, the positions of the digits in
    ``mnist10k.npz``.

    Returns
    -------
    x : numpy.ndarray
        ``float32`` images of shape ``(500, 1, 28, 28)`` in ``[0, 1]``.
    y : numpy.ndarray
        ``int64`` labels of shape ``(500,)``.
    """
    ref = resources.files("flowverify").joinpath("assets", BUNDLED_DIGITS)
    with resources.as_file(ref) as p:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"bundled digits not found at {str(p)!r}; reinstall flowverify "
                "or run scripts/train_models.py"
            )
        x, y = load_npz(Path(p))
    if y is None:
        raise ValueError(f"bundled digits at {str(p)!r} have no labels 'y'")
    return x, y
