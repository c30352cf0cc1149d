"""What every certification method shares: the options resolved once per call
(:class:`_Ctx`), the flow-domain problem of a batch (Corollary 2.1), the grid diameter,
predictions, deadlines, unit conversion and the result record of one image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.core.validation import model_device, model_dtype
from flowverify.model.flow_model import (
    FlowModel,
)
from flowverify.transport.flows import inverse_flow
from flowverify.transport.references import Reference
from flowverify.verification import flownet as _flownet
from flowverify.verification._chain import affine_chain
from flowverify.verification.checks import INVERSE_METHOD, _model_input, _prefix
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


def _problem(ctx: _Ctx, x: np.ndarray, refs: np.ndarray, labels: np.ndarray):
    """FlowNet and Batch for images ``x (n, C, H, W)`` with references ``refs``."""
    n, c, h, w = x.shape
    fm = FlowModel(ctx.model64, torch.as_tensor(refs), input_scale=ctx.input_scale, fuse=True)
    chain0 = affine_chain(fm, 0)
    scale = fm.scale.detach().to(torch.float64).cpu()  # (n, C)
    net = _flownet.FlowNet.from_chain(chain0, (c, h, w), scale=scale[0].numpy(), device=ctx.device)
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
    batch = _flownet.Batch.build(net, centre, 1.0 / scale.numpy(), x.reshape(n, -1), labels)
    return net, batch


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
