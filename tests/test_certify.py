"""The public certifier: Lemma 7 / Lemma 8 on linear models, the soundness chain
vanilla <= feasible <= exact <= attack, fixed-eps decisions, references, the CLI."""

from __future__ import annotations

import argparse
import copy
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog
from torch import nn

import flowverify as fv
from conftest import relu_net
from flowverify.api import certify
from flowverify.core.results import Status
from flowverify.transport.flows import incidence_matrix
from flowverify.verification import CERTIFIERS, METHODS, CertifyResult
from flowverify.verification import checks as _checks
from flowverify.verification import context as _context
from flowverify.verification import falsify as _falsify


def _images(seed, n=4, c=1, h=6, w=6):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, h, w)) * (rng.random((n, c, h, w)) < 0.7)
    x[..., 0, 0] += 0.05
    return x


def _linear(seed, c=1, h=6, w=6, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k)).double().eval()


def _relu_net(seed, c=1, h=6, w=6, conv=False):
    if conv:
        return relu_net(seed, [8, 3], c=c, h=h, w=w, conv=4)
    return relu_net(seed, [12, 10, 3], c=c, h=h, w=w)


def _lemma_terms(model, x, label):
    """w_t, d_t of Lemma 7 for a linear model (raw input), reference uniform."""
    lin = model[1]
    wt = lin.weight.detach().numpy()
    bt = lin.bias.detach().numpy()
    c, h, w = x.shape
    a = sp.block_diag([incidence_matrix(h, w)] * c).tocsr()
    ref = fv.make_reference("uniform", x).ravel()
    dmu = fv.inverse_flow(ref.reshape(x.shape), x).ravel()
    wa = (a.T @ wt.T).T
    others = [t for t in range(wt.shape[0]) if t != label]
    return (
        [(wa[label] - wa[t], (wt[label] - wt[t]) @ ref + bt[label] - bt[t]) for t in others],
        dmu,
        ref,
        a,
    )


def _lemma7(model, x, label):
    terms, dmu, _, _ = _lemma_terms(model, x, label)
    return min((w @ dmu + d) / np.abs(w).max() for w, d in terms)


def _lemma8(model, x, label):
    """min_t min ||δ - δµ||_1 s.t. R + Aδ >= 0, w_t^T δ + d_t <= 0 (flow LP, scipy)."""
    terms, dmu, ref, a = _lemma_terms(model, x, label)
    n = a.shape[1]
    best = math.inf
    for w, d in terms:  # δ = δµ + p - q
        a_ub = sp.vstack([sp.hstack([-a, a]), sp.csr_matrix(np.r_[w, -w][None])])
        b_ub = np.r_[ref + a @ dmu, -d - w @ dmu]
        res = linprog(np.ones(2 * n), A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs")
        if res.status == 0:
            best = min(best, res.fun)
    return best


def test_linear_vanilla_is_lemma_7_and_feasible_is_lemma_8():
    x = _images(0)
    model = _linear(1)
    res_v = certify(model, x, method="vanilla")
    res_f = certify(model, x, method="feasible")
    for i in range(len(x)):
        label = res_v[i].label
        np.testing.assert_allclose(res_v[i].radius_raw, _lemma7(model, x[i], label), rtol=1e-7)
        np.testing.assert_allclose(res_f[i].radius_raw, _lemma8(model, x[i], label), rtol=1e-6)
        assert res_f[i].radius_raw >= res_v[i].radius_raw
        np.testing.assert_allclose(res_v[i].radius, res_v[i].radius_raw / x[i].sum(), rtol=1e-12)


def _attack_w1(model, x, labels, radii, m64=None):
    """W1 (raw) of a Frank-Wolfe adversarial found at budgets growing from ``radii``."""
    m64 = model if m64 is None else m64
    ctx = _context._Ctx(
        model, m64, "feasible", "crown", "raw", torch.device("cpu"), 1e-3, None, False, 3, 0
    )
    out = []
    for i in range(len(x)):
        e_max = float(_checks._e_max(x[i : i + 1])[0])
        w1, img = _falsify._fw_min_radius(ctx, x[i], int(labels[i]), max(radii[i], 1e-3), e_max)
        out.append(w1)
        if img is not None:  # the witness is a valid image within the reported W1
            assert img.min() >= -1e-12
            np.testing.assert_allclose(img.sum(), x[i].sum(), rtol=1e-9)
    return np.array(out)


@pytest.mark.parametrize("conv", [False, True])
def test_soundness_chain_on_random_nets(conv):
    c = 2 if conv else 1
    x = _images(2, n=5, c=c)
    model = _relu_net(3, c=c, conv=conv)
    van = certify(model, x, method="vanilla")
    alpha = certify(model, x, method="vanilla", certifier="alpha-crown")
    fea = certify(model, x, method="feasible")
    lp = certify(model, x, method="feasible", certifier="lp")
    r = {
        k: np.array([q.radius_raw for q in v])
        for k, v in dict(van=van, alpha=alpha, fea=fea, lp=lp).items()
    }
    assert np.all(r["van"] <= r["alpha"] + 1e-12)
    assert np.all(r["van"] <= r["fea"] + 1e-12)
    assert np.all(r["fea"] <= r["lp"] + 1e-12)
    attack = _attack_w1(model, x, [q.label for q in van], r["lp"])
    found = np.isfinite(attack)
    assert found.sum() >= 3
    assert np.all(r["lp"][found] <= attack[found] * (1 + 1e-9))
    assert np.all(r["alpha"][found] <= attack[found] * (1 + 1e-9))


@pytest.mark.parametrize("input_scale", ["raw", "normalised"])
def test_lp_certifier_lies_between_crown_and_the_exact_radius(input_scale):
    """The LP relaxation (the exact searches' LP builder, engine bounds at each probe):
    never below polytope CROWN, never above the MILP's exact radius, and tighter than
    CROWN on some image (not vacuous)."""
    x = _images(5, n=4, c=1, h=5, w=5)
    model = relu_net(11, [10, 8, 3], c=1, h=5, w=5)
    kw = {"input_scale": input_scale}
    fea = [q.radius_raw for q in certify(model, x, method="feasible", **kw)]
    lp = [q.radius_raw for q in certify(model, x, method="feasible", certifier="lp", **kw)]
    ex = certify(model, x, method="complete", certifier="milp", timeout=120, **kw)
    assert all(q.exact for q in ex)
    exact = np.array([q.radius_raw for q in ex])
    fea, lp = np.array(fea), np.array(lp)
    assert np.all(fea <= lp * (1 + 1e-9) + 1e-12)
    assert np.all(lp <= exact * (1 + 1e-6) + 1e-12)
    assert np.any(lp > fea * (1 + 1e-3))


def test_bundled_fc_soundness():
    from flowverify.io.images import load_images

    x, y = load_images("bundled", indices="0:3")
    van = certify("fc", x, y, method="vanilla")
    fea = certify("fc", x, y, method="feasible")
    model = _checks._resolve_model("fc")
    m64 = copy.deepcopy(model).double()
    ok = [i for i in range(3) if van[i].status == Status.CERTIFIED]
    assert ok
    rv = np.array([van[i].radius_raw for i in ok])
    rf = np.array([fea[i].radius_raw for i in ok])
    assert np.all(rv <= rf + 1e-12) and np.all(rf > rv)
    w1 = _attack_w1(model, x[ok].astype(np.float64), y[ok], rf, m64=m64)
    assert np.all(rf <= w1 * (1 + 1e-9))


def test_fixed_eps_decisions_agree_with_the_radius():
    x = _images(4, n=4)
    model = _relu_net(5)
    for method in ("vanilla", "feasible"):
        res = certify(model, x, method=method)
        radii = np.array([q.radius for q in res])
        assert np.all(radii > 0)
        for i in range(len(x)):
            below = certify(
                model, x[i : i + 1], [res[i].label], method=method, eps=0.98 * radii[i]
            )[0]
            above = certify(
                model, x[i : i + 1], [res[i].label], method=method, eps=1.05 * radii[i]
            )[0]
            assert below.status == Status.CERTIFIED and below.radius == pytest.approx(
                0.98 * radii[i]
            )
            assert above.status in (Status.UNKNOWN, Status.FALSIFIED)
            if above.status == Status.FALSIFIED:
                w = above.witness
                assert w.min() >= -1e-12 and w.shape == x[i].shape
                assert float(fv.w1_distance(w, x[i], unit="normalised")) <= 1.05 * radii[i] + 1e-9
                logits = model(torch.as_tensor(w[None]))
                assert int(logits.argmax()) != res[i].label
    # raw unit
    r = certify(model, x[:1], method="feasible")[0]
    d = certify(model, x[:1], [r.label], method="feasible", eps=0.9 * r.radius_raw, unit="raw")
    assert d[0].status == Status.CERTIFIED


def test_falsified_with_a_witness():
    x = _images(6, n=3)
    model = _relu_net(7)
    res = certify(model, x, method="feasible", eps=5.0)  # normalised: the whole grid
    assert any(q.status == Status.FALSIFIED for q in res)
    for q, xi in zip(res, x, strict=True):
        if q.status == Status.FALSIFIED:
            assert q.upper <= 5.0 + 1e-9 and q.witness is not None
            np.testing.assert_allclose(q.witness.sum(), xi.sum(), rtol=1e-9)


def test_misclassified_and_result_record():
    x = _images(8, n=3)
    model = _relu_net(9)
    pred = model(torch.as_tensor(x)).argmax(1).numpy()
    labels = pred.copy()
    labels[1] = (pred[1] + 1) % 3
    res = certify(model, x, labels, method="feasible")
    assert res[1].status == Status.MISCLASSIFIED and res[1].radius == 0.0
    assert res[0].status == Status.CERTIFIED and res[0].radius > 0
    assert isinstance(res[0], CertifyResult)
    rec = res[0].to_dict()
    json.dumps(rec, allow_nan=False)
    assert "witness" not in rec
    for key in (
        "index",
        "label",
        "prediction",
        "method",
        "certifier",
        "references",
        "status",
        "radius",
        "radius_raw",
        "exact",
        "per_reference",
        "seconds",
    ):
        assert key in rec
    assert rec["exact"] is False and rec["status"] == "certified"


def test_references_max_and_invariance():
    x = _images(10, n=3)
    model = _relu_net(11)
    with pytest.warns(UserWarning, match="references: .*computed once"):
        res = certify(model, x, method="vanilla", references="uniform,random:2,point:1")
    for q in res:
        assert list(q.per_reference) == ["uniform", "random#0", "random#1", "point#0"]
        vals = np.array(list(q.per_reference.values()))
        assert q.radius == pytest.approx(vals.max())
        # CROWN certificates do not depend on the reference (up to the search tolerance)
        assert vals.min() >= vals.max() * (1 - 2e-3)
    data = _images(12, n=5)
    with pytest.warns(UserWarning, match="references: "):
        res = certify(
            model, data[:2], method="vanilla", references="data:2", data=data, indices=[0, 1]
        )
    for q in res:
        assert all(name.startswith("data#") for name in q.per_reference)
        assert f"data#{q.index}" not in q.per_reference


def test_input_scale_normalised_matches_rescaled_raw_model():
    x = _images(13, n=2)
    model = _linear(14)
    res_n = certify(model, x, method="feasible", input_scale="normalised")
    for i in range(2):
        scaled = _linear(14)
        with torch.no_grad():
            scaled[1].weight /= float(x[i].sum())
        res_r = certify(scaled, x[i : i + 1], [res_n[i].label], method="feasible")[0]
        np.testing.assert_allclose(res_n[i].radius, res_r.radius, rtol=1e-6)


def test_validation_errors():
    x = _images(15, n=2)
    model = _relu_net(16)
    with pytest.raises(ValueError, match="method"):
        certify(model, x, method="nope")
    with pytest.raises(ValueError, match="crown, alpha-crown, lp"):
        certify(model, x, method="feasible", certifier="nope")
    with pytest.raises(ValueError, match="eps"):
        certify(model, x, eps=-1.0)
    with pytest.raises(ValueError, match="labels"):
        certify(model, x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="images"):
        certify(model, -x)
    with pytest.raises(TypeError, match="images"):
        certify(model, [[1.0]])
    with pytest.raises(ValueError, match="references"):
        certify(model, x, references="bogus")
    assert METHODS == ("vanilla", "feasible", "complete", "complete-ball", "smoothing")
    assert set(CERTIFIERS) == set(METHODS)


def _cli(argv):
    from flowverify.cli import certify_cmd as _cli_certify

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    _cli_certify.add_parser(sub)
    return _cli_certify.run(parser.parse_args(["certify", *argv]))


def test_cli_writes_records(tmp_path):
    out = tmp_path / "r.jsonl"
    assert (
        _cli(
            [
                "--model",
                "fc",
                "--indices",
                "0:3",
                "--method",
                "feasible",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert all(r["config"]["method"] == "feasible" for r in recs)
    assert all(r["config"]["certifier"] == "crown" for r in recs)
    # fixed eps with witnesses
    out2 = tmp_path / "e.jsonl"
    wit = tmp_path / "wit"
    assert (
        _cli(
            [
                "--model",
                "linear",
                "--indices",
                "0:3",
                "--eps",
                "0.5",
                "--method",
                "feasible",
                "--out",
                str(out2),
                "--witness-dir",
                str(wit),
                "--no-progress",
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in out2.read_text().splitlines()]
    fals = [r for r in recs if r["status"] == "falsified"]
    assert fals
    img = np.load(wit / f"{fals[0]['index']}.npy")
    assert img.shape == (1, 28, 28) and img.min() >= -1e-12
    with pytest.raises(ValueError, match="--certifier"):
        _cli(["--model", "fc", "--certifier", "bab", "--out", str(out)])
    with pytest.raises(FileNotFoundError):
        _cli(["--model", "fc", "--data", str(tmp_path / "none.npz"), "--out", str(out)])


def test_complete_linear_is_lemma_8():
    x = _images(17, n=2)
    model = _linear(18)
    res = certify(model, x, method="complete")
    for i, q in enumerate(res):
        assert q.exact and q.status == Status.CERTIFIED
        np.testing.assert_allclose(q.radius_raw, _lemma8(model, x[i], q.label), rtol=1e-5)
        w = q.witness
        assert w is not None and w.min() >= -1e-9
        np.testing.assert_allclose(w.sum(), x[i].sum(), rtol=1e-9)
        np.testing.assert_allclose(
            float(fv.w1_distance(np.maximum(w, 0), x[i], unit="raw")), q.radius_raw, rtol=1e-4
        )


@pytest.mark.slow
def test_complete_chain_and_timeout():
    x = _images(19, n=3)
    model = _relu_net(20)
    fea = certify(model, x, method="feasible")
    comp = certify(model, x, method="complete", timeout=60)
    ball = certify(model, x, method="complete-ball", timeout=60)
    van = certify(model, x, method="vanilla")
    assert any(c.exact for c in comp) and any(b.exact for b in ball)  # not vacuous
    for v, f, c, b in zip(van, fea, comp, ball, strict=True):
        if c.exact:
            assert f.radius_raw <= c.radius_raw * (1 + 1e-6)
            assert c.radius_raw <= c.upper_raw * (1 + 1e-6)
        if b.exact:
            assert v.radius_raw <= b.radius_raw * (1 + 1e-6)
            if c.exact:
                assert b.radius_raw <= c.radius_raw * (1 + 1e-6)
    tiny = certify(model, x[:2], method="complete", timeout=1e-3)
    for q, c in zip(tiny, comp, strict=False):
        assert q.status == Status.UNKNOWN and not q.exact and q.message
        assert q.radius_raw <= c.upper_raw * (1 + 1e-6)  # a proven lower bound, nothing claimed


@pytest.mark.parametrize("certifier", ["bab", "milp"])
def test_complete_lp_searches_say_why_they_stopped(certifier):
    """Out of time, the LP and MILP searches give ``unknown`` with the proven bracket in
    the message, never a bare ``unknown``."""
    x = _images(21, n=2)
    model = _relu_net(22)
    for r in certify(model, x, method="complete-ball", certifier=certifier, timeout=1e-3):
        if r.status == Status.UNKNOWN:
            assert r.message and "lies in [" in r.message, r.message
            assert r.radius_raw <= r.upper_raw


def test_complete_on_bundled_fc_brackets_the_attacks():
    """Bundled fc digits with a short limit: the proven radius is at least the feasible
    CROWN radius, and the reported adversarial is no farther than the PGD attack's."""
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model

    x, y = bundled_digits()
    model = load_model("fc")
    x, y = x[:2], y[:2]
    fea = certify(model, x, y, method="feasible")
    comp = certify(model, x, y, method="complete", timeout=4)
    pgd = fv.attack(model, x, y)
    assert pgd.success.all()  # not vacuous
    for f, c, w1 in zip(fea, comp, np.asarray(pgd.w1), strict=True):
        assert c.status in (Status.CERTIFIED, Status.UNKNOWN)
        assert c.radius >= f.radius * (1 - 1e-9)
        assert c.radius <= c.upper * (1 + 1e-9)
        assert c.upper <= w1 * (1 + 1e-6)


def test_device_and_smoothing_validation():
    x = _images(21, n=1)
    model = _relu_net(22)
    with pytest.raises(ValueError, match="device"):
        certify(model, x, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device.*CUDA"):
            certify(model, x, device="cuda")
    with pytest.raises(ValueError, match="sigma"):
        certify(model, x, method="smoothing")
    with pytest.raises(ValueError, match="sigma"):
        certify(model, x, method="vanilla", sigma=0.1)
    with pytest.raises(ValueError, match="laplace-cohen"):
        certify(model, x, method="smoothing", sigma=0.1, certifier="crown")


def test_smoothing_through_certify_matches_smoothed_certify():
    from flowverify.baselines.smoothing import smoothed_certify

    x = _images(23, n=2)
    model = _relu_net(24, conv=True)
    a = certify(model, x, method="smoothing", sigma=0.05, n0=20, n_samples=100, seed=3)
    b = smoothed_certify(model, x, sigma=0.05, n0=20, n=100, seed=3)
    assert [r.to_dict() | {"seconds": 0} for r in a] == [r.to_dict() | {"seconds": 0} for r in b]
    assert all(r.method == "smoothing" for r in a)


def test_eval_mode_restored():
    model = _relu_net(25).train()
    certify(model, _images(26, n=1), method="vanilla")
    assert all(m.training for m in model.modules())


def test_incomplete_timeout_gives_unknown_with_a_lower_bound():
    x = _images(27, n=2)
    model = _relu_net(28)
    full = certify(model, x, method="feasible")
    cut = certify(model, x, method="feasible", timeout=1e-9)
    for q, f in zip(cut, full, strict=True):
        if q.status == Status.MISCLASSIFIED:
            continue
        assert q.radius_raw <= f.radius_raw * (1 + 1e-9)
        if not q.converged:
            assert q.status == Status.UNKNOWN
    assert any(not q.converged for q in cut)


def test_certify_and_the_verifier_share_their_keywords_and_defaults():
    """``certify`` spells its options out for users; the verifier it forwards to takes
    the same ones with the same defaults (smoothing's own and the verifier's
    ``adversary`` hook aside), so the two lists cannot drift apart."""
    import inspect

    from flowverify.verification import api as _vapi

    def options(fn, drop):
        sig = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in sig if p.kind == p.KEYWORD_ONLY and p.name not in drop}

    public = options(certify, {"sigma", "n0", "n_samples", "alpha"})
    inner = options(_vapi._iter_certify_modes, {"adversary"})
    assert public == inner


def test_a_model_is_prepared_once_and_again_after_its_weights_change():
    """The float64 copy and the engine graph (with its front map) are reused across calls
    on the same model, and rebuilt after an in-place change of its weights (an optimiser
    step), a new layer or a reloaded state: radii always those of the model as it is."""
    from flowverify.verification import api as _api

    model = _relu_net(5)
    x = _images(6)
    y = model(torch.as_tensor(x).double()).argmax(1).numpy()
    first = [r.radius for r in certify(model, x, y, method="feasible")]
    old = [r.radius for r in certify(model, x, y, method="vanilla")]
    graph = _api._ENGINE_MODELS[model][2]
    assert any(k[0] == "front" for k in graph.cache if isinstance(k, tuple))
    assert [r.radius for r in certify(model, x, y, method="feasible")] == first
    assert _api._ENGINE_MODELS[model][2] is graph  # reused, front map and all
    with torch.no_grad():
        model[1].weight.mul_(0.5)  # in place: the storage stays, its version moves on
    fresh = copy.deepcopy(model)
    now = [r.radius for r in certify(model, x, y, method="vanilla")]
    assert now == [r.radius for r in certify(fresh, x, y, method="vanilla")] and now != old
    assert _api._ENGINE_MODELS[model][2] is not graph
    before = _api._ENGINE_MODELS[model][2]
    model.load_state_dict(fresh.state_dict())  # same values, copied in: rebuilt anyway
    certify(model, x[:1], y[:1], method="vanilla")
    assert _api._ENGINE_MODELS[model][2] is not before
