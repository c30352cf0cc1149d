r"""Wasserstein projected gradient descent in the flow domain (paper section 4, Algorithm 1).

For an image :math:`\mu` of class :math:`y`, a reference :math:`R` and a flow
:math:`\delta_\mu` with :math:`R + A\delta_\mu = \mu`, the attack minimises an adversarial
loss, by default the margin

.. math::

    L(\delta) = \tilde f_y(\delta) - \max_{t \ne y} \tilde f_t(\delta),
    \qquad \tilde f(\delta) = f(R + A\delta),

over :math:`S = B_\varepsilon(\delta_\mu) \cap \{R + A\delta \ge 0\}` (optionally
:math:`\cap\, \{R + A\delta \le u\}`, a pixel upper bound, a different threat model).  Any
:math:`\hat\delta \in S` gives the image :math:`\bar\mu = \Delta(R, \hat\delta)`, non-negative,
of the mass of :math:`\mu`, with the size certificate (Theorem 1)

.. math::

    W_1(\bar\mu, \mu) \le \|\hat\delta - \delta_\mu\|_1 \le \varepsilon .

Writing :math:`\hat\delta = \delta_\mu + w`, :math:`R + A\hat\delta = \mu + Aw`: the set,
the loss and the output do not depend on the reference (up to rounding), so by default the
attack uses :math:`R = \mu` (:math:`\delta_\mu = 0`, exact).  A reference (and the fused
first layer of Corollary 2.1) can be asked for to run Algorithm 1 literally.

Each step (batched over images, per-image early exit on success):

1. a Euclidean gradient step on the loss, masked to the flows that can move mass (the
   source pixel holds mass; with an upper bound, the destination has room), of length
   ``step_size * eps`` (``eps`` in the normalised unit), with a cosine step schedule;
2. the feasible-point map of :mod:`flowverify.transport.projection`: exact Euclidean projection
   onto the L1 ball (sorting), flow limiting per pixel (keeps ``0 <= µ + Aw <= u``), and
   a radial shrink onto the ball if needed.  Every iterate is a point of ``S``.

Fixed budget, for the images the run (and its ``restarts``) does not fool: the closest
adversarial found without a budget (DeepFool-W1, else PGD at doubled budgets, then shrunk
for ``steps`` iterations; computed once per batch) if it lies in the ball, else a
PGD run started from it scaled radially into the ball.  PGD from 0 at a large budget
takes long steps that pile mass on a few pixels and can miss adversarials that smaller
budgets find.

Units: budgets and radii are *normalised* (the image scaled to mass 1 per channel, the
unit of the paper and of the attack literature; L1 ground cost between pixel
coordinates, whole grid).  ``w1_raw`` is in the units of the data (raw = mass x
normalised for one channel).  Internally the flows act on the normalised image.

Minimal-radius mode (``eps=None``, :mod:`flowverify.attacks.minimal`), per image, three
candidates: DeepFool-W1 steps (:func:`_deepfool`: for every candidate class, the smallest
W1 budget of mass moves whose first-order gain flips the class, solved exactly by a
multiple-choice knapsack, see :func:`flowverify.transport.projection.best_moves`; for a linear
model the first step is the exact minimal perturbation); the budget schedule (PGD at
0.05, 0.1, 0.2, 0.3, 0.5, 1.0, doubled further up to the grid diameter where none
succeeds: the first success, as a fixed-budget run at those budgets would find it); and
both shrunk by a fast-minimum-norm search (``search_steps * steps`` iterations that
shrink the ball while the iterate is adversarial and grow it otherwise, several rates
batched).  The returned adversarial is the re-checked candidate of smallest exact W1
(``inf`` where none was found): an upper bound on the true minimal adversarial radius,
never above the first success of the schedule.

Every claimed success is re-checked by a forward pass of the original model on the
returned image; the exact W1 of the returned image is computed by
:func:`flowverify.transport.flows.w1_distance`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowverify.attacks import minimal as _minimal
from flowverify.core.results import jsonable
from flowverify.core.validation import check_device, check_labels, check_logits, model_errors
from flowverify.model.flow_model import INPUT_SCALES, FlowModel, _infer_flat
from flowverify.transport.flows import flow_dim, inverse_flow, w1_distance
from flowverify.transport.projection import (
    _pgd_step_torch,
    best_moves,
    compiled_available,
    divergence,
    fix_rounding,
    limit_step,
    pgd_step_images,
    realise,
)
from flowverify.transport.references import make_reference

__all__ = [
    "LOSSES",
    "SCHEDULES",
    "AttackResult",
    "WassersteinPGD",
    "attack",
]

logger = logging.getLogger(__name__)

#: Adversarial losses (minimised): ``ce`` = minus the cross-entropy, ``margin`` =
#: f_y - max_{t≠y} f_t (the paper's; Carlini-Wagner, also accepted as ``cw``),
#: ``dlr`` = margin / (z_(1) - z_(3)) (Croce-Hein).
LOSSES = ("ce", "margin", "cw", "dlr")
#: Step-size schedules over the ``steps`` iterations of one run.
SCHEDULES = ("cosine", "constant")

_DF_ITERS = 20  # DeepFool-W1 steps of the minimal-radius mode
_REACH = 4  # longest single mass move of a DeepFool-W1 step (pixels, L1)
_CANDIDATES = 9  # target classes compared per DeepFool-W1 step
_SHRINK_GAMMAS = (0.05, 0.15)  # radius change rates of the shrinking runs (one row each)
_RADIUS_SAFETY = 1.0 - 1e-7  # iterates are kept inside a slightly smaller ball


# ----------------------------------------------------------------------------- results


@dataclass
class AttackResult:
    r"""Result of :class:`WassersteinPGD`: one row per (image, budget).

    Rows are ordered budget-major (all images at the first budget, then the next); in
    minimal-radius mode there is one row per image.  All arrays are numpy, length ``R``.

    Attributes
    ----------
    adversarial : ndarray
        ``(R, C, H, W)`` returned images in data units (dtype of the input images):
        non-negative, of the input's mass per channel (up to the dtype's rounding), and
        ``<= clip_max`` if set.  For failed rows, the final iterate (fixed budget) or the
        unchanged image (minimal radius).
    index : ndarray
        ``(R,)`` int, position of the image in the batch given to the attack.
    eps : ndarray
        ``(R,)`` budget, normalised.  Minimal-radius mode: the budget of the probe that
        produced the returned adversarial (``inf`` if none).
    success : ndarray
        ``(R,)`` bool, ``prediction_adversarial != label``, from a forward pass of the
        original model on ``adversarial``.
    w1_bound : ndarray
        ``(R,)`` the size certificate ``||δ̂ - δµ||_1`` in the normalised unit (plus an
        outward-rounding term for the cast to the output dtype): ``w1 <= w1_bound <= eps``.
        ``inf`` for failed rows in minimal-radius mode.
    w1 : ndarray
        ``(R,)`` exact W1 (L1 ground cost) between ``adversarial`` and the image,
        normalised.  Minimal-radius mode: the radius found (``inf`` where it failed).
    w1_raw : ndarray
        ``(R,)`` the same in data units (raw W1).
    label, prediction, prediction_adversarial : ndarray
        ``(R,)`` int: the label attacked, the model's class on the image and on
        ``adversarial``.
    iterations : ndarray
        ``(R,)`` int, gradient steps taken (all runs of the row).
    seconds : ndarray
        ``(R,)`` wall time of the row's run (attack, re-check and exact W1) divided by the
        batch size.
    threat_model : str
        ``"w1"`` or ``"w1+pixels<=U"`` (with ``clip_max=U``).
    mode : str
        ``"fixed"`` or ``"minimal"``.
    unit : str
        ``"normalised"`` (the unit of ``eps``, ``w1``, ``w1_bound``).
    config : dict
        The attack's resolved hyperparameters.
    max_pixel : ndarray
        ``(R,)`` the largest pixel of ``adversarial`` in data units.  In the default
        threat model (``"w1"``: non-negative images of the input's mass, the paper's)
        pixels are not bounded above, so an adversarial of a model trained on [0, 1]
        images may exceed 1; ``clip_max`` bounds them.
    """

    adversarial: np.ndarray
    index: np.ndarray
    eps: np.ndarray
    success: np.ndarray
    w1_bound: np.ndarray
    w1: np.ndarray
    w1_raw: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    prediction_adversarial: np.ndarray
    iterations: np.ndarray
    seconds: np.ndarray
    threat_model: str
    mode: str
    unit: str = "normalised"
    config: dict = field(default_factory=dict)
    max_pixel: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.max_pixel is None:
            adv = np.asarray(self.adversarial)
            flat = adv.reshape(adv.shape[0], int(np.prod(adv.shape[1:])))
            self.max_pixel = flat.max(axis=1, initial=-np.inf).astype(np.float64)

    _ROW_KEYS = (
        "index",
        "label",
        "prediction",
        "eps",
        "success",
        "w1_bound",
        "w1",
        "w1_raw",
        "prediction_adversarial",
        "iterations",
        "seconds",
        "max_pixel",
    )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def success_matrix(self) -> np.ndarray:
        """``(N, E)`` bool: success of image ``n`` at the ``e``-th budget (fixed mode)."""
        n = int(self.index.max()) + 1 if len(self) else 0
        return self.success.reshape(-1, n).T if n else self.success.reshape(0, 0)

    def to_records(
        self, *, indices: Sequence[int] | np.ndarray | None = None, config: Any = None
    ) -> list[dict[str, Any]]:
        """One JSON-ready dict per row.

        Keys: ``index`` (``indices[index]`` when ``indices`` maps batch positions to data
        set indices), ``label``, ``prediction``, ``eps``, ``success``, ``w1_bound``,
        ``w1``, ``w1_raw``, ``prediction_adversarial``, ``iterations``, ``seconds``,
        ``max_pixel``, ``unit``, ``threat_model``, ``mode``, and ``config`` if given.
        Non-finite numbers become the strings ``"inf"``/``"nan"`` (strict JSON).
        """
        rows = []
        for r in range(len(self)):
            rec: dict[str, Any] = {}
            for key in self._ROW_KEYS:
                rec[key] = getattr(self, key)[r].item()
            if indices is not None:
                rec["index"] = int(np.asarray(indices)[rec["index"]])
            rec["unit"] = self.unit
            rec["threat_model"] = self.threat_model
            rec["mode"] = self.mode
            if config is not None:
                rec["config"] = config
            rows.append(jsonable(rec))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Column-wise JSON-ready dict (without the adversarial images)."""
        out = {key: getattr(self, key) for key in self._ROW_KEYS}
        out.update(
            unit=self.unit, threat_model=self.threat_model, mode=self.mode, config=self.config
        )
        return jsonable(out)


# ----------------------------------------------------------------------------- losses


_margin = _minimal.margin


def _fooled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """In-loop success: another class wins by a relative margin of ``1e-5``.

    The margin keeps a claimed success robust to the rounding of the final image (float64
    repair, cast to the model's dtype); the re-check by a forward pass decides anyway.
    """
    margin = _margin(logits.detach(), labels)
    scale = logits.detach().abs().amax(1).clamp(min=1.0)
    return margin < -1e-5 * scale


def _loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image adversarial loss (to be minimised; negative margin = misclassified)."""
    if name in ("margin", "cw"):
        return _margin(logits, labels)
    if name == "ce":
        return -F.cross_entropy(logits, labels, reduction="none")
    top = logits.sort(dim=1, descending=True).values
    return _margin(logits, labels) / (top[:, 0] - top[:, 2]).clamp(min=1e-12)


# ----------------------------------------------------------------------------- objective


class _Objective:
    """Logits of the model at the perturbed images of a subset of the batch.

    ``x`` is the normalised perturbed image ``µ̃ + Aw`` (mass 1 per channel); ``w`` the
    normalised perturbation flow; ``idx`` the batch positions.
    """

    def __init__(
        self,
        model: nn.Module,
        mass: torch.Tensor,
        *,
        input_scale: str,
        flat: bool,
        reference: torch.Tensor | None = None,
        delta_mu: torch.Tensor | None = None,
        fuse: bool = False,
    ):
        self.model = model
        self.mass = mass  # (N, C)
        self.input_scale = input_scale
        self.flat = flat
        self.reference = reference  # data units, (N or 1, C, H, W), or None: R = µ
        self.delta_mu = delta_mu  # data units (N, C, D)
        self.fuse = fuse
        self._cache: tuple[torch.Tensor, FlowModel] | None = None

    def _flow_model(self, idx: torch.Tensor) -> FlowModel:
        if self._cache is not None and torch.equal(self._cache[0], idx):
            return self._cache[1]
        ref = self.reference if self.reference.shape[0] == 1 else self.reference[idx]
        fm = FlowModel(
            self.model, ref, input_scale=self.input_scale, fuse=self.fuse, flat_input=self.flat
        )
        self._cache = (idx.clone(), fm)
        return fm

    def on_images(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Logits of the model on the normalised images ``x`` of the images ``idx``."""
        z = x * self.mass[idx][:, :, None, None] if self.input_scale == "raw" else x
        if self.flat:
            z = z.reshape(z.shape[0], -1)
        return self.model(z)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mass = self.mass[idx]
        if self.reference is None:
            return self.on_images(x, idx)
        delta = self.delta_mu[idx] + w * mass[:, :, None]
        return self._flow_model(idx)(delta)


# ----------------------------------------------------------------------------- the engine


@dataclass
class _Run:
    flow: torch.Tensor  # (n, C, D) best perturbation flow (normalised units)
    success: torch.Tensor  # (n,) bool, in-loop success
    iterations: torch.Tensor  # (n,) int


def _schedule(name: str, k: int, steps: int) -> float:
    if name == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * k / steps))


def _pgd(
    objective: _Objective,
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
) -> _Run:
    """One batched PGD run over the images ``idx`` (normalised units); early exit.

    Direct path (``R = µ``): the gradient is taken w.r.t. the image and the step applies
    ``Aᵀ`` itself (:func:`~flowverify.transport.projection.pgd_step_images`; on CPU a compiled loop
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
    rad = radius * _RADIUS_SAFETY
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
            hit = _fooled(logits, labels[act])
            grad = None
            if want and not bool(hit.all()):
                value = _loss(loss, logits, labels[act]).sum()
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
            alpha = step_size * _schedule(schedule, k, steps) * r
            up = None if upper is None else upper[act].to(sdtype)
            if direct:
                w, x = pgd_step_images(w, x, grad, mu_s[act], r, alpha, upper=up, tau=tau)
            else:
                w = _pgd_step_torch(w, x, grad, r, alpha, upper=up, tau=tau)
                x = mu_s[act] + divergence(w, height, width)
    if pos.numel():
        best[pos] = w
    return _Run(best.to(mu.dtype), found, iters)


def _deepfool(
    objective: _Objective,
    mu: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    *,
    iters: int,
    reach: int,
    candidates: int,
    upper: torch.Tensor | None,
    overshoot: float = 1e-3,
) -> _Run:
    r"""First-order minimal-W1 steps (DeepFool in the W1 geometry), batched, multi-target.

    At the current image ``x``, for every candidate class ``t`` (the ``candidates``
    classes with the largest logits), the linearised margin ``f_t = z_t - z_y`` has the
    pixel gradient ``φ_t``; :func:`~flowverify.transport.projection.best_moves` gives the smallest
    W1 budget ``β_t`` of mass moves (from the current image, at most ``reach`` pixels
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
        hit = _fooled(z, labels[act])
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
            # aim past the in-loop success margin of _fooled
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
    return _Run(best, found, iters_used)


def _random_start(mu, radius, idx, upper, generator):
    """A random feasible perturbation flow of L1 norm up to ``radius`` (per image)."""
    height, width = mu.shape[-2], mu.shape[-1]
    x = mu[idx]
    shape = (idx.numel(), mu.shape[1], flow_dim(height, width))
    d = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    d = limit_step(x, d, upper=None if upper is None else upper[idx])
    frac = torch.rand(idx.numel(), generator=generator, device=mu.device, dtype=mu.dtype)
    norm = d.abs().flatten(1).sum(1).clamp(min=torch.finfo(d.dtype).tiny)
    return d * (frac * radius * _RADIUS_SAFETY / norm)[:, None, None]


# ----------------------------------------------------------------------------- the attack


def _check_eps(eps) -> tuple[float, ...] | None:
    if eps is None:
        return None
    if isinstance(eps, (str, bytes)):
        raise TypeError(f"eps: expected a float, a sequence of floats or None, got {eps!r}")
    if isinstance(eps, np.ndarray) and eps.ndim == 0:
        eps = eps.item()
    vals = list(eps) if isinstance(eps, (Sequence, np.ndarray)) else [eps]
    if not vals:
        raise ValueError("eps: expected at least one budget, got an empty sequence")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"eps: expected real numbers, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"eps: expected finite budgets >= 0 (normalised W1), got {v}")
        out.append(v)
    return tuple(out)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_choice(value, name: str, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}: unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


class WassersteinPGD:
    r"""Wasserstein PGD in the flow domain (paper section 4, Algorithm 1), batched.

    Finds images :math:`\bar\mu = \mu + Aw`, :math:`\|w\|_1 \le \varepsilon` (normalised),
    non-negative (and ``<= clip_max``), that the model does not classify as ``label``;
    see :mod:`flowverify.attacks.pgd` for the maths.

    Parameters
    ----------
    eps : float, sequence of float or None
        Budget(s) in normalised W1 (image mass 1, L1 ground cost).  A sequence gives one
        row per (image, budget); an adversarial found within a smaller budget is reused
        for the larger ones.  ``None`` (default): minimal-radius mode.
    steps : int
        Gradient steps per run (default 30).
    step_size : float
        Euclidean length of a gradient step as a fraction of the budget (default 0.15),
        scaled by the schedule.
    loss : {"ce", "margin", "cw", "dlr"}
        Adversarial loss, minimised: ``"ce"`` (default: minus the cross-entropy; measured
        stronger than the margin at small budgets and with ``clip_max``), ``"margin"`` (the
        paper's ``f_y - max_{t≠y} f_t``; ``"cw"`` is the same, Carlini-Wagner's name) or
        ``"dlr"``.
    schedule : {"cosine", "constant"}
        Step-size schedule over the steps of a run (default ``"cosine"``).
    restarts : int
        Extra runs from random feasible starting points for images not yet fooled
        (default 0: one run from :math:`\delta_\mu`, as in the paper).
    search_steps : int
        Minimal-radius mode: length of the shrinking search in units of ``steps``
        (default 6: ``6 * steps`` iterations; 0: none).
    clip_max : float, optional
        Pixel upper bound in data units (e.g. 1.0): an extra constraint of the set and a
        different threat model (``"w1+pixels<=1"``).  The images must satisfy it.
    input_scale : {"raw", "normalised"}
        What the model consumes: the image in data units (``"raw"``, default) or scaled
        to mass 1 per channel (``"normalised"``).
    reference : None, str or array
        ``None`` (default): ``R = µ``, ``δµ = 0`` (exact; the attack does not depend on
        ``R`` otherwise).  A kind (``"uniform"``, ``"random"``, ``"point"``) or an image
        array (see :func:`flowverify.make_reference`): run Algorithm 1 literally on
        ``f̃(δ) = f(R + Aδ)`` through :class:`flowverify.FlowModel` from
        ``δµ = Δ⁻¹(R, µ)`` (minimal flow).
    fuse : bool
        With a reference: fuse the first affine layer (Corollary 2.1).
    seed : int
        Seed of the random restarts and the random/point references (default 0).
    device : str or torch.device, optional
        Where to compute; default: the device of the model's parameters.  The model must
        already be there.

    Notes
    -----
    Computation uses the model's floating dtype (float32 for usual models).  The model is
    switched to eval mode and its modes are restored afterwards.

    Examples
    --------
    >>> atk = WassersteinPGD(eps=[0.1, 0.3], steps=30)               # doctest: +SKIP
    >>> res = atk(model, images, labels)                              # doctest: +SKIP
    >>> res.success_matrix().mean(0)                                  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        eps: float | Sequence[float] | None = None,
        steps: int = 30,
        step_size: float = 0.15,
        loss: str = "ce",
        schedule: str = "cosine",
        restarts: int = 0,
        search_steps: int = 6,
        clip_max: float | None = None,
        input_scale: str = "raw",
        reference: Any = None,
        fuse: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        self.eps = _check_eps(eps)
        self.steps = _check_int(steps, "steps", 1)
        if isinstance(step_size, bool) or not isinstance(
            step_size, (int, float, np.integer, np.floating)
        ):
            raise TypeError(f"step_size: expected a float, got {type(step_size).__name__}")
        if not math.isfinite(step_size) or step_size <= 0:
            raise ValueError(f"step_size: expected a finite value > 0, got {step_size}")
        self.step_size = float(step_size)
        self.loss = _check_choice(loss, "loss", LOSSES)
        self.schedule = _check_choice(schedule, "schedule", SCHEDULES)
        self.restarts = _check_int(restarts, "restarts", 0)
        self.search_steps = _check_int(search_steps, "search_steps", 0)
        if clip_max is not None:
            if isinstance(clip_max, bool) or not isinstance(
                clip_max, (int, float, np.integer, np.floating)
            ):
                raise TypeError(f"clip_max: expected a float or None, got {clip_max!r}")
            if not math.isfinite(clip_max) or clip_max <= 0:
                raise ValueError(f"clip_max: expected a finite value > 0, got {clip_max}")
            clip_max = float(clip_max)
        self.clip_max = clip_max
        self.input_scale = _check_choice(input_scale, "input_scale", INPUT_SCALES)
        if isinstance(reference, str):
            _check_choice(reference, "reference", ("uniform", "random", "point"))
        elif reference is not None and not isinstance(reference, (np.ndarray, torch.Tensor)):
            raise TypeError(
                "reference: expected None, 'uniform', 'random', 'point' or an image array, got "
                f"{type(reference).__name__}"
            )
        self.reference = reference
        self.fuse = bool(fuse)
        if fuse and reference is None:
            raise ValueError("fuse: fusion needs a reference (reference='uniform', ...)")
        self.seed = _check_int(seed, "seed", 0)
        if self.seed >= 2**64:
            raise ValueError(f"seed: expected an int < 2**64, got {self.seed}")
        self.device = None if device is None else check_device(device)

    # ------------------------------------------------------------------ description

    @property
    def threat_model(self) -> str:
        return "w1" if self.clip_max is None else f"w1+pixels<={self.clip_max:g}"

    def config(self) -> dict[str, Any]:
        """The resolved hyperparameters (JSON-ready)."""
        ref = self.reference
        if ref is not None and not isinstance(ref, str):
            ref = f"array{tuple(ref.shape)}"
        return {
            "attack": type(self).__name__,
            "mode": "minimal" if self.eps is None else "fixed",
            "eps": None if self.eps is None else list(self.eps),
            "steps": self.steps,
            "step_size": self.step_size,
            "loss": self.loss,
            "schedule": self.schedule,
            "restarts": self.restarts,
            "search_steps": self.search_steps,
            "clip_max": self.clip_max,
            "threat_model": self.threat_model,
            "input_scale": self.input_scale,
            "reference": ref if ref is not None else "image",
            "fuse": self.fuse,
            "seed": self.seed,
            "device": None if self.device is None else str(self.device),
            "unit": "normalised",
        }

    def __repr__(self) -> str:
        cfg = self.config()
        keys = (
            "eps steps step_size loss schedule restarts search_steps clip_max input_scale "
            "reference fuse seed device"
        ).split()
        eps = cfg["eps"] if cfg["eps"] is None or len(cfg["eps"]) > 1 else cfg["eps"][0]
        cfg["eps"] = eps
        return f"{type(self).__name__}(" + ", ".join(f"{k}={cfg[k]!r}" for k in keys) + ")"

    # ------------------------------------------------------------------ entry point

    def __call__(self, model: nn.Module, images, labels=None) -> AttackResult:
        """Attack a batch.

        Parameters
        ----------
        model : torch.nn.Module
            Classifier on images ``(N, C, H, W)`` (or flat ``(N, C*H*W)`` when it starts
            with an ``nn.Linear``), returning logits ``(N, K)``; or a
            :class:`flowverify.FlowModel` (its reference, input scale and fusion are used).
        images : ndarray or Tensor
            ``(N, C, H, W)`` non-negative images in data units, positive mass per channel.
        labels : array-like of int, optional
            ``(N,)`` classes to move away from; default: the model's predictions.

        Returns
        -------
        AttackResult
        """
        model, fm_reference, input_scale, fuse, flat = self._unwrap(model)
        device = self._device(model)
        dtype = _model_dtype(model)
        mu_data = _check_images(images)
        n, c, height, width = mu_data.shape
        if height < 2 or width < 2:
            raise ValueError(f"images: expected H, W >= 2, got shape {tuple(mu_data.shape)}")
        if self.clip_max is not None and float(mu_data.max(initial=0.0)) > self.clip_max:
            raise ValueError(
                f"clip_max: the images exceed clip_max={self.clip_max:g} (maximum pixel "
                f"{float(mu_data.max()):g}); the unperturbed image must be in the set"
            )
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        for p in grads:  # gradients are only needed for the flows (much faster)
            p.requires_grad_(False)
        try:
            how = (input_scale, fuse, flat)
            return self._attack(model, mu_data, labels, device, dtype, fm_reference, how)
        finally:
            for m, was in modes.items():
                m.train(was)
            for p, req in grads.items():
                p.requires_grad_(req)

    # ------------------------------------------------------------------ internals

    def _unwrap(self, model):
        if isinstance(model, FlowModel):
            if self.reference is not None:
                raise ValueError(
                    "reference: a FlowModel carries its own reference; pass reference=None"
                )
            return model.model, model.reference, model.input_scale, model.fused, model.flat_input
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
        return model, None, self.input_scale, self.fuse, _infer_flat(model)

    def _device(self, model: nn.Module) -> torch.device:
        params = [p for p in model.parameters()] + [b for b in model.buffers()]
        model_dev = params[0].device if params else torch.device("cpu")
        if self.device is None:
            return model_dev
        same = model_dev.type == self.device.type and (
            model_dev.type == "cpu" or (model_dev.index or 0) == (self.device.index or 0)
        )
        if params and not same:
            raise ValueError(
                f"device: the model is on {model_dev}, the attack was asked to run on "
                f"{self.device}; move the model first (model.to({str(self.device)!r}))"
            )
        return self.device

    def _attack(self, model, mu_data, labels, device, dtype, fm_reference, how) -> AttackResult:
        input_scale, fuse, flat = how
        n, c, height, width = mu_data.shape
        t_start = time.perf_counter()
        mass64 = mu_data.sum(axis=(2, 3))  # (N, C), data units
        mass = torch.as_tensor(mass64, dtype=dtype, device=device)
        mu = torch.as_tensor(mu_data / mass64[:, :, None, None], dtype=dtype, device=device)
        upper = None
        if self.clip_max is not None:
            upper = torch.as_tensor(self.clip_max / mass64, dtype=dtype, device=device)
            upper = upper[:, :, None, None]
        # Reference (Algorithm 1 literally) or R = µ.
        reference = delta_mu = None
        if fm_reference is not None or self.reference is not None:
            reference, delta_mu = self._reference(fm_reference, mu_data, dtype, device)
        objective = _Objective(
            model,
            mass,
            input_scale=input_scale,
            flat=flat,
            reference=reference,
            delta_mu=delta_mu,
            fuse=fuse,
        )
        with torch.no_grad():
            zero = torch.zeros(n, c, flow_dim(height, width), dtype=dtype, device=device)
            with model_errors((c, height, width)):
                clean_logits = objective(mu, zero, torch.arange(n, device=device))
        check_logits(clean_logits, n)
        bad = ~torch.isfinite(clean_logits).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"images: the model's logits are not finite on image(s) "
                f"{torch.nonzero(bad).flatten().tolist()[:5]} (pixel values too large for "
                f"the model's dtype {dtype}?)"
            )
        prediction = clean_logits.argmax(1)
        y = check_labels(labels, n, clean_logits.shape[1], prediction)
        ctx = _Ctx(
            objective=objective,
            mu=mu,
            labels=torch.as_tensor(y, device=device),
            upper=upper,
            generator=torch.Generator(device=device).manual_seed(self.seed),
            model=model,
            mu_data=mu_data,
            mass64=mass64,
            y=y,
            prediction=prediction.cpu().numpy(),
            input_scale=input_scale,
            flat=flat,
        )
        setup = time.perf_counter() - t_start
        rows: list[dict[str, np.ndarray]] = []
        if self.eps is None:
            t0 = time.perf_counter() - setup
            cands = [
                self._finalise(ctx, flow, found, eps_found, iters, t0, minimal=True)
                for flow, found, eps_found, iters in self._minimal(ctx)
            ]
            rows.append(_closest(cands, time.perf_counter() - t0))
        else:
            prev = None
            for eps in self.eps:
                t0 = time.perf_counter() - setup
                setup = 0.0  # counted once, with the first budget
                # Every image of the same masses lies within normalised W1 C * (H + W - 2):
                # a larger budget reaches the same set (and may overflow the dtype).
                cap = float(c * (height + width - 2))
                radius = torch.full((n,), min(eps, cap), dtype=dtype, device=device)
                flow, found, iters = self._fixed(ctx, radius, prev)
                eps_arr = np.full(n, eps)
                rows.append(self._finalise(ctx, flow, found, eps_arr, iters, t0, minimal=False))
                prev = (flow, found, flow.abs().flatten(1).sum(1))
        cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return AttackResult(
            threat_model=self.threat_model,
            mode="minimal" if self.eps is None else "fixed",
            config=self.config(),
            **cat,
        )

    def _reference(self, fm_reference, mu_data, dtype, device):
        """``R`` (data units) and ``δµ = Δ⁻¹(R, µ)`` (minimal flow) as tensors."""
        if fm_reference is not None:
            ref = fm_reference.detach().to("cpu", torch.float64).numpy()
            if ref.shape[0] not in (1, mu_data.shape[0]) or ref.shape[1:] != mu_data.shape[1:]:
                raise ValueError(
                    f"model: the FlowModel's reference {tuple(ref.shape)} does not match "
                    f"the images {tuple(mu_data.shape)}"
                )
        else:
            kind = self.reference
            if isinstance(kind, torch.Tensor):
                kind = kind.detach().cpu().numpy()
            try:
                ref = make_reference(kind, mu_data, seed=self.seed)
            except (ValueError, TypeError) as exc:  # make_reference names its `kind`
                msg = str(exc).removeprefix("kind: ")
                raise type(exc)(f"reference: {msg}") from None
        dmu = inverse_flow(np.broadcast_to(ref, mu_data.shape), mu_data, method="minimal")
        reference = torch.as_tensor(np.ascontiguousarray(ref), dtype=dtype, device=device)
        return reference, torch.as_tensor(dmu, dtype=dtype, device=device)

    def _run(self, ctx, radius, idx, init=None) -> _Run:
        return _pgd(
            ctx.objective,
            ctx.mu,
            ctx.labels,
            radius,
            idx,
            steps=self.steps,
            step_size=self.step_size,
            loss=self.loss,
            schedule=self.schedule,
            upper=ctx.upper,
            init=init,
        )

    def _attempts(self, ctx, radius, idx, init=None):
        """The run from ``init`` (or δµ) plus ``restarts`` random restarts for failures."""
        run = self._run(ctx, radius[idx], idx, init)
        flow, found, iters = run.flow, run.success, run.iterations
        for _ in range(self.restarts):
            todo = (~found).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            sub = idx[todo]
            start = _random_start(ctx.mu, radius[sub], sub, ctx.upper, ctx.generator)
            extra = self._run(ctx, radius[sub], sub, start)
            win = extra.success
            flow[todo[win]] = extra.flow[win]
            found[todo[win]] = True
            iters[todo] += extra.iterations
        return flow, found, iters

    def _fixed(self, ctx, radius, prev):
        n = radius.shape[0]
        device = radius.device
        flow = torch.zeros(n, *ctx.flow_shape, dtype=radius.dtype, device=device)
        found = torch.zeros(n, dtype=torch.bool, device=device)
        iters = torch.zeros(n, dtype=torch.long, device=device)
        todo = torch.ones(n, dtype=torch.bool, device=device)
        if prev is not None:
            prev_flow, prev_found, prev_norm = prev
            reuse = prev_found & (prev_norm <= radius * _RADIUS_SAFETY)
            flow[reuse], found[reuse] = prev_flow[reuse], True
            todo = ~reuse
        idx = todo.nonzero().squeeze(1)
        if idx.numel():
            f, s, it = self._budget_run(ctx, radius, idx)
            flow[idx], found[idx], iters[idx] = f, s, it
        return flow, found, iters

    def _deepfool_all(self, ctx) -> _Run:
        """DeepFool-W1 of every image of the batch (computed once, then cached)."""
        if ctx.deepfool is None:
            n = ctx.mu.shape[0]
            ctx.deepfool = _deepfool(
                ctx.objective,
                ctx.mu,
                ctx.labels,
                torch.arange(n, device=ctx.mu.device),
                iters=_DF_ITERS,
                reach=_REACH,
                candidates=_CANDIDATES,
                upper=ctx.upper,
            )
        return ctx.deepfool

    def _budget_run(self, ctx, radius, idx):
        """The attack of the images ``idx`` within ``radius``: :meth:`_attempts`, then,
        for its failures, the closest adversarial found without a budget
        (:meth:`_anchor`, computed once per batch) if it lies in the ball, else
        a PGD run started from it scaled radially into the ball (feasible: the set is
        convex and contains 0).  PGD from 0 at a large budget takes long steps that pile
        mass on a few pixels and can miss adversarials that smaller budgets find.
        """
        flow, found, iters = self._attempts(ctx, radius, idx)
        todo = (~found).nonzero().squeeze(1)
        if todo.numel() == 0:
            return flow, found, iters
        a_flow, a_norm, shrunk, shrunk_norm = self._anchor(ctx)
        sub = idx[todo]
        use_shrunk = shrunk_norm[sub] < a_norm[sub]
        start = torch.where(use_shrunk[:, None, None], shrunk[sub], a_flow[sub]).to(flow.dtype)
        norm = torch.minimum(a_norm[sub], shrunk_norm[sub])
        ok = torch.isfinite(norm)
        rad = (radius[sub] * _RADIUS_SAFETY).double()
        inside = ok & (norm <= rad)
        flow[todo[inside]], found[todo[inside]] = start[inside], True
        again = ok & ~inside
        if bool(again.any()):
            pick, rows = todo[again], sub[again]
            scale = (rad[again] / norm[again]).to(flow.dtype)
            init = start[again] * scale[:, None, None]
            run = self._run(ctx, radius[rows], rows, init)
            flow[pick[run.success]], found[pick[run.success]] = run.flow[run.success], True
            iters[pick] += run.iterations
        return flow, found, iters

    def _minimal(self, ctx):
        """Candidates of the minimal-radius mode (see :mod:`flowverify.attacks.minimal`).

        Returns a list of ``(flow, found, eps, iterations)``: the adversarials found
        without a budget (:meth:`_anchor`: DeepFool-W1, else PGD at doubled budgets) and
        their shrunk forms, the budget schedule's (for each image the first budget of
        :data:`~flowverify.attacks.minimal.BUDGET_SCHEDULE` at which :meth:`_budget_run` fools
        it, as a fixed-budget run at those budgets), and both shrunk further for
        ``search_steps * steps`` iterations.  The caller keeps,
        per image, the re-checked candidate of smallest exact W1.
        """
        mu = ctx.mu
        n = mu.shape[0]
        device, dtype = mu.device, mu.dtype
        inf = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        a_flow, a_norm, a_shrunk, a_shrunk_norm = self._anchor(ctx)
        # Budget schedule: what a fixed-budget run at these budgets finds first.
        sched = torch.zeros(n, *ctx.flow_shape, dtype=dtype, device=device)
        s_found = torch.zeros(n, dtype=torch.bool, device=device)
        s_eps = inf.clone()
        iters = ctx.deepfool.iterations.clone()
        for eps in _minimal.BUDGET_SCHEDULE:
            todo = (~s_found).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            radius = torch.full((n,), eps, dtype=dtype, device=device)
            f, won, it = self._budget_run(ctx, radius, todo)
            iters[todo] += it
            sched[todo[won]], s_found[todo[won]], s_eps[todo[won]] = f[won], True, eps
        # Shrink further: the schedule's adversarials and the anchor's shrunk ones.
        steps = self.search_steps * self.steps
        s_shrunk, s_shrunk_norm = self._shrink_starts(ctx, sched, s_found, steps)
        a_ok = torch.isfinite(a_shrunk_norm)
        a_more, a_more_norm = self._shrink_starts(ctx, a_shrunk, a_ok, steps)
        iters += (s_found.long() + a_ok.long()) * steps + torch.isfinite(a_norm).long() * self.steps
        cands = [(a_flow, a_norm), (sched, s_eps), (a_shrunk, a_shrunk_norm)]
        cands += [(s_shrunk, s_shrunk_norm), (a_more, a_more_norm)]
        out = []
        for flow, bound in cands:
            found = torch.isfinite(bound)
            eps = torch.where(found, bound * (1 + 1e-6), inf)  # norms: slack for rounding
            out.append((flow, found, eps.cpu().numpy(), iters))
        return out

    def _shrink_starts(self, ctx, flows, ok, steps):
        """Shrink the adversarial flows ``flows[ok]`` for ``steps`` iterations
        (:func:`flowverify.attacks.minimal.shrink`, one row per rate of :data:`_SHRINK_GAMMAS`,
        batched); per image the smallest adversarial found and its L1 norm (``inf`` where
        none)."""
        n = flows.shape[0]
        device = flows.device
        best = torch.zeros_like(flows)
        best_norm = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        rows = ok.nonzero().squeeze(1)
        if rows.numel() == 0 or steps == 0:
            return best, best_norm
        k = len(_SHRINK_GAMMAS)
        gamma = torch.tensor(_SHRINK_GAMMAS, dtype=torch.float64, device=device)
        out, norms = _minimal.shrink(
            ctx.objective,
            ctx.mu,
            ctx.labels,
            rows.repeat(k),
            flows[rows].repeat(k, 1, 1),
            steps=steps,
            step_size=self.step_size,
            upper=ctx.upper,
            gamma=gamma.repeat_interleave(rows.numel()),
        )
        norms = norms.reshape(k, rows.numel())
        pick = norms.argmin(0)
        cols = torch.arange(rows.numel(), device=device)
        best[rows] = out.reshape(k, rows.numel(), *out.shape[1:])[pick, cols].to(flows.dtype)
        best_norm[rows] = norms[pick, cols]
        return best, best_norm

    def _anchor(self, ctx):
        """Adversarials found without a budget (computed once per batch, then cached).

        DeepFool-W1; for the images it does not fool, PGD at budgets doubled from twice
        the last budget of the schedule up to the grid diameter; then shrunk
        (:meth:`_shrink_starts`, ``steps`` iterations: cheap enough for every
        fixed-budget run).  Returns ``(start, start_norm, shrunk, shrunk_norm)``:
        per image the unshrunk and the shrunk adversarial flows and their L1 norms
        (``inf`` where none).
        """
        if ctx.anchor is None:
            mu = ctx.mu
            n = mu.shape[0]
            device, dtype = mu.device, mu.dtype
            cap = float(mu.shape[1] * (mu.shape[-2] + mu.shape[-1] - 2))
            df = self._deepfool_all(ctx)
            start, ok = df.flow.clone(), df.success.clone()
            eps = 2 * _minimal.BUDGET_SCHEDULE[-1]
            while eps <= cap:
                todo = (~ok).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                radius = torch.full((n,), eps, dtype=dtype, device=device)
                f, won, _ = self._attempts(ctx, radius, todo)
                start[todo[won]], ok[todo[won]] = f[won], True
                eps *= 2
            norm = torch.where(ok, start.abs().flatten(1).sum(1).double(), math.inf)
            ctx.anchor = (start, norm, *self._shrink_starts(ctx, start, ok, self.steps))
        return ctx.anchor

    def _finalise(self, ctx, flow, found, eps_arr, iters, t0, *, minimal):
        """Float64 repair, output image, re-check by the model, exact W1, rows."""
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
        if self.clip_max is not None:
            upper64 = torch.as_tensor(self.clip_max / mass64)[:, :, None, None]
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
        if self.clip_max is not None:  # x64 <= clip_max / mass; the product may round up
            adv = np.minimum(adv, self.clip_max)
        # Re-check: forward pass of the original model on the returned image.
        pred_adv = _predict(ctx.model, adv, ctx.input_scale, ctx.flat, ctx.mu.device, ctx.mu.dtype)
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


def _closest(cands: list[dict[str, np.ndarray]], seconds: float) -> dict[str, np.ndarray]:
    """Per image, the re-checked candidate row of smallest exact W1 (``inf``: failed)."""
    w1 = np.stack([c["w1"] for c in cands])  # (K, n), inf where the re-check failed
    pick = np.argmin(w1, axis=0)
    n = pick.shape[0]
    out = {k: np.stack([c[k] for c in cands])[pick, np.arange(n)] for k in cands[0]}
    out["seconds"] = np.full(n, seconds / max(n, 1))
    return out


@dataclass
class _Ctx:
    objective: _Objective
    mu: torch.Tensor
    labels: torch.Tensor
    upper: torch.Tensor | None
    generator: torch.Generator
    model: nn.Module
    mu_data: np.ndarray  # float64 images, data units
    mass64: np.ndarray  # (N, C)
    y: np.ndarray
    prediction: np.ndarray
    input_scale: str
    flat: bool
    deepfool: _Run | None = None  # DeepFool-W1 of the whole batch, once needed
    anchor: tuple[torch.Tensor, ...] | None = None  # see WassersteinPGD._anchor

    @property
    def flow_shape(self) -> tuple[int, int]:
        return self.mu.shape[1], flow_dim(self.mu.shape[-2], self.mu.shape[-1])


# ----------------------------------------------------------------------------- helpers


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_images(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        arr = images.detach().to("cpu").numpy()
    elif isinstance(images, np.ndarray):
        arr = images
    else:
        raise TypeError(
            f"images: expected a numpy.ndarray or torch.Tensor, got {type(images).__name__}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"images: expected real pixel values, got dtype {arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"images: expected shape (N, C, H, W), got {tuple(arr.shape)}")
    if arr.shape[1] < 1:
        raise ValueError(f"images: expected at least one channel, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("images: expected finite pixel values, got NaN or infinity")
    if arr.size and arr.min() < 0:
        raise ValueError(f"images: expected non-negative pixels (mass), got {arr.min():g}")
    with np.errstate(over="ignore"):
        mass = arr.sum(axis=(2, 3))
    if arr.shape[0] and (mass <= 0).any():
        raise ValueError("images: expected positive mass in every channel, got an all-zero one")
    if not np.isfinite(mass).all():
        raise ValueError(
            f"images: expected a finite mass per channel, got one that overflows float64 "
            f"(largest pixel {arr.max():g})"
        )
    return arr


@torch.no_grad()
def _predict(model, images: np.ndarray, input_scale, flat, device, dtype) -> np.ndarray:
    x = torch.as_tensor(images, device=device).to(dtype)
    if input_scale == "normalised":
        x = x / x.sum(dim=(2, 3), keepdim=True)
    if flat:
        x = x.reshape(x.shape[0], -1)
    return model(x).argmax(1).cpu().numpy()


def attack(
    model: nn.Module,
    images,
    labels=None,
    *,
    eps: float | Sequence[float] | None = None,
    steps: int = 30,
    step_size: float = 0.15,
    loss: str = "ce",
    schedule: str = "cosine",
    restarts: int = 0,
    search_steps: int = 6,
    clip_max: float | None = None,
    input_scale: str = "raw",
    reference: Any = None,
    fuse: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> AttackResult:
    r"""Wasserstein PGD attack of a batch (functional form of :class:`WassersteinPGD`).

    Finds images :math:`\bar\mu = \mu + Aw` with :math:`\|w\|_1 \le \varepsilon`
    (normalised W1, L1 ground cost), non-negative, of the mass of :math:`\mu` per channel
    (and ``<= clip_max`` if set), that ``model`` does not classify as ``labels``; or, with
    ``eps=None``, the smallest such W1 found per image.

    Parameters
    ----------
    model : torch.nn.Module or flowverify.FlowModel
        Classifier on images ``(N, C, H, W)`` (or flat ``(N, C*H*W)`` when it starts with
        an ``nn.Linear``), returning logits ``(N, K)``.
    images : ndarray or Tensor
        ``(N, C, H, W)`` non-negative images in data units, positive mass per channel.
    labels : array-like of int, optional
        ``(N,)`` classes to move away from; default: the model's predictions.
    eps : float, sequence of float or None
        Budget(s) in normalised W1 (image mass 1); one result row per (image, budget),
        budget-major.  ``None`` (default): minimal-radius mode, one row per image.
    steps : int
        Gradient steps per run (default 30).
    step_size : float
        Euclidean step length as a fraction of the budget (default 0.15).
    loss : {"ce", "margin", "cw", "dlr"}
        Adversarial loss (default ``"ce"``).
    schedule : {"cosine", "constant"}
        Step-size schedule (default ``"cosine"``).
    restarts : int
        Random restarts for images not yet fooled (default 0).
    search_steps : int
        Minimal-radius mode: shrinking-search length in units of ``steps`` (default 6).
    clip_max : float, optional
        Pixel upper bound in data units (threat model ``"w1+pixels<=U"``).  Default: none,
        the paper's threat model, where pixels may exceed the data's range
        (see :attr:`AttackResult.max_pixel`).
    input_scale : {"raw", "normalised"}
        What the model consumes (default ``"raw"``: data units).
    reference : None, str or array
        ``None`` (default): ``R = µ``; or a reference to run Algorithm 1 literally.
    fuse : bool
        With a reference: fuse the first affine layer (Corollary 2.1).
    seed : int
        Seed of restarts and random references (default 0).
    device : str or torch.device, optional
        Where to compute (default: the model's device).

    Returns
    -------
    AttackResult
        ``success``, ``w1`` (exact W1 of each returned image, normalised), ``w1_raw``,
        ``adversarial`` ``(R, C, H, W)``, ``max_pixel``, ...

    See Also
    --------
    WassersteinPGD : the same as a reusable object, with the maths of each option.
    """
    return WassersteinPGD(
        eps=eps,
        steps=steps,
        step_size=step_size,
        loss=loss,
        schedule=schedule,
        restarts=restarts,
        search_steps=search_steps,
        clip_max=clip_max,
        input_scale=input_scale,
        reference=reference,
        fuse=fuse,
        seed=seed,
        device=device,
    )(model, images, labels)
