r"""The attack within a fixed W1 budget (paper section 4, Algorithm 1 and its fallback).

For the images of a batch and a budget :math:`\varepsilon` per image, :func:`budget_run`
runs Algorithm 1 (:func:`flowverify.attacks.descent.attempts`: one PGD run from
:math:`\delta_\mu`, then the random restarts).  For the images it does not fool, the
closest adversarial found without a budget (:func:`anchor`: DeepFool-W1, else PGD at
doubled budgets, then shrunk for ``steps`` iterations; computed once per batch) is
returned if it lies in the ball, else a PGD run starts from it scaled radially into the
ball.

:func:`fixed` is the fixed-budget mode for one budget of a sequence (an adversarial found
within a smaller budget is reused); the minimal-radius mode
(:mod:`flowverify.attacks.minimal`) probes the budgets of :data:`BUDGET_SCHEDULE` with
:func:`budget_run`.
"""

from __future__ import annotations

import math

import torch

from flowverify.attacks.deepfool import deepfool_all
from flowverify.attacks.descent import RADIUS_SAFETY, attempts, run
from flowverify.attacks.shrink import shrink_starts

__all__ = ["BUDGET_SCHEDULE", "anchor", "budget_run", "fixed"]

#: Fixed budgets (normalised W1) tried in ascending order before shrinking; an image not
#: fooled by any of them continues with doubled budgets up to the grid diameter.
BUDGET_SCHEDULE = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def fixed(settings, ctx, radius, prev):
    """The attack of every image of the batch ``ctx`` within ``radius`` (normalised, per
    image) with the settings of the attack ``settings``; ``prev``: ``(flow, found, norm)``
    of the previous (smaller) budget, whose adversarials inside the ball are kept."""
    n = radius.shape[0]
    device = radius.device
    flow = torch.zeros(n, *ctx.flow_shape, dtype=radius.dtype, device=device)
    found = torch.zeros(n, dtype=torch.bool, device=device)
    iters = torch.zeros(n, dtype=torch.long, device=device)
    todo = torch.ones(n, dtype=torch.bool, device=device)
    if prev is not None:
        prev_flow, prev_found, prev_norm = prev
        reuse = prev_found & (prev_norm <= radius * RADIUS_SAFETY)
        flow[reuse], found[reuse] = prev_flow[reuse], True
        todo = ~reuse
    idx = todo.nonzero().squeeze(1)
    if idx.numel():
        f, s, it = budget_run(settings, ctx, radius, idx)
        flow[idx], found[idx], iters[idx] = f, s, it
    return flow, found, iters


def budget_run(settings, ctx, radius, idx):
    """The attack of the images ``idx`` within ``radius``: the PGD runs and restarts of
    :func:`~flowverify.attacks.descent.attempts`, then,
    for its failures, the closest adversarial found without a budget
    (:func:`anchor`, computed once per batch) if it lies in the ball, else
    a PGD run started from it scaled radially into the ball (feasible: the set is
    convex and contains 0).  PGD from 0 at a large budget takes long steps that pile
    mass on a few pixels and can miss adversarials that smaller budgets find.
    """
    flow, found, iters = attempts(settings, ctx, radius, idx)
    todo = (~found).nonzero().squeeze(1)
    if todo.numel() == 0:
        return flow, found, iters
    sub = idx[todo]
    a_flow, a_norm, shrunk, shrunk_norm = anchor(settings, ctx, sub)
    use_shrunk = shrunk_norm[sub] < a_norm[sub]
    start = torch.where(use_shrunk[:, None, None], shrunk[sub], a_flow[sub]).to(flow.dtype)
    norm = torch.minimum(a_norm[sub], shrunk_norm[sub])
    ok = torch.isfinite(norm)
    rad = (radius[sub] * RADIUS_SAFETY).double()
    inside = ok & (norm <= rad)
    flow[todo[inside]], found[todo[inside]] = start[inside], True
    again = ok & ~inside
    if bool(again.any()):
        pick, rows = todo[again], sub[again]
        scale = (rad[again] / norm[again]).to(flow.dtype)
        init = start[again] * scale[:, None, None]
        rerun = run(settings, ctx, radius[rows], rows, init)
        flow[pick[rerun.success]], found[pick[rerun.success]] = rerun.flow[rerun.success], True
        iters[pick] += rerun.iterations
    return flow, found, iters


def anchor(settings, ctx, rows: torch.Tensor | None = None):
    """Adversarials found without a budget for the images ``rows`` (default: all; each
    computed once per batch, then cached).

    DeepFool-W1; for the images it does not fool, PGD at budgets doubled from twice
    the last budget of the schedule up to the grid diameter; then shrunk
    (:func:`~flowverify.attacks.shrink.shrink_starts`, ``steps`` iterations: cheap enough
    for every fixed-budget run).  Returns ``(start, start_norm, shrunk, shrunk_norm)``,
    batch-sized: per image the unshrunk and the shrunk adversarial flows and their L1
    norms (``inf`` where none, or not computed).
    """
    mu = ctx.mu
    n = mu.shape[0]
    device, dtype = mu.device, mu.dtype
    if ctx.anchor is None:
        zero = torch.zeros(n, *ctx.flow_shape, dtype=dtype, device=device)
        inf = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        ctx.anchor = (zero, inf, zero.clone(), inf.clone())
        ctx.anchor_done = torch.zeros(n, dtype=torch.bool, device=device)
    want = torch.ones(n, dtype=torch.bool, device=device)
    if rows is not None:
        want = torch.zeros_like(want)
        want[rows] = True
    new = want & ~ctx.anchor_done
    if bool(new.any()):
        cap = float(mu.shape[1] * (mu.shape[-2] + mu.shape[-1] - 2))
        df = deepfool_all(ctx, new.nonzero().squeeze(1))
        start = torch.where(new[:, None, None], df.flow, torch.zeros_like(df.flow))
        ok = df.success & new
        eps = 2 * BUDGET_SCHEDULE[-1]
        while eps <= cap:
            todo = (new & ~ok).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            radius = torch.full((n,), eps, dtype=dtype, device=device)
            f, won, _ = attempts(settings, ctx, radius, todo)
            start[todo[won]], ok[todo[won]] = f[won], True
            eps *= 2
        norm = torch.where(ok, start.abs().flatten(1).sum(1).double(), math.inf)
        shrunk, shrunk_norm = shrink_starts(ctx, start, ok, settings.steps, settings.step_size)
        a_start, a_norm, a_shrunk, a_shrunk_norm = ctx.anchor
        a_start[new], a_norm[new] = start[new], norm[new]
        a_shrunk[new], a_shrunk_norm[new] = shrunk[new].to(dtype), shrunk_norm[new]
        ctx.anchor_done |= new
    return ctx.anchor
