r"""The flow-domain classifier (Theorem 2, Corollary 2.1; SPEC section 3).

For a classifier ``f`` on images and a reference ``R``, the flow-domain classifier is

.. math::

    \tilde f(\delta) = f(R + A\delta), \qquad \tilde f(\delta_\mu) = f(\mu).

If the first operation of ``f`` is affine, ``x \mapsto Wx + b``, so is the first operation
of ``\tilde f``: ``\tilde W = WA``, ``\tilde b = WR + b`` (Corollary 2.1).  For a
convolution, ``conv(A\delta)`` is a convolution of ``h`` with the kernel differenced
along the width plus a convolution of ``v`` with the kernel differenced along the height,
so the fused layer stays convolution-shaped (:class:`FlowConv2d`).

Units: flows and references are in the units of the data (mass ``s`` per image); with
``input_scale="normalised"`` the wrapped model consumes the normalised image
``(R + A\delta)/s`` (mass 1 per channel), with ``"raw"`` the image itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowverify.transport.flows import apply_flow, apply_flow_adjoint, flow_dim

__all__ = ["INPUT_SCALES", "FlowConv2d", "FlowLinear", "FlowModel", "first_affine_layer"]

INPUT_SCALES = ("raw", "normalised")


def _modules_in_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules of ``model`` in execution order for (nested) ``nn.Sequential``s."""
    if isinstance(model, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            for sub_name, sub in _modules_in_order(child):
                out.append((f"{name}.{sub_name}" if sub_name else name, sub))
        return out
    return [("", model)]


def first_affine_layer(model: nn.Module) -> tuple[int, str, nn.Module]:
    """Locate the first affine layer of a sequential model for fusion.

    Returns ``(position, name, layer)`` where ``position`` indexes the flattened list of
    leaf modules; the layer is an ``nn.Linear`` (optionally preceded by ``nn.Flatten``)
    or an ``nn.Conv2d``.

    Raises
    ------
    ValueError
        Naming the offending layer, if the first operation is not affine or the model is
        not a (nested) ``nn.Sequential``.
    """
    mods = _modules_in_order(model)
    if len(mods) == 1 and mods[0][0] == "":
        raise ValueError(
            f"model: fuse=True needs an nn.Sequential whose first operation is affine, got "
            f"{type(model).__name__}; use fuse=False (composed) for other modules"
        )
    for pos, (name, mod) in enumerate(mods):
        if isinstance(mod, (nn.Flatten, nn.Identity)) and pos == 0:
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            return pos, name, mod
        raise ValueError(
            f"model: fuse=True needs an affine first operation (nn.Linear after an optional "
            f"nn.Flatten, or nn.Conv2d), got layer {name!r} of type {type(mod).__name__}"
        )
    raise ValueError("model: fuse=True needs at least one layer, got an empty model")


class FlowLinear(nn.Module):
    r"""A fused first linear layer on flows: ``z = \tilde W (\delta / s) + \tilde b``.

    ``\tilde W = W A`` (shape ``(out, C*D)``), ``\tilde b = W (R / s) + b`` (one row per
    reference), ``s`` ``(N, C)`` the per-image, per-channel scale (1 for raw models, the
    mass for normalised ones).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("scale", scale)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        flow = flow / self.scale[:, :, None]
        return flow.reshape(flow.shape[0], -1) @ self.weight.T + self.bias


class FlowConv2d(nn.Module):
    r"""A fused first convolution on flows (Corollary 2.1 for convolutions).

    ``conv(R + A\delta) = conv(R) + conv_{K_h}(h) + conv_{K_v}(v)`` where
    ``K_h[..., b] = K[..., b] - K[..., b-1]`` (kernel differenced along the width, width
    ``k_w + 1``, width padding ``p_w + 1``) and ``K_v`` the same along the height.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        reference_term: torch.Tensor,
        scale: torch.Tensor,
        height: int,
        width: int,
    ):
        super().__init__()
        k = conv.weight.detach()
        zw = torch.zeros_like(k[..., :1])
        zh = torch.zeros_like(k[..., :1, :])
        self.register_buffer("kernel_h", torch.cat([k, zw], -1) - torch.cat([zw, k], -1))
        self.register_buffer("kernel_v", torch.cat([k, zh], -2) - torch.cat([zh, k], -2))
        self.register_buffer("reference_term", reference_term)
        self.register_buffer("scale", scale)
        self.stride = conv.stride
        self.pad = _conv_padding(conv)
        self.height, self.width = height, width
        self.channels = conv.in_channels

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        n, c, hw = flow.shape[0], self.channels, self.height * (self.width - 1)
        flow = flow / self.scale[:, :, None]
        h = flow[..., :hw].reshape(n, c, self.height, self.width - 1)
        v = flow[..., hw:].reshape(n, c, self.height - 1, self.width)
        ph, pw = self.pad
        out = F.conv2d(h, self.kernel_h, stride=self.stride, padding=(ph, pw + 1))
        out = out + F.conv2d(v, self.kernel_v, stride=self.stride, padding=(ph + 1, pw))
        return out + self.reference_term


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(
            "model: fuse=True supports Conv2d with groups=1, dilation=1 and zero padding, got "
            f"groups={conv.groups}, dilation={conv.dilation}, padding_mode={conv.padding_mode!r}"
        )
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return 0, 0
        raise ValueError(f"model: fuse=True does not support Conv2d padding={pad!r}")
    return int(pad[0]), int(pad[1])


class FlowModel(nn.Module):
    r"""The classifier in the flow domain: ``flow (N, C, D) -> logits f(R + A flow)``.

    Parameters
    ----------
    model : nn.Module
        Classifier on images.  Its input is ``(N, C, H, W)`` or, when its first layer is
        an ``nn.Linear`` with no ``nn.Flatten`` before it, ``(N, C*H*W)``.
    reference : Tensor or ndarray
        ``R``: one reference ``(C, H, W)`` / ``(H, W)`` / ``(1, C, H, W)`` shared by the
        batch, or ``(N, C, H, W)`` with one reference per flow of the batch.  In the units
        of the data (it must have the mass of the images it represents).
    input_scale : {"raw", "normalised"}
        ``"raw"``: the model consumes ``R + A flow``.  ``"normalised"``: it consumes
        ``(R + A flow) / s`` with ``s`` the per-channel mass of ``R`` (mass 1 images).
    fuse : bool
        Replace the first affine layer by its flow-domain version (Corollary 2.1):
        ``W̃ = WA``, ``b̃ = WR + b``; a convolution stays a convolution.  Otherwise the
        flow map is composed with the model.
    flat_input : bool, optional
        Whether the model takes flat ``(N, C*H*W)`` inputs; inferred when None.

    Notes
    -----
    The model is put in eval mode.  Parameters are shared with ``model`` when composed;
    fusion copies the first layer (later changes to its weights are not seen).
    """

    def __init__(
        self,
        model: nn.Module,
        reference,
        *,
        input_scale: str = "raw",
        fuse: bool = False,
        flat_input: bool | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
        if input_scale not in INPUT_SCALES:
            raise ValueError(
                f"input_scale: expected one of {', '.join(INPUT_SCALES)}, got {input_scale!r}"
            )
        ref = _as_reference_tensor(reference, model)
        self.model = model.eval()
        self.input_scale = input_scale
        self.fused = bool(fuse)
        self.channels, self.height, self.width = ref.shape[1:]
        self.flow_dim = flow_dim(self.height, self.width)
        self.register_buffer("reference", ref)
        mass = ref.sum(dim=(-2, -1))  # (N, C)
        if input_scale == "normalised":
            if not bool((mass > 0).all()):
                raise ValueError("reference: input_scale='normalised' needs positive mass")
            scale = mass
        else:
            scale = torch.ones_like(mass)
        self.register_buffer("scale", scale)
        self.flat_input = _infer_flat(model) if flat_input is None else bool(flat_input)
        self.head: nn.Module | None = None
        self.first: nn.Module | None = None
        if self.fused:
            self._fuse(model)

    def _fuse(self, model: nn.Module) -> None:
        pos, name, layer = first_affine_layer(model)
        ref = self.reference
        n = ref.shape[0]
        with torch.no_grad():
            if isinstance(layer, nn.Linear):
                c, hh, ww = self.channels, self.height, self.width
                if layer.in_features != c * hh * ww:
                    raise ValueError(
                        f"model: first layer {name!r} expects {layer.in_features} inputs, the "
                        f"reference has C*H*W = {c * hh * ww}"
                    )
                w = layer.weight.detach().to(ref.dtype)
                w_img = w.reshape(-1, c, hh, ww)
                w_tilde = apply_flow_adjoint(w_img).reshape(w.shape[0], -1)
                ref_s = ref / self.scale[:, :, None, None]
                b_tilde = ref_s.reshape(n, -1) @ w.T
                if layer.bias is not None:
                    b_tilde = b_tilde + layer.bias.detach().to(ref.dtype)
                self.first = FlowLinear(w_tilde, b_tilde, self.scale.clone())
            else:
                conv = layer
                if conv.in_channels != self.channels:
                    raise ValueError(
                        f"model: first layer {name!r} expects {conv.in_channels} channels, "
                        f"the reference has {self.channels}"
                    )
                ref_term = F.conv2d(
                    ref / self.scale[:, :, None, None],
                    conv.weight.detach().to(ref.dtype),
                    None if conv.bias is None else conv.bias.detach().to(ref.dtype),
                    stride=conv.stride,
                    padding=_conv_padding(conv),
                )
                fused = FlowConv2d(conv, ref_term, self.scale.clone(), self.height, self.width)
                fused.kernel_h = fused.kernel_h.to(ref.dtype)
                fused.kernel_v = fused.kernel_v.to(ref.dtype)
                self.first = fused
        rest = [m for _, m in _modules_in_order(model)[pos + 1 :]]
        self.head = nn.Sequential(*rest)

    def images(self, flow: torch.Tensor) -> torch.Tensor:
        """The images ``R + A flow`` ``(N, C, H, W)`` (data units)."""
        flow = self._check_flow(flow)
        return apply_flow(self.reference, flow)

    def model_input(self, flow: torch.Tensor) -> torch.Tensor:
        """What the wrapped model consumes for ``flow`` (normalised or raw image)."""
        x = self.images(flow)
        if self.input_scale == "normalised":
            x = x / self.scale[:, :, None, None]
        if self.flat_input:
            x = x.reshape(x.shape[0], -1)
        return x

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, classes)`` of the model at ``R + A flow``.

        Raises ValueError naming ``model`` if the model's output is not ``(N, classes)``.
        """
        if not self.fused:
            out = self.model(self.model_input(flow))
        else:
            flow = self._check_flow(flow)
            out = self.head(self.first(flow))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != flow.shape[0]:
            got = (
                f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            )
            raise ValueError(
                f"model: expected logits of shape (N, classes) = ({flow.shape[0]}, classes) for "
                f"a batch of {flow.shape[0]} flows, got {got}"
            )
        return out

    def _check_flow(self, flow: torch.Tensor) -> torch.Tensor:
        if not isinstance(flow, torch.Tensor):
            raise TypeError(f"flow: expected a torch.Tensor, got {type(flow).__name__}")
        expected = (self.channels, self.flow_dim)
        if flow.ndim == 2 and flow.shape[1] == self.channels * self.flow_dim:
            flow = flow.reshape(flow.shape[0], *expected)
        if flow.ndim != 3 or tuple(flow.shape[1:]) != expected:
            raise ValueError(
                f"flow: expected shape (N, {self.channels}, {self.flow_dim}), got "
                f"{tuple(flow.shape)}"
            )
        if flow.dtype != self.reference.dtype:  # the model's floating dtype
            flow = flow.to(self.reference.dtype)
        n_ref = self.reference.shape[0]
        if n_ref not in (1, flow.shape[0]):
            raise ValueError(
                f"flow: the FlowModel holds {n_ref} references, got a batch of "
                f"{flow.shape[0]} flows (expected 1 or {n_ref})"
            )
        return flow


def _infer_flat(model: nn.Module) -> bool:
    mods = _modules_in_order(model)
    first = mods[0][1] if mods else None
    return isinstance(first, nn.Linear)


def _as_reference_tensor(reference, model: nn.Module) -> torch.Tensor:
    if isinstance(reference, np.ndarray):
        reference = torch.as_tensor(reference)
    if not isinstance(reference, torch.Tensor):
        raise TypeError(
            f"reference: expected a torch.Tensor or numpy.ndarray, got {type(reference).__name__}"
        )
    if not reference.is_floating_point():
        reference = reference.to(torch.get_default_dtype())
    if reference.ndim == 2:
        reference = reference[None, None]
    elif reference.ndim == 3:
        reference = reference[None]
    elif reference.ndim != 4:
        raise ValueError(
            "reference: expected shape (C, H, W), (H, W) or (N, C, H, W), got "
            f"{tuple(reference.shape)}"
        )
    if reference.numel() == 0:
        raise ValueError(
            "reference: expected a non-empty reference (N, C, H, W >= 1), got shape "
            f"{tuple(reference.shape)}"
        )
    if not bool(torch.isfinite(reference).all()) or float(reference.min()) < 0:
        raise ValueError("reference: expected finite, non-negative pixel values")
    # The reference takes the model's floating dtype (a float64 reference, numpy's default,
    # with a float32 model would otherwise feed float64 images to float32 layers).
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        reference = reference.to(device=param.device, dtype=param.dtype)
    return reference.detach()
