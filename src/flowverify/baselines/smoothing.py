r"""Wasserstein smoothing (Levine & Feizi [1]) as a certifier: Laplace noise on flows.

The smoothed classifier
-----------------------
For an image ``x`` (data units, mass ``s = sum(x)`` per channel) let ``µ = x / s`` be the
normalised image and ``δµ = Δ⁻¹(R, µ)`` a flow from a reference ``R`` (e.g. the uniform
one).  Levine & Feizi smooth the flow-domain classifier ``f̃(δ) = f(Δ(R, δ))`` with
i.i.d. Laplace noise :math:`\eta \in \mathbb{R}^{D}` on every flow coordinate:

.. math::

    g(x) = \arg\max_c \; \mathbb{P}_\eta\big[\, f\big(s \cdot \Delta(R, \delta_\mu + \eta)\big)
    = c \,\big], \qquad \eta_k \sim \mathrm{Laplace}(0, b), \quad b = \sigma / \sqrt{2}

(so each flow coordinate has standard deviation ``σ``).  Because ``Δ`` is affine,
``Δ(R, δµ + η) = µ + Aη`` for *any* reference and *any* right inverse, so the noisy image
is simply ``x + s·Aη``: neither the reference nor ``Δ⁻¹`` has to be computed (the
implementation draws ``x + s·Aη`` directly; :func:`add_flow_noise`).  The noisy image
has zero-mass, high-frequency noise and may have negative pixels; that is the method.

Units and conventions (flowverify's choice, used consistently in training and
certification): ``σ`` and ``b`` are in *normalised* flow units (image mass 1), and the
base classifier consumes the noisy normalised image rescaled by the image's mass,
``s·(µ + Aη) = x + s·Aη``, i.e. images in data units (pixels of ``x`` in ``[0, 1]``), like
every bundled model.  A base net is trained on exactly these noisy images
(:func:`train_smoothed_model`).

Certificate
-----------
If ``W1(x/s, x'/s) ≤ ρ`` (same mass), Theorem 1 gives a flow ``δ`` with ``x'/s = µ + Aδ``
and ``‖δ‖₁ ≤ ρ``, so ``g(x') = h(δ)`` for the flow-space smoothed classifier
``h(z) = argmax_c P[f(x + s·A(z + η)) = c]``, and any L1 certificate for Laplace
smoothing applies.  With a lower bound ``p`` on ``P[f(x + s·Aη) = c_A] > 1/2``:

* Levine & Feizi's form (after Lecuyer et al. [2]), ``p_B ≤ 1 - p``:
  :math:`\rho_{LF} = \frac{b}{2} \ln\frac{p}{1-p}` (:func:`levine_feizi_radius`);
* the tight Laplace/L1 bound (Teng et al. [3]):
  :math:`\rho = -b \ln\big(2(1-p)\big)` (:func:`laplace_radius`), ``ρ ≥ ρ_LF``.

Both are normalised W1 radii (L1 ground cost, one pixel step = 1); raw = ``s`` ×
normalised.  ``p`` comes from Cohen et al.'s CERTIFY [4]: ``n0`` noisy samples select the
top class ``c_A``, ``n`` fresh samples give a one-sided Clopper–Pearson lower bound at
level ``α``, and the classifier abstains when ``p ≤ 1/2``.  The certificate holds with
probability at least ``1 - α`` per image (over the noise of the certification).

References
----------
.. [1] A. Levine, S. Feizi. "Wasserstein Smoothing: Certified Robustness against
   Wasserstein Adversarial Attacks". AISTATS 2020.
.. [2] M. Lecuyer et al. "Certified Robustness to Adversarial Examples with Differential
   Privacy". IEEE S&P 2019.
.. [3] J. Teng, G.-H. Lee, Y. Yuan. "ℓ1 Adversarial Robustness Certificates: a Randomized
   Smoothing Approach". 2020.
.. [4] J. Cohen, E. Rosenfeld, Z. Kolter. "Certified Adversarial Robustness via Randomized
   Smoothing". ICML 2019.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest
from torch import nn

from flowverify.core.results import Status, jsonable
from flowverify.core.validation import check_device, check_logits, model_errors
from flowverify.transport.flows import apply_flow, flow_dim

__all__ = [
    "ABSTAIN",
    "SmoothingResult",
    "add_flow_noise",
    "clopper_pearson_lower",
    "laplace_radius",
    "laplace_scale",
    "levine_feizi_radius",
    "smoothed_certify",
    "smoothed_counts",
    "smoothed_predict",
    "train_smoothed_model",
]

logger = logging.getLogger(__name__)

#: Prediction returned when the smoothed classifier abstains.
ABSTAIN = -1

METHOD = "smoothing"
CERTIFIER = "laplace-cohen"

# Stream tags of the per-image seeds: CERTIFY's selection and estimation samples must be
# independent; PREDICT uses its own stream.
_STREAM_SELECT, _STREAM_ESTIMATE, _STREAM_PREDICT = 0, 1, 2


# --------------------------------------------------------------------------- validation


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


def _check_labels(labels: Any, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.shape != (n,) or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"labels: expected {n} integer labels of shape ({n},), got dtype {arr.dtype} and "
            f"shape {arr.shape}"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels: expected classes >= 0, got {int(arr.min())}")
    return arr.astype(np.int64)


def _check_indices(indices: Any, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.shape != (n,) or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"indices: expected {n} integer data-set indices of shape ({n},), got dtype "
            f"{arr.dtype} and shape {arr.shape}"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"indices: expected non-negative indices, got {int(arr.min())}")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- closed forms


def laplace_scale(sigma: float) -> float:
    r"""Laplace scale ``b = σ/√2`` of a flow coordinate with standard deviation ``σ``."""
    return _check_sigma(sigma) / math.sqrt(2.0)


def _as_prob(p: Any) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        raise ValueError("p: expected probabilities in [0, 1]")
    return arr


def laplace_radius(p: float | np.ndarray, *, sigma: float) -> float | np.ndarray:
    r"""Certified L1 (flow) radius of Laplace smoothing, the tight form.

    .. math::

        \rho = -b \ln\big(2(1 - p)\big) \quad (p > 1/2), \qquad \rho = 0 \quad (p \le 1/2),

    with ``b = σ/√2`` (Teng et al. 2020).  For flows of the normalised image this is a
    normalised W1 radius.

    Parameters
    ----------
    p : float or ndarray
        Lower bound on the probability of the top class under the noise, in ``[0, 1]``.
    sigma : float
        Noise level (standard deviation of one flow coordinate), normalised units.

    Returns
    -------
    float or ndarray
        Radii ``>= 0`` (``inf`` at ``p = 1``), shaped like ``p``.
    """
    b = laplace_scale(sigma)
    arr = _as_prob(p)
    with np.errstate(divide="ignore"):
        out = np.where(arr > 0.5, -b * np.log(np.maximum(2.0 * (1.0 - arr), 0.0)), 0.0)
    return float(out) if out.ndim == 0 else out


def levine_feizi_radius(p: float | np.ndarray, *, sigma: float) -> float | np.ndarray:
    r"""Certified L1 (flow) radius in Levine & Feizi's form.

    .. math::

        \rho_{LF} = \frac{b}{2} \ln \frac{p}{1 - p} \quad (p > 1/2), \qquad 0 \text{ otherwise},

    with ``b = σ/√2``: the differential-privacy bound of Lecuyer et al. with the runner-up
    probability bounded by ``1 - p``.  Never larger than :func:`laplace_radius`.

    Parameters and returns as :func:`laplace_radius`.
    """
    b = laplace_scale(sigma)
    arr = _as_prob(p)
    with np.errstate(divide="ignore"):
        out = np.where(arr > 0.5, 0.5 * b * (np.log(arr) - np.log1p(-np.minimum(arr, 1.0))), 0.0)
    return float(out) if out.ndim == 0 else out


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    r"""One-sided Clopper–Pearson lower confidence bound on a binomial proportion.

    .. math::

        \underline{p} = \mathrm{Beta}^{-1}(\alpha;\; k,\; n - k + 1), \qquad
        \underline{p} = 0 \text{ if } k = 0,

    so that ``P[p < p_lower] <= α`` (level ``1 - α``).  Equals
    ``scipy.stats.binomtest(k, n).proportion_ci(1 - α, "exact", alternative="greater")``.

    Parameters
    ----------
    k : int
        Number of successes, ``0 <= k <= n``.
    n : int
        Number of trials, ``n >= 1``.
    alpha : float
        Significance level in ``(0, 1)``.
    """
    n = _check_count(n, "n")
    k = _check_count(k, "k", minimum=0)
    if k > n:
        raise ValueError(f"k: expected at most n = {n} successes, got {k}")
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(beta_dist.ppf(alpha, k, n - k + 1))


# --------------------------------------------------------------------------- sampling


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


def _image_seed(seed: int, index: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1)[0])


def _model_context(model: nn.Module, device: str | torch.device):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    device = check_device(device)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    return device, dtype


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
    idx = _check_indices(indices, x.shape[0])
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


def smoothed_predict(
    model: nn.Module,
    images: Any,
    *,
    sigma: float,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    r"""Cohen et al.'s PREDICT: the smoothed prediction, or :data:`ABSTAIN`.

    Draws ``n`` noisy samples per image (see :func:`smoothed_counts`), takes the two most
    frequent classes ``c_A, c_B`` with counts ``n_A ≥ n_B`` and returns ``c_A`` if the
    two-sided binomial test of ``n_A`` out of ``n_A + n_B`` against ``1/2`` has p-value
    ``<= α``, else abstains.  The probability of returning a class other than
    :math:`g(x)` is at most ``α``.

    Parameters
    ----------
    model, images, sigma, batch_size, seed, indices, device
        As :func:`smoothed_counts`.
    n : int
        Noisy samples per image.
    alpha : float
        Significance level of the test.

    Returns
    -------
    ndarray
        ``int64`` predictions ``(N,)``, :data:`ABSTAIN` (``-1``) where it abstains.
    """
    alpha = _check_alpha(alpha)
    counts = smoothed_counts(
        model,
        images,
        sigma=sigma,
        num=n,
        batch_size=batch_size,
        seed=seed,
        indices=indices,
        device=device,
    )
    out = np.full(counts.shape[0], ABSTAIN, dtype=np.int64)
    for i, row in enumerate(counts):
        order = np.argsort(-row, kind="stable")
        n_a = int(row[order[0]])
        n_b = int(row[order[1]]) if row.size > 1 else 0
        if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
            out[i] = order[0]
    return out


# --------------------------------------------------------------------------- CERTIFY


@dataclass
class SmoothingResult:
    """Outcome of CERTIFY for one image (smoothed classifier, Laplace noise on flows).

    Attributes
    ----------
    index : int
        Data-set index of the image.
    label : int
        The class certified: the true class, or ``c_A`` when no labels were given.
    prediction : int
        The smoothed classifier's class ``c_A``, or :data:`ABSTAIN` (``-1``).
    status : Status
        ``certified`` (``c_A`` = label, ``p_lower > 1/2``), ``misclassified``
        (``c_A`` ≠ label, ``p_lower > 1/2``) or ``unknown`` (abstain: ``p_lower <= 1/2``).
    radius : float
        Certified normalised W1 radius ``-b ln(2(1 - p_lower))`` (0 unless certified).
    radius_lf : float
        Levine & Feizi's radius ``(b/2) ln(p_lower/(1 - p_lower))`` (0 unless certified).
    radius_raw, radius_lf_raw : float
        The same in raw units (× ``mass``).
    p_lower : float
        Clopper–Pearson lower bound on ``P[f(x + s·Aη) = c_A]`` at level ``alpha``.
    guess : int
        ``c_A``, the top class of the ``n0`` selection samples (even when abstaining).
    count : int
        ``n_A``: estimation samples classified as ``c_A``.
    counts : list of int
        Estimation counts per class (length K).
    mass : float
        Image mass ``s`` (data units; the smallest channel mass for ``C > 1``, so that
        ``radius_raw`` stays a sound raw radius).
    seconds : float
        Wall time for this image.
    config : dict
        ``sigma``, ``b``, ``n0``, ``n``, ``alpha``, ``seed``, ``batch_size``, ``unit``.
    method, certifier, exact, references, per_reference, witness
        Fields shared with :class:`flowverify.verification.CertifyResult`: ``"smoothing"``,
        ``"laplace-cohen"``, False, ``[]`` and ``{}`` (the smoothed classifier does not
        depend on the reference: ``Δ(R, δµ + η) = µ + Aη``), None.
    """

    index: int
    label: int
    prediction: int
    status: Status
    radius: float
    radius_lf: float
    radius_raw: float
    radius_lf_raw: float
    p_lower: float
    guess: int
    count: int
    counts: list[int]
    mass: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    method: str = METHOD
    certifier: str = CERTIFIER
    exact: bool = False
    references: list[str] = field(default_factory=list)
    per_reference: dict[str, float] = field(default_factory=dict)
    witness: None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """One JSON object in the certify-record schema (plus smoothing fields)."""
        return jsonable(
            {
                "index": self.index,
                "label": self.label,
                "prediction": self.prediction,
                "method": self.method,
                "certifier": self.certifier,
                "references": list(self.references),
                "status": self.status,
                "radius": self.radius,
                "radius_raw": self.radius_raw,
                "exact": self.exact,
                "per_reference": dict(self.per_reference),
                "radius_lf": self.radius_lf,
                "radius_lf_raw": self.radius_lf_raw,
                "p_lower": self.p_lower,
                "guess": self.guess,
                "count": self.count,
                "counts": list(self.counts),
                "mass": self.mass,
                "seconds": self.seconds,
                "config": self.config,
            }
        )


def smoothed_certify(
    model: nn.Module,
    images: Any,
    labels: Any = None,
    *,
    sigma: float,
    n0: int = 1000,
    n: int = 10000,
    alpha: float = 0.05,
    batch_size: int = 1000,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[SmoothingResult]:
    r"""Certify the Wasserstein-smoothed classifier (Cohen et al.'s CERTIFY, Laplace noise).

    For each image ``x`` (mass ``s``): draw ``n0`` noisy images ``x + s·Aη`` and let
    ``c_A`` be the most frequent base prediction; draw ``n`` fresh ones, count
    ``n_A`` hits of ``c_A`` and bound :math:`\underline p =` :func:`clopper_pearson_lower`
    ``(n_A, n, α)``.  If :math:`\underline p \le 1/2` abstain, else the smoothed
    classifier returns ``c_A`` on the whole normalised W1 ball of radius

    .. math::

        \rho = -b \ln\big(2(1 - \underline p)\big), \qquad b = \sigma / \sqrt 2

    (also reported: Levine & Feizi's :math:`\frac b2 \ln\frac{\underline p}{1 -
    \underline p}`), with probability at least ``1 - α`` over the sampling.

    Parameters
    ----------
    model : torch.nn.Module
        Base classifier on images in data units, ``(B, C, H, W) -> (B, K)`` logits,
        trained with this noise (:func:`train_smoothed_model`).  Moved to ``device`` in
        place; run in eval mode (the training flag is restored).
    images : ndarray or Tensor
        Images ``(N, C, H, W)`` in data units (non-negative, positive mass per channel).
    labels : array-like of int, optional
        True classes ``(N,)``.  None certifies the smoothed classifier's own prediction
        (``label = c_A``; an abstention stays ``unknown``).
    sigma : float
        Noise level ``σ``: standard deviation of one flow coordinate of the normalised
        image (Laplace scale ``b = σ/√2``).
    n0 : int
        Selection samples per image.
    n : int
        Estimation samples per image.
    alpha : float
        Failure probability of each certificate.
    batch_size : int
        Noisy samples per forward pass.
    seed : int
        Base seed; each image draws from streams derived from ``(seed, index)``.
    indices : sequence of int, optional
        Data-set indices of the images (records and seeds); default ``0..N-1``.
    device : str or torch.device
        Where noise is drawn and the model runs.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    list of SmoothingResult
        One per image, in order; radii in normalised W1 (``*_raw``: × mass).
    """
    sigma = _check_sigma(sigma)
    n0 = _check_count(n0, "n0")
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    batch_size = _check_count(batch_size, "batch_size")
    seed = _check_count(seed, "seed", minimum=0)
    x = _check_images(images)
    y = None if labels is None else _check_labels(labels, x.shape[0])
    idx = _check_indices(indices, x.shape[0])
    device, dtype = _model_context(model, device)
    _check_fits(x, dtype)
    b = laplace_scale(sigma)
    config = {
        "sigma": sigma,
        "b": b,
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "seed": seed,
        "batch_size": batch_size,
        "noise": "iid Laplace(0, sigma/sqrt(2)) on the flow of the normalised image",
        "base_input": "x + mass * A eta (data units)",
        "unit": "normalised",
    }
    masses = x.sum(dim=(-2, -1)).amin(dim=1).double().cpu().numpy()
    out: list[SmoothingResult] = []
    iterator = range(x.shape[0])
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"smoothing sigma={sigma:g}", unit="img")
    common = dict(batch_size=batch_size, seed=seed, device=device, dtype=dtype, sigma=sigma)
    with _EvalOn(model, device) as m:
        with torch.no_grad():  # the model must fit the images (even an empty batch)
            k = _forward(m, x[:1].to(device=device, dtype=dtype)).shape[1]
        if y is not None and y.size and y.max() >= k:  # labels must be classes of the model
            raise ValueError(
                f"labels: expected classes in [0, {k}) (the model's logits), got {int(y.max())}"
            )
        for i in iterator:
            t0 = time.perf_counter()
            xi, ii = x[i : i + 1], idx[i : i + 1]
            c0 = _counts(m, xi, ii, num=n0, stream=_STREAM_SELECT, **common)[0]
            guess = int(np.argmax(c0))
            c1 = _counts(m, xi, ii, num=n, stream=_STREAM_ESTIMATE, num_classes=c0.size, **common)[
                0
            ]
            n_a = int(c1[guess])
            label = guess if y is None else int(y[i])
            p_lower = clopper_pearson_lower(n_a, n, alpha)
            if p_lower <= 0.5:
                status, prediction, r, r_lf = Status.UNKNOWN, ABSTAIN, 0.0, 0.0
            else:
                prediction = guess
                if guess == label:
                    status = Status.CERTIFIED
                    r = float(laplace_radius(p_lower, sigma=sigma))
                    r_lf = float(levine_feizi_radius(p_lower, sigma=sigma))
                else:
                    status, r, r_lf = Status.MISCLASSIFIED, 0.0, 0.0
            mass = float(masses[i])
            out.append(
                SmoothingResult(
                    index=int(idx[i]),
                    label=label,
                    prediction=int(prediction),
                    status=status,
                    radius=r,
                    radius_lf=r_lf,
                    radius_raw=r * mass,
                    radius_lf_raw=r_lf * mass,
                    p_lower=p_lower,
                    guess=guess,
                    count=n_a,
                    counts=[int(v) for v in c1],
                    mass=mass,
                    seconds=time.perf_counter() - t0,
                    config=dict(config),
                )
            )
            logger.info(
                "smoothing: index %d label %d -> %s (p_lower %.4f, radius %.4g)",
                idx[i],
                label,
                status,
                p_lower,
                r,
            )
    return out


# --------------------------------------------------------------------------- training


def _check_data(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError("data: expected a pair (images, labels)")
    x = _check_images(data[0]).float()
    y = torch.from_numpy(_check_labels(data[1], x.shape[0]))
    if x.shape[0] == 0:
        raise ValueError("data: expected at least one training image, got none")
    return x, y


def train_smoothed_model(
    sigma: float,
    *,
    data: tuple[Any, Any],
    epochs: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    architecture: str = "smoothing_base",
    model: nn.Sequential | None = None,
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    r"""Train a base classifier on flow-noised images (Levine & Feizi's training).

    Each minibatch image ``x`` is replaced by one fresh draw ``x + s·Aη``
    (:func:`add_flow_noise`, ``η`` i.i.d. Laplace(0, σ/√2) in normalised flow units) and
    the cross-entropy is minimised with Adam and a cosine learning-rate schedule.

    Parameters
    ----------
    sigma : float
        Noise level, normalised flow units (as in :func:`smoothed_certify`).
    data : (images, labels)
        Training images ``(N, C, H, W)`` in data units and integer labels ``(N,)``.
    epochs : int
        Passes over the data.
    seed : int
        Seed of the initialisation, the shuffling and the noise; the global torch RNG
        state is restored afterwards.
    batch_size : int
        Minibatch size.
    lr : float
        Initial Adam learning rate.
    architecture : str
        A :func:`flowverify.model.loading.build_architecture` name, used when ``model`` is None;
        default the Levine–Feizi MNIST base net ``"smoothing_base"``.
    model : torch.nn.Sequential, optional
        A network to train instead (trained in place).
    device : str or torch.device
        Training device.

    Returns
    -------
    torch.nn.Sequential
        The trained base classifier, in eval mode, on the CPU, float32.
    """
    from flowverify.model.zoo import build_architecture

    sigma = _check_sigma(sigma)
    epochs = _check_count(epochs, "epochs")
    seed = _check_count(seed, "seed", minimum=0)
    batch_size = _check_count(batch_size, "batch_size")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    x, y = _check_data(data)
    device = check_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_architecture(architecture) if model is None else model
        if not isinstance(net, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(net).__name__}")
        net = net.float().to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(_image_seed(seed, 0, 99))
        rng = np.random.default_rng(seed)
        opt = torch.optim.Adam(net.parameters(), lr=float(lr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        loss_fn = nn.CrossEntropyLoss()
        net.train()
        for epoch in range(epochs):
            perm = torch.from_numpy(rng.permutation(x.shape[0]))
            total, correct, seen = 0.0, 0, 0
            for start in range(0, x.shape[0], batch_size):
                sel = perm[start : start + batch_size]
                xb, yb = x[sel].to(device), y[sel].to(device)
                noisy = add_flow_noise(xb, sigma=sigma, generator=gen)
                opt.zero_grad()
                logits = net(noisy)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(sel)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(sel)
            sched.step()
            logger.info(
                "train sigma=%g epoch %d/%d: loss %.4f, noisy accuracy %.4f",
                sigma,
                epoch + 1,
                epochs,
                total / seen,
                correct / seen,
            )
    net.eval()
    return net.cpu()
