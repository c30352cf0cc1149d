"""Small helpers shared by the public functions: array kinds, shapes and validation.

Every public entry point accepts numpy arrays or torch tensors and returns the same kind
(same dtype, same device).  Images are ``(N, C, H, W)``; ``(C, H, W)`` and ``(H, W)`` are
accepted for one image and the output is given back in the caller's rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

Array = Any  # numpy.ndarray | torch.Tensor


def is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def check_array(x: Array, name: str) -> None:
    """Raise TypeError unless ``x`` is a numpy array or a torch tensor of real numbers."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real-valued tensor, got dtype {x.dtype}")
        return
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise TypeError(f"{name}: expected a real-valued array, got dtype {x.dtype}")
        return
    raise TypeError(f"{name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def to_float(x: Array) -> Array:
    """Integer arrays become float64 (numpy) / float32 (torch); floats are kept."""
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def as_batch(x: Array, name: str) -> tuple[Array, int]:
    """View an image argument as ``(N, C, H, W)``; return it and the caller's rank."""
    check_array(x, name)
    nd = x.ndim
    if nd not in (2, 3, 4):
        raise ValueError(
            f"{name}: expected an image of shape (N, C, H, W), (C, H, W) or (H, W), "
            f"got shape {tuple(x.shape)}"
        )
    check_grid(x, name)
    if nd == 4:
        return x, 4
    if nd == 3:
        return x[None], 3
    return x[None, None], 2


def check_grid(x: Array, name: str) -> None:
    """Raise ValueError if the image grid of ``x`` (its last two axes) has no pixel."""
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{name}: expected images of at least 1x1 pixels (H, W >= 1), got an empty "
            f"{x.shape[-2]}x{x.shape[-1]} grid in shape {tuple(x.shape)}"
        )


def restore_rank(x: Array, rank: int) -> Array:
    """Undo :func:`as_batch` on an output with the same leading layout."""
    if rank == 4:
        return x
    if rank == 3:
        return x[0]
    return x[0, 0]


def check_finite_nonnegative(x: Array, name: str) -> None:
    """Raise ValueError if ``x`` has NaN/inf or negative entries (images are masses)."""
    if isinstance(x, torch.Tensor):
        finite = bool(torch.isfinite(x).all())
        neg = float(x.min()) if x.numel() else 0.0
    else:
        finite = bool(np.isfinite(x).all())
        neg = float(x.min()) if x.size else 0.0
    if not finite:
        raise ValueError(f"{name}: expected finite pixel values, got NaN or infinity")
    if neg < 0:
        raise ValueError(f"{name}: expected non-negative pixel values (mass), got minimum {neg:g}")


def to_numpy64(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def like(values: np.ndarray, template: Array) -> Array:
    """Return numpy ``values`` as the kind, dtype and device of ``template``."""
    if isinstance(template, torch.Tensor):
        dtype = template.dtype if template.is_floating_point() else torch.get_default_dtype()
        return torch.as_tensor(values, dtype=dtype, device=template.device)
    dtype = template.dtype if np.issubdtype(template.dtype, np.floating) else np.float64
    return values.astype(dtype, copy=False)


def check_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``: ``cpu``, ``cuda`` or ``cuda:N`` present here.

    Anything else (``"bogus"``, ``"meta"``, ``"mps"``, a missing GPU) is a ValueError
    naming ``name``, before any model or tensor is moved.
    """
    expected = "expected 'cpu', 'cuda' or 'cuda:N'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {expected}, got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: {expected}, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {str(device)!r} requested but CUDA is not available here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"{name}: {dev} requested, this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return dev


def check_labels(
    labels: Any, n: int, num_classes: int | None = None, default: Array | None = None
) -> np.ndarray:
    """Class labels ``(n,)`` as int64, each in ``[0, num_classes)`` (``>= 0`` when the
    number of classes is not known); ``default`` (e.g. the model's predictions) when
    ``labels`` is None.  Errors name ``labels``."""
    if labels is None and default is not None:
        d = default.detach().cpu().numpy() if is_torch(default) else np.asarray(default)
        return d.astype(np.int64)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels: expected integer class labels, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match the images, got {arr.shape}")
    top = np.inf if num_classes is None else num_classes
    if arr.size and (arr.min() < 0 or arr.max() >= top):
        want = ">= 0" if num_classes is None else f"in [0, {num_classes})"
        raise ValueError(f"labels: expected classes {want}, got values {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def check_indices(indices: Any, n: int) -> np.ndarray:
    """Data-set indices ``(n,)`` of the images as int64 (``arange(n)`` when None), each
    ``>= 0``.  Errors name ``indices``."""
    if indices is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.shape != (n,) or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"indices: expected {n} integer data-set indices of shape ({n},), got dtype "
            f"{arr.dtype} and shape {arr.shape}"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"indices: expected non-negative indices, got {int(arr.min())}")
    return arr.astype(np.int64)


@contextlib.contextmanager
def model_errors(shape: tuple, detail: str = "") -> Iterator[None]:
    """Turn an exception raised while running the user's model on images of ``shape``
    (C, H, W) into a ValueError naming ``model``.  CUDA out-of-memory passes through: it
    is not the input's fault."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise ValueError(
            f"model: cannot be applied to images of shape {tuple(shape)}{detail}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def check_logits(logits: Any, n: int, *, min_classes: int = 2) -> int:
    """``logits`` must be a tensor ``(n, K)`` with ``K >= min_classes``; returns ``K``.
    Errors name ``model``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model: expected logits of shape (N, classes) = ({n}, K), got {got}")
    if logits.shape[1] < min_classes:
        raise ValueError(
            f"model: expected at least {min_classes} classes, got logits of shape "
            f"{tuple(logits.shape)}"
        )
    return int(logits.shape[1])


def channel_last_hint(shape: tuple) -> str:
    """A hint for an image batch given channel-last, or ``""``.

    Parameters
    ----------
    shape : tuple of int
        The shape as given.

    Returns
    -------
    str
        ``"; this looks channel-last (N, H, W, C): ..."`` when the last axis is short (1,
        3 or 4 channels) and the two before it are image-sized, else the empty string.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) in (3, 4) and shape[-1] in (1, 3, 4) and min(shape[-3:-1]) >= 2:
        if len(shape) == 4 and shape[1] in (1, 3, 4):
            return ""  # (N, C, H, W) with a narrow image: ambiguous, no hint
        perm = "x.transpose(0, 3, 1, 2)" if len(shape) == 4 else "x.transpose(2, 0, 1)"
        return (
            "; this looks channel-last (H, W, C): flowverify expects channels first "
            f"(N, C, H, W), e.g. {perm}"
        )
    return ""


def model_dtype(model) -> torch.dtype:
    """The floating dtype of a model's parameters (float32 if it has none): the dtype its
    inputs are cast to."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model) -> torch.device:
    """The device of a model's first parameter (the CPU if it has none)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
