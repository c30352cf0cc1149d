r"""Validation of the attack's arguments (paper section 4, the inputs of Algorithm 1).

Each check returns the value in its resolved form (floats, ints, a tuple of budgets, float64
images) or raises a ``TypeError``/``ValueError`` that names the argument.  Budgets are W1
radii in the normalised unit (image mass 1 per channel); images are non-negative masses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flowverify.core.validation import channel_last_hint

__all__ = [
    "check_choice",
    "check_clip_max",
    "check_eps",
    "check_images",
    "check_int",
    "check_reference",
    "check_seed",
    "check_step_size",
]

_REAL = (int, float, np.integer, np.floating)


def check_eps(eps) -> tuple[float, ...] | None:
    """Budgets: ``None`` (minimal-radius mode), a number or a non-empty sequence of them."""
    if eps is None:
        return None
    if isinstance(eps, (str, bytes)):
        raise TypeError(f"eps: expected a float, a sequence of floats or None, got {eps!r}")
    if isinstance(eps, np.ndarray) and eps.ndim == 0:
        eps = eps.item()
    vals = list(eps) if isinstance(eps, (Sequence, np.ndarray)) else [eps]
    if not vals:
        raise ValueError("eps: expected at least one budget, got an empty sequence")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, _REAL):
            raise TypeError(f"eps: expected real numbers, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"eps: expected finite budgets >= 0 (normalised W1), got {v}")
        out.append(v)
    return tuple(out)


def check_int(value, name: str, minimum: int) -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_seed(seed) -> int:
    """A seed: an int in ``[0, 2**64)``."""
    seed = check_int(seed, "seed", 0)
    if seed >= 2**64:
        raise ValueError(f"seed: expected an int < 2**64, got {seed}")
    return seed


def check_choice(value, name: str, valid: Sequence[str]) -> str:
    """One of the strings ``valid``."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}: unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


def check_step_size(step_size) -> float:
    """A finite step size ``> 0`` (a fraction of the budget)."""
    if isinstance(step_size, bool) or not isinstance(step_size, _REAL):
        raise TypeError(f"step_size: expected a float, got {type(step_size).__name__}")
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size: expected a finite value > 0, got {step_size}")
    return float(step_size)


def check_clip_max(clip_max) -> float | None:
    """``None`` or a finite pixel upper bound ``> 0`` (data units)."""
    if clip_max is None:
        return None
    if isinstance(clip_max, bool) or not isinstance(clip_max, _REAL):
        raise TypeError(f"clip_max: expected a float or None, got {clip_max!r}")
    if not math.isfinite(clip_max) or clip_max <= 0:
        raise ValueError(f"clip_max: expected a finite value > 0, got {clip_max}")
    return float(clip_max)


def check_reference(reference) -> Any:
    """``None``, a reference kind (``"uniform"``, ``"random"``, ``"point"``) or an image
    array (numpy or torch); returned unchanged."""
    if isinstance(reference, str):
        check_choice(reference, "reference", ("uniform", "random", "point"))
    elif reference is not None and not isinstance(reference, (np.ndarray, torch.Tensor)):
        raise TypeError(
            "reference: expected None, 'uniform', 'random', 'point' or an image array, got "
            f"{type(reference).__name__}"
        )
    return reference


def check_images(images) -> np.ndarray:
    """``(N, C, H, W)`` finite non-negative images of positive mass per channel, as float64."""
    if isinstance(images, torch.Tensor):
        arr = images.detach().to("cpu").numpy()
    elif isinstance(images, np.ndarray):
        arr = images
    else:
        raise TypeError(
            f"images: expected a numpy.ndarray or torch.Tensor, got {type(images).__name__}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"images: expected real pixel values, got dtype {arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"images: expected shape (N, C, H, W), got {tuple(arr.shape)}")
    if arr.shape[1] < 1:
        raise ValueError(f"images: expected at least one channel, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("images: expected finite pixel values, got NaN or infinity")
    if arr.size and arr.min() < 0:
        raise ValueError(f"images: expected non-negative pixels (mass), got {arr.min():g}")
    with np.errstate(over="ignore"):
        mass = arr.sum(axis=(2, 3))
    if arr.shape[0] and (mass <= 0).any():
        raise ValueError(
            "images: expected positive mass in every channel, got an all-zero one"
            + channel_last_hint(arr.shape)
        )
    if not np.isfinite(mass).all():
        raise ValueError(
            f"images: expected a finite mass per channel, got one that overflows float64 "
            f"(largest pixel {arr.max():g})"
        )
    return arr
