"""Methods, certifiers and units of :func:`flowverify.certify`, and the checks of its
arguments at the library's boundary (each raised before any work, naming the argument).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowverify.core.validation import (
    channel_last_hint,
    check_logits,
    model_device,
    model_dtype,
    model_errors,
)
from flowverify.model.flow_model import (
    _modules_in_order,
    first_affine_layer,
)

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
    xin = torch.as_tensor(x[:1])
    scale = xin.sum(dim=(-2, -1)) if input_scale == "normalised" else None
    inp = _model_input(xin, scale, flat).to(dtype=model_dtype(model), device=model_device(model))
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


def _e_max(x: np.ndarray) -> np.ndarray:
    """Raw radius that contains every image of the same masses: ``Σ_c s_c (H + W - 2)``."""
    h, w = x.shape[-2:]
    return x.sum(axis=(1, 2, 3)) * (h + w - 2)
