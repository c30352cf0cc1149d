"""Model zoo, code-free checkpoints, safe ONNX conversion, load_model, input shapes."""

from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from flowverify.io.bundled import bundled_digits
from flowverify.model.checkpoint import load_checkpoint, save_checkpoint
from flowverify.model.input_shape import model_input_shape
from flowverify.model.layers import Elementwise, Reshape
from flowverify.model.loading import load_model
from flowverify.model.zoo import ARCHITECTURES, BUNDLED_MODELS, build_architecture, bundled_model

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from flowverify.model.onnx_import import load_onnx  # noqa: E402

TARGETS = {"linear": 0.88, "fc": 0.95, "cnn": 0.95}


# --------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architectures_shapes(name):
    torch.manual_seed(0)
    net = build_architecture(name)
    assert isinstance(net, nn.Sequential)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert model_input_shape(net) == (1, 28, 28)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="smoothing_base"):
        build_architecture("resnet")


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_models_accuracy(name):
    x, y = bundled_digits()
    net = bundled_model(name)
    assert not net.training
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    acc = float((pred == y).mean())
    assert acc >= TARGETS[name] - 0.02, f"{name}: {acc:.3f}"
    _, meta = load_checkpoint(_asset(name), return_metadata=True)
    assert meta["eval_accuracy"] >= TARGETS[name]
    assert meta["architecture"] == name
    assert all(p.dtype == torch.float32 for p in net.parameters())


def _asset(name):
    from importlib import resources

    return resources.files("flowverify").joinpath("assets", f"{name}.pt")


# --------------------------------------------------------------------------- checkpoints


def _odd_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        Elementwise("sub", torch.tensor([[[0.1]]])),
        Elementwise("div", torch.tensor([[[0.3]]])),
        nn.ZeroPad2d((1, 0, 2, 1)),
        nn.Conv2d(1, 4, 3, stride=2, padding=1, dilation=1),
        nn.Tanh(),
        nn.Sequential(nn.MaxPool2d(2), nn.Identity()),
        nn.AvgPool2d(1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Unflatten(1, (4, 8, 7)),
        Reshape((-1,)),
        nn.Linear(224, 10, bias=False),
    )


@pytest.mark.parametrize("make", [lambda: build_architecture("cnn"), _odd_net])
def test_checkpoint_roundtrip(tmp_path, make):
    torch.manual_seed(0)
    net = make().eval()
    save_checkpoint(net, tmp_path / "m.pt", metadata={"acc": 0.5, "tags": ["a", 1]})
    loaded, meta = load_checkpoint(tmp_path / "m.pt", return_metadata=True)
    assert meta == {"acc": 0.5, "tags": ["a", 1]}
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    # the file loads with weights_only=True and contains only plain data
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["format"] == "flowverify-checkpoint" and raw["version"] == 1


def test_checkpoint_refuses_pickled_module(tmp_path):
    torch.save(build_architecture("linear"), tmp_path / "full.pt")
    with pytest.raises(ValueError, match="pickled Python objects.*save_checkpoint"):
        load_checkpoint(tmp_path / "full.pt")


def test_checkpoint_refuses_state_dict(tmp_path):
    torch.save(build_architecture("linear").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="bare state_dict"):
        load_checkpoint(tmp_path / "sd.pt")


def test_checkpoint_refuses_truncated_and_garbage(tmp_path):
    save_checkpoint(build_architecture("fc"), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read .*cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def _payload(**over):
    base = {
        "format": "flowverify-checkpoint",
        "version": 1,
        "layers": [{"type": "Flatten", "start_dim": 1, "end_dim": -1}],
        "state_dict": {},
        "metadata": {},
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_payload(layers=[{"type": "LSTM", "input_size": 3}]), "unknown type 'LSTM'"),
        (_payload(format="other"), "expected format"),
        (_payload(version=2), "unsupported checkpoint version 2"),
        (_payload(layers=[{"type": "Linear", "in_features": 2}]), "cannot build layer 0"),
        (
            _payload(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}]),
            "weights do not match",
        ),
        (_payload(layers=[{"type": "ReLU", "inplace": {"a": 1}}]), "invalid option"),
        (_payload(layers="Flatten"), "malformed"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_checkpoint_refuses_malformed(tmp_path, payload, match):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=match) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert "bad.pt" in str(info.value)


def test_save_checkpoint_refusals(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="Custom cannot be stored"):
        save_checkpoint(nn.Sequential(nn.Flatten(), Custom()), tmp_path / "a.pt")
    with pytest.raises(TypeError, match="nn.Sequential"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "a.pt")
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(nn.Sequential(nn.ReLU()), tmp_path / "a.pt", metadata={"x": object()})


# --------------------------------------------------------------------------- ONNX


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _save_onnx(path, nodes, inits, in_shape, out_shape, *, opset=13):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_chain_conv_gemm(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    w2 = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)  # conv without bias, uneven pads
    g_b = rng.normal(size=(10, 3 * 14 * 14)).astype(np.float32)  # transB=1: (out, in)
    g_c = rng.normal(size=10).astype(np.float32)
    mean, std = np.float32(0.13), np.float32(0.31)
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["a"]),
        helper.make_node("Div", ["a", "std"], ["b"]),
        helper.make_node(
            "Conv", ["b", "w1", "b1"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Conv", ["d", "w2"], ["e"], pads=[0, 0, 1, 1], dilations=[1, 1]),
        helper.make_node("Identity", ["e"], ["f"]),
        helper.make_node("Flatten", ["f"], ["g"], axis=1),
        helper.make_node("Gemm", ["g", "gb", "gc"], ["output"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = [
        _init("mean", mean),
        _init("std", std),
        _init("w1", w1),
        _init("b1", b1),
        _init("w2", w2),
        _init("gb", g_b),
        _init("gc", g_c),
    ]
    path = _save_onnx(tmp_path / "m.onnx", nodes, inits, ["N", 1, 28, 28], ["N", 10])
    net = load_model(path)
    assert isinstance(net, nn.Sequential) and not net.training
    assert model_input_shape(net) == (1, 28, 28)

    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    t = lambda a: torch.from_numpy(np.asarray(a)).double()  # noqa: E731
    h = (x - float(mean)) / float(std)
    h = torch.relu(nn.functional.conv2d(h, t(w1), t(b1), stride=2, padding=1))
    h = nn.functional.conv2d(nn.functional.pad(h, (0, 1, 0, 1)), t(w2))
    ref = 0.5 * h.flatten(1) @ t(g_b).T + 2.0 * t(g_c)
    with torch.no_grad():
        got = net.double()(x)  # float32 weights are exact in float64: compare the structure
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    net.float()
    # shipped as a code-free checkpoint too
    save_checkpoint(net, tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m.pt")(x.float()), net(x.float()))


def test_onnx_matmul_add_reshape_constant(tmp_path):
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(784, 20)).astype(np.float32)
    b1 = rng.normal(size=20).astype(np.float32)
    w2 = rng.normal(size=(20, 10)).astype(np.float32)
    b2 = rng.normal(size=(1, 10)).astype(np.float32)
    shape = numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "shape_value")
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Reshape", ["input", "shape"], ["a"]),
        helper.make_node("MatMul", ["a", "w1"], ["b"]),
        helper.make_node("Add", ["b", "b1"], ["c"]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("MatMul", ["d", "w2"], ["e"]),
        helper.make_node("Add", ["b2", "e"], ["f"]),
        helper.make_node("Mul", ["f", "scale"], ["output"]),
    ]
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)]
    inits.append(_init("scale", 3.0))
    path = _save_onnx(tmp_path / "mlp.onnx", nodes, inits, ["N", 1, 28, 28], ["N", 10])
    net = load_onnx(path)
    # the Adds are folded into the Linear layers
    assert [type(m).__name__ for m in net] == ["Reshape", "Linear", "ReLU", "Linear", "Elementwise"]
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref = 3.0 * (torch.relu(x.reshape(4, -1) @ t(w1) + t(b1)) @ t(w2) + t(b2))
    with torch.no_grad():
        torch.testing.assert_close(net.double()(x), ref, rtol=1e-6, atol=1e-6)


def test_onnx_flat_input_shape(tmp_path):
    w = np.ones((784, 10), np.float32)
    nodes = [helper.make_node("Gemm", ["input", "w"], ["output"])]
    path = _save_onnx(tmp_path / "flat.onnx", nodes, [_init("w", w)], ["N", 784], ["N", 10])
    net = load_model(str(path))
    assert model_input_shape(net) == (784,)
    with torch.no_grad():
        torch.testing.assert_close(net(torch.ones(2, 784)), torch.full((2, 10), 784.0))


def test_onnx_unsupported_op_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # make the fallback unavailable
    nodes = [
        helper.make_node("Flatten", ["input"], ["a"]),
        helper.make_node("Softmax", ["a"], ["b"]),
        helper.make_node("LeakyRelu", ["b"], ["output"]),
    ]
    path = _save_onnx(tmp_path / "s.onnx", nodes, [], ["N", 1, 2, 2], ["N", 4])
    with pytest.raises(ValueError, match=r"unsupported ONNX op type\(s\): LeakyRelu, Softmax;"):
        load_model(path)


def test_onnx_non_chain_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx2torch", None)
    nodes = [
        helper.make_node("Relu", ["input"], ["a"]),
        helper.make_node("Add", ["a", "input"], ["output"]),  # residual connection
    ]
    path = _save_onnx(tmp_path / "res.onnx", nodes, [], ["N", 4], ["N", 4])
    with pytest.raises(ValueError, match="not a chain"):
        load_onnx(path)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="junk.onnx"):
        load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError):
        load_onnx(tmp_path / "none.onnx")


# --------------------------------------------------------------------------- load_model


def test_load_model_variants(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).train()
    assert load_model(net) is net and not net.training
    assert isinstance(load_model("linear"), nn.Sequential)
    with pytest.raises(FileNotFoundError, match=r"model: .*linear, fc, cnn"):
        load_model("resnet50")
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown file type '.h5'"):
        load_model(tmp_path / "m.h5")
    with pytest.raises(TypeError, match="model must be"):
        load_model(3)
    with pytest.raises(ValueError, match="bundled models"):
        bundled_model("smoothing_base_missing")


def test_model_input_shape_rules():
    assert model_input_shape(nn.Sequential(nn.Linear(784, 10))) == (784,)
    assert model_input_shape(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))) == (
        3,
        32,
        32,
    )
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    assert model_input_shape(conv, input_shape=(3, 32, 32)) == (3, 32, 32)
    with pytest.raises(ValueError, match="input_shape"):
        model_input_shape(conv)  # default 28 x 28 does not fit the Linear layer
    with pytest.raises(ValueError, match="input_shape"):
        model_input_shape(conv, input_shape=(0, 3))
    norm = nn.Sequential(Elementwise("sub", torch.zeros(1, 1, 1)), nn.Conv2d(1, 2, 3))
    assert model_input_shape(norm) == (1, 28, 28)


def test_state_dict_helpers_do_not_leak():
    # OrderedDict state_dicts of bundled nets contain only tensors (sanity for the refusal test)
    sd = build_architecture("fc").state_dict()
    assert isinstance(sd, OrderedDict)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
