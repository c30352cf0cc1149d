"""Inference of the per-sample input shape a classifier expects, read from its first
informative layer and checked with a forward pass."""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

from flowverify.core.validation import model_device, model_dtype
from flowverify.model.layers import Elementwise, flat_layers

__all__ = ["DEFAULT_IMAGE_SHAPE", "model_input_shape"]

#: The per-sample shape assumed when the layers do not tell (an MNIST digit).
DEFAULT_IMAGE_SHAPE = (1, 28, 28)


_SHAPE_PRESERVING = (
    nn.ReLU,
    nn.Identity,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    Elementwise,
)


def _shape_from_features(d: int) -> tuple[int, ...]:
    s = math.isqrt(d)
    if s * s == d:
        return (1, s, s)
    if d % 3 == 0 and math.isqrt(d // 3) ** 2 == d // 3:
        s = math.isqrt(d // 3)
        return (3, s, s)
    return (d,)


def _guess_shape(model: nn.Module) -> tuple[int, ...] | None:
    hinted = getattr(model, "flowverify_input_shape", None)
    if hinted is not None:
        return tuple(int(s) for s in hinted)
    if isinstance(model, nn.Sequential):
        layers = flat_layers(model)
    else:  # e.g. an onnx2torch GraphModule: leaf modules in registration order
        layers = [m for m in model.modules() if next(m.children(), None) is None]
    seen_flatten = False
    seen_spatial = False
    for m in layers:
        if isinstance(m, _SHAPE_PRESERVING):
            continue
        if isinstance(m, nn.Flatten):
            seen_flatten = True
            continue
        if isinstance(m, nn.ZeroPad2d | nn.MaxPool2d | nn.AvgPool2d):
            seen_spatial = True
            continue
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, *DEFAULT_IMAGE_SHAPE[1:])
        if isinstance(m, nn.Linear):
            if seen_spatial:
                return None
            if seen_flatten:
                return _shape_from_features(m.in_features)
            return (m.in_features,)
        return None
    return None


def model_input_shape(
    model: nn.Module, *, input_shape: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """Infer the per-sample input shape a model expects.

    Rules, applied to the first informative layer (activations, identities
    and :class:`Elementwise` layers are skipped):

    * ``Linear`` without a preceding ``Flatten``: flat input ``(in_features,)``
      (e.g. ``(784,)``);
    * ``Flatten`` then ``Linear(D, .)``: an image ``(1, s, s)`` when
      ``D = s * s``, ``(3, s, s)`` when ``D = 3 s^2``, otherwise ``(D,)``;
    * ``Conv2d``: ``(in_channels, 28, 28)``; height and width cannot be read
      from the weights and default to 28 (pass ``input_shape`` otherwise);
    * models loaded from ONNX use the static input shape declared in the
      file when there is one (attribute ``flowverify_input_shape``);
    * anything else: ``(1, 28, 28)``.

    The result (or the hint) is checked with a forward pass on zeros.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.
    input_shape : tuple of int, optional
        A per-sample shape hint (without the batch dimension), for example
        ``(1, 32, 32)``; it is validated and returned.

    Returns
    -------
    tuple of int
        Per-sample input shape, without the batch dimension, e.g.
        ``(1, 28, 28)`` or ``(784,)``.

    Raises
    ------
    ValueError
        If the model does not accept the inferred or hinted shape.
    """
    if input_shape is not None:
        try:
            shape = tuple(operator.index(s) for s in input_shape)
        except TypeError:
            shape = ()
        if not shape or min(shape) <= 0 or any(isinstance(s, bool) for s in input_shape):
            raise ValueError(
                f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}"
            )
        source = "input_shape"
    else:
        shape = _guess_shape(model)
        source = "inferred input shape"
        if shape is None:
            shape = DEFAULT_IMAGE_SHAPE
            source = "default input shape"
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), dtype=model_dtype(model), device=model_device(model)))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"model does not accept the {source} {shape} (batch of 1): {exc}; "
            "pass input_shape=(C, H, W) or (D,)"
        ) from None
    return tuple(int(s) for s in shape)
