r"""Shrinking of adversarial perturbations: a fast-minimum-norm search in W1 (section 4).

The minimal-radius mode of the attack (:mod:`flowverify.attacks.minimal`) and the
fallback of a fixed budget (:mod:`flowverify.attacks.budget`) shrink the adversarials they
find.  The search follows what the minimal-adversarial literature does (DDN, Rony et al.
2019; FMN, Pintor et al. 2021; foolbox's minimisation wrappers).

Shrinking (:func:`shrink`) is a fast-minimum-norm iteration in the W1 geometry, batched
over several starting points per image.  With :math:`w_k` the perturbation flow
(normalised units) and :math:`\varepsilon_k` the current radius,

.. math::

    \varepsilon_{k+1} =
    \begin{cases}
        \min(\varepsilon_k, \|w_k\|_1)\,(1 - \gamma_k) & \text{if } \mu + Aw_k
            \text{ is misclassified},\\
        \min(\varepsilon_k (1 + \gamma_k), \varepsilon^\star) & \text{otherwise,}
    \end{cases}

    w_{k+1} = P_{S(\varepsilon_{k+1})}\bigl(w_k - \alpha_k \nabla_w L / \|\nabla_w L\|_2\bigr),

where :math:`L` is the margin loss, :math:`\varepsilon^\star` the norm of the best
adversarial so far, :math:`\gamma_k` decays (cosine) from ``gamma`` to ``gamma / 50``,
:math:`\alpha_k = \text{step\_size} \cdot \text{cosine}(k) \cdot \varepsilon_{k+1}` and
:math:`P_S` the feasible-point map of :mod:`flowverify.transport.projection` onto
:math:`S(\varepsilon) = \{w : \|w\|_1 \le \varepsilon,\ \mu + Aw \ge 0\ (\le u)\}`.
Every iterate misclassified with a relative margin of ``1e-3`` is a candidate; the one
of smallest :math:`\|w\|_1` is kept (an upper bound on its exact W1, Theorem 1).  The caller
re-checks the returned images with the original model and measures their exact W1.
"""

from __future__ import annotations

import math

import torch

from flowverify.attacks.losses import margin
from flowverify.attacks.objective import Objective
from flowverify.transport.grid import divergence
from flowverify.transport.pgd_step import _pgd_step_torch, compiled_available, pgd_step_images

__all__ = ["shrink", "shrink_starts"]

_SAFETY = 1.0 - 1e-7  # iterates stay inside a slightly smaller ball
#: An iterate counts as adversarial when another class wins by this fraction of the
#: largest logit: the search ends on the decision boundary, and a smaller margin would not
#: survive the rounding of the returned image (float64 repair, cast to the data's dtype).
_MARGIN = 1e-3
_SHRINK_GAMMAS = (0.05, 0.15)  # radius change rates of the shrinking runs (one row each)


def shrink(
    objective: Objective,
    mu: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    start: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    upper: torch.Tensor | None,
    gamma: float | torch.Tensor = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Shrink adversarial perturbations (fast-minimum-norm iteration, module docstring).

    Parameters
    ----------
    objective : flowverify.attacks.objective.Objective
        Logits of the model at perturbed images.
    mu : Tensor
        ``(N, C, H, W)`` images of the whole batch, normalised (mass 1 per channel).
    labels : Tensor
        ``(N,)`` classes attacked.
    idx : Tensor
        ``(n,)`` batch positions of the rows (an image may appear several times: several
        starting points are shrunk together).
    start : Tensor
        ``(n, C, D)`` feasible perturbation flows (normalised) whose images are
        misclassified.
    steps : int
        Iterations.
    step_size : float
        Euclidean step length as a fraction of the current radius (scaled by a cosine).
    upper : Tensor, optional
        ``(N, C, 1, 1)`` pixel upper bounds (normalised units).
    gamma : float or Tensor
        Initial relative change of the radius per step, or ``(n,)`` one per row.

    Returns
    -------
    best : Tensor
        ``(n, C, D)`` the misclassified iterate of smallest L1 norm of each row
        (``start`` if none is smaller).
    norm : Tensor
        ``(n,)`` float64, its L1 norm (``inf`` if ``start`` itself was not fooled and no
        iterate was).
    """
    n = idx.numel()
    height, width = mu.shape[-2], mu.shape[-1]
    direct = objective.reference is None
    fast = direct and mu.device.type == "cpu" and compiled_available()
    sdtype = torch.float64 if fast else mu.dtype
    mu_s = mu.to(sdtype)
    w = start.to(sdtype).clone()
    best = start.clone()
    best_norm = torch.full((n,), math.inf, dtype=torch.float64, device=mu.device)
    eps = w.abs().flatten(1).sum(1).double()
    tau = 1e-9 / (height * width)
    up = None if upper is None else upper[idx].to(sdtype)
    gamma = torch.as_tensor(gamma, dtype=torch.float64, device=mu.device).expand(n)
    x = mu_s[idx] + divergence(w, height, width)
    for k in range(steps + 1):
        want = k < steps
        with torch.set_grad_enabled(want):
            if direct:
                leaf = x.detach().to(mu.dtype).requires_grad_(want)
                logits = objective(leaf, w, idx)
            else:
                leaf = w.detach().to(mu.dtype).requires_grad_(want)
                logits = objective(x, leaf, idx)
            gap = margin(logits, labels[idx])
            scale = logits.detach().abs().amax(1).clamp(min=1.0)
            hit = gap.detach() < -_MARGIN * scale
            grad = None
            if want:
                (grad,) = torch.autograd.grad(gap.sum(), leaf)
        with torch.no_grad():
            norm = w.abs().flatten(1).sum(1).double()
            better = hit & (norm < best_norm)
            best[better] = w[better].to(best.dtype)
            best_norm[better] = norm[better]
            if grad is None:
                break
            cos = 0.5 * (1.0 + math.cos(math.pi * k / steps))
            g = gamma * (0.02 + 0.98 * cos)
            cap = torch.where(torch.isfinite(best_norm), best_norm, eps)
            eps = torch.where(
                hit,
                torch.minimum(eps, norm) * (1.0 - g),
                torch.minimum(eps * (1.0 + g), cap),
            )
            r = (eps * _SAFETY).to(sdtype)
            alpha = step_size * cos * r + 1e-12
            if direct:
                w, x = pgd_step_images(
                    w, x, grad.to(sdtype), mu_s[idx], r, alpha, upper=up, tau=tau
                )
            else:
                w = _pgd_step_torch(w, x, grad.to(sdtype), r, alpha, upper=up, tau=tau)
                x = mu_s[idx] + divergence(w, height, width)
    return best, best_norm


def shrink_starts(ctx, flows, ok, steps, step_size):
    """Shrink the adversarial flows ``flows[ok]`` of the batch ``ctx`` for ``steps``
    iterations (:func:`shrink`, one row per rate of :data:`_SHRINK_GAMMAS`, batched); per
    image the smallest adversarial found and its L1 norm (``inf`` where none)."""
    n = flows.shape[0]
    device = flows.device
    best = torch.zeros_like(flows)
    best_norm = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    rows = ok.nonzero().squeeze(1)
    if rows.numel() == 0 or steps == 0:
        return best, best_norm
    k = len(_SHRINK_GAMMAS)
    gamma = torch.tensor(_SHRINK_GAMMAS, dtype=torch.float64, device=device)
    out, norms = shrink(
        ctx.objective,
        ctx.mu,
        ctx.labels,
        rows.repeat(k),
        flows[rows].repeat(k, 1, 1),
        steps=steps,
        step_size=step_size,
        upper=ctx.upper,
        gamma=gamma.repeat_interleave(rows.numel()),
    )
    norms = norms.reshape(k, rows.numel())
    pick = norms.argmin(0)
    cols = torch.arange(rows.numel(), device=device)
    best[rows] = out.reshape(k, rows.numel(), *out.shape[1:])[pick, cols].to(flows.dtype)
    best_norm[rows] = norms[pick, cols]
    return best, best_norm
