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
