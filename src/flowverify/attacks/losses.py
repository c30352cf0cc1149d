r"""Adversarial losses of the attack and its in-loop success test (paper section 4).

Algorithm 1 minimises an adversarial loss of the logits :math:`\tilde f(\delta)` of the
perturbed image; the paper's is the margin

.. math::

    L(\delta) = \tilde f_y(\delta) - \max_{t \ne y} \tilde f_t(\delta),

negative exactly where the image is misclassified.  This module holds the losses the
attack offers (:data:`LOSSES`), the margin they build on, and the test by which a run
counts an iterate as adversarial (:func:`fooled`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "adversarial_loss", "fooled", "margin"]

#: Adversarial losses (minimised): ``ce`` = minus the cross-entropy, ``margin`` =
#: f_y - max_{t≠y} f_t (the paper's; Carlini-Wagner, also accepted as ``cw``),
#: ``dlr`` = margin / (z_(1) - z_(3)) (Croce-Hein).
LOSSES = ("ce", "margin", "cw", "dlr")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{t != y} f_t`` per row of ``logits (N, K)`` (negative: misclassified)."""
    zy = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return zy - other.max(1).values


def fooled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """In-loop success: another class wins by a relative margin of ``1e-5``.

    The margin keeps a claimed success robust to the rounding of the final image (float64
    repair, cast to the model's dtype); the re-check by a forward pass decides anyway.
    """
    gap = margin(logits.detach(), labels)
    scale = logits.detach().abs().amax(1).clamp(min=1.0)
    return gap < -1e-5 * scale


def adversarial_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image adversarial loss (to be minimised; negative margin = misclassified)."""
    if name in ("margin", "cw"):
        return margin(logits, labels)
    if name == "ce":
        return -F.cross_entropy(logits, labels, reduction="none")
    top = logits.sort(dim=1, descending=True).values
    return margin(logits, labels) / (top[:, 0] - top[:, 2]).clamp(min=1e-12)
