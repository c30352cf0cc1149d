"""Monte Carlo counts of the base classifier's predictions under Laplace flow noise: the
estimate behind Wasserstein smoothing's PREDICT and CERTIFY (paper section 3.3; Levine &
Feizi, AISTATS 2020, after Cohen et al., ICML 2019).

:func:`smoothed_counts` classifies ``num`` noisy copies ``x + s·Aη`` of every image
(:func:`~flowverify.baselines.noise.add_flow_noise`) in batches, with the model in eval
mode.  Image ``i`` draws from its own stream, seeded by ``(seed, indices[i], stream)``, so
the counts depend neither on the batching nor on the other images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.baselines.checks import _check_count, _check_images, _check_sigma
from flowverify.baselines.noise import _image_seed, add_flow_noise
from flowverify.core.validation import (
    check_device,
    check_indices,
    check_logits,
    model_dtype,
    model_errors,
)

__all__ = ["smoothed_counts"]

# Stream tags of the per-image seeds: CERTIFY's selection and estimation samples must be
# independent; PREDICT uses its own stream.
_STREAM_SELECT, _STREAM_ESTIMATE, _STREAM_PREDICT = 0, 1, 2


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, checked to be logits ``(len(x), K)``; errors name the model."""
    with model_errors(x.shape[1:]):
        logits = model(x)
    check_logits(logits, len(x), min_classes=1)  # one class: certified everywhere
    return logits


def _check_fits(x: torch.Tensor, dtype: torch.dtype) -> None:
    """The images, and their masses, must be finite in the model's dtype."""
    if x.numel() and dtype.is_floating_point:
        xd = x.to(dtype)
        if not bool(torch.isfinite(xd).all()) or not bool(
            torch.isfinite(xd.sum(dim=(-2, -1))).all()
        ):
            raise ValueError(
                f"images: pixel values (largest {float(x.max()):g}) or masses overflow the "
                f"model's dtype {dtype}"
            )


def _model_context(model: nn.Module, device: str | torch.device):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    device = check_device(device)
    return device, model_dtype(model)


@torch.no_grad()
def _count_one(
    model: nn.Module,
    image: torch.Tensor,
    *,
    sigma: float,
    num: int,
    batch_size: int,
    generator: torch.Generator,
    num_classes: int | None,
) -> np.ndarray:
    """Counts of the base predictions over ``num`` noisy copies of one image ``(C, H, W)``."""
    counts: np.ndarray | None = None if num_classes is None else np.zeros(num_classes, np.int64)
    remaining = num
    while remaining > 0:
        m = min(batch_size, remaining)
        batch = image.unsqueeze(0).expand(m, *image.shape)
        logits = _forward(model, add_flow_noise(batch, sigma=sigma, generator=generator))
        if counts is None:
            counts = np.zeros(logits.shape[1], np.int64)
        pred = logits.argmax(dim=1)
        counts += torch.bincount(pred, minlength=counts.size).cpu().numpy()[: counts.size]
        remaining -= m
    assert counts is not None
    return counts


def _counts(
    model: nn.Module,
    images: torch.Tensor,
    indices: np.ndarray,
    *,
    sigma: float,
    num: int,
    batch_size: int,
    seed: int,
    stream: int,
    device: torch.device,
    dtype: torch.dtype,
    num_classes: int | None = None,
) -> np.ndarray:
    rows = []
    for i in range(images.shape[0]):
        gen = torch.Generator(device=device)
        gen.manual_seed(_image_seed(seed, indices[i], stream))
        rows.append(
            _count_one(
                model,
                images[i].to(device=device, dtype=dtype),
                sigma=sigma,
                num=num,
                batch_size=batch_size,
                generator=gen,
                num_classes=num_classes,
            )
        )
        num_classes = rows[-1].size
    if not rows:
        return np.zeros((0, num_classes or 0), np.int64)
    return np.stack(rows)


class _EvalOn:
    """Put a model in eval mode on a device for a block; restore the training flag after."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.to(self.device)
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def smoothed_counts(
    model: nn.Module,
    images: Any,
    *,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Counts of the base classifier's predictions under the smoothing noise.

    Parameters
    ----------
    model : torch.nn.Module
        Base classifier on images in data units, ``(B, C, H, W) -> (B, K)`` logits.  It
        is moved to ``device`` (in place, as ``nn.Module.to``) and run in eval mode; its
        training flag is restored afterwards.
    images : ndarray or Tensor
        Images ``(N, C, H, W)`` in data units (non-negative, positive mass).
    sigma : float
        Noise level (normalised flow units).
    num : int
        Noisy samples per image.
    batch_size : int
        Noisy samples per forward pass.
    seed : int
        Base seed; image ``i`` uses a stream derived from ``(seed, indices[i])``, so
        counts do not depend on batching or on the other images.
    indices : sequence of int, optional
        Data-set indices of the images (seed derivation); default ``0..N-1``.
    device : str or torch.device
        Where the noise is drawn and the model runs.

    Returns
    -------
    ndarray
        ``int64`` counts ``(N, K)``; each row sums to ``num``.
    """
    sigma = _check_sigma(sigma)
    num = _check_count(num, "num")
    batch_size = _check_count(batch_size, "batch_size")
    seed = _check_count(seed, "seed", minimum=0)
    x = _check_images(images)
    idx = check_indices(indices, x.shape[0])
    device, dtype = _model_context(model, device)
    _check_fits(x, dtype)
    with _EvalOn(model, device) as m:
        return _counts(
            m,
            x,
            idx,
            sigma=sigma,
            num=num,
            batch_size=batch_size,
            seed=seed,
            stream=_STREAM_PREDICT,
            device=device,
            dtype=dtype,
        )
