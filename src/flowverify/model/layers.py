"""Module types the ONNX converter and checkpoints produce beyond ``torch.nn`` (a
constant element-wise operation, the normalisation ``(x - mean) / std`` of an ONNX front,
and a reshape), and the flattening of nested ``nn.Sequential`` containers into their leaf
layers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Elementwise", "Reshape", "flat_layers"]


class Elementwise(nn.Module):
    """Element-wise operation with a constant (for normalisation layers).

    Computes ``x + c``, ``x - c``, ``c - x``, ``x * c`` or ``x / c`` with
    PyTorch (= ONNX/numpy) broadcasting.

    Parameters
    ----------
    op : {"add", "sub", "rsub", "mul", "div"}
        The operation; ``"rsub"`` is ``c - x``.
    value : torch.Tensor
        The constant ``c`` (stored as a buffer, so it is part of the
        ``state_dict``), in the units of the layer input; for example the
        per-channel mean of shape ``(C, 1, 1)`` of a normalisation layer.
    """

    OPS = ("add", "sub", "rsub", "mul", "div")

    def __init__(self, op: str, value: torch.Tensor):
        super().__init__()
        if op not in self.OPS:
            raise ValueError(f"op must be one of {self.OPS}, got {op!r}")
        self.op = op
        self.register_buffer("value", torch.as_tensor(value).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.value
        if self.op == "add":
            return x + c
        if self.op == "sub":
            return x - c
        if self.op == "rsub":
            return c - x
        if self.op == "mul":
            return x * c
        return x / c

    def extra_repr(self) -> str:
        return f"op={self.op!r}, value_shape={tuple(self.value.shape)}"


class Reshape(nn.Module):
    """Reshape every sample, keeping the batch dimension.

    Computes ``x.reshape(x.shape[0], *shape)`` where an entry ``0`` copies
    the corresponding input dimension (ONNX convention) and one entry may be
    ``-1``.

    Parameters
    ----------
    shape : tuple of int
        The per-sample target shape (without the batch dimension).
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if sum(s == -1 for s in shape) > 1 or any(s < -1 for s in shape):
            raise ValueError(f"shape must hold ints >= -1 with at most one -1, got {shape}")
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = [x.shape[i + 1] if s == 0 else s for i, s in enumerate(self.shape)]
        return x.reshape(x.shape[0], *target)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def flat_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in order, with nested ``nn.Sequential`` containers
    flattened (subclasses of ``nn.Sequential`` count as layers)."""
    out: list[nn.Module] = []
    for m in model.children():
        if type(m) is nn.Sequential:
            out.extend(flat_layers(m))
        else:
            out.append(m)
    return out
