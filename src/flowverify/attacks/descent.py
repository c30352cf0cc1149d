r"""Projected gradient descent in the flow domain: the iteration of Algorithm 1 (section 4).

One run minimises the adversarial loss (:mod:`flowverify.attacks.losses`) over
:math:`S = \{w : \|w\|_1 \le \varepsilon,\ \mu + Aw \ge 0\ (\le u)\}`, batched over images,
with a per-image early exit on success.  Each step:

1. a Euclidean gradient step on the loss, masked to the flows that can move mass (the
   source pixel holds mass; with an upper bound, the destination has room), of length
   ``step_size * eps`` (``eps`` in the normalised unit), scaled by the step-size schedule
   (:data:`SCHEDULES`);
2. the feasible-point map of :mod:`flowverify.transport.projection`: exact Euclidean
   projection onto the L1 ball (sorting), flow limiting per pixel (keeps
   ``0 <= µ + Aw <= u``), and a radial shrink onto the ball if needed.  Every iterate is a
   point of ``S``.

:func:`attempts` adds the random restarts: further runs, from random feasible starting
points (:func:`random_start`), for the images the first run did not fool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowverify.attacks.losses import adversarial_loss, fooled
from flowverify.attacks.objective import Objective
from flowverify.transport.flows import flow_dim
from flowverify.transport.grid import divergence
from flowverify.transport.pgd_step import _pgd_step_torch, compiled_available, pgd_step_images
from flowverify.transport.projection import limit_step

__all__ = [
    "RADIUS_SAFETY",
    "SCHEDULES",
    "Run",
    "attempts",
    "descend",
    "random_start",
    "run",
    "step_factor",
]

#: Step-size schedules over the ``steps`` iterations of one run.
SCHEDULES = ("cosine", "constant")

RADIUS_SAFETY = 1.0 - 1e-7  # iterates are kept inside a slightly smaller ball


@dataclass
class Run:
    flow: torch.Tensor  # (n, C, D) best perturbation flow (normalised units)
    success: torch.Tensor  # (n,) bool, in-loop success
    iterations: torch.Tensor  # (n,) int


def step_factor(name: str, k: int, steps: int) -> float:
    """The factor of the step length at step ``k`` of ``steps`` under schedule ``name``."""
    if name == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * k / steps))


def descend(
    objective: Objective,
    mu: torch.Tensor,
    labels: torch.Tensor,
    radius: torch.Tensor,
    idx: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    loss: str,
    schedule: str,
    upper: torch.Tensor | None,
    init: torch.Tensor | None = None,
) -> Run:
    """One batched PGD run over the images ``idx`` (normalised units); early exit.

    Direct path (``R = µ``): the gradient is taken w.r.t. the image and the step applies
    ``Aᵀ`` itself (:func:`~flowverify.transport.pgd_step.pgd_step_images`; on CPU a compiled loop
    in float64 that also returns the next image).  With a FlowModel: w.r.t. the flow.
    Only flows that can move mass take part: the source holds more than a negligible
    amount (1e-9 of a mean pixel, so that rounding noise around 0 does not switch
    directions on and off) and, with an upper bound, the destination has room.
    """
    n = idx.numel()
    height, width = mu.shape[-2], mu.shape[-1]
    direct = objective.reference is None
    fast = direct and mu.device.type == "cpu" and compiled_available()
    sdtype = torch.float64 if fast else mu.dtype  # dtype of the iterate
    mu_s = mu.to(sdtype)
    if init is None:
        w = torch.zeros(n, mu.shape[1], flow_dim(height, width), dtype=sdtype, device=mu.device)
    else:
        w = init.to(sdtype)
    best = w.clone()
    found = torch.zeros(n, dtype=torch.bool, device=mu.device)
    iters = torch.full((n,), steps, dtype=torch.long, device=mu.device)
    pos = torch.arange(n, device=mu.device)  # active rows of this run
    rad = radius * RADIUS_SAFETY
    tau = 1e-9 / (height * width)
    x = mu_s[idx] + divergence(w, height, width)
    for k in range(steps + 1):
        act = idx[pos]
        want = k < steps
        with torch.set_grad_enabled(want):
            if direct:
                leaf = x.detach().to(mu.dtype).requires_grad_(want)
                logits = objective(leaf, w, act)
            else:
                leaf = w.detach().requires_grad_(want)
                logits = objective(x, leaf, act)
            hit = fooled(logits, labels[act])
            grad = None
            if want and not bool(hit.all()):
                value = adversarial_loss(loss, logits, labels[act]).sum()
                (grad,) = torch.autograd.grad(value, leaf)
        if bool(hit.any()):
            best[pos[hit]] = w[hit]
            found[pos[hit]] = True
            iters[pos[hit]] = k
            keep = ~hit
            pos, w, x = pos[keep], w[keep], x[keep]
            grad = grad[keep] if grad is not None else None
        if grad is None or pos.numel() == 0:
            break
        with torch.no_grad():
            act = idx[pos]
            r = rad[pos].to(sdtype)
            alpha = step_size * step_factor(schedule, k, steps) * r
            up = None if upper is None else upper[act].to(sdtype)
            if direct:
                w, x = pgd_step_images(w, x, grad, mu_s[act], r, alpha, upper=up, tau=tau)
            else:
                w = _pgd_step_torch(w, x, grad, r, alpha, upper=up, tau=tau)
                x = mu_s[act] + divergence(w, height, width)
    if pos.numel():
        best[pos] = w
    return Run(best.to(mu.dtype), found, iters)


def random_start(mu, radius, idx, upper, generator):
    """A random feasible perturbation flow of L1 norm up to ``radius`` (per image)."""
    height, width = mu.shape[-2], mu.shape[-1]
    x = mu[idx]
    shape = (idx.numel(), mu.shape[1], flow_dim(height, width))
    d = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    d = limit_step(x, d, upper=None if upper is None else upper[idx])
    frac = torch.rand(idx.numel(), generator=generator, device=mu.device, dtype=mu.dtype)
    norm = d.abs().flatten(1).sum(1).clamp(min=torch.finfo(d.dtype).tiny)
    return d * (frac * radius * RADIUS_SAFETY / norm)[:, None, None]


def run(settings, ctx, radius, idx, init=None) -> Run:
    """:func:`descend` on the batch ``ctx`` (a :class:`~flowverify.attacks.context.Context`)
    with the iteration settings of the attack ``settings`` (a
    :class:`~flowverify.attacks.pgd.WassersteinPGD`)."""
    return descend(
        ctx.objective,
        ctx.mu,
        ctx.labels,
        radius,
        idx,
        steps=settings.steps,
        step_size=settings.step_size,
        loss=settings.loss,
        schedule=settings.schedule,
        upper=ctx.upper,
        init=init,
    )


def attempts(settings, ctx, radius, idx, init=None):
    """The run from ``init`` (or δµ) plus ``settings.restarts`` random restarts for failures.

    Returns ``(flow, found, iterations)`` for the images ``idx``.
    """
    first = run(settings, ctx, radius[idx], idx, init)
    flow, found, iters = first.flow, first.success, first.iterations
    for _ in range(settings.restarts):
        todo = (~found).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        sub = idx[todo]
        start = random_start(ctx.mu, radius[sub], sub, ctx.upper, ctx.generator)
        extra = run(settings, ctx, radius[sub], sub, start)
        win = extra.success
        flow[todo[win]] = extra.flow[win]
        found[todo[win]] = True
        iters[todo] += extra.iterations
    return flow, found, iters
