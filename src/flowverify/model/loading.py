"""Model loading: one entry point for a module, a bundled name, an ONNX file or a
flowverify checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from flowverify.model.checkpoint import load_checkpoint
from flowverify.model.zoo import BUNDLED_MODELS, bundled_model

__all__ = ["load_model"]


def load_model(spec) -> nn.Module:
    """Get a model from a module, a bundled name or a file.

    Parameters
    ----------
    spec : torch.nn.Module, str or path-like
        * an ``nn.Module``: returned as it is (switched to eval mode);
        * a bundled name, one of :data:`BUNDLED_MODELS`;
        * a ``*.onnx`` file, converted by :func:`flowverify.model.onnx_import.load_onnx`;
        * a flowverify checkpoint (``*.pt`` / ``*.pth``), see
          :func:`load_checkpoint`.

    Returns
    -------
    torch.nn.Module
        The model in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``spec`` names neither a bundled model nor an existing file.
    ValueError
        If the file cannot be loaded or has an unknown extension.
    TypeError
        If ``spec`` has an unsupported type.
    """
    if isinstance(spec, nn.Module):
        return spec.eval()
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(
            f"model must be an nn.Module, a bundled name or a file path, got {type(spec).__name__}"
        )
    if isinstance(spec, str) and spec in BUNDLED_MODELS:
        return bundled_model(spec)
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(
            f"model: {str(spec)!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) "
            "nor an existing .onnx / .pt file"
        )
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        from flowverify.model.onnx_import import load_onnx

        return load_onnx(p)
    if suffix in (".pt", ".pth"):
        return load_checkpoint(p)
    raise ValueError(
        f"model: unknown file type {suffix or '(none)'!r} for {str(p)!r}; expected .onnx, "
        f".pt or .pth, or a bundled name ({', '.join(BUNDLED_MODELS)})"
    )
