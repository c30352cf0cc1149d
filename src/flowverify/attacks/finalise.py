r"""The returned images of the attack, re-checked, with their certificate (section 4, Theorem 1).

The attack iterates in the dtype of the model.  :func:`finalise` repairs each perturbation
flow in float64 so that :math:`\bar\mu = \mu + Aw` is non-negative (and ``<= clip_max``)
with the mass of :math:`\mu`, casts it to the data's units, re-checks every claimed success
by a forward pass of the original model on the returned image (:func:`predict`), computes
the exact W1 of the returned image (:func:`flowverify.transport.flows.w1_distance`) and the
size certificate :math:`W_1(\bar\mu, \mu) \le \|\hat\delta - \delta_\mu\|_1 \le
\varepsilon` of Theorem 1, rounded outward.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from flowverify.transport.flows import w1_distance
from flowverify.transport.grid import divergence
from flowverify.transport.projection import fix_rounding

__all__ = ["finalise", "predict"]

logger = logging.getLogger(__name__)


def finalise(ctx, flow, found, eps_arr, iters, t0, *, minimal, clip_max):
    """Float64 repair, output image, re-check by the model, exact W1: the result rows.

    ``flow`` ``(N, C, D)`` and ``found`` are the attack's perturbation flows (normalised)
    and in-loop claims for the batch ``ctx``, ``eps_arr`` the budgets, ``iters`` the
    gradient steps taken, ``t0`` the start time of the rows; ``minimal``: failed rows give
    the unchanged image and ``inf``; ``clip_max``: the pixel upper bound (data units).
    Returns the columns of :class:`~flowverify.attacks.result.AttackResult` as a dict.
    """
    mu_data, mass64, y = ctx.mu_data, ctx.mass64, ctx.y
    n, c, height, width = mu_data.shape
    mu64 = torch.as_tensor(mu_data / mass64[:, :, None, None], dtype=torch.float64)
    w64 = flow.detach().to("cpu", torch.float64)
    if minimal:
        w64 = torch.where(torch.as_tensor(found, device="cpu")[:, None, None], w64, 0.0)
    eps_t = torch.as_tensor(np.where(np.isfinite(eps_arr), eps_arr, 0.0))
    norm = w64.abs().flatten(1).sum(1)
    limit = eps_t * (1 - 1e-9)
    over = norm > limit
    if bool(over.any()):  # float32 accumulation: scale into the ball (feasible)
        scale = torch.where(over, limit / norm.clamp(min=1e-300), torch.ones_like(norm))
        w64 = w64 * scale[:, None, None]
    upper64 = None
    if clip_max is not None:
        upper64 = torch.as_tensor(clip_max / mass64)[:, :, None, None]
    w_in = w64
    w64, x64 = fix_rounding(mu64, w64, upper=upper64)
    x_ref = x64  # the image of w64; the certificate accounts for adv - x_ref
    lost = (w_in - w64).abs().flatten(1).sum(1) > 1e-6 * w_in.abs().flatten(1).sum(1)
    if upper64 is None and bool(lost.any()):
        # fix_rounding fell back to shrinking the flow (rounding deficits on pixels
        # that mass only passes through, along cycles of the flow): keep the flow and
        # clamp its image's rounding negatives instead, same mass; the certificate
        # below adds the (tiny) distance between the two images.
        raw = mu64 + divergence(w_in, height, width)
        alt = raw.clamp(min=0)
        alt = alt / alt.sum(dim=(2, 3), keepdim=True)
        keep = lost[:, None, None, None]
        w64 = torch.where(lost[:, None, None], w_in, w64)
        x64 = torch.where(keep, alt, x64)
        x_ref = torch.where(keep, raw, x_ref)
    adv64 = (x64 * torch.as_tensor(mass64)[:, :, None, None]).numpy()  # data units
    adv = np.maximum(adv64, 0.0)  # x64 >= 0 already; removes signed zeros only
    if clip_max is not None:  # x64 <= clip_max / mass; the product may round up
        adv = np.minimum(adv, clip_max)
    # Re-check: forward pass of the original model on the returned image.
    pred_adv = predict(ctx.model, adv, ctx.input_scale, ctx.flat, ctx.mu.device, ctx.mu.dtype)
    success = pred_adv != y
    # Exact W1 (per channel, normalised), and the certificate with outward rounding.
    adv_f64 = adv.astype(np.float64)
    per_channel = np.asarray(
        w1_distance(
            mu_data.reshape(n * c, 1, height, width),
            adv_f64.reshape(n * c, 1, height, width),
            unit="normalised",
        )
    ).reshape(n, c)
    w1 = per_channel.sum(1)
    w1_raw = (per_channel * mass64).sum(1)
    adv_norm = adv_f64 / adv_f64.sum(axis=(2, 3), keepdims=True)
    diam = height + width - 2
    rounding = 0.5 * diam * np.abs(adv_norm - x_ref.numpy()).sum(axis=(2, 3)).sum(1)
    w1_bound = (w64.abs().flatten(1).sum(1).numpy() + rounding) * (1 + 1e-12)
    claimed = found.cpu().numpy()
    revoked = claimed & ~success
    if revoked.any():
        logger.debug("re-check revoked %d claimed successes", int(revoked.sum()))
    if minimal:
        w1 = np.where(success, w1, math.inf)
        w1_raw = np.where(success, w1_raw, math.inf)
        w1_bound = np.where(success, w1_bound, math.inf)
        eps_arr = np.where(success, eps_arr, math.inf)
        adv = np.where(success[:, None, None, None], adv, mu_data)
        pred_adv = np.where(success, pred_adv, ctx.prediction)
    seconds = (time.perf_counter() - t0) / max(n, 1)
    return {
        "adversarial": adv,
        "index": np.arange(n),
        "eps": np.asarray(eps_arr, dtype=np.float64),
        "success": success,
        "w1_bound": w1_bound,
        "w1": w1,
        "w1_raw": w1_raw,
        "label": y,
        "prediction": ctx.prediction,
        "prediction_adversarial": pred_adv,
        "iterations": iters.cpu().numpy(),
        "seconds": np.full(n, seconds),
    }


@torch.no_grad()
def predict(model, images: np.ndarray, input_scale, flat, device, dtype) -> np.ndarray:
    """The model's classes of ``images`` (data units), as it consumes them."""
    x = torch.as_tensor(images, device=device).to(dtype)
    if input_scale == "normalised":
        x = x / x.sum(dim=(2, 3), keepdim=True)
    if flat:
        x = x.reshape(x.shape[0], -1)
    return model(x).argmax(1).cpu().numpy()
