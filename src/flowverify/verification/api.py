r"""Certified and exact W1 radii of a batch of images: the driver behind
:func:`flowverify.certify` (SPEC section 4).

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
    dual, :func:`~flowverify.verification.polytope.polytope_gain`), or the LP relaxation solved
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
``rtol`` (:func:`~flowverify.verification.search.search_radius`); the reported value is the
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
import itertools
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.core.results import Status
from flowverify.core.validation import (
    check_device,
    check_indices,
    check_labels,
)
from flowverify.model.flow_model import (
    INPUT_SCALES,
    _infer_flat,
)
from flowverify.transport.references import parse_references
from flowverify.verification.checks import (
    ENGINE_CERTIFIERS,
    ENGINE_METHODS,
    METHODS,
    UNITS,
    _check_architecture,
    _check_choice,
    _check_images,
    _check_positive,
    _model_input,
    _probe_model,
    _resolve_certifier,
    _resolve_model,
)
from flowverify.verification.context import _Ctx, _eps_raw, _mass, _predict, _result
from flowverify.verification.exact_driver import _complete_result
from flowverify.verification.incomplete import _incomplete_results
from flowverify.verification.result import CertifyResult

__all__ = ["check_certifiable", "references_note"]

logger = logging.getLogger(__name__)


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
    adversary=None,
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
    idx = check_indices(indices, n)
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
        adversary,
    )
    step = 1 if method.startswith("complete") else int(batch_size)
    # chunks of nearly equal size (97 images in batches of 32: 25, 24, 24, 24, not a last
    # batch of one, whose probes would each cost a whole batch's fixed overhead)
    chunks = np.array_split(np.arange(n), -(-n // step)) if n else []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"certify {method}", unit="img", leave=False)
    try:
        for sel in chunks:
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
    key = (_weights_key(net_model), tuple(x.shape[1:]), flat, input_scale)
    with _ENGINE_LOCK:
        kept = _ENGINE_MODELS.get(net_model)
    if kept is not None and kept[0] == key:
        return net_model, kept[1], flat, num_classes, kept[2]
    model64 = copy.deepcopy(net_model).to(torch.float64).eval()
    for p in model64.parameters():
        p.requires_grad_(False)
    graph = _engine_graph(model64, x, flat, input_scale)
    with _ENGINE_LOCK:
        _ENGINE_MODELS[net_model] = (key, model64, graph)
    return net_model, model64, flat, num_classes, graph


#: Per user model (weakly held): its float64 copy and engine graph (with the graph's
#: front map, built on first use), reused by later calls while :func:`_weights_key` is
#: unchanged.  Measured: building them takes ~40 ms per call on the bundled ``cnn``.
_ENGINE_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINE_LOCK = threading.Lock()


def _weights_key(model) -> tuple:
    """What a change of the model's layers or weights changes: every submodule, and every
    parameter's and buffer's storage, version counter (bumped by in-place updates such
    as an optimiser step or ``load_state_dict``), dtype, shape and device."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return tuple(id(m) for m in model.modules()) + tuple(
        (t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)) for t in tensors
    )


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


#: Torch runs single-threaded while an incomplete method certifies fewer than
#: ``SMALL_BATCH`` images of a model whose layers all have fewer entries than
#: ``SMALL_LAYER``: such small matrix products lose more to waking BLAS threads than they
#: gain (the heavy kernels are numba's, with their own threads).  Batches keep every
#: thread (measured: fc vanilla 178 -> 207 images/s, cnn vanilla 0.30 -> 0.18 s/image),
#: and so do the complete methods, which bound batches of subdomains of one image
#: (measured, ad-hoc, 30 s per digit: 0-25% more subdomains on fc, 13-69% on the VNN-COMP
#: 256x2 net).
SMALL_LAYER = 1_000_000
SMALL_BATCH = 8


@contextlib.contextmanager
def _torch_threads(ctx: _Ctx, n_images: int):
    params = [p.numel() for p in ctx.model64.parameters()]
    small = (
        ctx.device.type == "cpu"
        and not ctx.method.startswith("complete")
        and n_images < SMALL_BATCH
        and max(params, default=0) < SMALL_LAYER
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

    def zero(i, status, **kw) -> CertifyResult:  # a record of radius 0 (no certificate)
        names = [r.name for r in ref_sets[i]]
        return _result(
            ctx, i, idx[i], lab[i], pred[i], names, status=status, radius=0.0,
            radius_raw=0.0, mass=float(mass[i]), **kw,
        )  # fmt: skip

    for i in sel:
        if pred[i] != lab[i]:
            out[i] = zero(
                i,
                Status.MISCLASSIFIED,
                per_reference={r.name: 0.0 for r in ref_sets[i]},
                lower=0.0,
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
                out[i] = zero(i, Status.ERROR, message=f"{type(exc).__name__}: {exc}")
    per = (time.perf_counter() - t0) / max(len(sel), 1)
    results = []
    for i in sel:
        res = out[i]
        if not res.seconds:
            res.seconds = per
        results.append(res)
    return results
