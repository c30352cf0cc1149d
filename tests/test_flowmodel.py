"""Theorem 2 / Corollary 2.1: the flow-domain model, fused == composed; references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import flowverify as fv
from flowverify.transport.flows import flow_dim
from flowverify.verification._chain import affine_chain


def _nets(dtype):
    torch.manual_seed(0)
    nets = {
        "flatten-linear": nn.Sequential(
            nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5)
        ),
        "linear-flat-input": nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5)),
        "conv": nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 5),
        ),
        "conv-rgb-nopad-nobias": nn.Sequential(
            nn.Conv2d(3, 2, (3, 2), stride=(1, 2), bias=False), nn.ReLU(), nn.Flatten()
        ),
    }
    return {k: v.to(dtype) for k, v in nets.items()}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("input_scale", ["raw", "normalised"])
@pytest.mark.parametrize(
    "name", ["flatten-linear", "linear-flat-input", "conv", "conv-rgb-nopad-nobias"]
)
def test_fused_equals_composed(dtype, tol, input_scale, name):
    net = _nets(dtype)[name]
    c = 3 if "rgb" in name else 1
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, c, 8, 8, dtype=dtype, generator=gen)
    ref = fv.make_reference("random", x, seed=2)
    flow = fv.inverse_flow(ref, x, method="algorithm2")
    flow = flow + 0.01 * torch.randn(flow.shape, dtype=dtype, generator=gen)
    composed = fv.FlowModel(net, ref, input_scale=input_scale)
    fused = fv.FlowModel(net, ref, input_scale=input_scale, fuse=True)
    a, b = composed(flow), fused(flow)
    scale = max(1.0, float(a.detach().abs().max()))
    assert float((a - b).detach().abs().max()) <= tol * scale
    # single image with a shared reference
    one = fv.FlowModel(net, ref[0], input_scale=input_scale, fuse=True)
    np.testing.assert_allclose(
        one(flow[:1]).detach().numpy(), a[:1].detach().numpy(), atol=tol * scale, rtol=0
    )


def test_flow_model_reproduces_model_on_the_image():
    net = _nets(torch.float64)["conv"]
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    ref = fv.make_reference("uniform", x)
    flow = fv.inverse_flow(ref, x)
    for fuse in (False, True):
        out = fv.FlowModel(net, ref, fuse=fuse)(flow)  # f~(δµ) = f(µ)
        torch.testing.assert_close(out, net(x), atol=1e-12, rtol=0)
    norm = fv.FlowModel(net, ref, input_scale="normalised", fuse=True)(flow)
    torch.testing.assert_close(norm, net(x / x.sum(dim=(1, 2, 3), keepdim=True)))


def test_fusion_errors_name_the_layer():
    x = torch.rand(1, 1, 8, 8)
    ref = fv.make_reference("uniform", x)
    with pytest.raises(ValueError, match=r"layer '0' of type ReLU"):
        fv.FlowModel(nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)), ref, fuse=True)
    with pytest.raises(ValueError, match="nn.Sequential"):
        fv.FlowModel(nn.Linear(64, 2), ref, fuse=True)
    with pytest.raises(ValueError, match="expects 10 inputs"):
        fv.FlowModel(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), ref, fuse=True)
    with pytest.raises(ValueError, match="input_scale: expected one of raw, normalised"):
        fv.FlowModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), ref, input_scale="unit")
    with pytest.raises(TypeError, match="model: expected a torch nn.Module"):
        fv.FlowModel("fc", ref)
    fm = fv.FlowModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), ref, fuse=True)
    with pytest.raises(ValueError, match=r"flow: expected shape \(N, 1, 112\)"):
        fm(torch.zeros(1, 1, 10))


def test_flow_model_is_eval_and_gradients_flow():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    x = torch.rand(2, 1, 8, 8)
    ref = fv.make_reference("uniform", x)
    fm = fv.FlowModel(net, ref, fuse=True)
    assert not net.training
    flow = torch.zeros(2, 1, flow_dim(8, 8), requires_grad=True)
    fm(flow).sum().backward()
    assert flow.grad is not None and float(flow.grad.abs().sum()) > 0


def test_affine_chain_matches_fused_model():
    net = _nets(torch.float32)["conv"]
    x = torch.rand(2, 1, 8, 8)
    ref = fv.make_reference("point", x, seed=4)
    fm = fv.FlowModel(net, ref, fuse=True)
    flow = torch.randn(2, 1, flow_dim(8, 8)) * 0.05
    out = fm(flow).detach().double().numpy()
    for i in range(2):
        chain = affine_chain(fm, i)
        np.testing.assert_allclose(
            chain.forward(flow[i].reshape(-1).double().numpy()), out[i], atol=1e-5
        )
        margins = chain.margin_chain(1).forward(flow[i].reshape(-1).double().numpy())
        np.testing.assert_allclose(margins, out[i, 1] - np.delete(out[i], 1), atol=1e-5)
    assert next(net.parameters()).dtype == torch.float32  # densifying never mutates the model


# ------------------------------------------------------------------------ references


def test_references_have_the_image_mass():
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 5, 6))
    for kind in ("uniform", "random", "point"):
        ref = fv.make_reference(kind, x, seed=7)
        assert ref.shape == x.shape and (ref >= 0).all()
        np.testing.assert_allclose(ref.sum(axis=(-2, -1)), x.sum(axis=(-2, -1)), rtol=1e-12)
    pt = fv.make_reference("point", x, seed=7)
    assert (np.count_nonzero(pt[0, 0]) == 1) and np.array_equal(
        fv.make_reference("point", x, seed=7), pt
    )
    assert not np.array_equal(
        fv.make_reference("random", x, seed=1), fv.make_reference("random", x, seed=2)
    )
    img = fv.make_reference(x[0], x)
    np.testing.assert_allclose(img.sum(axis=(-2, -1)), x.sum(axis=(-2, -1)))
    t = fv.make_reference("uniform", torch.as_tensor(x[0, 0], dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.shape == (5, 6) and t.dtype == torch.float32


def test_reference_errors():
    x = np.ones((1, 1, 4, 4))
    with pytest.raises(ValueError, match="kind: unknown reference 'gauss'"):
        fv.make_reference("gauss", x)
    with pytest.raises(ValueError, match="image: expected positive mass"):
        fv.make_reference("uniform", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="references: unknown reference spec 'foo:2'"):
        fv.parse_references("uniform,foo:2")
    with pytest.raises(ValueError, match="needs a data set"):
        fv.parse_references("data:2")


def test_parse_references_paper_six():
    data = np.random.default_rng(0).random((10, 1, 4, 4))
    refs = fv.parse_references("random:2,point:2,data:2", data=data, exclude_index=3)
    assert [r.kind for r in refs] == ["random", "random", "point", "point", "data", "data"]
    assert all(r.seed != 3 for r in refs if r.kind == "data")
    x = data[3]
    for r in refs:
        ref = r.build(x)
        np.testing.assert_allclose(ref.sum(), x.sum())
