r"""The flow-domain network of one image as a chain of dense affine maps and ReLUs.

Certifiers (bound propagation, LP, MILP) work on

.. math::

    z_1 = W_1 \delta + b_1,\quad z_{k+1} = W_{k+1}\,\mathrm{relu}(z_k) + b_{k+1},
    \quad \text{logits} = z_L ,

where ``W_1 = \tilde W = WA`` and ``b_1 = \tilde b = WR + b`` come from the fused first
layer (Corollary 2.1) and consecutive affine layers (e.g. ``Conv2d -> Flatten -> Linear``)
are merged.  Convolutions are densified (fine for the small nets verified here).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowverify.model.flow_model import FlowConv2d, FlowLinear, FlowModel, _modules_in_order

__all__ = ["AffineChain", "affine_chain"]


@dataclass
class AffineChain:
    """Dense affine layers ``(W_k, b_k)`` with a ReLU between consecutive layers.

    Attributes
    ----------
    weights : list of ndarray
        ``W_k`` of shape ``(n_k, n_{k-1})``, float64; ``n_0 = C*D`` (flow coordinates).
    biases : list of ndarray
        ``b_k`` of shape ``(n_k,)``, float64.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @property
    def input_dim(self) -> int:
        return self.weights[0].shape[1]

    @property
    def num_classes(self) -> int:
        return self.weights[-1].shape[0]

    def forward(self, delta: np.ndarray) -> np.ndarray:
        """Logits for flows ``delta (..., n_0)`` (float64)."""
        z = delta @ self.weights[0].T + self.biases[0]
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            z = np.maximum(z, 0.0) @ w.T + b
        return z

    def margin_chain(self, label: int) -> AffineChain:
        """The chain whose outputs are the margins ``f_y - f_t`` for ``t != y``."""
        k = self.num_classes
        others = [t for t in range(k) if t != label]
        c = np.zeros((k - 1, k))
        c[np.arange(k - 1), label] = 1.0
        c[np.arange(k - 1), others] = -1.0
        weights = [*self.weights[:-1], c @ self.weights[-1]]
        biases = [*self.biases[:-1], c @ self.biases[-1]]
        return AffineChain(weights, biases)


def _dense(
    module: nn.Module, in_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Dense matrix and offset of an affine module on inputs of shape ``in_shape``."""
    n_in = int(np.prod(in_shape))
    with torch.no_grad():
        param = next(iter(module.parameters()), None)
        buf = next(iter(module.buffers()), None)
        ref = param if param is not None else buf
        dtype = torch.float64
        device = ref.device if ref is not None else torch.device("cpu")
        zero = torch.zeros((1, *in_shape), dtype=dtype, device=device)
        eye = torch.eye(n_in, dtype=dtype, device=device).reshape(n_in, *in_shape)
        mod = copy.deepcopy(module).to(dtype)
        b = mod(zero).reshape(-1)
        w = (mod(eye).reshape(n_in, -1) - b).T
        out_shape = tuple(mod(zero).shape[1:])
    return w.cpu().numpy(), b.cpu().numpy(), out_shape


def affine_chain(flow_model: FlowModel, index: int = 0) -> AffineChain:
    """The dense affine/ReLU chain of a *fused* :class:`FlowModel` for reference ``index``.

    Parameters
    ----------
    flow_model : FlowModel
        Built with ``fuse=True``; the layers after the first must be ``nn.Linear``,
        ``nn.Conv2d``, ``nn.Flatten``, ``nn.Identity`` or ``nn.ReLU`` (no two ReLUs in a
        row, a ReLU after an affine layer).
    index : int
        Which reference of the FlowModel's batch (images have their own references).

    Returns
    -------
    AffineChain
        In float64, with input ``δ`` flattened to ``C*D``.
    """
    if not flow_model.fused:
        raise ValueError("flow_model: expected a FlowModel built with fuse=True")
    first = flow_model.first
    c, d = flow_model.channels, flow_model.flow_dim
    n_ref = flow_model.reference.shape[0]
    if not 0 <= index < n_ref:
        raise ValueError(f"index: expected 0 <= index < {n_ref}, got {index}")
    with torch.no_grad():
        if isinstance(first, FlowLinear):
            sc = first.scale[index if first.scale.shape[0] > 1 else 0].double().cpu().numpy()
            w = first.weight.detach().double().cpu().numpy() / np.repeat(sc, d)[None, :]
            bias = first.bias.detach().double().cpu()
            b = bias[index if bias.shape[0] > 1 else 0].numpy()
            shape: tuple[int, ...] = (w.shape[0],)
        elif isinstance(first, FlowConv2d):
            probe = FlowConv2d.__new__(FlowConv2d)
            nn.Module.__init__(probe)
            probe.kernel_h = first.kernel_h.double()
            probe.kernel_v = first.kernel_v.double()
            probe.stride, probe.pad = first.stride, first.pad
            probe.height, probe.width, probe.channels = first.height, first.width, first.channels
            rt = first.reference_term.double()
            rt = rt[index : index + 1] if rt.shape[0] > 1 else rt
            probe.reference_term = torch.zeros_like(rt)
            probe.scale = first.scale[index : index + 1].double()
            w, _, _ = _dense(probe, (c, d))
            b = rt.reshape(-1).cpu().numpy()
            shape = tuple(rt.shape[1:])
        else:
            raise ValueError(f"flow_model: unexpected first layer {type(first).__name__}")
    weights, biases = [w], [b]
    pending_relu = False
    for name, mod in _modules_in_order(flow_model.head):
        if isinstance(mod, nn.ReLU):
            if pending_relu:
                raise ValueError(f"flow_model: two ReLUs in a row at layer {name!r}")
            pending_relu = True
            continue
        if isinstance(mod, (nn.Flatten, nn.Identity)):
            if isinstance(mod, nn.Flatten):
                shape = (int(np.prod(shape)),)
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            w_k, b_k, out_shape = _dense(mod, shape)
            if pending_relu:
                weights.append(w_k)
                biases.append(b_k)
            else:  # merge consecutive affine maps
                weights[-1] = w_k @ weights[-1]
                biases[-1] = w_k @ biases[-1] + b_k
            shape = out_shape
            pending_relu = False
            continue
        raise ValueError(
            f"flow_model: certifiers support Linear, Conv2d, Flatten and ReLU layers, got "
            f"layer {name!r} of type {type(mod).__name__}"
        )
    if pending_relu:
        raise ValueError("flow_model: the network ends with a ReLU; expected logits")
    return AffineChain(weights, biases)
