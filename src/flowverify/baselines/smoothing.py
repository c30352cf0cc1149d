r"""The Wasserstein-smoothed classifier (Levine & Feizi [1], paper section 3.3): Cohen et
al.'s PREDICT and CERTIFY [4] with Laplace noise on flows.

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
implementation draws ``x + s·Aη`` directly;
:func:`~flowverify.baselines.noise.add_flow_noise`).  The noisy image has zero-mass,
high-frequency noise and may have negative pixels; that is the method.

Units and conventions (flowverify's choice, used consistently in training and
certification): ``σ`` and ``b`` are in *normalised* flow units (image mass 1), and the
base classifier consumes the noisy normalised image rescaled by the image's mass,
``s·(µ + Aη) = x + s·Aη``, i.e. images in data units (pixels of ``x`` in ``[0, 1]``), like
every bundled model.  A base net is trained on exactly these noisy images
(:func:`~flowverify.baselines.training.train_smoothed_model`).

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
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from flowverify.baselines.bounds import clopper_pearson_lower, laplace_radius, levine_feizi_radius
from flowverify.baselines.checks import (
    _check_alpha,
    _check_count,
    _check_images,
    _check_sigma,
)
from flowverify.baselines.noise import laplace_scale
from flowverify.baselines.result import ABSTAIN, SmoothingResult
from flowverify.baselines.sampling import (
    _STREAM_ESTIMATE,
    _STREAM_SELECT,
    _check_fits,
    _counts,
    _EvalOn,
    _forward,
    _model_context,
    smoothed_counts,
)
from flowverify.core.results import Status
from flowverify.core.validation import check_indices, check_labels

__all__ = ["smoothed_certify", "smoothed_predict"]

logger = logging.getLogger(__name__)


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
        trained with this noise (:func:`~flowverify.baselines.training.train_smoothed_model`).
        Moved to ``device`` in place; run in eval mode (the training flag is restored).
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
    y = None if labels is None else check_labels(labels, x.shape[0])
    idx = check_indices(indices, x.shape[0])
    device, dtype = _model_context(model, device)
    _check_fits(x, dtype)
    b = laplace_scale(sigma)
    config = {
        "sigma": sigma,
        "b": b,
        "n0": n0,
        "n_samples": n,
        "alpha": alpha,
        "seed": seed,
        "batch_size": batch_size,
        "noise": "iid Laplace(0, sigma/sqrt(2)) on the flow of the normalised image",
        "base_input": "x + mass * A eta (data units)",
        "unit": "normalised",
    }
    channel_mass = x.sum(dim=(-2, -1)).double().cpu().numpy()  # (N, C)
    masses = channel_mass.min(axis=1)  # raw radii: the smallest channel mass (sound)
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
                    mass=float(channel_mass[i].max()),
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
