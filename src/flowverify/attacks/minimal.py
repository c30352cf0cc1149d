r"""Minimal-radius mode of the attack: the smallest adversarial W1 found per image (section 4).

Used by :class:`flowverify.attacks.pgd.WassersteinPGD` with ``eps=None``.  As the
minimal-adversarial literature does (DDN, Rony et al. 2019; FMN, Pintor et al. 2021), it
first finds *any* adversarial, then shrinks it.  Per image, the candidates are:

* DeepFool-W1 steps (:mod:`flowverify.attacks.deepfool`: for every candidate class, the
  smallest W1 budget of mass moves whose first-order gain flips the class, solved exactly
  by a multiple-choice knapsack, see :func:`flowverify.transport.transport_plans.best_moves`;
  for a linear model the first step is the exact minimal perturbation), else PGD at
  doubled budgets (:func:`flowverify.attacks.budget.anchor`);
* the budget schedule (Algorithm 1 at the budgets of
  :data:`~flowverify.attacks.budget.BUDGET_SCHEDULE`: the first success, as a fixed-budget
  run at those budgets would find it);
* both shrunk by a fast-minimum-norm search (:mod:`flowverify.attacks.shrink`:
  ``search_steps * steps`` iterations that shrink the ball while the iterate is
  adversarial and grow it otherwise, several rates batched).

The returned adversarial is the re-checked candidate of smallest exact W1 (:func:`closest`,
``inf`` where none was found): an upper bound on the true minimal adversarial radius,
never above the first success of the schedule.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowverify.attacks.budget import BUDGET_SCHEDULE, anchor, budget_run
from flowverify.attacks.deepfool import deepfool_all
from flowverify.attacks.shrink import shrink_starts

__all__ = ["candidates", "closest"]


def candidates(settings, ctx):
    """Candidates of the minimal-radius mode of the batch ``ctx`` (module docstring).

    Returns a list of ``(flow, found, eps, iterations)``: the adversarials found
    without a budget (:func:`~flowverify.attacks.budget.anchor`: DeepFool-W1, else PGD at
    doubled budgets) and their shrunk forms, the budget schedule's (for each image the
    first budget of :data:`~flowverify.attacks.budget.BUDGET_SCHEDULE` at which
    :func:`~flowverify.attacks.budget.budget_run` fools it, as a fixed-budget run at those
    budgets), and both shrunk further for ``search_steps * steps`` iterations.  The caller
    keeps, per image, the re-checked candidate of smallest exact W1.
    """
    mu = ctx.mu
    n = mu.shape[0]
    device, dtype = mu.device, mu.dtype
    inf = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    a_flow, a_norm, a_shrunk, a_shrunk_norm = anchor(settings, ctx)
    # Budget schedule: what a fixed-budget run at these budgets finds first.
    sched = torch.zeros(n, *ctx.flow_shape, dtype=dtype, device=device)
    s_found = torch.zeros(n, dtype=torch.bool, device=device)
    s_eps = inf.clone()
    iters = deepfool_all(ctx).iterations.clone()  # computed by the anchor (none if empty)
    for eps in BUDGET_SCHEDULE:
        todo = (~s_found).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        radius = torch.full((n,), eps, dtype=dtype, device=device)
        f, won, it = budget_run(settings, ctx, radius, todo)
        iters[todo] += it
        sched[todo[won]], s_found[todo[won]], s_eps[todo[won]] = f[won], True, eps
    # Shrink further: the schedule's adversarials and the anchor's shrunk ones.
    steps = settings.search_steps * settings.steps
    s_shrunk, s_shrunk_norm = shrink_starts(ctx, sched, s_found, steps, settings.step_size)
    a_ok = torch.isfinite(a_shrunk_norm)
    a_more, a_more_norm = shrink_starts(ctx, a_shrunk, a_ok, steps, settings.step_size)
    anchor_steps = torch.isfinite(a_norm).long() * settings.steps  # the anchor's shrinking
    iters += (s_found.long() + a_ok.long()) * steps + anchor_steps
    cands = [(a_flow, a_norm), (sched, s_eps), (a_shrunk, a_shrunk_norm)]
    cands += [(s_shrunk, s_shrunk_norm), (a_more, a_more_norm)]
    out = []
    for flow, bound in cands:
        found = torch.isfinite(bound)
        eps = torch.where(found, bound * (1 + 1e-6), inf)  # norms: slack for rounding
        out.append((flow, found, eps.cpu().numpy(), iters))
    return out


def closest(cands: list[dict[str, np.ndarray]], seconds: float) -> dict[str, np.ndarray]:
    """Per image, the re-checked candidate row of smallest exact W1 (``inf``: failed)."""
    w1 = np.stack([c["w1"] for c in cands])  # (K, n), inf where the re-check failed
    pick = np.argmin(w1, axis=0)
    n = pick.shape[0]
    out = {k: np.stack([c[k] for c in cands])[pick, np.arange(n)] for k in cands[0]}
    out["seconds"] = np.full(n, seconds / max(n, 1))
    return out
