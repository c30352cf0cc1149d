"""What every certification method shares: the options resolved once per call
(:class:`_Ctx`), the grid diameter, predictions, deadlines, unit conversion and the
result record of one image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.core.validation import model_device, model_dtype
from flowverify.transport.references import Reference
from flowverify.verification.checks import _model_input
from flowverify.verification.result import CertifyResult


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
    #: Upper bounds for complete methods: ``(model, x, label, *, input_scale, seed,
    #: device) -> adversarial image or None`` (see :func:`~.falsify._adversary_upper`).
    adversary: Any = None


def _mass(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(-2, -1)).max(axis=-1)


def _predict(
    model: nn.Module, x: np.ndarray, flat: bool, input_scale: str, check: bool = False
) -> np.ndarray:
    """The model's classes on images ``x`` in data units (divided by their mass per
    channel when ``input_scale="normalised"``)."""
    dtype, dev = model_dtype(model), model_device(model)
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


def _eps_raw(eps: float, unit: str, mass: float) -> float:
    return eps * mass if unit == "normalised" else eps


def _build_ref(ref: Reference, image: np.ndarray) -> np.ndarray:
    return np.asarray(ref.build(image), dtype=np.float64)
