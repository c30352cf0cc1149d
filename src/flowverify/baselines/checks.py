"""Argument checks of the Wasserstein smoothing baseline (paper section 3.3, after Levine
& Feizi, AISTATS 2020).

Noise levels, sample counts, significance levels, images, labels and data-set indices are
checked at the baseline's boundary, before any noise is drawn or any model runs; each
error names the argument.  Images are in data units: finite, non-negative, with positive
mass in every channel (the noise acts on the normalised image ``x / s``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
        raise TypeError(f"sigma: expected a positive float, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a positive finite noise level, got {sigma!r}")
    return sigma


def _check_count(value: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"alpha: expected a float in (0, 1), got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a significance level in (0, 1), got {alpha!r}")
    return alpha


def _check_images(images: Any) -> torch.Tensor:
    """Images ``(N, C, H, W)`` as a float tensor; non-negative, finite, positive mass."""
    if isinstance(images, np.ndarray):
        if not (
            np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)
        ):
            raise TypeError(f"images: expected a real-valued array, got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images: expected a numpy.ndarray or torch.Tensor, got {type(images).__name__}"
        )
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(f"images: expected H, W >= 2, got {tuple(images.shape)}")
    if images.shape[1] < 1:
        raise ValueError(f"images: expected at least one channel, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"images: expected floating-point pixels in data units (e.g. [0, 1]), got dtype "
            f"{images.dtype}; convert integer images first (uint8 / 255)"
        )
    if images.numel():
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images: expected finite pixel values, got NaN or infinity")
        if float(images.min()) < 0:
            raise ValueError(
                f"images: expected non-negative pixel values (mass), got minimum "
                f"{float(images.min()):g}"
            )
        mass = images.sum(dim=(-2, -1))
        if bool((mass <= 0).any()):
            raise ValueError("images: expected positive mass in every channel, got an empty one")
        if not bool(torch.isfinite(mass).all()):
            raise ValueError(
                f"images: expected a finite mass per channel, got one that overflows "
                f"{images.dtype} (largest pixel {float(images.max()):g})"
            )
    return images
