r"""Laplace noise on flows: the smoothing distribution of Levine & Feizi's Wasserstein
smoothing (AISTATS 2020; paper section 3.3).

Every flow coordinate of the normalised image ``µ = x / s`` gets i.i.d. Laplace noise of
scale ``b = σ/√2`` (:func:`laplace_scale`; standard deviation ``σ``, normalised flow
units).  Because ``Δ`` is affine, ``s·Δ(R, δµ + η) = x + s·Aη`` for any reference ``R``
and any right inverse, so :func:`add_flow_noise` draws the noisy image directly, without
a reference or ``Δ⁻¹``.  Noise streams are seeded per image (``_image_seed``), so a
draw does not depend on the batching or on the other images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from flowverify.baselines.checks import _check_sigma
from flowverify.transport.flows import apply_flow, flow_dim

__all__ = ["add_flow_noise", "laplace_scale"]


def laplace_scale(sigma: float) -> float:
    r"""Laplace scale ``b = σ/√2`` of a flow coordinate with standard deviation ``σ``."""
    return _check_sigma(sigma) / math.sqrt(2.0)


def _laplace(shape: tuple[int, ...], b: float, generator: torch.Generator | None, like) -> Any:
    r"""i.i.d. Laplace(0, b) by inversion of the CDF, drawn in float64.

    ``w = 2u - 1`` with ``u`` uniform on ``[0, 1)`` (53-bit grid), ``η = -b sign(w)
    ln(1 - |w|)``; ``w = -1`` (probability ``2^-53``) is mapped to 0 so the result is
    finite.  Tails beyond ``36.7 b`` (probability ``1e-16`` per coordinate) are cut off.
    """
    w = torch.rand(shape, generator=generator, dtype=torch.float64, device=like.device)
    w = w.mul_(2.0).sub_(1.0)
    w = torch.where(w <= -1.0, torch.zeros_like(w), w)
    eta = torch.log1p(-w.abs()).mul_(-b).mul_(torch.sign(w))
    return eta.to(like.dtype)


def add_flow_noise(
    images: torch.Tensor, *, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""One draw of the smoothing noise for each image: ``x + s·Aη``.

    .. math::

        \tilde x = s \cdot \Delta(R, \delta_\mu + \eta) = x + s \, A\eta, \qquad
        \eta \in \mathbb{R}^{C \times D} \text{ i.i.d. } \mathrm{Laplace}(0, \sigma/\sqrt 2),

    ``s`` the mass of each channel of ``x`` (so ``η`` lives in normalised flow units).

    Parameters
    ----------
    images : Tensor
        Images ``(N, C, H, W)`` in data units (non-negative; not checked here, this is
        the inner loop); differentiable.
    sigma : float
        Noise level, normalised flow units (standard deviation per flow coordinate).
    generator : torch.Generator, optional
        Source of randomness (on the device of ``images``); default the global one.

    Returns
    -------
    Tensor
        Noisy images ``(N, C, H, W)``, same mass per channel as ``images``, possibly with
        negative pixels.
    """
    b = laplace_scale(sigma)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images: expected a tensor of shape (N, C, H, W)")
    n, c, height, width = images.shape
    eta = _laplace((n, c, flow_dim(height, width)), b, generator, images)
    mass = images.sum(dim=(-2, -1))[..., None]  # (N, C, 1)
    try:
        return apply_flow(images, mass * eta)
    except ValueError as exc:  # finite images: the noise level overflows their dtype
        if not bool(torch.isfinite(images).all()):
            raise
        raise ValueError(
            f"sigma: noise of level {sigma:g} overflows {images.dtype} on images of mass up "
            f"to {float(mass.max()):g}; expected a noise level well within the "
            f"floating-point range"
        ) from exc


def _image_seed(seed: int, index: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1)[0])
