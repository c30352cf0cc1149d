"""Model zoo, a code-free checkpoint format and model loading.

All bundled architectures take raw pixels in data units ``[0, 1]`` with shape
``(N, 1, 28, 28)`` and return logits of shape ``(N, 10)``.

Checkpoints
-----------
:func:`save_checkpoint` writes an ``nn.Sequential`` as a plain dictionary::

    {"format": "flowverify-checkpoint", "version": 1,
     "layers": [{"type": "Conv2d", "in_channels": 1, ...}, ...],
     "state_dict": {"0.weight": tensor, ...},
     "metadata": {...}}

with :func:`torch.save`. :func:`load_checkpoint` reads it back with
``torch.load(..., weights_only=True)`` only and rebuilds the network from a
whitelist of layer types (:data:`CHECKPOINT_LAYERS`), so loading a checkpoint
never runs code from the file. Pickled whole modules and bare state dicts are
refused with an explanation.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from flowverify.model.layers import Elementwise, Reshape

__all__ = [
    "ARCHITECTURES",
    "BUNDLED_MODELS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_LAYERS",
    "CHECKPOINT_VERSION",
    "Elementwise",
    "Reshape",
    "build_architecture",
    "bundled_model",
    "load_checkpoint",
    "load_model",
    "model_input_shape",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "flowverify-checkpoint"
CHECKPOINT_VERSION = 1

#: Names of the models whose trained weights ship with the package
#: (``flowverify/assets/<name>.pt``; see ``scripts/train_models.py``).
BUNDLED_MODELS: tuple[str, ...] = ("linear", "fc", "cnn")

DEFAULT_IMAGE_SHAPE = (1, 28, 28)


def _linear() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _fc() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=5, stride=2),  # 28 -> 12
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=5, stride=2),  # 12 -> 4
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def _smoothing_base() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=4, stride=2, padding=1),  # 28 -> 14
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1),  # 14 -> 7
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


_BUILDERS: dict[str, Callable[[], nn.Sequential]] = {
    "linear": _linear,
    "fc": _fc,
    "cnn": _cnn,
    "smoothing_base": _smoothing_base,
}

#: Names accepted by :func:`build_architecture`.
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def build_architecture(name: str) -> nn.Sequential:
    """Build an untrained network of a named architecture.

    Parameters
    ----------
    name : {"linear", "fc", "cnn", "smoothing_base"}
        ``linear``: Flatten, Linear(784, 10).
        ``fc``: Flatten, Linear(784, 100), ReLU, Linear(100, 100), ReLU,
        Linear(100, 10).
        ``cnn``: Conv2d(1, 8, 5, stride 2), ReLU, Conv2d(8, 16, 5, stride 2),
        ReLU, Flatten, Linear(256, 10).
        ``smoothing_base``: the MNIST base classifier of Levine & Feizi's
        Wasserstein smoothing: Conv2d(1, 16, 4, stride 2, padding 1), ReLU,
        Conv2d(16, 32, 4, stride 2, padding 1), ReLU, Flatten,
        Linear(1568, 100), ReLU, Linear(100, 10).

    Returns
    -------
    torch.nn.Sequential
        Float32 network on the CPU, initialised from the current torch RNG.
        Input ``(N, 1, 28, 28)`` pixels in ``[0, 1]``, output ``(N, 10)`` logits.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {ARCHITECTURES}, got {name!r}")
    return _BUILDERS[name]()


# --------------------------------------------------------------------------- checkpoint spec


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


def _flat_layers(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in model.children():
        if type(m) is nn.Sequential:
            out.extend(_flat_layers(m))
        else:
            out.append(m)
    return out


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
    layers = _flat_layers(model)
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
            "save it with flowverify.model.loading.save_checkpoint(model, path), or export it to "
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
                "weights_only=True)) and save it with flowverify.model.loading.save_checkpoint"
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


# --------------------------------------------------------------------------- loading


def bundled_model(name: str) -> nn.Sequential:
    """Load one of the trained models shipped with flowverify.

    Parameters
    ----------
    name : str
        One of :data:`BUNDLED_MODELS` (``"linear"``, ``"fc"``, ``"cnn"``).
        They were trained by ``scripts/train_models.py`` on the first 8,000
        digits of ``mnist10k.npz``; their metadata holds the accuracy on the
        last 2,000.

    Returns
    -------
    torch.nn.Sequential
        The network in eval mode; input ``(N, 1, 28, 28)`` pixels in
        ``[0, 1]``, output ``(N, 10)`` logits.
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"name must be one of the bundled models {BUNDLED_MODELS}, got {name!r}")
    ref = resources.files("flowverify").joinpath("assets", f"{name}.pt")
    with resources.as_file(ref) as p:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"bundled model {name!r} not found at {str(p)!r}; reinstall flowverify or "
                "run scripts/train_models.py"
            )
        return load_checkpoint(p)


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


# --------------------------------------------------------------------------- input shape

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
        layers = _flat_layers(model)
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
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"model does not accept the {source} {shape} (batch of 1): {exc}; "
            "pass input_shape=(C, H, W) or (D,)"
        ) from None
    return tuple(int(s) for s in shape)
