"""The bound-propagation engine on architectures beyond Linear/Conv2d/ReLU chains.

Every operator is checked by sampling: points of the input domain never give a margin
below the engine's bound.  Certified radii stay below the W1 of adversarial images found
by the attack and by the Frank-Wolfe search of ``eps`` decisions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import flowverify as fv
from flowverify.core.results import Status
from flowverify.io.bundled import bundled_digits
from flowverify.model.layers import Elementwise
from flowverify.model.loading import load_model
from flowverify.transport.flows import apply_flow, flow_dim
from flowverify.verification import polytope as _polytope
from flowverify.verification import search as _search
from flowverify.verification.engine import DOMAINS, EngineProblem, build_graph, make_domain


class Residual(nn.Module):
    """conv -> relu -> (conv + skip) -> relu -> avgpool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h) + h)
        return self.fc(torch.flatten(self.pool(h), 1))


def _norm_bn_sigmoid():
    return nn.Sequential(
        Elementwise("sub", torch.tensor(0.13)),
        Elementwise("div", torch.tensor(0.31)),
        nn.Flatten(),
        nn.Linear(784, 24),
        nn.BatchNorm1d(24),
        nn.Sigmoid(),
        nn.Linear(24, 10),
    )


def _conv_bn_tanh_leaky():
    return nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=2, padding=1, dilation=1),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )


def _conv_maxpool():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 10),
    )


NETS = {
    "maxpool": _conv_maxpool,
    "residual": Residual,
    "norm-bn-sigmoid": _norm_bn_sigmoid,
    "bn-leaky-tanh": _conv_bn_tanh_leaky,
}


def _seeded(name):
    torch.manual_seed(3)
    net = NETS[name]()
    for mod in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    x, _ = bundled_digits()
    return x[:4].astype(np.float64)


def _labels(net, x):
    with torch.no_grad():
        return net(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()


def _margins(net64, nu, labels):
    with torch.no_grad():
        z = net64(torch.as_tensor(nu))
    own = z[np.arange(len(labels)), labels]
    z[np.arange(len(labels)), labels] = -np.inf
    return (own - z.max(dim=1).values).numpy()


def _samples(domain, mu, eps, rng, count=40):
    """Points of the domain around ``mu (C, H, W)`` (vertices, flows, convex combinations)."""
    c, h, w = mu.shape
    pts = []
    if domain in ("w1-ball", "w1-polytope"):
        for _ in range(count):
            if domain == "w1-polytope":
                q = rng.normal(size=mu.size)
                pts.append(_polytope.polytope_plan(q, mu, eps)[0])
            else:
                g = rng.normal(size=(c, flow_dim(h, w))) * (rng.random((c, flow_dim(h, w))) < 0.05)
                g *= eps / max(np.abs(g).sum(), 1e-12)
                pts.append(np.asarray(apply_flow(mu, g)).reshape(mu.shape))
    else:
        for _ in range(count):
            d = rng.normal(size=mu.shape)
            if domain == "linf":
                d = np.sign(d) * eps
            elif domain == "l2":
                d *= eps / np.linalg.norm(d)
            else:
                d = np.zeros(mu.size)
                d[rng.integers(mu.size)] = eps * rng.choice([-1, 1])
                d = d.reshape(mu.shape)
            pts.append(mu + d)
    return np.stack(pts)


@pytest.mark.parametrize("name", sorted(NETS))
def test_graph_reproduces_the_model(name, digits):
    net64 = copy.deepcopy(_seeded(name)).double()
    g = build_graph(net64, torch.as_tensor(digits[:1]))
    x = torch.as_tensor(digits)
    np.testing.assert_allclose(g.forward(x).numpy(), net64(x).detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_sampled_points_never_leave_the_bounds(name, domain, digits):
    net = _seeded(name)
    net64 = copy.deepcopy(net).double()
    labels = _labels(net, digits)
    g = build_graph(net64, torch.as_tensor(digits[:1]))
    eps = {"w1-ball": 3.0, "w1-polytope": 3.0, "linf": 0.02, "l2": 0.5, "l1": 2.0}[domain]
    prob = EngineProblem(g, digits, labels, make_domain(domain, digits))
    bound = prob.lower_bounds(np.arange(len(digits)), np.full(len(digits), eps))
    rng = np.random.default_rng(0)
    loosest = np.inf
    for b in range(len(digits)):
        pts = _samples(domain, digits[b], eps, rng)
        marg = _margins(net64, pts, np.full(len(pts), labels[b]))
        loosest = min(loosest, marg.min() - bound[b].min())
        assert marg.min() >= bound[b].min() - 1e-9, (b, marg.min(), bound[b].min())
        # the float32 model as given: the same up to its own rounding
        m32 = _margins(net, pts.astype(np.float32), np.full(len(pts), labels[b]))
        assert m32.min() >= bound[b].min() - 1e-4 * (1 + abs(bound[b].min()))
    assert np.isfinite(loosest)
    # the bounds are not vacuous: at eps -> 0 they equal the margins at the image
    tiny = prob.lower_bounds(np.arange(len(digits)), np.full(len(digits), 1e-9))
    np.testing.assert_allclose(
        tiny.min(axis=1), _margins(net64, digits, labels), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETS))
def test_certified_radius_below_the_attack(name, digits):
    net = _seeded(name)
    x = digits.astype(np.float32)
    labels = _labels(net, x)
    van = fv.certify(net, x, labels, method="vanilla")
    fea = fv.certify(net, x, labels, method="feasible")
    alpha = fv.certify(net, x, labels, method="feasible", certifier="alpha-crown")
    atk = fv.attack(net, x, labels, eps=None, steps=30, seed=0)
    for v, f, a, w1 in zip(van, fea, alpha, atk.w1, strict=True):
        assert v.status == Status.CERTIFIED and v.radius > 0, v
        assert f.radius >= v.radius * (1 - 1e-12)  # the polytope lies inside the ball
        assert a.radius >= f.radius * (1 - 1e-12)  # optimised slopes never lose
        assert a.radius <= w1 * (1 + 1e-9), (a.radius, w1)
    # fixed-eps decisions agree with the radii, and falsified ones carry a real witness
    for e_scale in (0.5, 3.0):
        dec = fv.certify(
            net, x, labels, method="feasible", eps=e_scale * np.median([f.radius for f in fea])
        )
        for d, f in zip(dec, fea, strict=True):
            if d.status == Status.CERTIFIED:
                assert f.radius >= d.eps / (1 + 1e-3)
            if d.status == Status.FALSIFIED:
                assert d.upper <= d.eps * (1 + 1e-6) and f.radius <= d.upper * (1 + 1e-9)


def test_engine_matches_the_chain_certifier_on_the_bundled_fc():
    """Same relaxation, same domains: the radii of both stacks agree."""
    x, y = bundled_digits()
    x, y = x[:6], y[:6]
    model = load_model("fc")
    g = build_graph(copy.deepcopy(model).double(), torch.as_tensor(x[:1], dtype=torch.float64))
    e_max = x.sum(axis=(1, 2, 3)) * 54
    mass = x.sum(axis=(1, 2, 3))
    for method, domain in (("vanilla", "w1-ball"), ("feasible", "w1-polytope")):
        prob = EngineProblem(g, x, y, make_domain(domain, x))
        eng = _search.search_radius(prob, e_max, rtol=1e-6).lower / mass
        old = np.array([r.radius for r in fv.certify(model, x, y, method=method, rtol=1e-6)])
        np.testing.assert_allclose(eng, old, rtol=1e-4)


def test_unsupported_operator_is_named_before_any_work():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softplus(), nn.Linear(10, 10))
    x, y = bundled_digits()
    with pytest.raises(ValueError, match="Softplus"):
        fv.certify(net, x[:2], method="vanilla")
    with pytest.raises(ValueError, match="chain of Linear"):  # the LP-based search
        fv.certify(_seeded("residual"), x[:2], method="complete", certifier="bab")


def test_first_operation_must_be_affine():
    net = nn.Sequential(nn.Sigmoid(), nn.Flatten(), nn.Linear(784, 10))
    x, _ = bundled_digits()
    with pytest.raises(ValueError, match="affine"):
        fv.certify(net, x[:2], method="vanilla")


def test_cli_certifies_an_onnx_file_with_a_normalisation_front(tmp_path):
    """Sub/Div (x - mean) / std, then the bundled fc's layers compensated for it."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from flowverify.cli.app import main

    fc = load_model("fc")
    lin = [m for m in fc.modules() if isinstance(m, nn.Linear)]
    mean, std = 0.1307, 0.3081
    w = [m.weight.detach().double().numpy() for m in lin]
    b = [m.bias.detach().double().numpy() for m in lin]
    b0 = b[0] + w[0].sum(axis=1) * mean  # W((x - m)/s * s) + b = W x + b
    w0 = w[0] * std
    inits = [
        numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)
        for n, a in [
            ("mean", mean),
            ("std", std),
            ("w0", w0),
            ("b0", b0),
            ("w1", w[1]),
            ("b1", b[1]),
            ("w2", w[2]),
            ("b2", b[2]),
        ]
    ]
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["a"]),
        helper.make_node("Div", ["a", "std"], ["b"]),
        helper.make_node("Flatten", ["b"], ["c"], axis=1),
        helper.make_node("Gemm", ["c", "w0", "b0"], ["d"], transB=1),
        helper.make_node("Relu", ["d"], ["e"]),
        helper.make_node("Gemm", ["e", "w1", "b1"], ["f"], transB=1),
        helper.make_node("Relu", ["f"], ["g"]),
        helper.make_node("Gemm", ["g", "w2", "b2"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "normalised-fc",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path = tmp_path / "norm.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "cert.jsonl"
    code = main(
        [
            "certify",
            "--model",
            str(path),
            "--indices",
            "0:4",
            "--method",
            "feasible",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    recs = [json.loads(s) for s in out.read_text().splitlines()]
    recs = [r for r in recs if "radius" in r]
    assert len(recs) == 4
    x, y = bundled_digits()
    ref = fv.certify(fc, x[:4], y[:4], method="feasible")
    for r, f in zip(recs, ref, strict=True):
        assert r["status"] == "certified" and r["radius"] > 0
        # the same function (float32 weights): the same radius to the search tolerance
        assert r["radius"] == pytest.approx(f.radius, rel=5e-3)


@pytest.mark.parametrize("domain", ["w1-ball", "w1-polytope"])
@pytest.mark.parametrize("channels", [1, 3])
def test_w1_domain_gain_equals_an_lp(domain, channels):
    """``max qᵀ(µ - ν)`` over the W1 ball / polytope: the engine's value is an LP's
    optimum (HiGHS on the flow formulation ``ν = µ + Aγ, ‖γ‖₁ <= ε``), never below it."""
    from scipy.optimize import linprog

    rng = np.random.default_rng(channels)
    c, h, w = channels, 5, 6
    d = flow_dim(h, w)
    mu = rng.uniform(0, 1, (c, h, w)) * (rng.random((c, h, w)) < 0.4)
    # A: image-space image of each flow coordinate (columns), from apply_flow
    eye = np.eye(c * d).reshape(c * d, c, d)
    amat = np.stack([np.asarray(apply_flow(np.zeros((c, h, w)), e)).ravel() for e in eye], 1)
    q = rng.normal(size=(4, c, h, w))
    dom = make_domain(domain, mu[None])
    for eps in (0.3, 1.5, 6.0):
        got = dom.gain(torch.as_tensor(q[None]), torch.tensor([eps]), [0]).numpy()[0]
        for r in range(len(q)):
            cost = q[r].ravel() @ amat  # min qᵀAγ with γ = γ⁺ - γ⁻
            a_ub = [np.ones(2 * c * d)]
            b_ub = [eps]
            if domain == "w1-polytope":  # µ + Aγ >= 0
                a_ub = np.vstack([a_ub, np.hstack([-amat, amat])])
                b_ub = np.concatenate([b_ub, mu.ravel()])
            lp = linprog(np.concatenate([cost, -cost]), A_ub=a_ub, b_ub=b_ub, method="highs")
            assert lp.status == 0
            exact = -lp.fun
            assert got[r] >= exact - 1e-9 * (1 + abs(exact)), (eps, r, got[r], exact)
            assert got[r] <= exact + 1e-6 * (1 + abs(exact)), (eps, r, got[r], exact)


def test_normalised_input_scale_bounds_hold(digits):
    """``input_scale="normalised"``: the model reads ``ν / mass``; bounds hold on samples."""
    net = _seeded("residual")
    net64 = copy.deepcopy(net).double()
    mass = digits.sum(axis=(-2, -1))  # (B, C)
    scaled = digits / mass[:, :, None, None]
    labels = _labels(net, scaled)
    g = build_graph(net64, torch.as_tensor(scaled[:1]))
    for domain in ("w1-ball", "w1-polytope"):
        prob = EngineProblem(g, digits, labels, make_domain(domain, digits), inv_scale=1 / mass)
        bound = prob.lower_bounds(np.arange(len(digits)), np.full(len(digits), 4.0))
        rng = np.random.default_rng(1)
        for b in range(len(digits)):
            pts = _samples(domain, digits[b], 4.0, rng)
            marg = _margins(net64, pts / mass[b][None, :, None, None], np.full(len(pts), labels[b]))
            assert marg.min() >= bound[b].min() - 1e-9
    res = fv.certify(net, digits.astype(np.float32), labels, input_scale="normalised")
    assert all(r.status == Status.CERTIFIED and r.radius > 0 for r in res)


def test_alpha_crown_on_the_outside_network(outside_net):
    """alpha-CROWN on the VNN-COMP net: never below CROWN, never above the attack."""
    x, y = bundled_digits()
    x, y = x[:2], y[:2]
    crown = fv.certify(outside_net, x, y, method="vanilla")
    alpha = fv.certify(outside_net, x, y, method="vanilla", certifier="alpha-crown")
    atk = fv.attack(outside_net, x, y, eps=None, steps=30, seed=0)
    for c, a, w1 in zip(crown, alpha, atk.w1, strict=True):
        assert a.status == Status.CERTIFIED and a.radius >= c.radius * (1 - 1e-12) > 0
        assert a.radius <= w1 * (1 + 1e-9), (a.radius, w1)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_domain_radii_hold_at_the_radius(domain, digits):
    """``domain_radii``: sampled points of the domain at the radius keep the class."""
    from flowverify.verification.engine import domain_radii

    net = _seeded("bn-leaky-tanh")
    net64 = copy.deepcopy(net).double()
    labels = _labels(net, digits)
    rad = domain_radii(net, digits, labels, domain=domain)
    assert np.all(rad > 0) and np.all(np.isfinite(rad))
    rng = np.random.default_rng(2)
    for b in range(len(digits)):
        pts = _samples(domain, digits[b], float(rad[b]), rng)
        assert _margins(net64, pts, np.full(len(pts), labels[b])).min() > 0
    with pytest.raises(ValueError, match="domain"):
        domain_radii(net, digits, labels, domain="l3")
    with pytest.raises(ValueError, match="labels"):
        domain_radii(net, digits, labels + 10, domain=domain)
    with pytest.raises(ValueError, match="labels"):
        domain_radii(net, digits, labels[:1], domain=domain)
    with pytest.raises(ValueError, match="images"):
        domain_radii(net, digits[0], labels, domain=domain)
    with pytest.raises(ValueError, match="rtol"):
        domain_radii(net, digits, labels, domain=domain, rtol=0)


def _dilated_stem():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=1, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(3, 6, 4, stride=3, padding=1, groups=3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 9 * 9, 10),
    )


@pytest.mark.parametrize("name", ["bn-leaky-tanh", "dilated", "cnn"])
@pytest.mark.parametrize("domain", ["w1-ball", "w1-polytope"])
def test_patch_rows_give_the_dense_bounds(name, domain, digits, monkeypatch):
    """A convolution's rows kept as patches down to the front (:mod:`.engine.patches`)
    give the bounds of the dense path, and the path is taken (not vacuous)."""
    from flowverify.verification.engine import patches

    if name == "cnn":
        net = load_model("cnn")
    elif name == "dilated":
        torch.manual_seed(5)
        net = _dilated_stem().eval()
    else:
        net = _seeded(name)
    net64 = copy.deepcopy(net).double()
    graph = build_graph(net64, torch.as_tensor(digits[:1]))
    eps = torch.full((len(digits),), 1.5, dtype=torch.float64)
    idx = np.arange(len(digits))

    def bounds():
        prob = EngineProblem(graph, digits, _labels(net, digits), make_domain(domain, digits))
        found, _ = prob.layer_bounds(idx, eps)
        return found

    taken = []
    orig = patches.patch_bounds
    monkeypatch.setattr(patches, "patch_bounds", lambda *a: taken.append(1) or orig(*a))
    fast = bounds()
    assert taken
    monkeypatch.setattr(patches, "patch_front", lambda prob, i: None)
    dense = bounds()
    for node, (lo, up) in dense.items():
        np.testing.assert_allclose(fast[node][0].numpy(), lo.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fast[node][1].numpy(), up.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cnn", "fc"])
def test_bounds_reusing_dual_evaluations_equal_fresh_ones(name, digits):
    """A problem keeps the polytope dual's evaluations of its rows between calls (the
    front's as bounds, the others' as starting points): at every ``ε`` of a search-like
    sequence its bounds are a fresh problem's, and it does keep them (not vacuous)."""
    net = load_model(name)
    graph = build_graph(copy.deepcopy(net).double(), torch.as_tensor(digits[:1]))
    labels = _labels(net, digits)
    idx = np.arange(len(digits))
    kept = EngineProblem(graph, digits, labels, make_domain("w1-polytope", digits))
    for e in (1.5, 0.7, 1.5, 1.52, 3.0, 1.51):
        eps = torch.full((len(digits),), e, dtype=torch.float64)
        fresh = EngineProblem(graph, digits, labels, make_domain("w1-polytope", digits))
        want, _ = fresh.layer_bounds(idx, eps)
        got, _ = kept.layer_bounds(idx, eps)
        for node, (lo, up) in want.items():
            np.testing.assert_allclose(got[node][0].numpy(), lo.numpy(), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(got[node][1].numpy(), up.numpy(), rtol=1e-9, atol=1e-9)
    stores = kept.domain._planes
    assert stores and all((s[..., 0] >= 0).any() for s in stores.values())


@pytest.mark.parametrize("name,domain", [("fc", "w1-ball"), ("cnn", "w1-polytope")])
def test_a_search_reuses_the_bounds_of_its_larger_probes(name, domain, digits):
    """``F(ε)`` after probes at larger ``ε'`` (whose bounds hold on ``D_ε ⊆ D_ε'`` and
    spare the CROWN rows of the neurons they prove stable) is at least a fresh
    problem's, and the kept bounds are used only for ``ε <= ε'``."""
    net = load_model(name)
    graph = build_graph(copy.deepcopy(net).double(), torch.as_tensor(digits[:1]))
    labels = _labels(net, digits)
    idx = np.arange(len(digits))
    kept = EngineProblem(graph, digits, labels, make_domain(domain, digits))
    for e in (4.0, 2.0, 1.0, 1.2):
        eps = np.full(len(digits), e)
        fresh = EngineProblem(graph, digits, labels, make_domain(domain, digits))
        want, got = fresh(idx, eps), kept(idx, eps)
        assert np.all(got >= want - 1e-9 * (1 + np.abs(want)))
        mem = kept._seen.bounds(idx, torch.as_tensor(eps * (1 - 1e-9)))
        assert mem is not None  # finite exactly where the kept bounds prove stability
        for lo, up in mem.values():
            kept_at = torch.isfinite(lo) | torch.isfinite(up)
            assert bool(kept_at.any()) and bool((torch.isfinite(lo) == kept_at).all())
            assert bool(((lo >= 0) | (up <= 0))[kept_at].all())
    assert kept._seen.bounds(idx, torch.full((len(digits),), 5.0, dtype=torch.float64)) is None


@pytest.mark.parametrize("name,domain", [("fc", "w1-ball"), ("cnn", "w1-polytope")])
def test_bounds_of_a_batch_equal_those_of_each_image(name, domain):
    """A batch whose images have very different counts of unstable neurons is bounded in
    groups (``crown._groups``: less padding); its bounds are each image's alone."""
    from flowverify.verification.engine import crown

    net = load_model(name)
    x, _ = bundled_digits()
    x = x[:8].astype(np.float64)
    graph = build_graph(copy.deepcopy(net).double(), torch.as_tensor(x[:1]))
    labels = _labels(net, x)
    eps = torch.as_tensor(np.linspace(0.2, 3.0, len(x)))  # from few to many unstable
    prob = EngineProblem(graph, x, labels, make_domain(domain, x))
    assert crown._groups(torch.tensor([1, 2, 40, 41, 42, 43])) is not None
    got, _ = prob.layer_bounds(np.arange(len(x)), eps)
    for k in range(len(x)):
        one = EngineProblem(
            graph, x[k : k + 1], labels[k : k + 1], make_domain(domain, x[k : k + 1])
        )
        want, _ = one.layer_bounds(np.zeros(1, dtype=np.int64), eps[k : k + 1])
        for node, (lo, up) in want.items():
            np.testing.assert_allclose(got[node][0][k].numpy(), lo[0].numpy(), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(got[node][1][k].numpy(), up[0].numpy(), rtol=1e-9, atol=1e-9)


def _rgb_stem(front=None):
    """RGB conv (padding, stride) -> ReLU -> dilated conv (padding) -> ReLU -> linear,
    optionally after an element-wise ``front`` (a normalisation)."""
    layers = [] if front is None else [front]
    return nn.Sequential(
        *layers,
        nn.Conv2d(3, 4, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 6 * 6, 10),
    )


@pytest.mark.parametrize("name", ["cnn", "rgb", "rgb-normalised", "rgb-per-pixel"])
def test_folded_norms_equal_the_sparse_kernel(name, monkeypatch):
    """On a convolutional front the ball norms of the patch rows and of the dense rows
    come from each channel's kernel (:func:`~flowverify.verification.flownet.
    folded_rows_norm`): the bounds equal
    the sparse kernel's, with padding, stride, dilation, colour and a per-channel
    normalisation; a per-pixel scaling is not a convolution's front and keeps the
    sparse kernel."""
    from flowverify.verification import flownet as _flownet

    rng = np.random.default_rng(2)
    torch.manual_seed(4)
    if name == "cnn":
        net, x = load_model("cnn"), bundled_digits()[0][:3].astype(np.float64)
    else:
        front = {
            "rgb": None,
            "rgb-normalised": Elementwise("div", torch.tensor([0.3, 0.5, 0.7])[:, None, None]),
            "rgb-per-pixel": Elementwise("mul", torch.rand(1, 12, 12) + 0.5),
        }[name]
        net = _rgb_stem(front).eval()
        x = rng.random((3, 3, 12, 12)) * (rng.random((3, 3, 12, 12)) < 0.6)
    graph = build_graph(copy.deepcopy(net).double(), torch.as_tensor(x[:1]))
    eps = torch.full((len(x),), 0.8 if name == "cnn" else 0.3, dtype=torch.float64)

    def bounds():
        graph.cache.clear()
        prob = EngineProblem(graph, x, _labels(net, x), make_domain("w1-ball", x))
        found = prob.layer_bounds(np.arange(len(x)), eps)[0]
        found["F"] = (torch.as_tensor(prob(np.arange(len(x)), eps.numpy())),) * 2  # margins
        return found

    folded = bounds()
    used = [v is not None for k, v in graph.cache.items() if k[0] == "folded"]
    assert used == [name != "rgb-per-pixel"]
    fronts = [v[0].front_geo is not None for k, v in graph.cache.items() if k[0] == "front"]
    assert fronts == [name != "rgb-per-pixel"]  # the dense rows' norms too
    monkeypatch.setattr(_flownet, "conv_template", lambda *a: None)
    sparse = bounds()
    _assert_same_bounds(folded, sparse)


def _assert_same_bounds(got: dict, want: dict) -> None:
    """Equal bounds ``{node: (lo, up)}`` to float64 rounding, some of them unstable (the
    relaxations are not trivial)."""
    unstable = 0
    for node, (lo, up) in want.items():
        np.testing.assert_allclose(got[node][0].numpy(), lo.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[node][1].numpy(), up.numpy(), rtol=1e-12, atol=1e-12)
        unstable += int(((lo < 0) & (up > 0)).sum())
    assert unstable > 0


@pytest.mark.parametrize("name", ["fc", "leaky"])
def test_native_fast_paths_give_the_torch_bounds(name, monkeypatch):
    """The numba paths of the ReLU relaxation and of the rows' centres
    (:mod:`~flowverify.verification.engine.native`) give the bounds and ``F`` of the torch
    code they replace, to float64 rounding, and do run."""
    from flowverify.verification.engine import native

    rng = np.random.default_rng(3)
    if name == "fc":
        net = load_model("fc")
        x = bundled_digits()[0][:6].astype(np.float64)
    else:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(36, 20),
            nn.LeakyReLU(0.1),
            nn.Linear(20, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
        ).eval()
        x = rng.random((5, 1, 6, 6))
    graph = build_graph(copy.deepcopy(net).double(), torch.as_tensor(x[:1]))
    eps = torch.as_tensor(np.linspace(0.5, 2.0, len(x)))
    calls = []
    usable = native.usable
    monkeypatch.setattr(native, "usable", lambda *t: calls.append(1) or usable(*t))

    def bounds():
        prob = EngineProblem(graph, x, _labels(net, x), make_domain("w1-ball", x))
        found = prob.layer_bounds(np.arange(len(x)), eps)[0]
        found["F"] = (torch.as_tensor(prob(np.arange(len(x)), eps.numpy())),) * 2
        return found

    fast = bounds()
    assert calls
    monkeypatch.setattr(native, "usable", lambda *t: False)
    _assert_same_bounds(fast, bounds())
