r"""The batch under attack: normalised images, reference flow and clean predictions (section 4).

Before Algorithm 1 runs, :func:`prepare` scales each image to mass 1 per channel (the
normalised unit of the budgets), sets the pixel upper bound of the threat model, builds the
reference :math:`R` and the flow :math:`\delta_\mu = \Delta^{-1}(R, \mu)` when one is asked
for, and classifies the clean images.  The resulting :class:`Context` is what every stage of
the attack reads (and where the once-per-batch DeepFool-W1 run and anchor are cached).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowverify.attacks.descent import Run
from flowverify.attacks.objective import Objective
from flowverify.core.validation import (
    channel_last_hint,
    check_labels,
    check_logits,
    model_errors,
)
from flowverify.transport.flows import flow_dim, inverse_flow
from flowverify.transport.references import make_reference

__all__ = ["Context", "prepare", "reference_flow"]


@dataclass
class Context:
    objective: Objective
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
    deepfool: Run | None = None  # DeepFool-W1 of the images that needed it (batch-sized)
    deepfool_done: torch.Tensor | None = None  # (N,) which rows of ``deepfool`` are computed
    anchor: tuple[torch.Tensor, ...] | None = None  # see flowverify.attacks.budget.anchor
    anchor_done: torch.Tensor | None = None  # (N,) which rows of ``anchor`` are computed

    @property
    def flow_shape(self) -> tuple[int, int]:
        return self.mu.shape[1], flow_dim(self.mu.shape[-2], self.mu.shape[-1])


def reference_flow(fm_reference, kind, mu_data, dtype, device, seed):
    """``R`` (data units) and ``δµ = Δ⁻¹(R, µ)`` (minimal flow) as tensors.

    ``fm_reference``: the reference of a FlowModel given as the model, else ``kind`` (a
    reference kind or an image array, see :func:`flowverify.make_reference`).
    """
    if fm_reference is not None:
        ref = fm_reference.detach().to("cpu", torch.float64).numpy()
        if ref.shape[0] not in (1, mu_data.shape[0]) or ref.shape[1:] != mu_data.shape[1:]:
            raise ValueError(
                f"model: the FlowModel's reference {tuple(ref.shape)} does not match "
                f"the images {tuple(mu_data.shape)}"
            )
    else:
        if isinstance(kind, torch.Tensor):
            kind = kind.detach().cpu().numpy()
        try:
            ref = make_reference(kind, mu_data, seed=seed)
        except (ValueError, TypeError) as exc:  # make_reference names its `kind`
            msg = str(exc).removeprefix("kind: ")
            raise type(exc)(f"reference: {msg}") from None
    dmu = inverse_flow(np.broadcast_to(ref, mu_data.shape), mu_data, method="minimal")
    reference = torch.as_tensor(np.ascontiguousarray(ref), dtype=dtype, device=device)
    return reference, torch.as_tensor(dmu, dtype=dtype, device=device)


def prepare(
    model, mu_data, labels, device, dtype, fm_reference, how, *, clip_max, reference, seed
) -> Context:
    """The :class:`Context` of the images ``mu_data`` (float64, data units).

    ``how`` is ``(input_scale, fuse, flat)``; ``reference``: the attack's reference
    argument (``None``: ``R = µ`` unless the model is a FlowModel with ``fm_reference``).
    """
    input_scale, fuse, flat = how
    n, c, height, width = mu_data.shape
    mass64 = mu_data.sum(axis=(2, 3))  # (N, C), data units
    mass = torch.as_tensor(mass64, dtype=dtype, device=device)
    mu = torch.as_tensor(mu_data / mass64[:, :, None, None], dtype=dtype, device=device)
    upper = None
    if clip_max is not None:
        upper = torch.as_tensor(clip_max / mass64, dtype=dtype, device=device)
        upper = upper[:, :, None, None]
    # Reference (Algorithm 1 literally) or R = µ.
    ref = delta_mu = None
    if fm_reference is not None or reference is not None:
        ref, delta_mu = reference_flow(fm_reference, reference, mu_data, dtype, device, seed)
    objective = Objective(
        model,
        mass,
        input_scale=input_scale,
        flat=flat,
        reference=ref,
        delta_mu=delta_mu,
        fuse=fuse,
    )
    with torch.no_grad():
        zero = torch.zeros(n, c, flow_dim(height, width), dtype=dtype, device=device)
        with model_errors((c, height, width), channel_last_hint((n, c, height, width))):
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
    return Context(
        objective=objective,
        mu=mu,
        labels=torch.as_tensor(y, device=device),
        upper=upper,
        generator=torch.Generator(device=device).manual_seed(seed),
        model=model,
        mu_data=mu_data,
        mass64=mass64,
        y=y,
        prediction=prediction.cpu().numpy(),
        input_scale=input_scale,
        flat=flat,
    )
