r"""Wasserstein projected gradient descent in the flow domain (paper section 4, Algorithm 1).

:class:`WassersteinPGD` is the attack and :func:`attack` its functional form: they validate
the settings (:mod:`flowverify.attacks.arguments`), prepare a batch and run one of the two
modes.  For an image :math:`\mu` of class :math:`y`, a reference :math:`R` and a flow
:math:`\delta_\mu` with :math:`R + A\delta_\mu = \mu`, the attack minimises an
adversarial loss (:mod:`flowverify.attacks.losses`), by default the margin

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
first layer of Corollary 2.1) can be asked for to run Algorithm 1 literally
(:mod:`flowverify.attacks.objective`).

The stages, one module each:

* :mod:`flowverify.attacks.context`: the batch, normalised, with its reference;
* :mod:`flowverify.attacks.descent`: the iteration of Algorithm 1 (gradient step, then the
  feasible-point map onto :math:`S`) and its random restarts;
* :mod:`flowverify.attacks.budget`: the fixed-budget mode (``eps`` given), with the
  fallback to the closest adversarial found without a budget;
* :mod:`flowverify.attacks.minimal`: the minimal-radius mode (``eps=None``), from
  DeepFool-W1 (:mod:`flowverify.attacks.deepfool`) and the budget schedule, shrunk
  (:mod:`flowverify.attacks.shrink`);
* :mod:`flowverify.attacks.finalise`: the returned images, re-checked by a forward pass of
  the original model, with their exact W1 and certificate
  (:class:`~flowverify.attacks.result.AttackResult`).

Units: budgets and radii are *normalised* (the image scaled to mass 1 per channel, the
unit of the paper and of the attack literature; L1 ground cost between pixel
coordinates, whole grid).  ``w1_raw`` is in the units of the data (raw = mass x
normalised for one channel).  Internally the flows act on the normalised image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.attacks.arguments import (
    check_choice,
    check_clip_max,
    check_eps,
    check_images,
    check_int,
    check_reference,
    check_seed,
    check_step_size,
)
from flowverify.attacks.budget import fixed
from flowverify.attacks.context import prepare
from flowverify.attacks.descent import SCHEDULES
from flowverify.attacks.finalise import finalise
from flowverify.attacks.losses import LOSSES
from flowverify.attacks.minimal import candidates, closest
from flowverify.attacks.result import AttackResult
from flowverify.core.validation import check_device, model_dtype
from flowverify.model.flow_model import INPUT_SCALES, FlowModel, _infer_flat

__all__ = ["WassersteinPGD", "attack"]


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
        self.eps = check_eps(eps)
        self.steps = check_int(steps, "steps", 1)
        self.step_size = check_step_size(step_size)
        self.loss = check_choice(loss, "loss", LOSSES)
        self.schedule = check_choice(schedule, "schedule", SCHEDULES)
        self.restarts = check_int(restarts, "restarts", 0)
        self.search_steps = check_int(search_steps, "search_steps", 0)
        self.clip_max = check_clip_max(clip_max)
        self.input_scale = check_choice(input_scale, "input_scale", INPUT_SCALES)
        self.reference = check_reference(reference)
        self.fuse = bool(fuse)
        if fuse and reference is None:
            raise ValueError("fuse: fusion needs a reference (reference='uniform', ...)")
        self.seed = check_seed(seed)
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
        dtype = model_dtype(model)
        mu_data = check_images(images)
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
        n, c, height, width = mu_data.shape
        t_start = time.perf_counter()
        ctx = prepare(
            model,
            mu_data,
            labels,
            device,
            dtype,
            fm_reference,
            how,
            clip_max=self.clip_max,
            reference=self.reference,
            seed=self.seed,
        )
        setup = time.perf_counter() - t_start
        clip = self.clip_max
        rows: list[dict[str, np.ndarray]] = []
        if self.eps is None:
            t0 = time.perf_counter() - setup
            cands = [
                finalise(ctx, flow, found, eps_found, iters, t0, minimal=True, clip_max=clip)
                for flow, found, eps_found, iters in candidates(self, ctx)
            ]
            rows.append(closest(cands, time.perf_counter() - t0))
        else:
            prev = None
            for eps in self.eps:
                t0 = time.perf_counter() - setup
                setup = 0.0  # counted once, with the first budget
                # Every image of the same masses lies within normalised W1 C * (H + W - 2):
                # a larger budget reaches the same set (and may overflow the dtype).
                cap = float(c * (height + width - 2))
                radius = torch.full((n,), min(eps, cap), dtype=dtype, device=device)
                flow, found, iters = fixed(self, ctx, radius, prev)
                eps_arr = np.full(n, eps)
                row = finalise(ctx, flow, found, eps_arr, iters, t0, minimal=False, clip_max=clip)
                rows.append(row)
                prev = (flow, found, flow.abs().flatten(1).sum(1))
        cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return AttackResult(
            threat_model=self.threat_model,
            mode="minimal" if self.eps is None else "fixed",
            config=self.config(),
            **cat,
        )


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
