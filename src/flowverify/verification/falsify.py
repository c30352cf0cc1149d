"""Falsification inside the verifier: a Frank-Wolfe attack on the model's margins over
the W1 polytope or ball (its linear minimisation is the transport plan of the Kantorovich
dual, Theorem 6), its minimal-radius search, and the adversary a caller supplies (the
PGD attack of :func:`flowverify.certify`), each image re-checked on the model.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from flowverify.transport.flows import w1_distance
from flowverify.verification import polytope as _polytope
from flowverify.verification.checks import _model_input
from flowverify.verification.context import _Ctx, _predict

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------ Frank-Wolfe attack


def _model_margins(ctx: _Ctx, labels):
    """Margin function ``(rows, ν) -> min_t f_y - f_t`` of the float64 model."""
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    param = next(iter(ctx.model64.parameters()), None)
    model_dev = param.device if param is not None else torch.device("cpu")

    def margins(rows, nu):
        scale = nu.sum(dim=(-2, -1)) if ctx.input_scale == "normalised" else None
        logits = ctx.model64(_model_input(nu, scale, ctx.flat).to(model_dev))
        y = lab[torch.as_tensor(rows)].to(logits.device)
        own = logits.gather(1, y[:, None])
        other = logits.scatter(1, y[:, None], -math.inf)
        return (own[:, 0] - other.amax(dim=1)).to(nu.device)

    return margins


def _fw_attack(ctx: _Ctx, margin_fn, x: np.ndarray, labels, eps_raw, steps: int = 25):
    r"""Frank-Wolfe on ``{ν >= 0, W1(µ, ν) <= ε}`` minimising the smallest margin.

    The linear minimisation oracle is exact (:func:`~.polytope.polytope_plan`) and the set is
    convex, so every iterate is an image of the input's mass within W1 ``ε``.  Returns
    ``(success (n,), images (n, C, H, W))``; a success is re-checked on the given model.
    """
    n = x.shape[0]
    mu = torch.as_tensor(x, dtype=torch.float64, device=ctx.device)
    nu = mu.clone()
    found = np.zeros(n, dtype=bool)
    gammas = (1.0, 0.5, 0.25, 0.1)
    for k in range(steps):
        act = np.flatnonzero(~found)
        if act.size == 0:
            break
        cur = nu[act].clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(margin_fn(act, cur).sum(), cur)
        g_np = grad.detach().cpu().numpy().reshape(act.size, -1)
        vert = np.stack(
            [
                _polytope.polytope_plan(g_np[j], x[i], float(eps_raw[i]))[0]
                for j, i in enumerate(act)
            ]
        )
        vert_t = torch.as_tensor(vert, device=ctx.device)
        best_m = torch.full((act.size,), math.inf, dtype=torch.float64, device=ctx.device)
        best_nu = nu[act].clone()
        with torch.no_grad():
            for gam in gammas if k else (1.0,):
                cand = nu[act] + gam * (vert_t - nu[act])
                m = margin_fn(act, cand)
                better = m < best_m
                best_m = torch.where(better, m, best_m)
                best_nu[better] = cand[better]
        nu[act] = best_nu
        found[act[(best_m < 0).cpu().numpy()]] = True
    out = nu.detach().cpu().numpy()
    if found.any():  # re-check on the model as given
        pred = _predict(ctx.model, out, ctx.flat, ctx.input_scale)
        found &= pred != np.asarray(labels)
    return found, out


def _fw_min_radius(ctx: _Ctx, x, label: int, start_raw: float, e_max: float):
    """Smallest budget (raw) where the FW attack succeeds, grown then bisected (one image).

    Returns the exact W1 (raw) of the adversarial image found and the image, or
    ``(inf, None)``."""
    lab = np.array([label])
    margin_fn = _model_margins(ctx, lab)
    e = max(start_raw * 1.25, 1e-6 * e_max)
    last_fail = start_raw
    hit = None
    while e <= e_max * 1.000001:
        ok, adv = _fw_attack(ctx, margin_fn, x[None], lab, np.array([e]))
        if ok[0]:
            hit = (e, adv[0])
            break
        last_fail, e = e, (e * 1.6 if e < e_max else math.inf)
    if hit is None:
        return math.inf, None
    lo, hi = last_fail, hit[0]
    for _ in range(6):
        mid = 0.5 * (lo + hi)
        ok, adv = _fw_attack(ctx, margin_fn, x[None], lab, np.array([mid]))
        if ok[0]:
            hi, hit = mid, (mid, adv[0])
        else:
            lo = mid
    img = hit[1]
    return float(w1_distance(img, x, unit="raw")), img


def _adversary_upper(ctx: _Ctx, x: np.ndarray, label: int):
    """The caller's adversary (``ctx.adversary``: ``(model, x (C, H, W), label, *,
    input_scale, seed, device) -> image or None``; :func:`flowverify.certify` passes the
    minimal-radius PGD attack) on one image: the exact W1 (raw) of its image, re-checked on
    the model, and the image; ``(inf, None)`` if there is none or it fails."""
    if ctx.adversary is None:
        return math.inf, None
    try:
        img = ctx.adversary(
            ctx.model, x, label, input_scale=ctx.input_scale, seed=ctx.seed, device=ctx.device
        )
        if img is None:
            return math.inf, None
        img = np.asarray(img, dtype=np.float64).reshape(x.shape)
        if _predict(ctx.model, img[None], ctx.flat, ctx.input_scale)[0] == label:
            return math.inf, None
        return float(w1_distance(img, x, unit="raw")), img  # ValueError: mass differs
    except (RuntimeError, ValueError) as exc:  # an upper bound is optional
        logger.debug("the adversary gave no usable adversarial (%s)", exc)
        return math.inf, None
