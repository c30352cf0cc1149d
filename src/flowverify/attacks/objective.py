r"""The function the attack differentiates: the model at perturbed images (paper section 4).

Algorithm 1 attacks :math:`\tilde f(\delta) = f(R + A\delta)`.  Writing
:math:`\delta = \delta_\mu + w`, the perturbed image is :math:`\mu + Aw`; with the default
reference :math:`R = \mu` (:math:`\delta_\mu = 0`) the logits are those of the model on that
image, otherwise they come from a :class:`~flowverify.model.flow_model.FlowModel` on the flow
:math:`\delta` (optionally with the first affine layer fused, Corollary 2.1).
:class:`Objective` gives both, for any subset of the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from flowverify.model.flow_model import FlowModel

__all__ = ["Objective"]


class Objective:
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
