r"""Certified and exact W1 radii: the public entry point :func:`certify` (SPEC section 4).

For an image :math:`\mu` of class :math:`y`, a model :math:`F` and references
:math:`R_1, \dots, R_k`, :func:`certify` gives the largest W1 radius inside which ``F``
provably keeps class ``y``.  Each reference gives ``δµ = Δ⁻¹(R, µ)`` and the fused
flow-domain network ``f̃(δ) = f(R + Aδ)`` (Corollary 2.1); then, by method (the paper's
Table 1):

``"vanilla"``
    The L1 ball ``B_ε(δµ)`` (Theorem 3), certified by CROWN (``certifier="crown"``) or
    alpha-CROWN (``"alpha-crown"``) on the bound-propagation engine
    (:mod:`flowverify.verification.engine`): every bound ends as ``qᵀν + β`` in the image,
    minimised over the ball as ``qᵀµ - ε‖Aᵀq‖_∞`` (the dual-norm concretisation
    ``cᵀδµ - ε‖c‖_∞`` with ``c = Aᵀq``); for a linear model this is Lemma 7's closed form.
    Any traced feed-forward model whose first operation is affine (Corollary 2.1).
``"feasible"``
    The polytope ``B_ε(δµ) ∩ {R + Aδ >= 0}`` (Lemma 5, Theorem 6): the same engine with
    every intermediate and final bound minimised exactly over the polytope (Kantorovich
    dual, :func:`~flowverify.verification.bounds.polytope_gain`), or the LP relaxation solved
    by HiGHS (``"lp"``, :mod:`flowverify.verification.lp`, chains of Linear/Conv2d/ReLU).
    Never below ``"vanilla"`` (its search starts from the vanilla radius); exact
    (Lemma 8) for a linear model.
``"complete"`` / ``"complete-ball"``
    The exact radius over the polytope (resp. the ball) by
    :func:`flowverify.verification.complete.exact_radius`, pruned by the feasible (resp.
    vanilla) radius from below and by a Frank-Wolfe attack from above.

References (section 3.2.2): the reported radius is the maximum over references; every
per-reference radius is kept.  (No certificate here depends on ``R``: ``W̃δµ + b̃ =
Wµ + b`` and the region's image set ``{µ + Aγ}`` do not, so the engine's and the LP's
radius is computed once and reported for every reference.  Complete methods use the
first reference only: their radius does not depend on it, Table 1.  Several references
therefore cost nothing but give nothing either; a warning says so, once per call.)

Radii of incomplete methods come from a search on ``ε`` to a relative tolerance
``rtol`` (:func:`~flowverify.verification.bounds.search_radius`); the reported value is the
largest radius certified.  ``eps=`` instead decides one radius: ``certified``,
``falsified`` (a Frank-Wolfe attack found an adversarial image within ``eps``) or
``unknown``.

Units: the W1 ground cost is the L1 distance between pixel coordinates.  ``radius_raw``
is in data units (flow L1 norm: W1 between the images as given); ``radius`` is
normalised: ``radius_raw / s`` with ``s`` the image's mass (for ``C`` channels, the
largest channel mass, which is conservative: the normalised W1 ball of that radius lies
inside the certified raw one).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.core.results import Status, jsonable
from flowverify.core.validation import (
    channel_last_hint,
    check_device,
    check_labels,
    check_logits,
    model_errors,
)
from flowverify.model.flow_model import (
    INPUT_SCALES,
    FlowModel,
    _infer_flat,
    _modules_in_order,
    first_affine_layer,
)
from flowverify.transport.flows import apply_flow, inverse_flow, w1_distance
from flowverify.transport.references import Reference, parse_references
from flowverify.verification import bounds as _b
from flowverify.verification._chain import affine_chain
from flowverify.verification.complete import exact_radius

__all__ = ["CERTIFIERS", "METHODS", "CertifyResult", "certify", "check_certifiable"]

logger = logging.getLogger(__name__)

#: Verification regions x certifier families (the paper's Table 1), and Levine & Feizi's
#: Wasserstein smoothing (section 3.3, :mod:`flowverify.baselines.smoothing`) as a baseline.
METHODS = ("vanilla", "feasible", "complete", "complete-ball", "smoothing")

#: Methods whose ``crown`` certifier runs on the bound-propagation engine
#: (:mod:`flowverify.verification.engine`) for every architecture; the other certifiers and
#: methods work on chains of Linear/Conv2d/ReLU layers.
ENGINE_METHODS = ("vanilla", "feasible")
#: Certifiers of :data:`ENGINE_METHODS` that run on the engine (``lp`` reads the chain).
ENGINE_CERTIFIERS = ("crown", "alpha-crown")

#: Valid certifiers per method; the first is the default.
CERTIFIERS: dict[str, tuple[str, ...]] = {
    "vanilla": ("crown", "alpha-crown"),
    "feasible": ("crown", "alpha-crown", "lp"),
    "complete": ("beta-crown", "bab", "milp"),
    "complete-ball": ("bab", "beta-crown", "milp"),
    "smoothing": ("laplace-cohen",),
}

UNITS = ("normalised", "raw")

#: Right inverse used for ``δµ`` (any right inverse is valid; the minimal one is exact).
INVERSE_METHOD = "minimal"


@dataclass
class CertifyResult:
    """Certification of one image.

    Attributes
    ----------
    index : int
        Index of the image (in ``data`` when ``indices`` are given, else in the batch).
    label, prediction : int
        The class certified and the model's class on the image.
    method, certifier : str
        As resolved (see :data:`METHODS`, :data:`CERTIFIERS`).
    references : list of str
        Names of the references used (``uniform``, ``random#0``, ``data#17``, ...).
    status : Status
        ``certified`` (radius > 0 proven; with ``eps``: the ball of radius ``eps``),
        ``falsified`` (``eps`` only: an adversarial image within ``eps``, see
        ``witness``), ``unknown``, ``misclassified`` (radius 0) or ``error``.
    radius : float
        Certified W1 radius, normalised unit (image mass 1): every image within it is
        classified ``label``.  For an exact result, the W1 distance to the closest
        image of another class (its proven lower bound).
    radius_raw : float
        The same in data units (``radius * mass``).
    exact : bool
        True only for a complete method that finished (``radius`` is exact).
    per_reference : dict
        Reference name -> certified radius (normalised).
    seconds : float
        Wall time (a batch's time divided by its size for batched methods).
    eps, eps_raw : float or None
        The radius decided (``eps=`` mode), normalised and raw.
    lower, upper : float or None
        Proven lower bound (normalised; equal to ``radius``) and the W1 distance of
        the closest adversarial image known (normalised; ``inf`` if none, ``None`` if
        not searched).
    upper_raw : float or None
        ``upper`` in data units.
    mass : float
        ``s``: normalised = raw / s (largest channel mass).
    best_reference : str or None
        The reference that gave ``radius``.
    converged : bool
        Whether the radius search reached its tolerance (else it was cut by ``timeout``;
        the radius is still certified).
    solver_status : str or None
        Complete methods: the solver's status.
    message : str or None
        Error message (``status="error"``) or notes.
    nodes : int or None
        Complete methods: the branch-and-bound subdomains (nodes) bounded.
    witness : ndarray or None
        ``(C, H, W)`` adversarial image (exact results, falsified decisions, and the
        closest one found by a complete method that stopped at its limit); excluded
        from :meth:`to_dict`.  For ``complete-ball`` it may have negative pixels.
    witness_kind : str or None
        What ``witness`` is: ``"closest"`` (exact result: the closest adversarial image,
        at W1 ``upper`` = ``radius``), ``"within-eps"`` (falsified decision) or
        ``"closest-found"`` (``unknown`` result of a complete method: the closest
        adversarial image found, at W1 ``upper``; it proves only that the radius is at
        most ``upper``, not that no closer one exists); ``None`` without a witness.
    """

    index: int
    label: int
    prediction: int
    method: str
    certifier: str
    references: list[str]
    status: Status
    radius: float
    radius_raw: float
    exact: bool = False
    per_reference: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    eps: float | None = None
    eps_raw: float | None = None
    lower: float | None = None
    upper: float | None = None
    upper_raw: float | None = None
    mass: float = 1.0
    best_reference: str | None = None
    converged: bool = True
    solver_status: str | None = None
    message: str | None = None
    witness: np.ndarray | None = field(default=None, repr=False)
    nodes: int | None = None
    witness_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field but ``witness`` (``inf`` -> ``"inf"``)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "witness"}
        out["status"] = str(self.status)
        out["unit"] = "normalised"
        return jsonable(out)


# --------------------------------------------------------------------------- validation


def _resolve_certifier(method: str, certifier: str | None) -> str:
    """``certifier``, or the method's default; ValueError listing the valid ones."""
    valid = CERTIFIERS[method]
    certifier = valid[0] if certifier is None else certifier
    if certifier not in valid:
        raise ValueError(
            f"certifier: unknown certifier {certifier!r} for method {method!r}; valid: "
            f"{', '.join(valid)}"
        )
    return certifier


def _check_choice(value, name: str, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}: expected one of {', '.join(valid)}, got {value!r}")
    return value


def _check_positive(value, name: str, *, allow_none=True, allow_zero=False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(
            f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {value!r}"
        )
    return v


def _check_images(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(
            f"images: expected a numpy array or torch tensor, got {type(images).__name__}"
        )
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise TypeError(f"images: expected real pixel values, got dtype {images.dtype}")
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(
            f"images: expected shape (N, C, H, W), (C, H, W) or (H, W), got {images.shape}"
        )
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(
            f"images: expected at least 2x2 pixels, got {images.shape}"
            + channel_last_hint(images.shape)
        )
    if x.shape[1] < 1:
        raise ValueError(f"images: expected at least one channel, got shape {images.shape}")
    if not np.isfinite(x).all():
        raise ValueError("images: expected finite pixel values, got NaN or infinity")
    if (x < 0).any():
        raise ValueError(f"images: expected non-negative pixels (mass), got minimum {x.min():g}")
    with np.errstate(over="ignore"):
        mass = x.sum(axis=(-2, -1))
    if x.shape[0] and (mass <= 0).any():
        bad = np.flatnonzero((mass <= 0).any(axis=1))
        raise ValueError(
            "images: every channel of every image needs positive mass (W1 compares "
            f"distributions), got {bad.size} all-zero image(s) or channel(s), first at "
            f"position {int(bad[0])}"
        )
    if not np.isfinite(mass).all() or not np.isfinite(_e_max(x)).all():
        raise ValueError(
            f"images: expected a finite mass per channel (times the grid diameter), got one "
            f"that overflows float64 (largest pixel {x.max():g})"
        )
    return x


def _check_indices(indices, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n)
    arr = np.asarray(indices)
    if not np.issubdtype(arr.dtype, np.integer) or arr.shape != (n,):
        raise ValueError(f"indices: expected {n} integer indices (one per image), got {arr!r}")
    return arr.astype(np.int64)


def _resolve_model(model) -> nn.Module:
    if isinstance(model, nn.Module):
        return model.eval()
    from flowverify.model.loading import load_model

    return load_model(model)


def _check_architecture(model: nn.Module) -> None:
    """Refuse, naming its layer, a model that is not a fused chain (an affine first
    operation, then only Linear/Conv2d/Flatten/ReLU, logits last): what the LP and the
    complete search read.  The engine (vanilla, feasible) takes any traced model."""
    try:
        pos, _, _ = first_affine_layer(model)
    except ValueError as exc:
        detail = str(exc).split("; use fuse=False")[0]
        raise ValueError(detail.replace("fuse=True needs", "certify needs")) from None
    pending_relu = False
    for name, mod in _modules_in_order(model)[pos + 1 :]:
        if isinstance(mod, nn.ReLU):
            if pending_relu:
                raise ValueError(f"model: two ReLUs in a row at layer {name!r}")
            pending_relu = True
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            pending_relu = False
        elif not isinstance(mod, (nn.Flatten, nn.Identity)):
            raise ValueError(
                f"model: certifiers support Linear, Conv2d, Flatten and ReLU layers, got "
                f"layer {name!r} of type {type(mod).__name__}"
            )
    if pending_relu:
        raise ValueError("model: the network ends with a ReLU; expected logits")


def _probe_model(model: nn.Module, x: np.ndarray, flat: bool, input_scale: str) -> int:
    """Run ``model`` on the first image (on none for an empty batch): it must accept the
    images and return logits ``(N, classes)`` with at least two classes.  Returns the
    number of classes."""
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    xin = torch.as_tensor(x[:1])
    scale = xin.sum(dim=(-2, -1)) if input_scale == "normalised" else None
    inp = _model_input(xin, scale, flat).to(dtype=_model_dtype(model), device=dev)
    with model_errors(x.shape[1:], f" (model input {tuple(inp.shape)})"), torch.no_grad():
        out = model(inp)
    return check_logits(out, inp.shape[0])


# ------------------------------------------------------------------------------- helpers


def _prefix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-activation of the first ReLU (or the logits): the chain's first layer."""
    z = x
    for _, mod in _modules_in_order(model):
        if isinstance(mod, nn.ReLU):
            break
        z = mod(z)
    return z.reshape(z.shape[0], -1)


def _model_input(x: torch.Tensor, scale: torch.Tensor | None, flat: bool) -> torch.Tensor:
    if scale is not None:
        x = x / scale[:, :, None, None]
    return x.reshape(x.shape[0], -1) if flat else x


@dataclass
class _Ctx:
    """Resolved options shared by every image."""

    model: nn.Module  # as given (predictions)
    model64: nn.Module  # float64 copy (certification)
    method: str
    certifier: str
    input_scale: str
    device: torch.device
    rtol: float
    timeout: float | None
    flat: bool
    num_classes: int
    seed: int
    #: The model as a graph for the bound-propagation engine (built from ``model64``).
    graph: Any = None


def _problem(ctx: _Ctx, x: np.ndarray, refs: np.ndarray, labels: np.ndarray):
    """FlowNet and Batch for images ``x (n, C, H, W)`` with references ``refs``."""
    n, c, h, w = x.shape
    fm = FlowModel(ctx.model64, torch.as_tensor(refs), input_scale=ctx.input_scale, fuse=True)
    chain0 = affine_chain(fm, 0)
    scale = fm.scale.detach().to(torch.float64).cpu()  # (n, C)
    net = _b.FlowNet.from_chain(chain0, (c, h, w), scale=scale[0].numpy(), device=ctx.device)
    xin = _model_input(
        torch.as_tensor(x), scale if ctx.input_scale == "normalised" else None, ctx.flat
    )
    with torch.no_grad():
        centre = _prefix(ctx.model64, xin).numpy()
    # consistency with the chain (reference 0): W̃ δµ + b̃ = first pre-activation at µ
    dmu0 = np.asarray(inverse_flow(refs[:1], x[:1], method=INVERSE_METHOD)).reshape(-1)
    c0 = chain0.weights[0] @ dmu0 + chain0.biases[0]
    err = float(np.abs(c0 - centre[0]).max(initial=0.0))
    if err > 1e-6 * (1.0 + float(np.abs(c0).max(initial=0.0))):
        raise RuntimeError(
            f"internal: the fused chain and the model disagree at the image by {err:g}"
        )
    batch = _b.Batch.build(net, centre, 1.0 / scale.numpy(), x.reshape(n, -1), labels)
    return net, batch


def _e_max(x: np.ndarray) -> np.ndarray:
    """Raw radius that contains every image of the same masses: ``Σ_c s_c (H + W - 2)``."""
    h, w = x.shape[-2:]
    return x.sum(axis=(1, 2, 3)) * (h + w - 2)


def _mass(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(-2, -1)).max(axis=-1)


def _predict(
    model: nn.Module, x: np.ndarray, flat: bool, input_scale: str, check: bool = False
) -> np.ndarray:
    """The model's classes on images ``x`` in data units (divided by their mass per
    channel when ``input_scale="normalised"``)."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    dev = param.device if param is not None else torch.device("cpu")
    out = []
    with torch.no_grad():
        for s in range(0, len(x), 256):
            xb = torch.as_tensor(x[s : s + 256], dtype=torch.float64)
            scale = xb.sum(dim=(-2, -1)) if input_scale == "normalised" else None
            inp = _model_input(xb, scale, flat).to(dtype=dtype, device=dev)
            logits = model(inp)
            bad = ~torch.isfinite(logits).all(dim=1)
            if check and bool(bad.any()):
                which = (s + torch.nonzero(bad).flatten().cpu()).tolist()[:5]
                raise ValueError(
                    f"images: the model's logits are not finite on image(s) {which} (pixel "
                    f"values too large for the model's dtype {dtype}?)"
                )
            out.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _deadline(ctx: _Ctx, n: int) -> float | None:
    return None if ctx.timeout is None else time.perf_counter() + ctx.timeout * n


# ---------------------------------------------------------------- incomplete (batched)


def _lp_radii(ctx: _Ctx, x, refs, labels, eps_raw, lower):
    """Raw radii ``(n,)`` and convergence flags of the ``lp`` certifier (one reference
    slot): the LP relaxation over the polytope on the fused chain, searched from the
    engine's radius ``lower`` (radius mode) or evaluated at ``ε`` (``eps`` mode)."""
    from flowverify.verification.lp import LPOracle

    net, batch = _problem(ctx, x, refs, labels)
    n = len(x)
    e_max = _e_max(x)
    if eps_raw is not None:
        best = lower.copy()
        todo = np.flatnonzero(best < eps_raw)
        if todo.size:
            f_val = LPOracle(net, batch.subset(todo))(np.arange(todo.size), eps_raw[todo])
            val = np.minimum(np.maximum(np.minimum(f_val, eps_raw[todo]), 0.0), e_max[todo])
            best[todo] = np.maximum(best[todo], val)
        return best, np.ones(n, dtype=bool)
    if net.num_relu == 0:  # polytope CROWN is already exact (Lemma 8) on a linear model
        return lower, np.ones(n, dtype=bool)
    res = _b.search_radius(
        LPOracle(net, batch), e_max, rtol=ctx.rtol, deadline=_deadline(ctx, n), lower_init=lower
    )
    return np.maximum(res.lower, lower), res.converged


def _engine_radii(ctx: _Ctx, x, labels, eps_raw, *, method=None, certifier=None):
    """Raw radii ``(n,)`` and convergence flags from the bound-propagation engine.

    Vanilla: the W1 ball (Theorem 3); feasible: the ball's search first, then the W1
    polytope (Theorem 6) from its radius, so feasible is never below vanilla;
    ``alpha-crown`` adds a last stage with optimised slopes.  ``eps`` mode:
    ``min(ε, F(ε))`` maximised over the stages.
    """
    from flowverify.verification.engine import EngineProblem, make_domain

    method = ctx.method if method is None else method
    certifier = ctx.certifier if certifier is None else certifier
    n = len(x)
    inv = 1.0 / x.sum(axis=(-2, -1)) if ctx.input_scale == "normalised" else None
    domains = ["w1-ball"] + (["w1-polytope"] if method == "feasible" else [])
    e_max = _e_max(x)
    best, conv = np.zeros(n), np.ones(n, dtype=bool)
    deadline = None if eps_raw is not None else _deadline(ctx, n)
    linear = not ctx.graph.activations()  # F(ε) does not depend on ε (Lemmas 7, 8)
    stages = [(d, False) for d in domains]
    if certifier == "alpha-crown" and not linear:
        stages.append((domains[-1], True))
    for k, (name, optimise) in enumerate(stages):
        prob = EngineProblem(
            ctx.graph,
            x,
            labels,
            make_domain(name, x),
            inv_scale=inv,
            device=ctx.device,
            optimise=optimise,
        )
        if eps_raw is not None:
            todo = np.flatnonzero(best < eps_raw)
            if todo.size:
                f_val = prob(todo, eps_raw[todo])
                val = np.minimum(np.maximum(np.minimum(f_val, eps_raw[todo]), 0.0), e_max[todo])
                best[todo] = np.maximum(best[todo], val)
            continue
        res = _b.search_radius(
            prob,
            e_max,
            linear=linear,
            rtol=ctx.rtol,
            deadline=deadline,
            lower_init=best if k else None,
        )
        better = res.lower >= best
        conv = np.where(better, res.converged, conv) if k else res.converged
        best = np.maximum(best, res.lower)
    return best, conv


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

    The linear minimisation oracle is exact (:func:`bounds.polytope_plan`) and the set is
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
            [_b.polytope_plan(g_np[j], x[i], float(eps_raw[i]))[0] for j, i in enumerate(act)]
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


def _pgd_min_radius(ctx: _Ctx, x: np.ndarray, label: int):
    """The minimal-radius PGD attack (:class:`~flowverify.attacks.pgd.WassersteinPGD`) on one
    image: the exact W1 (raw) of its adversarial image, re-checked on the model, and the
    image; ``(inf, None)`` if it fails."""
    from flowverify.attacks.pgd import WassersteinPGD

    try:
        res = WassersteinPGD(input_scale=ctx.input_scale, seed=ctx.seed, device=ctx.device)(
            ctx.model, x[None], np.array([label])
        )
        if not bool(np.asarray(res.success)[0]):
            return math.inf, None
        img = np.asarray(res.adversarial[0], dtype=np.float64).reshape(x.shape)
        if _predict(ctx.model, img[None], ctx.flat, ctx.input_scale)[0] == label:
            return math.inf, None
        return float(w1_distance(img, x, unit="raw")), img  # ValueError: mass differs
    except (RuntimeError, ValueError) as exc:  # an upper bound is optional
        logger.debug("PGD attack gave no usable adversarial (%s)", exc)
        return math.inf, None


# ----------------------------------------------------------------------------- complete


def _complete_one(ctx: _Ctx, x: np.ndarray, label: int, ref: np.ndarray, eps_raw):
    """Exact radius of one image over the polytope (or the ball), or with ``eps_raw`` the
    decision at that radius (``beta-crown`` only). Returns a dict."""
    t_end = None if ctx.timeout is None else time.perf_counter() + ctx.timeout
    feasible = ctx.method == "complete"
    c, h, w = x.shape
    e_max = float(_e_max(x[None])[0])
    # lower bound: the incomplete radius of the same region
    lower, _ = _engine_radii(
        ctx,
        x[None],
        np.array([label]),
        None,
        method="feasible" if feasible else "vanilla",
        certifier="crown",
    )
    lower = float(lower[0])
    # upper bound: Frank-Wolfe and PGD attacks (valid for the ball too: feasible ⊂ ball)
    upper, adv = _fw_min_radius(ctx, x, label, lower, e_max)
    p_upper, p_adv = _pgd_min_radius(ctx, x, label)
    if p_upper < upper:
        upper, adv = p_upper, p_adv
    if ctx.certifier == "beta-crown" and (ctx.graph.activations() or not _is_chain(ctx.model)):
        return _complete_engine(ctx, x, label, eps_raw, lower, upper, adv, t_end)
    # a linear chain: the polytope bound is exact (Lemma 8), the chain's LP gives the witness
    dmu = np.asarray(inverse_flow(ref, x, method=INVERSE_METHOD), dtype=np.float64)
    fm = FlowModel(ctx.model64, torch.as_tensor(ref), input_scale=ctx.input_scale, fuse=True)
    chain = affine_chain(fm, 0)
    witness_flow = None
    if adv is not None:
        witness_flow = (dmu + np.asarray(inverse_flow(x, adv, method=INVERSE_METHOD))).reshape(-1)
    remaining = None if t_end is None else max(t_end - time.perf_counter(), 1e-3)
    kwargs = dict(
        height=h,
        width=w,
        feasible=feasible,
        timeout=remaining,
        lower_bound=lower,
        upper_bound=upper,
        witness_flow=witness_flow,
        bound_fn=functools.partial(_b.relu_bounds, height=h, width=w, device=str(ctx.device)),
        algorithm="bab" if ctx.certifier == "beta-crown" else ctx.certifier,
    )
    res = exact_radius(chain, dmu.reshape(-1), ref.reshape(-1), int(label), **kwargs)
    status = str(getattr(res, "status", "error"))
    out = {
        "nodes": getattr(res, "nodes", None),
        "solver_status": str(getattr(res, "solver_status", status)),
        "lower": max(float(getattr(res, "lower", 0.0)), lower),
        "upper": min(float(getattr(res, "upper", math.inf)), upper),
        "exact": False,
        "witness": None,
    }
    wf = getattr(res, "witness_flow", None)
    if wf is not None and float(getattr(res, "upper", math.inf)) <= upper:
        img = apply_flow(ref, np.asarray(wf, dtype=np.float64).reshape(c, -1))
        out["witness"] = img
    elif adv is not None:
        out["witness"] = adv
    if status == "optimal":
        out["exact"] = True
    elif status == "infeasible":  # no image of this mass is classified otherwise
        out.update(exact=True, lower=e_max, upper=math.inf, witness=None)
        out["message"] = "no adversarial image exists; radius capped at the grid diameter"
    elif status == "error":
        out["message"] = f"complete solver error ({out['solver_status']})"
    return out


def _is_chain(model) -> bool:
    try:
        _check_architecture(model)
    except ValueError:
        return False
    return True


def _complete_engine(ctx: _Ctx, x, label, eps_raw, lower, upper, adv, t_end) -> dict:
    """``beta-crown``: branch and bound on the engine (:mod:`.engine.bab`) between the
    CROWN radius ``lower`` and the attacks' ``upper``; every witness is re-checked by the
    model and an exact W1."""
    from flowverify.verification.engine.bab import SplitBab

    e_max = float(_e_max(x[None])[0])
    inv = 1.0 / x.sum(axis=(-2, -1)) if ctx.input_scale == "normalised" else None
    bab = SplitBab(
        ctx.graph, x, label, feasible=ctx.method == "complete", inv_scale=inv, device=ctx.device
    )
    hi = upper if math.isfinite(upper) else e_max
    out = {"solver_status": "beta-crown", "witness": adv, "message": None}
    if eps_raw is None:
        res = bab.radius(lower, hi, adv, deadline=t_end, rtol=ctx.rtol)
        lower, witness = res.lower, res.witness
        out["exact"] = res.exact and witness is not None
        if not out["exact"]:
            out["message"] = (res.message or "time limit reached") + (
                f"; the exact radius lies in [{res.lower:.6g}, {res.upper:.6g}] (raw)"
            )
    else:
        out["exact"] = False
        witness = adv if upper <= eps_raw else None
        if lower < eps_raw and witness is None:
            dec = bab.decide(eps_raw, deadline=t_end)
            if dec.status == "certified":
                lower = eps_raw
            elif dec.status == "falsified":
                witness = dec.witness
            else:
                out["message"] = f"branch and bound: {dec.message}"
    if witness is not None and witness is not adv:
        ok = _predict(ctx.model, witness[None], ctx.flat, ctx.input_scale)[0] != label
        w1 = float(w1_distance(witness, x, unit="raw")) if ok else math.inf
        if w1 < upper:
            upper, adv = w1, witness
        if eps_raw is not None and not w1 <= eps_raw:
            out["message"] = "branch and bound: its witness did not survive the re-check"
    out.update(lower=lower, upper=upper, witness=adv, nodes=bab.nodes)
    if out["exact"] and not upper <= lower * (1 + ctx.rtol):
        out["exact"] = False  # the witness did not survive the re-check
    return out


# ------------------------------------------------------------------------------- driver


def _result(ctx, i, index, label, pred, names, **kw) -> CertifyResult:
    return CertifyResult(
        index=int(index),
        label=int(label),
        prediction=int(pred),
        method=ctx.method,
        certifier=ctx.certifier,
        references=list(names),
        **kw,
    )


def _iter_certify(model, *args, **kwargs) -> Iterator[CertifyResult]:
    """Generator form of :func:`certify` (one result per image, in order).

    A given ``nn.Module`` is run in eval mode; the training flags of its modules are
    restored when the generator ends (or is closed).
    """
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    try:
        yield from _iter_certify_modes(model, *args, **kwargs)
    finally:
        for mod, training in modes:
            mod.train(training)


def _iter_certify_modes(
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
) -> Iterator[CertifyResult]:
    _check_choice(method, "method", METHODS)
    if method == "smoothing":
        raise ValueError(
            "method: 'smoothing' certifies a smoothed classifier; call flowverify.certify "
            "(or flowverify.baselines.smoothing.smoothed_certify) with sigma=..."
        )
    certifier = _resolve_certifier(method, certifier)
    _check_choice(unit, "unit", UNITS)
    _check_choice(input_scale, "input_scale", INPUT_SCALES)
    eps = _check_positive(eps, "eps", allow_zero=True)
    timeout = _check_positive(timeout, "timeout")
    rtol = float(_check_positive(rtol, "rtol", allow_none=False))
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    dev = check_device(device)
    x = _check_images(images)
    n = x.shape[0]
    if data is not None:
        data = _check_images(data)
        if data.shape[1:] != x.shape[1:]:
            raise ValueError(f"data: expected images of shape {x.shape[1:]}, got {data.shape[1:]}")
    idx = _check_indices(indices, n)
    net_model, model64, flat, num_classes, graph = _prepare_model(
        model, x, method, certifier, input_scale
    )
    pred = _predict(net_model, x, flat, input_scale, check=True)
    lab = check_labels(labels, n, num_classes, pred)
    # resolve references once per image (data:K excludes the image itself)
    ref_sets = (
        [
            parse_references(
                references,
                data=data,
                exclude_index=int(idx[i]) if data is not None else None,
                seed=int(seed),
            )
            for i in range(n)
        ]
        if n
        else []
    )
    if n and len(ref_sets[0]) > 1:
        _warn_references(method, certifier, [r.name for r in ref_sets[0]])
    ctx = _Ctx(
        net_model,
        model64,
        method,
        certifier,
        input_scale,
        dev,
        rtol,
        timeout,
        flat,
        num_classes,
        int(seed),
        graph.to(dev),
    )
    step = 1 if method.startswith("complete") else int(batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"certify {method}", unit="img", leave=False)
    try:
        for s in range(0, n, step):
            sel = np.arange(s, min(n, s + step))
            yield from _certify_chunk(ctx, x, lab, pred, idx, ref_sets, sel, eps, unit)
            if bar is not None:
                bar.update(len(sel))
    finally:
        if bar is not None:
            bar.close()


def references_note(method: str, certifier: str, n_refs: int) -> str | None:
    """Why ``n_refs`` references change nothing for ``method``/``certifier`` (``None``
    for one reference, or for smoothing, which ignores them with its own warning)."""
    if n_refs <= 1 or method == "smoothing":
        return None
    if method.startswith("complete"):
        return (
            f"method {method!r} uses the first of the {n_refs} references only: its exact "
            "radius does not depend on the reference"
        )
    return (
        f"method {method!r} (certifier {certifier!r}) does not depend on the reference "
        f"(docs/REPRODUCTION.md): the radius is computed once and reported for each of the "
        f"{n_refs} references"
    )


def _warn_references(method: str, certifier: str, names: list[str]) -> None:
    note = references_note(method, certifier, len(names))
    if note is not None:
        warnings.warn(f"references: {note}", UserWarning, stacklevel=5)


def _prepare_model(model, x: np.ndarray, method: str, certifier: str, input_scale: str):
    """Check that ``method``/``certifier`` can certify ``model`` on images like ``x``
    (raising a ValueError naming the layer or operator, before any work) and return
    ``(model, float64 copy, flat, number of classes, engine graph)``."""
    net_model = _resolve_model(model)
    try:
        _check_architecture(net_model)
        chain_error = None
    except ValueError as exc:
        chain_error = exc
    flat = _infer_flat(net_model)
    num_classes = _probe_model(net_model, x, flat, input_scale)
    if chain_error is not None and not (
        (method in ENGINE_METHODS and certifier in ENGINE_CERTIFIERS) or certifier == "beta-crown"
    ):
        raise ValueError(
            f"method: {method!r} with certifier {certifier!r} needs a chain of Linear, "
            f"Conv2d and ReLU layers ({chain_error}); vanilla and feasible with "
            "certifier='crown' certify this model through the bound-propagation engine"
        )
    model64 = copy.deepcopy(net_model).to(torch.float64).eval()
    for p in model64.parameters():
        p.requires_grad_(False)
    graph = _engine_graph(model64, x, flat, input_scale)
    return net_model, model64, flat, num_classes, graph


def check_certifiable(
    model,
    images,
    *,
    method: str = "vanilla",
    certifier: str | None = None,
    input_scale: str = "raw",
) -> None:
    """Raise, before any work, if ``method``/``certifier`` cannot certify ``model``.

    The checks :func:`certify` makes before it starts (the images, the model's layers or
    operators, its logits), without certifying anything: a command line tool calls it
    once up front instead of reporting the same refusal for every image.

    Parameters
    ----------
    model : torch.nn.Module or str
        As for :func:`certify`.
    images : ndarray or Tensor
        A few images of the data (the first one is run through the model).
    method, certifier, input_scale : str
        As for :func:`certify` (``"smoothing"`` takes any model: only the images are
        checked).

    Raises
    ------
    ValueError, TypeError
        Naming the argument (``images``, ``model``, ``method``, ``certifier``) and what
        was expected.
    """
    _check_choice(method, "method", METHODS)
    _check_choice(input_scale, "input_scale", INPUT_SCALES)
    x = _check_images(images)
    if method == "smoothing":
        return
    certifier = _resolve_certifier(method, certifier)
    net_model = _resolve_model(model)
    modes = [(m, m.training) for m in net_model.modules()]
    try:
        _prepare_model(net_model, x[:1], method, certifier, input_scale)
    finally:
        for mod, training in modes:
            mod.train(training)


def _engine_graph(model64, x, flat, input_scale):
    """The float64 model as a graph for the engine (raises, naming the operator, before
    any work)."""
    from flowverify.verification.engine import build_graph

    xin = torch.as_tensor(x[:1], dtype=torch.float64)
    scale = xin.sum(dim=(-2, -1)) if input_scale == "normalised" else None
    param = next(iter(model64.parameters()), None)
    if param is not None:
        xin = xin.to(param.device)
    return build_graph(model64, _model_input(xin, scale, flat))


def _model_dtype(model: nn.Module) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


#: Torch runs single-threaded while certifying fewer than ``SMALL_BATCH`` images (the
#: complete methods: one image per chunk) of a model whose layers all have fewer entries
#: than ``SMALL_LAYER``: such small matrix products lose more to waking BLAS threads than
#: they gain (the heavy kernels are numba's, with their own threads).  Batches keep every
#: thread (measured: fc vanilla 178 -> 207 images/s, cnn vanilla 0.30 -> 0.18 s/image).
SMALL_LAYER = 1_000_000
SMALL_BATCH = 8


@contextlib.contextmanager
def _torch_threads(ctx: _Ctx, n_images: int):
    params = [p.numel() for p in ctx.model64.parameters()]
    small = (
        ctx.device.type == "cpu" and n_images < SMALL_BATCH and max(params, default=0) < SMALL_LAYER
    )
    prev = torch.get_num_threads()
    if small and prev > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def _certify_chunk(ctx, x, lab, pred, idx, ref_sets, sel, eps, unit) -> Iterator[CertifyResult]:
    with _torch_threads(ctx, len(sel)):
        out = _certify_chunk_results(ctx, x, lab, pred, idx, ref_sets, sel, eps, unit)
    yield from out


def _certify_chunk_results(ctx, x, lab, pred, idx, ref_sets, sel, eps, unit):
    t0 = time.perf_counter()
    ok = sel[pred[sel] == lab[sel]]
    mass = _mass(x)
    out: dict[int, CertifyResult] = {}
    for i in sel:
        if pred[i] != lab[i]:
            names = [r.name for r in ref_sets[i]]
            out[i] = _result(
                ctx,
                i,
                idx[i],
                lab[i],
                pred[i],
                names,
                status=Status.MISCLASSIFIED,
                radius=0.0,
                radius_raw=0.0,
                per_reference={nm: 0.0 for nm in names},
                lower=0.0,
                mass=float(mass[i]),
                eps=eps,
                eps_raw=None if eps is None else _eps_raw(eps, unit, mass[i]),
            )
    if ok.size:
        try:
            if ctx.method.startswith("complete"):
                for i in ok:
                    out[i] = _complete_result(ctx, x, lab, pred, idx, ref_sets, i, eps, unit)
            else:
                out.update(_incomplete_results(ctx, x, lab, pred, idx, ref_sets, ok, eps, unit))
        except (KeyboardInterrupt, NotImplementedError):
            raise
        except Exception as exc:  # one failing batch must not stop the run
            raise_if_interrupted(exc)
            logger.exception("certify: batch %s failed", idx[ok].tolist())
            for i in ok:
                names = [r.name for r in ref_sets[i]]
                out[i] = _result(
                    ctx,
                    i,
                    idx[i],
                    lab[i],
                    pred[i],
                    names,
                    status=Status.ERROR,
                    radius=0.0,
                    radius_raw=0.0,
                    mass=float(mass[i]),
                    message=f"{type(exc).__name__}: {exc}",
                )
    per = (time.perf_counter() - t0) / max(len(sel), 1)
    results = []
    for i in sel:
        res = out[i]
        if not res.seconds:
            res.seconds = per
        results.append(res)
    return results


def _eps_raw(eps: float, unit: str, mass: float) -> float:
    return eps * mass if unit == "normalised" else eps


def _incomplete_results(ctx, x, lab, pred, idx, ref_sets, ok, eps, unit):
    mass = _mass(x[ok])
    eps_raw = None if eps is None else np.array([_eps_raw(eps, unit, m) for m in mass])
    n_refs = len(ref_sets[ok[0]])
    radii = np.zeros((n_refs, ok.size))
    conv = np.ones((n_refs, ok.size), dtype=bool)
    # No certifier here depends on the reference (module docstring): the engine works on
    # images, and the LP over the fused chain of any reference has the same optimum.  So
    # one computation fills every reference's slot.
    lp = ctx.certifier == "lp"
    radii[:], conv[:] = _engine_radii(
        ctx, x[ok], lab[ok], eps_raw, certifier="crown" if lp else ctx.certifier
    )
    if lp:  # the LP reads the fused chain of the first reference
        refs = np.stack([_build_ref(ref_sets[i][0], x[i]) for i in ok])
        radii[:], conv[:] = _lp_radii(ctx, x[ok], refs, lab[ok], eps_raw, radii[0].copy())
    best = radii.argmax(axis=0)
    out = {}
    fals = np.zeros(ok.size, dtype=bool)
    adv = None
    if eps_raw is not None:
        cert = radii.max(axis=0) >= eps_raw
        todo = np.flatnonzero(~cert)
        if todo.size:
            margin_fn = _model_margins(ctx, lab[ok[todo]])
            f_ok, f_img = _fw_attack(ctx, margin_fn, x[ok[todo]], lab[ok[todo]], eps_raw[todo])
            fals[todo] = f_ok
            adv = dict(zip(todo.tolist(), f_img, strict=True))
    for k, i in enumerate(ok):
        names = [r.name for r in ref_sets[i]]
        r_raw = float(radii[best[k], k])
        per_ref = {nm: float(radii[j, k] / mass[k]) for j, nm in enumerate(names)}
        kw = dict(
            radius=r_raw / mass[k],
            radius_raw=r_raw,
            per_reference=per_ref,
            lower=r_raw / mass[k],
            mass=float(mass[k]),
            best_reference=names[best[k]],
            converged=bool(conv[best[k], k]),
        )
        if eps_raw is None:
            timed_out = ctx.timeout is not None and not kw["converged"]
            status = Status.CERTIFIED if r_raw > 0 and not timed_out else Status.UNKNOWN
            if timed_out:
                kw["message"] = "time limit reached: radius is the proven lower bound so far"
            elif not kw["converged"]:
                kw["message"] = (
                    f"radius search stopped at its probe limit before reaching rtol={ctx.rtol}:"
                    " radius is the largest radius certified so far"
                )
            elif r_raw <= 0:
                kw["message"] = "the relaxation certifies no positive radius"
        else:
            kw.update(eps=float(eps_raw[k] / mass[k]), eps_raw=float(eps_raw[k]))
            if r_raw >= eps_raw[k]:
                status = Status.CERTIFIED
            elif fals[k]:
                status = Status.FALSIFIED
                img = adv[k]
                w1 = float(w1_distance(img, x[i], unit="raw"))
                kw.update(witness=img, upper=w1 / mass[k], upper_raw=w1, witness_kind="within-eps")
            else:
                status = Status.UNKNOWN
        out[i] = _result(ctx, i, idx[i], lab[i], pred[i], names, status=status, **kw)
    return out


def _build_ref(ref: Reference, image: np.ndarray) -> np.ndarray:
    return np.asarray(ref.build(image), dtype=np.float64)


def _complete_result(ctx, x, lab, pred, idx, ref_sets, i, eps, unit) -> CertifyResult:
    t0 = time.perf_counter()
    refs = ref_sets[i]
    mass = float(_mass(x[i : i + 1])[0])
    ref = _build_ref(refs[0], x[i])
    e_raw = None if eps is None else _eps_raw(eps, unit, mass)
    res = _complete_one(
        ctx, x[i], int(lab[i]), ref, e_raw if ctx.certifier == "beta-crown" else None
    )
    lower, upper = res["lower"], res["upper"]
    kw: dict[str, Any] = dict(
        radius=lower / mass,
        radius_raw=lower,
        per_reference={refs[0].name: lower / mass},
        lower=lower / mass,
        upper=upper / mass,
        upper_raw=upper,
        mass=mass,
        best_reference=refs[0].name,
        solver_status=res["solver_status"],
        exact=bool(res["exact"]),
        message=res.get("message"),
        nodes=res.get("nodes"),
    )
    names = [refs[0].name]
    if eps is None:
        status = Status.CERTIFIED if res["exact"] and lower > 0 else Status.UNKNOWN
        if res["exact"]:
            kw["witness"] = res["witness"]
    else:
        e_raw = _eps_raw(eps, unit, mass)
        kw.update(eps=e_raw / mass, eps_raw=e_raw)
        if lower >= e_raw and lower > 0:
            status = Status.CERTIFIED
        elif upper <= e_raw and res["witness"] is not None:
            status = Status.FALSIFIED
            kw["witness"] = res["witness"]
        else:
            status = Status.UNKNOWN
    if res.get("message") and not res["exact"] and eps is None:
        status = Status.UNKNOWN
    if status == Status.UNKNOWN and res["witness"] is not None and math.isfinite(upper):
        kw["witness"] = res["witness"]  # the closest adversarial image found: not a proof
    if kw.get("witness") is not None:
        kw["witness_kind"] = {
            Status.FALSIFIED: "within-eps",
            Status.UNKNOWN: "closest-found",
        }.get(status, "closest")
    kw["seconds"] = time.perf_counter() - t0
    return _result(ctx, i, idx[i], lab[i], pred[i], names, status=status, **kw)


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
        Images per batch of the incomplete methods.
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
        _iter_certify(
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
    from flowverify.baselines.smoothing import smoothed_certify

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
