"""The code-free checkpoint format: writing an ``nn.Sequential`` and reading it back
without running code from the file.

:func:`save_checkpoint` writes an ``nn.Sequential`` as a plain dictionary::

    {"format": "flowverify-checkpoint", "version": 1,
     "layers": [{"type": "Conv2d", "in_channels": 1, ...}, ...],
     "state_dict": {"0.weight": tensor, ...},
     "metadata": {...}}

with :func:`torch.save`. :func:`load_checkpoint` reads it back with
``torch.load(..., weights_only=True)`` only, after checking the CRC-32 of every member of
the zip archive, and rebuilds the network from a whitelist of layer types
(:data:`CHECKPOINT_LAYERS`) whose options must be plain data, so loading a checkpoint
never runs code from the file. Pickled whole modules and bare state dicts are refused
with an explanation.
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flowverify.model.layers import Elementwise, Reshape, flat_layers

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_LAYERS",
    "CHECKPOINT_VERSION",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "flowverify-checkpoint"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- layer whitelist


def _spec_linear(m: nn.Linear) -> dict:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


def _spec_conv(m: nn.Conv2d) -> dict:
    if m.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported")
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": tuple(m.kernel_size),
        "stride": tuple(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
        "dilation": tuple(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
    }


def _spec_maxpool(m: nn.MaxPool2d) -> dict:
    if m.return_indices:
        raise ValueError("MaxPool2d with return_indices=True is not supported")
    return {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "ceil_mode": m.ceil_mode,
    }


def _spec_avgpool(m: nn.AvgPool2d) -> dict:
    return {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "ceil_mode": m.ceil_mode,
        "count_include_pad": m.count_include_pad,
        "divisor_override": m.divisor_override,
    }


def _build_elementwise(op: str, value_shape: tuple[int, ...]) -> Elementwise:
    return Elementwise(op, torch.zeros(tuple(value_shape)))


# type name -> (class, spec function, builder)
_LAYERS: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[..., nn.Module]]] = {
    "Linear": (nn.Linear, _spec_linear, nn.Linear),
    "Conv2d": (nn.Conv2d, _spec_conv, nn.Conv2d),
    "Flatten": (
        nn.Flatten,
        lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
        nn.Flatten,
    ),
    "Unflatten": (
        nn.Unflatten,
        lambda m: {"dim": m.dim, "unflattened_size": tuple(m.unflattened_size)},
        nn.Unflatten,
    ),
    "ReLU": (nn.ReLU, lambda m: {}, nn.ReLU),
    "Identity": (nn.Identity, lambda m: {}, nn.Identity),
    "Tanh": (nn.Tanh, lambda m: {}, nn.Tanh),
    "Sigmoid": (nn.Sigmoid, lambda m: {}, nn.Sigmoid),
    "MaxPool2d": (nn.MaxPool2d, _spec_maxpool, nn.MaxPool2d),
    "AvgPool2d": (nn.AvgPool2d, _spec_avgpool, nn.AvgPool2d),
    "ZeroPad2d": (nn.ZeroPad2d, lambda m: {"padding": tuple(m.padding)}, nn.ZeroPad2d),
    "Elementwise": (
        Elementwise,
        lambda m: {"op": m.op, "value_shape": tuple(m.value.shape)},
        _build_elementwise,
    ),
    "Reshape": (Reshape, lambda m: {"shape": tuple(m.shape)}, Reshape),
}

#: Layer types a checkpoint may contain.
CHECKPOINT_LAYERS: tuple[str, ...] = tuple(_LAYERS)


def _layer_spec(m: nn.Module) -> dict:
    for name, (cls, spec_fn, _) in _LAYERS.items():
        if type(m) is cls:
            return {"type": name, **spec_fn(m)}
    raise ValueError(
        f"layer {type(m).__name__} cannot be stored in a flowverify checkpoint; "
        f"supported layers: {', '.join(CHECKPOINT_LAYERS)} (export other models to ONNX)"
    )


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None
) -> None:
    """Write a code-free flowverify checkpoint.

    Parameters
    ----------
    model : torch.nn.Sequential
        The network. Nested ``nn.Sequential`` containers are flattened; every
        leaf layer must be one of :data:`CHECKPOINT_LAYERS`.
    path : str or path-like
        Output file (conventionally ``*.pt``).
    metadata : dict, optional
        Extra information stored with the weights (for example accuracy and
        training settings). Values must be plain Python data (str, int,
        float, bool, None, lists, tuples and dicts of these) so that the file
        can be read with ``torch.load(weights_only=True)``.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Sequential`` or ``metadata`` is not a dict
        of plain data.
    ValueError
        If ``model`` contains a layer outside the whitelist.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model must be a torch.nn.Sequential, got {type(model).__name__}; "
            "export other models to ONNX instead"
        )
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    metadata = _plain(metadata, "metadata")
    layers = flat_layers(model)
    specs = [_layer_spec(m) for m in layers]
    state = {}
    for i, m in enumerate(layers):
        for k, v in m.state_dict().items():
            state[f"{i}.{k}"] = v.detach().cpu().clone().contiguous()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "layers": specs,
        "state_dict": state,
        "metadata": metadata,
    }
    torch.save(payload, Path(path))


def _plain(obj, where: str):
    """Return a copy of ``obj`` made of built-in types only (str subclasses -> str, ...)."""
    if obj is None or type(obj) is bool:
        return obj
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, list | tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(f"{where} keys must be str or int, got {type(k).__name__}")
            out[str(k) if isinstance(k, str) else int(k)] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"{where} must hold plain data (str, int, float, bool, None, list, tuple, dict), "
        f"got {type(obj).__name__}"
    )


def _unpickler_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error" in ln and ln.rstrip(":").endswith("error"):
            continue  # the reason is on a later line
        if "WeightsUnpickler error" in ln or "GLOBAL" in ln or "Unsupported" in ln:
            return ln.split(". Please use")[0]
    return lines[0] if lines else type(exc).__name__


def _is_forbidden_object(exc: Exception) -> bool:
    """Whether torch's weights-only unpickler refused a Python object (a class or function
    named in the file), as opposed to failing on bytes that are no pickle at all."""
    return "global" in str(exc).lower()


# What zipfile raises for a corrupted archive (NotImplementedError: a corrupted version or
# compression field; RuntimeError: a corrupted 'encrypted' flag).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


def _check_zip_integrity(p: Path, where: str) -> None:
    """Verify the CRC-32 of every member of a zip-format checkpoint.

    ``torch.load`` does not check them, so a flipped byte in the weight data would load
    silently as a different weight.
    """
    try:
        if not zipfile.is_zipfile(p):
            return  # legacy (non-zip) torch format, or not a torch file: torch.load decides
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except _ZIP_ERRORS as exc:
        raise ValueError(
            f"could not read {where}: truncated or corrupted zip archive ({type(exc).__name__}: "
            f"{exc})"
        ) from None
    if bad is not None:
        raise ValueError(
            f"could not read {where}: corrupted file (CRC-32 mismatch in member {bad!r})"
        )


_PLAIN_KW = (int, bool, str, float, type(None))


def _check_kwarg(value) -> bool:
    if isinstance(value, _PLAIN_KW):
        return True
    return isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def load_checkpoint(
    path: str | os.PathLike, *, return_metadata: bool = False
) -> nn.Sequential | tuple[nn.Sequential, dict]:
    """Load a flowverify checkpoint without executing code from the file.

    The file is read with ``torch.load(path, weights_only=True,
    map_location="cpu")`` and the network is rebuilt from the whitelisted
    layer specifications.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save_checkpoint`.
    return_metadata : bool, optional
        Also return the stored metadata dict. Default ``False``.

    Returns
    -------
    model : torch.nn.Sequential
        The network, in eval mode, on the CPU.
    metadata : dict
        Only when ``return_metadata`` is true.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file, if it is truncated or corrupted, is not a flowverify
        checkpoint (for example a pickled ``nn.Module`` or a bare
        ``state_dict``), has an unknown version, or contains a layer type or
        option outside the whitelist or weights that do not fit the layers.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(p)!r}")
    where = f"{str(p)!r}"
    _check_zip_integrity(p, where)
    try:
        payload = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if not _is_forbidden_object(exc):
            raise ValueError(
                f"could not read {where}: not a PyTorch file, or truncated or corrupted "
                f"({_unpickler_reason(exc)})"
            ) from None
        raise ValueError(
            f"{where} is not a flowverify checkpoint: it contains pickled Python objects "
            "(for example a whole nn.Module saved with torch.save(model)), which are never "
            "loaded because that could run arbitrary code. Rebuild the model in Python and "
            "save it with flowverify.model.save_checkpoint(model, path), or export it to "
            f"ONNX. ({_unpickler_reason(exc)})"
        ) from None
    except Exception as exc:  # torch raises many types for corrupted files
        raise ValueError(
            f"could not read {where}: not a PyTorch file, or truncated or corrupted "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict):
        raise ValueError(
            f"{where} is not a flowverify checkpoint: expected a dict, got {type(payload).__name__}"
        )
    if payload.get("format") != CHECKPOINT_FORMAT:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise ValueError(
                f"{where} holds a bare state_dict (weights without the architecture); "
                "build the network, call model.load_state_dict(torch.load(path, "
                "weights_only=True)) and save it with flowverify.model.save_checkpoint"
            )
        raise ValueError(
            f"{where} is not a flowverify checkpoint: expected format "
            f"{CHECKPOINT_FORMAT!r}, got {payload.get('format')!r}"
        )
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{where}: unsupported checkpoint version {version!r} (this flowverify reads "
            f"version {CHECKPOINT_VERSION})"
        )
    layers = payload.get("layers")
    state = payload.get("state_dict")
    metadata = payload.get("metadata", {})
    if not isinstance(layers, list) or not isinstance(state, dict):
        raise ValueError(f"{where}: malformed checkpoint ('layers' or 'state_dict' missing)")
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: malformed checkpoint ('metadata' is not a dict)")
    modules = []
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise ValueError(f"{where}: layer {i} is not a layer specification")
        kind = spec["type"]
        if kind not in _LAYERS:
            raise ValueError(
                f"{where}: layer {i} has unknown type {kind!r}; supported: "
                f"{', '.join(CHECKPOINT_LAYERS)}"
            )
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        for k, v in kwargs.items():
            if not isinstance(k, str) or not k.isidentifier() or not _check_kwarg(v):
                raise ValueError(f"{where}: layer {i} ({kind}) has an invalid option {k!r}={v!r}")
        try:
            modules.append(_LAYERS[kind][2](**kwargs))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{where}: cannot build layer {i} ({kind}) from {kwargs}: {exc}"
            ) from None
    model = nn.Sequential(*modules)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise ValueError(f"{where}: weights do not match the layers: {exc}") from None
    model.eval()
    if return_metadata:
        return model, metadata
    return model
