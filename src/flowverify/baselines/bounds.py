r"""Closed forms of the smoothing certificate (paper section 3.3): the certified radii of
Laplace smoothing and the Clopper–Pearson bound on the top-class probability.

With a lower bound ``p > 1/2`` on ``P[f(x + s·Aη) = c_A]``, the smoothed classifier is
constant on the normalised W1 ball of radius

* :math:`\rho_{LF} = \frac{b}{2} \ln\frac{p}{1-p}` in Levine & Feizi's form (AISTATS
  2020, after Lecuyer et al., IEEE S&P 2019; :func:`levine_feizi_radius`), or
* :math:`\rho = -b \ln\big(2(1-p)\big)`, the tight Laplace/L1 bound of Teng et al. (2020;
  :func:`laplace_radius`), ``ρ ≥ ρ_LF``,

with ``b = σ/√2``.  ``p`` is the one-sided Clopper–Pearson bound
(:func:`clopper_pearson_lower`) of Cohen et al.'s CERTIFY (ICML 2019).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist

from flowverify.baselines.checks import _check_alpha, _check_count
from flowverify.baselines.noise import laplace_scale

__all__ = ["clopper_pearson_lower", "laplace_radius", "levine_feizi_radius"]


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
