"""Safe conversion of simple ONNX classifiers to PyTorch.

The file is parsed with the ``onnx`` package (protobuf data only; nothing in
it is executed), validated with :func:`onnx.checker.check_model`, and chains
of the following operators are converted to an ``nn.Sequential``:

========================  ===================================================
ONNX                      PyTorch
========================  ===================================================
Gemm (transA = 0)         ``nn.Linear`` (alpha, beta and transB folded in)
MatMul(x, W) [+ Add(b)]   ``nn.Linear`` (bias from a following constant Add)
Conv (2-D, group = 1)     ``nn.Conv2d`` (``nn.ZeroPad2d`` for uneven pads)
Relu                      ``nn.ReLU``
Flatten (axis = 1)        ``nn.Flatten``
Reshape (constant shape)  :class:`flowverify.model.layers.Reshape` (first entry = batch)
Add/Sub/Mul/Div constant  :class:`flowverify.model.layers.Elementwise`
Identity, Dropout         dropped (inference semantics)
Constant, initializers    constants
========================  ===================================================

Anything else (other operators, branching graphs) is refused with a ValueError naming
the operators, unless the optional package ``onnx2torch`` is installed, which then
converts the graph (it is in no extra of flowverify: it pulls ``torchvision``, which can
replace a CPU build of torch; install the ``torchvision`` matching your torch first).
``onnx`` itself (the protobuf reader: CPU-only, no torch) is a base dependency.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowverify.model.layers import Elementwise, Reshape

__all__ = ["SUPPORTED_OPS", "convert_onnx", "load_onnx"]

logger = logging.getLogger(__name__)

#: ONNX operator types converted natively.
SUPPORTED_OPS: tuple[str, ...] = (
    "Add",
    "Constant",
    "Conv",
    "Div",
    "Dropout",
    "Flatten",
    "Gemm",
    "Identity",
    "MatMul",
    "Mul",
    "Relu",
    "Reshape",
    "Sub",
)


class UnsupportedGraphError(ValueError):
    """The ONNX graph uses operators or a structure the native converter lacks."""

    def __init__(self, message: str, ops: tuple[str, ...] = ()):
        super().__init__(message)
        self.ops = ops


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a base dependency
        raise ValueError(
            "reading ONNX models needs the 'onnx' package (a dependency of flowverify that "
            f"is missing here: {exc}); pip install onnx"
        ) from exc
    return onnx


def load_onnx(path: str | os.PathLike) -> nn.Module:
    """Load an ONNX classifier as a PyTorch module, without executing code.

    Parameters
    ----------
    path : str or path-like
        The ``.onnx`` file. The graph must have one input (a batch of images
        ``(N, C, H, W)`` or flat vectors ``(N, D)``) and one output (logits
        ``(N, K)``).

    Returns
    -------
    torch.nn.Module
        An ``nn.Sequential`` in eval mode for supported chains (see the module
        docstring), otherwise the ``onnx2torch`` conversion. When the graph
        input has a static per-sample shape, it is stored in the attribute
        ``flowverify_input_shape`` (used by
        :func:`flowverify.model.input_shape.model_input_shape`).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be parsed, fails the ONNX checker, or uses
        operators that are not supported natively while ``onnx2torch`` is not
        installed (the message names the operator types).
    """
    onnx = _import_onnx()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ONNX model not found: {str(p)!r}")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise ValueError(f"could not read {str(p)!r}: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{str(p)!r} is not a valid ONNX model: {exc}") from exc
    try:
        module = convert_onnx(model)
    except UnsupportedGraphError as exc:
        try:
            import onnx2torch
        except ImportError:
            raise ValueError(
                f"{str(p)!r}: {exc}; flowverify converts chains of "
                f"{', '.join(SUPPORTED_OPS)} (other graphs: the optional package onnx2torch, "
                "see the README)"
            ) from None
        logger.info("%s: %s; converting with onnx2torch", p, exc)
        try:
            module = onnx2torch.convert(model)
        except Exception as exc2:
            raise ValueError(
                f"{str(p)!r}: onnx2torch could not convert the model: {exc2}"
            ) from exc2
        shape = _static_input_shape(model.graph)
        if shape is not None:
            module.flowverify_input_shape = shape
    return module.eval()


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_input_shape(graph) -> tuple[int, ...] | None:
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or not inputs[0].type.HasField("tensor_type"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for d in list(dims)[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        shape.append(int(d.dim_value))
    return tuple(shape) if shape else None


def _fold(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))


def convert_onnx(model) -> nn.Sequential:
    """Convert a parsed ONNX chain to an ``nn.Sequential``.

    Parameters
    ----------
    model : onnx.ModelProto
        A model that passed :func:`onnx.checker.check_model`.

    Returns
    -------
    torch.nn.Sequential
        Float32 network in eval mode computing the same function as the graph
        (up to float32 rounding).

    Raises
    ------
    UnsupportedGraphError
        (a ``ValueError``) if the graph uses other operators, is not a chain
        from its single input to its single output, or uses unsupported
        attributes; ``.ops`` lists offending operator types.
    """
    from onnx import numpy_helper

    graph = model.graph
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in SUPPORTED_OPS})
    if unsupported:
        raise UnsupportedGraphError(
            f"unsupported ONNX op type(s): {', '.join(unsupported)}", tuple(unsupported)
        )
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UnsupportedGraphError(
            f"expected one graph input and one output, got inputs {inputs} and "
            f"outputs {[o.name for o in graph.output]}"
        )
    current = inputs[0]
    modules: list[nn.Module] = []
    matmul_open = False  # last module is a bias-free Linear made from MatMul/Gemm

    for node in graph.node:
        op = node.op_type
        attrs = _attrs(node)
        where = f"node {node.name or op!r} ({op})"
        if op == "Constant":
            consts[node.output[0]] = _constant_value(attrs, where)
            continue
        ins = [i for i in node.input if i]
        dyn = [i for i in ins if i not in consts]
        if not dyn:
            # constant folding of simple ops between constants
            if op in ("Identity", "Dropout"):
                consts[node.output[0]] = consts[ins[0]]
            elif op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
                consts[node.output[0]] = _fold(op, consts[ins[0]], consts[ins[1]])
            else:
                raise UnsupportedGraphError(f"{where} computes on constants only")
            continue
        if dyn != [current]:
            raise UnsupportedGraphError(
                f"graph is not a chain: {where} takes inputs {dyn}, expected only {current!r}"
            )
        if op == "Dropout" and len(ins) >= 3 and bool(np.asarray(consts[ins[2]]).item()):
            raise UnsupportedGraphError(f"{where} runs in training mode")
        new, matmul_open = _convert_node(op, node, ins, attrs, consts, modules, matmul_open, where)
        modules.extend(new)
        current = node.output[0]

    if current != graph.output[0].name:
        raise UnsupportedGraphError(
            f"graph is not a chain: output {graph.output[0].name!r} is not the end of the "
            f"chain starting at the input ({current!r})"
        )
    seq = nn.Sequential(*modules) if modules else nn.Sequential(nn.Identity())
    shape = _static_input_shape(graph)
    if shape is not None:
        seq.flowverify_input_shape = shape
    return seq.eval()


def _constant_value(attrs: dict, where: str) -> np.ndarray:
    from onnx import numpy_helper

    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise UnsupportedGraphError(f"{where}: unsupported Constant attributes {sorted(attrs)}")


def _convert_node(op, node, ins, attrs, consts, modules, matmul_open, where):
    """Return (new modules, whether the last module is an open bias-free Linear)."""
    if op in ("Identity", "Dropout"):
        return [], matmul_open
    if op == "Relu":
        return [nn.ReLU()], False
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        if axis != 1:
            raise UnsupportedGraphError(f"{where}: only axis=1 is supported, got {axis}")
        return [nn.Flatten()], False
    if op == "Reshape":
        return [_reshape(consts[ins[1]], attrs, where)], False
    if op == "Gemm":
        return [_gemm(node, ins, attrs, consts, where)], False
    if op == "MatMul":
        if ins[0] in consts:
            raise UnsupportedGraphError(f"{where}: left multiplication by a constant")
        w = consts[ins[1]]
        if w.ndim != 2:
            raise UnsupportedGraphError(f"{where}: weight must be 2-D, got shape {w.shape}")
        lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(_tensor(w.T))
        return [lin], True
    if op == "Conv":
        return _conv(ins, attrs, consts, where), False
    if op in ("Add", "Sub", "Mul", "Div"):
        const_first = ins[0] in consts
        c = consts[ins[0] if const_first else ins[1]]
        if op == "Add" and matmul_open and modules:
            lin = modules[-1]
            c = np.asarray(c)
            n_out = lin.out_features
            if 1 <= c.ndim <= 2 and c.shape[-1] == n_out and c.size == n_out:
                lin.bias = nn.Parameter(_tensor(c.reshape(-1)))
                return [], False
        if op == "Div" and const_first:
            raise UnsupportedGraphError(f"{where}: division of a constant by the input")
        name = {"Add": "add", "Sub": "rsub" if const_first else "sub", "Mul": "mul", "Div": "div"}
        return [Elementwise(name[op], _tensor(c))], False
    raise UnsupportedGraphError(f"unsupported ONNX op type(s): {op}", (op,))  # pragma: no cover


def _reshape(shape: np.ndarray, attrs: dict, where: str) -> Reshape:
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    if attrs.get("allowzero", 0) and 0 in shape:
        raise UnsupportedGraphError(f"{where}: allowzero=1 with zero dimensions")
    if len(shape) < 2 or shape[0] not in (-1, 0, 1):
        raise UnsupportedGraphError(
            f"{where}: target shape {shape} does not keep the batch dimension first"
        )
    rest = shape[1:]
    if shape[0] == -1 and -1 in rest:
        raise UnsupportedGraphError(f"{where}: ambiguous target shape {shape}")
    return Reshape(tuple(rest))


def _gemm(node, ins, attrs, consts, where) -> nn.Linear:
    if attrs.get("transA", 0):
        raise UnsupportedGraphError(f"{where}: transA=1 is not supported")
    if ins[0] in consts or ins[1] not in consts:
        raise UnsupportedGraphError(f"{where}: expected Gemm(input, constant B[, constant C])")
    alpha = float(attrs.get("alpha", 1.0))
    beta = float(attrs.get("beta", 1.0))
    b = np.asarray(consts[ins[1]], dtype=np.float64)
    if b.ndim != 2:
        raise UnsupportedGraphError(f"{where}: B must be 2-D, got shape {b.shape}")
    w = alpha * (b if attrs.get("transB", 0) else b.T)  # (out, in)
    out_f, in_f = w.shape
    bias = None
    if len(ins) >= 3:
        c = np.asarray(consts[ins[2]], dtype=np.float64)
        if not (c.size == 1 or (c.ndim in (1, 2) and c.shape[-1] == out_f and c.size == out_f)):
            raise UnsupportedGraphError(
                f"{where}: C of shape {c.shape} is not a per-output bias for {out_f} outputs"
            )
        bias = beta * np.broadcast_to(c.reshape(-1), (out_f,))
    lin = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(_tensor(w))
        if bias is not None:
            lin.bias.copy_(_tensor(bias))
    return lin


def _conv(ins, attrs, consts, where) -> list[nn.Module]:
    if ins[1] not in consts or (len(ins) >= 3 and ins[2] not in consts):
        raise UnsupportedGraphError(f"{where}: weights and bias must be constants")
    w = np.asarray(consts[ins[1]])
    if w.ndim != 4:
        raise UnsupportedGraphError(f"{where}: only 2-D convolutions are supported")
    group = int(attrs.get("group", 1))
    if group != 1:
        raise UnsupportedGraphError(f"{where}: group={group} is not supported (only 1)")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedGraphError(f"{where}: auto_pad={auto_pad} is not supported")
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", w.shape[2:]))
    if kernel != tuple(w.shape[2:]):
        raise UnsupportedGraphError(f"{where}: kernel_shape {kernel} != weight shape {w.shape}")
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
    if auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise UnsupportedGraphError(f"{where}: malformed strides/dilations/pads")
    top, left, bottom, right = pads
    out: list[nn.Module] = []
    if (top, left) == (bottom, right):
        padding = (top, left)
    else:
        out.append(nn.ZeroPad2d((left, right, top, bottom)))
        padding = (0, 0)
    bias = np.asarray(consts[ins[2]]) if len(ins) >= 3 else None
    conv = nn.Conv2d(
        w.shape[1],
        w.shape[0],
        kernel_size=kernel,
        stride=strides,
        padding=padding,
        dilation=dilations,
        bias=bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(_tensor(w))
        if bias is not None:
            conv.bias.copy_(_tensor(bias.reshape(-1)))
    out.append(conv)
    return out
