r"""DeepFool in the W1 geometry: first-order minimal-W1 steps (paper section 4).

The attack's adversarials found without a budget start here.  At the current image, for
every candidate class :math:`t`, the linearised margin :math:`f_t = z_t - z_y` has a pixel
gradient :math:`\varphi_t`; the smallest W1 budget of mass moves whose first-order gain
reaches :math:`-f_t` is solved exactly by a multiple-choice knapsack
(:func:`flowverify.transport.transport_plans.best_moves`).  The step moves that budget for the
cheapest class and repeats until the class changes.  For a linear model the first step is
the exact minimal perturbation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowverify.attacks.descent import Run
from flowverify.attacks.losses import fooled
from flowverify.attacks.objective import Objective
from flowverify.transport.flows import flow_dim
from flowverify.transport.grid import divergence
from flowverify.transport.transport_plans import best_moves, realise

__all__ = ["deepfool", "deepfool_all"]

_DF_ITERS = 20  # DeepFool-W1 steps of the minimal-radius mode
_REACH = 4  # longest single mass move of a DeepFool-W1 step (pixels, L1)
_CANDIDATES = 9  # target classes compared per DeepFool-W1 step


def deepfool(
    objective: Objective,
    mu: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    *,
    iters: int,
    reach: int,
    candidates: int,
    upper: torch.Tensor | None,
    overshoot: float = 1e-3,
) -> Run:
    r"""First-order minimal-W1 steps (DeepFool in the W1 geometry), batched, multi-target.

    At the current image ``x``, for every candidate class ``t`` (the ``candidates``
    classes with the largest logits), the linearised margin ``f_t = z_t - z_y`` has the
    pixel gradient ``φ_t``; :func:`~flowverify.transport.transport_plans.best_moves` gives the
    smallest W1 budget ``β_t`` of mass moves (from the current image, at most ``reach`` pixels
    long) whose first-order gain reaches ``-f_t``.  The step moves ``β_{t*}(1+overshoot)``
    for the class ``t*`` with the smallest ``β``, and repeats until the class changes.
    For a linear model and a large enough reach the first step is the exact minimal
    perturbation of the fine-tuned LP (SPEC section 4, Lemma 8), up to the overshoot.
    """
    n = idx.numel()
    c, height, width = mu.shape[1:]
    w = torch.zeros(n, c, flow_dim(height, width), dtype=mu.dtype, device=mu.device)
    best = w.clone()
    found = torch.zeros(n, dtype=torch.bool, device=mu.device)
    iters_used = torch.full((n,), iters, dtype=torch.long, device=mu.device)
    pos = torch.arange(n, device=mu.device)
    for k in range(iters + 1):
        act = idx[pos]
        m = pos.numel()
        x = (mu[act] + divergence(w, height, width)).detach()
        with torch.no_grad():
            z = objective.on_images(x, act)
        hit = fooled(z, labels[act])
        if bool(hit.any()):
            best[pos[hit]] = w[hit]
            found[pos[hit]] = True
            iters_used[pos[hit]] = k
            pos, w, x, act, z = pos[~hit], w[~hit], x[~hit], act[~hit], z[~hit]
            m = pos.numel()
        if k == iters or m == 0:
            break
        t_count = min(candidates, z.shape[1] - 1)
        others = z.masked_fill(F.one_hot(labels[act], z.shape[1]).bool(), -math.inf)
        targets = others.topk(t_count, dim=1).indices.T.reshape(-1)  # (T*m,), target-major
        rep = act.repeat(t_count)
        xr = x.repeat(t_count, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            logits = objective.on_images(xr, rep)
            y_rep = labels[act].repeat(t_count)
            f = logits.gather(1, targets[:, None]).squeeze(1)
            f = f - logits.gather(1, y_rep[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(f.sum(), xr)
        with torch.no_grad():
            room = None if upper is None else (upper[rep] - xr.detach()).clamp(min=0)
            plan = best_moves(grad, xr.detach().clamp(min=0), reach=reach, room=room)
            # aim past the in-loop success margin of fooled
            scale = z.abs().amax(1).clamp(min=1.0).repeat(t_count)
            beta = plan.budget_for_gain(-f.detach() + 2e-5 * scale).reshape(t_count, m)
            b_min, t_star = beta.min(0)
            stuck = ~torch.isfinite(b_min)
            rows = t_star * m + torch.arange(m, device=mu.device)
            budget = torch.where(stuck, torch.zeros_like(b_min), b_min * (1 + overshoot))
            step = realise(plan.select(rows), budget, room=None if room is None else room[rows])
            w = w + step
            if bool(stuck.any()):  # no first-order move reaches another class: give up
                pos, w = pos[~stuck], w[~stuck]
                if pos.numel() == 0:
                    break
    return Run(best, found, iters_used)


def deepfool_all(ctx, rows: torch.Tensor | None = None) -> Run:
    """DeepFool-W1 of the images ``rows`` of the batch ``ctx`` (default: all), each
    computed once and cached in ``ctx.deepfool`` (batch-sized; rows not computed yet
    have no success and no iterations)."""
    n = ctx.mu.shape[0]
    if ctx.deepfool is None:
        ctx.deepfool = Run(
            torch.zeros(n, *ctx.flow_shape, dtype=ctx.mu.dtype, device=ctx.mu.device),
            torch.zeros(n, dtype=torch.bool, device=ctx.mu.device),
            torch.zeros(n, dtype=torch.long, device=ctx.mu.device),
        )
        ctx.deepfool_done = torch.zeros(n, dtype=torch.bool, device=ctx.mu.device)
    want = torch.ones(n, dtype=torch.bool, device=ctx.mu.device)
    if rows is not None:
        want = torch.zeros_like(want)
        want[rows] = True
    new = (want & ~ctx.deepfool_done).nonzero().squeeze(1)
    if new.numel():
        run = deepfool(
            ctx.objective,
            ctx.mu,
            ctx.labels,
            new,
            iters=_DF_ITERS,
            reach=_REACH,
            candidates=_CANDIDATES,
            upper=ctx.upper,
        )
        df = ctx.deepfool
        df.flow[new], df.success[new] = run.flow.to(df.flow.dtype), run.success
        df.iterations[new] = run.iterations.to(df.iterations.dtype)
        ctx.deepfool_done[new] = True
    return ctx.deepfool
