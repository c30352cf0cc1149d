"""The public entry point :func:`certify`: certified and exact W1 radii of images for a
classifier (:mod:`flowverify.verification`), with the minimal-radius PGD attack
(:mod:`flowverify.attacks`) as the complete methods' first upper bound, and randomised
smoothing (:mod:`flowverify.baselines`) as a baseline method.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from flowverify.attacks.pgd import WassersteinPGD
from flowverify.baselines.smoothing import smoothed_certify
from flowverify.verification import api as _verification
from flowverify.verification.checks import (
    CERTIFIERS,
    _check_images,
    _check_positive,
    _resolve_model,
)
from flowverify.verification.result import CertifyResult

__all__ = ["certify", "iter_certify", "pgd_adversary"]


def certify(
    model,
    images,
    labels=None,
    *,
    method: str = "vanilla",
    certifier: str | None = None,
    references: str | Sequence[str] = ("uniform",),
    eps: float | None = None,
    unit: str = "normalised",
    input_scale: str = "raw",
    timeout: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    data=None,
    indices=None,
    batch_size: int = 32,
    rtol: float = 1e-3,
    progress: bool = False,
    sigma: float | None = None,
    n0: int = 1000,
    n_samples: int = 10000,
    alpha: float = 0.05,
) -> list[CertifyResult]:
    r"""Certified (or exact) W1 radii of images for a classifier.

    For each image ``µ`` of class ``y``: the largest ``ε`` such that every image ``ν``
    of the same mass with ``W1(µ, ν) <= ε`` is classified ``y`` (SPEC section 4):

    * ``vanilla``: certify ``f̃`` on the L1 ball ``B_ε(δµ)`` (Theorem 3);
    * ``feasible``: on ``B_ε(δµ) ∩ {R + Aδ >= 0}`` (Lemma 5, Theorem 6), never below
      vanilla;
    * ``complete``: the exact radius ``min_{t≠y} min{‖δ - δµ‖₁ : R + Aδ >= 0,
      f̃_t(δ) >= f̃_y(δ)}`` and the closest adversarial image (``witness``);
    * ``complete-ball``: the same without ``R + Aδ >= 0`` (the exact L1-ball radius of
      ``f̃``, a lower bound of the W1 radius);
    * ``smoothing``: Levine & Feizi's baseline, the Wasserstein-smoothed classifier of
      ``model`` (Laplace noise of scale ``sigma/√2`` on the flow), certified by Cohen et
      al.'s CERTIFY with ``n0``/``n_samples`` samples at level ``alpha``
      (:func:`flowverify.baselines.smoothing.smoothed_certify`; returns its ``SmoothingResult``
      records, whose radius holds with probability ``1 - alpha``).

    Parameters
    ----------
    model : torch.nn.Module or str or path
        An ``nn.Sequential`` whose first operation is affine (``Linear`` after an
        optional ``Flatten``, or ``Conv2d``) followed by ``Linear``/``Conv2d``/``ReLU``/
        ``Flatten`` layers; or a bundled name (``"linear"``, ``"fc"``, ``"cnn"``), an
        ONNX file or a flowverify checkpoint (:func:`flowverify.model.loading.load_model`).
    images : ndarray or Tensor
        ``(N, C, H, W)`` (or ``(C, H, W)``, ``(H, W)``) non-negative pixels in data units.
    labels : array of int, optional
        ``(N,)`` classes to certify; default: the model's predictions.
    method : {"vanilla", "feasible", "complete", "complete-ball", "smoothing"}
    certifier : str, optional
        ``vanilla``: ``"crown"`` (default), ``"alpha-crown"``; ``feasible``: ``"crown"``
        (default), ``"alpha-crown"``, ``"lp"``; complete methods: ``"bab"``, ``"milp"``.
    references : str or sequence of str
        Reference specs (``uniform``, ``random:K``, ``point:K``, ``data:K``; see
        :func:`flowverify.parse_references`).  The radius is the maximum over them.
    eps : float, optional
        Decide this radius instead of searching (unit ``unit``).
    unit : {"normalised", "raw"}
        Unit of ``eps``.  Results always give both.
    input_scale : {"raw", "normalised"}
        What the model consumes: the image (``raw``) or the image divided by its mass.
    timeout : float, optional
        Seconds per image (complete: the solver's limit, a timeout gives ``unknown``
        with the proven lower bound; incomplete: a batch of ``B`` images gets ``B``
        times it, then reports the best radius certified so far).
    device : str or torch.device
        Where bound propagation runs (``"cpu"``, ``"cuda"``).
    seed : int
        Seed of ``random:K``/``point:K``/``data:K`` references.
    data : ndarray, optional
        ``(M, C, H, W)`` images ``data:K`` references are drawn from.
    indices : array of int, optional
        ``(N,)`` index of each image in ``data`` (reported as ``index`` and never used
        as the image's own reference).
    batch_size : int
        Most images per batch of the incomplete methods (the images are split into
        batches of nearly equal size).
    rtol : float
        Relative tolerance of the radius search.
    progress : bool
        A tqdm progress bar on stderr.
    sigma, n0, n_samples, alpha
        ``smoothing`` only: noise level (standard deviation of one flow coordinate of
        the normalised image; required), selection and estimation samples per image,
        failure probability of each certificate.

    Returns
    -------
    list of CertifyResult
        One per image, in order (``smoothing``: ``SmoothingResult``).

    Examples
    --------
    >>> res = certify("fc", x, y, method="feasible")          # doctest: +SKIP
    >>> res[0].radius, res[0].status                           # doctest: +SKIP
    """
    if method == "smoothing":
        return _smoothing(
            model,
            images,
            labels,
            certifier=certifier,
            references=references,
            eps=eps,
            input_scale=input_scale,
            timeout=timeout,
            device=device,
            seed=seed,
            indices=indices,
            progress=progress,
            sigma=sigma,
            n0=n0,
            n_samples=n_samples,
            alpha=alpha,
        )
    if sigma is not None:
        raise ValueError(f"sigma: only used by method='smoothing', not {method!r}")
    return list(
        iter_certify(
            model,
            images,
            labels,
            method=method,
            certifier=certifier,
            references=references,
            eps=eps,
            unit=unit,
            input_scale=input_scale,
            timeout=timeout,
            device=device,
            seed=seed,
            data=data,
            indices=indices,
            batch_size=batch_size,
            rtol=rtol,
            progress=progress,
        )
    )


def iter_certify(model, *args, **kwargs) -> Iterator[CertifyResult]:
    """Generator form of :func:`certify` without ``method="smoothing"`` (one result per
    image, in order; same arguments)."""
    return _verification._iter_certify(model, *args, adversary=pgd_adversary, **kwargs)


def pgd_adversary(model, x: np.ndarray, label: int, *, input_scale, seed, device):
    """The minimal-radius PGD attack (:class:`~flowverify.attacks.pgd.WassersteinPGD`) on one
    image ``x (C, H, W)``: its adversarial image, or ``None`` where it failed (the verifier
    re-checks the image on the model and computes its exact W1)."""
    res = WassersteinPGD(input_scale=input_scale, seed=seed, device=device)(
        model, x[None], np.array([label])
    )
    if not bool(np.asarray(res.success)[0]):
        return None
    return np.asarray(res.adversarial[0], dtype=np.float64).reshape(x.shape)


def _smoothing(
    model,
    images,
    labels,
    *,
    certifier,
    references,
    eps,
    input_scale,
    timeout,
    device,
    seed,
    indices,
    progress,
    sigma,
    n0,
    n_samples,
    alpha,
):
    """``method="smoothing"``: :func:`flowverify.baselines.smoothing.smoothed_certify`."""
    if certifier not in (None, *CERTIFIERS["smoothing"]):
        raise ValueError(
            f"certifier: unknown certifier {certifier!r} for method 'smoothing'; valid: "
            f"{', '.join(CERTIFIERS['smoothing'])}"
        )
    if sigma is None:
        raise ValueError("sigma: method='smoothing' needs the noise level sigma (e.g. 0.02)")
    if eps is not None:
        raise ValueError("eps: fixed-radius decisions are not available for 'smoothing'")
    if input_scale != "raw":
        raise ValueError("input_scale: 'smoothing' base nets consume raw images ('raw')")
    if _check_positive(timeout, "timeout") is not None:
        warnings.warn("timeout is ignored by method='smoothing'", stacklevel=3)
    refs = [references] if isinstance(references, str) else list(references)
    if refs != ["uniform"]:
        warnings.warn(
            "references are ignored by method='smoothing' (the smoothed classifier does "
            "not depend on the reference)",
            stacklevel=3,
        )
    x = _check_images(images)
    net = _resolve_model(model) if not isinstance(model, nn.Module) else model
    return smoothed_certify(
        net,
        x,
        labels,
        sigma=sigma,
        n0=n0,
        n=n_samples,
        alpha=alpha,
        seed=seed,
        indices=indices,
        device=device,
        progress=progress,
    )
