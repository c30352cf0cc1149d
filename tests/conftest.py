"""Shared fixtures: the data and the network from outside the project (``../shared``)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def outside_onnx() -> Path:
    """``mnist-net_256x2.onnx``: a VNN-COMP 784-256-256-10 ReLU network (see its README)."""
    path = SHARED / "models" / "mnist-net_256x2.onnx"
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def outside_net(outside_onnx):
    """The outside network loaded by flowverify (native ONNX converter)."""
    from flowverify.model.loading import load_model

    return load_model(str(outside_onnx))


def relu_net(seed, sizes, *, c=1, h=6, w=6, conv=None, dtype=None):
    """A seeded ReLU network on ``(c, h, w)`` images, in eval mode: an optional stem
    ``Conv2d(c, conv, 3, stride=2) -> ReLU``, then ``Linear`` layers of ``sizes`` with a
    ReLU between consecutive ones (the last is the logits).  float64 unless ``dtype``.
    The tests' small networks (import it: ``from conftest import relu_net``)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if conv:
        layers += [nn.Conv2d(c, conv, 3, stride=2), nn.ReLU(), nn.Flatten()]
        n_in = conv * ((h - 3) // 2 + 1) * ((w - 3) // 2 + 1)
    else:
        layers += [nn.Flatten()]
        n_in = c * h * w
    for k, n_out in enumerate(sizes):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(sizes) - 1:
            layers.append(nn.ReLU())
        n_in = n_out
    return nn.Sequential(*layers).to(torch.float64 if dtype is None else dtype).eval()
