r"""A feed-forward model as a graph of operators, for bound propagation.

Corollary 2.1 of the paper needs only that the model's first operation is affine: the
W1 ball (Theorem 3) and the W1 polytope (Theorem 6) are then input domains like any
other, and a linear bound ``qᵀν + β`` of any quantity of the network can be minimised
over them in image space.  This module turns an ``nn.Module`` (traced with
``torch.fx``; ONNX files arrive converted by :mod:`~flowverify.model.onnx_import`) into a
list of :class:`Node` in execution order, each holding one operator of
:mod:`.affine` or :mod:`.activations` and the per-sample shape of its output.

Anything the engine has no sound relaxation for is refused by :func:`build_graph` with a
ValueError naming the operator, before any image is processed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from flowverify.model.layers import Elementwise, Reshape
from flowverify.verification.engine import activations as act
from flowverify.verification.engine import affine as aff

__all__ = ["Graph", "Node", "build_graph"]


@dataclass
class Node:
    """One operator of the graph.

    Attributes
    ----------
    name : str
        The traced name (``fc1``, ``add_1``, ...), used in messages.
    op : object or None
        An operator of :mod:`.affine` or :mod:`.activations`, :class:`.affine.Merge` for
        an addition or subtraction of two branches; ``None`` for the input.
    inputs : list of int
        Positions of the nodes it reads.
    shape : tuple of int
        Per-sample shape of its output (without the batch dimension).
    """

    name: str
    op: object
    inputs: list[int] = field(default_factory=list)
    shape: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


@dataclass
class Graph:
    """Nodes in execution order; node 0 is the input, the last node the logits."""

    nodes: list[Node]
    #: Image-independent data derived from the graph (the engine's front map), by key.
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: ``(device, dtype)`` the operators' tensors were last moved to (:meth:`to`).
    where: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @property
    def num_classes(self) -> int:
        return self.nodes[-1].size

    def activations(self) -> list[int]:
        """Positions of the nodes with a non-linear operator."""
        return [i for i, n in enumerate(self.nodes) if isinstance(n.op, act.Activation)]

    def pre_activations(self) -> list[int]:
        """Positions whose bounds the relaxations need (inputs of activations), in order."""
        return sorted({self.nodes[i].inputs[0] for i in self.activations()})

    def linear_front(self, pre) -> set[int]:
        """The nodes of ``pre`` reached from the input through affine operators only."""
        affine = {0}
        for i, node in enumerate(self.nodes[1:], start=1):
            if not isinstance(node.op, act.Activation) and all(j in affine for j in node.inputs):
                affine.add(i)
        return {i for i in pre if i in affine}

    def reaches_input(self, pre, front) -> bool:
        """Whether a bound of the output or of ``pre`` reaches the input without passing
        the nodes ``front``."""
        todo = [self.output] + [p for p in pre if p not in front]
        seen = set()
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            if i == 0:
                return True
            todo.extend(j for j in self.nodes[i].inputs if j not in front)
        return False

    def values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every node's output on the input ``x``."""
        vals: list[torch.Tensor] = [x]
        for node in self.nodes[1:]:
            vals.append(node.op.forward(*[vals[j] for j in node.inputs]))
        return vals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output from the graph (checks the conversion)."""
        return self.values(x)[-1]

    def to(self, device, dtype=torch.float64) -> Graph:
        """Move every operator's tensors (in place); the cache is kept when nothing moves
        (a graph reused across calls keeps its front map)."""
        where = (torch.device(device), dtype)
        if self.where == where:
            return self
        self.cache.clear()
        for node in self.nodes:
            if hasattr(node.op, "to"):
                node.op.to(device, dtype)
        self.where = where
        return self


class _Tracer(fx.Tracer):
    """Keeps flowverify's own layers and every ``torch.nn`` layer as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (Elementwise, Reshape)):
            return True
        return super().is_leaf_module(m, qualname)


_RELU = (torch.relu, F.relu)
_ADD = (operator.add, torch.add, operator.iadd)
_SUB = (operator.sub, torch.sub, operator.isub)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div, operator.itruediv)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")
_SKIP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_POSITIVE_LINEAR_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ZeroPad2d)


def _module_op(mod: nn.Module, name: str, in_shape, out_shape):
    """The operator of a leaf module, or ``None`` for an identity."""
    if isinstance(mod, _SKIP_MODULES):
        return None
    if isinstance(mod, nn.Linear):
        return aff.LinearOp(mod.weight, mod.bias)
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise ValueError(
                f"model: layer {name!r}: Conv2d with padding_mode={mod.padding_mode!r} is "
                "not supported by the certifiers (only 'zeros')"
            )
        return aff.ConvOp(mod, in_shape, out_shape)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return aff.BatchNormOp(mod)
    if isinstance(mod, (nn.Flatten, Reshape)):
        return aff.ReshapeOp(in_shape, out_shape)
    if isinstance(mod, _POSITIVE_LINEAR_MODULES):
        return aff.PositiveLinearOp(mod, in_shape)
    if isinstance(mod, Elementwise):
        return aff.ConstantOp(mod.op, mod.value)
    if isinstance(mod, nn.ReLU):
        return act.LeakyReLUOp(0.0)
    if isinstance(mod, nn.LeakyReLU):
        return act.LeakyReLUOp(mod.negative_slope)
    if isinstance(mod, nn.Sigmoid):
        return act.SigmoidOp()
    if isinstance(mod, nn.Tanh):
        return act.TanhOp()
    if isinstance(mod, nn.MaxPool2d):
        if mod.ceil_mode:
            raise ValueError(
                f"model: layer {name!r}: MaxPool2d with ceil_mode=True is not supported"
            )
        return act.MaxPoolOp(mod, in_shape)
    raise ValueError(
        f"model: layer {name!r} of type {type(mod).__name__} has no sound relaxation in "
        f"the certifiers; supported: {', '.join(SUPPORTED)}"
    )


#: What :func:`build_graph` accepts (for messages and the README).
SUPPORTED = (
    "Linear",
    "Conv2d",
    "BatchNorm1d/2d (eval)",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "ZeroPad2d",
    "Flatten/Reshape/view",
    "constant Add/Sub/Mul/Div",
    "Add/Sub of two branches",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "MaxPool2d",
    "Identity/Dropout",
)


def build_graph(model: nn.Module, example: torch.Tensor) -> Graph:
    """Trace ``model`` on ``example`` (one input batch) into a :class:`Graph`.

    Parameters
    ----------
    model : nn.Module
        In eval mode; any ``torch.fx``-traceable feed-forward network of the operators in
        :data:`SUPPORTED`.
    example : Tensor
        An input of the shape the model expects (``(1, C, H, W)``, or ``(1, C*H*W)`` for
        a model that takes flat images).

    Raises
    ------
    ValueError
        Naming the operator when the model has one without a sound relaxation, when it
        cannot be traced, or when its first operation is not affine.
    """
    try:
        traced = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # noqa: BLE001 - tracing errors are user-model errors
        raise ValueError(
            f"model: cannot trace {type(model).__name__} with torch.fx for certification "
            f"({type(exc).__name__}: {exc})"
        ) from None
    modules = dict(traced.named_modules())
    values: dict[str, object] = {}
    dynamic: set[str] = set()
    pos: dict[str, int] = {}
    nodes: list[Node] = []
    env = _Interp(traced, values)
    with torch.no_grad():
        env.run(example)

    def shape_of(n: fx.Node) -> tuple[int, ...]:
        return tuple(values[n.name].shape[1:])

    def add(name, op, ins, shape) -> None:
        pos[name] = len(nodes)
        nodes.append(Node(name, op, ins, tuple(int(s) for s in shape)))

    for n in traced.graph.nodes:
        if n.op == "placeholder":
            if nodes:
                raise ValueError("model: certifiers need a model with a single input")
            add(n.name, None, [], shape_of(n))
            dynamic.add(n.name)
            continue
        if n.op == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node) or out.name not in dynamic:
                raise ValueError("model: certifiers need a model returning one logits tensor")
            if pos[out.name] != len(nodes) - 1:  # the logits last
                shape = nodes[pos[out.name]].shape
                nodes.append(
                    Node(
                        "output",
                        aff.ReshapeOp(shape, shape),
                        [pos[out.name]],
                        nodes[pos[out.name]].shape,
                    )
                )
            break
        ins = [a for a in _flat_args(n) if isinstance(a, fx.Node) and a.name in dynamic]
        if not ins:  # a constant or shape computation
            continue
        dynamic.add(n.name)
        value = values.get(n.name)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model: operation {n.name!r} ({n.target}) does not give a tensor")
        in_shape = shape_of(ins[0])
        op = _node_op(n, ins, modules, values, in_shape, shape_of(n))
        if op is None:
            pos[n.name] = pos[ins[0].name]
            continue
        add(n.name, op, [pos[a.name] for a in ins], shape_of(n))
    graph = Graph(nodes)
    _check_front(graph)
    return graph


def _flat_args(n: fx.Node):
    for a in list(n.args) + list(n.kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class _Interp(fx.Interpreter):
    """Runs the traced model once, keeping every intermediate value."""

    def __init__(self, gm, store):
        super().__init__(gm)
        self.store = store

    def run_node(self, n):
        out = super().run_node(n)
        self.store[n.name] = out
        return out


def _const(a, values):
    if isinstance(a, fx.Node):
        return values[a.name]
    return a


def _node_op(n: fx.Node, ins, modules, values, in_shape, out_shape):
    name = n.name
    if n.op == "call_module":
        return _module_op(modules[n.target], str(n.target), in_shape, out_shape)
    target = n.target
    if n.op == "call_method":
        if target in _RESHAPE_METHODS:
            return aff.ReshapeOp(in_shape, out_shape) if in_shape != out_shape else None
        if target in ("relu", "sigmoid", "tanh"):
            target = getattr(torch, target)
        elif target in ("add", "sub", "mul", "div"):
            target = getattr(torch, target)
    if target is torch.flatten:
        return aff.ReshapeOp(in_shape, out_shape)
    if target in _RELU:
        return act.LeakyReLUOp(0.0)
    if target is F.leaky_relu:
        slope = n.kwargs.get("negative_slope", n.args[1] if len(n.args) > 1 else 0.01)
        return act.LeakyReLUOp(float(slope))
    if target in (torch.sigmoid, F.sigmoid):
        return act.SigmoidOp()
    if target in (torch.tanh, F.tanh):
        return act.TanhOp()
    if target in _ADD + _SUB + _MUL + _DIV:
        a, b = n.args[0], n.args[1]
        a_dyn = isinstance(a, fx.Node) and a in ins
        b_dyn = isinstance(b, fx.Node) and b in ins
        if a_dyn and b_dyn:
            if target in _ADD:
                return aff.Merge(+1.0)
            if target in _SUB:
                return aff.Merge(-1.0)
            raise ValueError(
                f"model: operation {name!r} multiplies or divides two network values; "
                "the certifiers need one side constant"
            )
        const = torch.as_tensor(_const(b if a_dyn else a, values))
        if target in _ADD:
            return aff.ConstantOp("add", const)
        if target in _SUB:
            return aff.ConstantOp("sub" if a_dyn else "rsub", const)
        if target in _MUL:
            return aff.ConstantOp("mul", const)
        if not a_dyn:
            raise ValueError(f"model: operation {name!r} divides by a network value")
        return aff.ConstantOp("div", const)
    raise ValueError(
        f"model: operation {name!r} ({getattr(target, '__name__', target)}) has no sound "
        f"relaxation in the certifiers; supported: {', '.join(SUPPORTED)}"
    )


def _check_front(graph: Graph) -> None:
    """The paper's requirement: the first operation on the image is affine."""
    if len(graph.nodes) < 2:
        raise ValueError("model: the model does nothing to its input")
    for node in graph.nodes[1:]:
        if 0 in node.inputs and isinstance(node.op, act.Activation):
            raise ValueError(
                f"model: the first operation on the image ({node.name!r}) must be affine "
                "(Corollary 2.1); got a non-linear activation"
            )
