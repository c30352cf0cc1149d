"""Tests of the complete certifier (exact W1 radius, SPEC section 4, Theorem 6, Lemma 8).

Small seeded networks on 5x5 / 6x6 images, where the exact radius can be computed by
brute force: one LP per (activation pattern, target class) over the closed linear
region, ``min ‖g‖₁ s.t. x0 + Ag ≥ 0, pattern signs, f_t ≥ f_y``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from conftest import relu_net
from flowverify.model.flow_model import FlowModel
from flowverify.transport.flows import incidence_matrix, inverse_flow, w1_distance
from flowverify.transport.references import make_reference
from flowverify.verification._chain import affine_chain
from flowverify.verification.complete import ExactResult, exact_radius

H = W = 6


def _block_a(h, w, c):
    a = incidence_matrix(h, w)
    return a if c == 1 else sp.block_diag([a] * c, format="csr")


def _image(seed, c=1, h=H, w=W, sparse=True):
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 1, size=(c, h, w))
    if sparse:
        img[rng.uniform(size=img.shape) < 0.4] = 0.0  # zero pixels make feasibility bite
    return img


def _net(seed, sizes, c=1, h=H, w=W):
    return relu_net(seed, sizes, c=c, h=h, w=w)


def _setup(seed, sizes, c=1, h=H, w=W, ref="uniform"):
    model = _net(seed, sizes, c, h, w)
    img = _image(seed + 100, c, h, w)
    r = make_reference(ref, img, seed=seed)
    fm = FlowModel(model, torch.as_tensor(r), fuse=True)
    chain = affine_chain(fm, 0)
    dmu = np.asarray(inverse_flow(r, img, method="minimal"), dtype=np.float64).reshape(-1)
    with torch.no_grad():
        label = int(model(torch.as_tensor(img[None])).argmax())
    return model, chain, dmu, r.reshape(-1), label, img


def _brute_force(chain, dmu, ref, label, c=1, h=H, w=W, feasible=True):
    """Exact radius: min over activation patterns and targets of the region LP."""
    amat = _block_a(h, w, c)
    x0 = ref + amat @ dmu
    n0 = dmu.size
    hidden = [wk.shape[0] for wk in chain.weights[:-1]]
    best = math.inf
    for bits in itertools.product([0, 1], repeat=sum(hidden)):
        pat = np.array(bits, dtype=float)
        # affine map of each layer on g under the pattern
        jac, off = chain.weights[0], chain.weights[0] @ dmu + chain.biases[0]
        a_ub, b_ub = [], []
        start = 0
        for k, n in enumerate(hidden):
            d = pat[start : start + n]
            start += n
            sgn = np.where(d > 0, -1.0, 1.0)  # active: -z <= 0 ; inactive: z <= 0
            a_ub.append(sgn[:, None] * jac)
            b_ub.append(-sgn * off)
            wn, bn = chain.weights[k + 1], chain.biases[k + 1]
            jac, off = wn @ (d[:, None] * jac), wn @ (d * off) + bn
        if feasible:
            a_ub.append(-amat.toarray())
            b_ub.append(x0)
        for t in range(jac.shape[0]):
            if t == label:
                continue
            m_jac = jac[t] - jac[label]
            m_off = off[t] - off[label]
            rows = np.vstack(a_ub + [-m_jac[None]])
            rhs = np.concatenate(b_ub + [[m_off]])
            res = linprog(
                np.ones(2 * n0),
                A_ub=np.hstack([rows, -rows]),
                b_ub=rhs,
                bounds=(0, None),
                method="highs",
            )
            if res.status == 0:
                best = min(best, res.fun)
    return best


def _check_witness(res: ExactResult, chain, dmu, ref, label, feasible=True, c=1, h=H, w=W):
    assert res.witness_flow is not None
    assert res.witness_flow.shape == dmu.shape
    logits = chain.forward(res.witness_flow)
    assert int(np.argmax(logits)) != label
    assert logits.max() > logits[label]
    assert res.target == int(np.argmax(logits))
    assert np.abs(res.witness_flow - dmu).sum() == pytest.approx(res.upper, rel=1e-12)
    img = (ref + _block_a(h, w, c) @ res.witness_flow).reshape(c, h, w)
    if feasible:
        assert img.min() >= 0.0
        x0 = (ref + _block_a(h, w, c) @ dmu).reshape(c, h, w)
        np.testing.assert_allclose(img.sum(axis=(1, 2)), x0.sum(axis=(1, 2)), rtol=1e-12)
    return img


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bab_equals_brute_force_and_milp(seed):
    _, chain, dmu, ref, label, img = _setup(seed, [6, 3])
    truth = _brute_force(chain, dmu, ref, label)
    bab = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60)
    milp = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60, algorithm="milp")
    for res in (bab, milp):
        assert res.status == "optimal", res.solver_status
        assert res.lower <= truth + 1e-9
        assert res.upper >= truth - 1e-9
        assert res.upper == pytest.approx(truth, rel=1e-5, abs=1e-9)
        assert res.upper - res.lower <= 1e-6 * res.upper + 1e-12
        wimg = _check_witness(res, chain, dmu, ref, label)
        # Theorem 1: the minimal flow between the image and the witness costs ‖δ*-δµ‖₁
        w1 = float(w1_distance(img, wimg, unit="raw"))
        assert w1 <= res.upper * (1 + 1e-9) + 1e-12
        assert w1 == pytest.approx(res.upper, rel=1e-5)


@pytest.mark.parametrize("seed", [8, 13])
def test_two_hidden_layers_brute_force(seed):
    _, chain, dmu, ref, label, _ = _setup(seed, [4, 4, 3])
    truth = _brute_force(chain, dmu, ref, label)
    res = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60)
    assert res.status == "optimal", res.solver_status
    assert res.lower <= truth + 1e-9 <= res.upper + 2e-9
    assert res.upper == pytest.approx(truth, rel=1e-5)
    _check_witness(res, chain, dmu, ref, label)


def test_no_adversarial_image_is_infeasible():
    # brute force: no image of the same mass is classified otherwise
    _, chain, dmu, ref, label, _ = _setup(7, [4, 4, 3])
    assert _brute_force(chain, dmu, ref, label) == math.inf
    for algorithm in ("bab", "milp"):
        res = exact_radius(chain, dmu, ref, label, height=H, width=W, algorithm=algorithm)
        assert res.status == "infeasible"
        assert res.witness_flow is None and res.upper == math.inf


def test_ball_brute_force_and_not_larger_than_feasible():
    _, chain, dmu, ref, label, _ = _setup(3, [6, 3])
    truth_ball = _brute_force(chain, dmu, ref, label, feasible=False)
    ball = exact_radius(chain, dmu, ref, label, height=H, width=W, feasible=False, timeout=60)
    feas = exact_radius(chain, dmu, ref, label, height=H, width=W, feasible=True, timeout=60)
    assert ball.status == feas.status == "optimal"
    assert ball.upper == pytest.approx(truth_ball, rel=1e-5)
    assert ball.lower <= feas.lower + 1e-9
    assert ball.upper <= feas.upper * (1 + 1e-6)
    _check_witness(ball, chain, dmu, ref, label, feasible=False)


def test_two_channels():
    c, h, w = 2, 5, 5
    _, chain, dmu, ref, label, _ = _setup(12, [5, 3], c=c, h=h, w=w)
    truth = _brute_force(chain, dmu, ref, label, c=c, h=h, w=w)
    res = exact_radius(chain, dmu, ref, label, height=h, width=w, timeout=60)
    assert res.status == "optimal", res.solver_status
    assert res.upper == pytest.approx(truth, rel=1e-5)
    _check_witness(res, chain, dmu, ref, label, c=c, h=h, w=w)


def test_reference_does_not_change_the_exact_radius():
    _, chain_u, dmu_u, ref_u, label, _ = _setup(4, [6, 3], ref="uniform")
    _, chain_p, dmu_p, ref_p, _, _ = _setup(4, [6, 3], ref="point")
    a = exact_radius(chain_u, dmu_u, ref_u, label, height=H, width=W, timeout=60)
    b = exact_radius(chain_p, dmu_p, ref_p, label, height=H, width=W, timeout=60)
    assert a.status == b.status == "optimal"
    assert a.upper == pytest.approx(b.upper, rel=1e-5)


# --------------------------------------------------------------------------- linear


def _lemma8(chain, dmu, ref, label, h=H, w=W):
    amat = incidence_matrix(h, w)
    x0 = ref + amat @ dmu
    wt_all, b = chain.weights[0], chain.biases[0]
    best = math.inf
    for t in range(wt_all.shape[0]):
        if t == label:
            continue
        wt = wt_all[label] - wt_all[t]
        dt = b[label] - b[t]
        # min ‖δ - δµ‖₁  s.t.  x0 + A g ≥ 0,  wtᵀ(δµ + g) + dt ≤ 0
        rows = np.vstack([-amat.toarray(), wt[None]])
        rhs = np.concatenate([x0, [-dt - wt @ dmu]])
        res = linprog(
            np.ones(2 * dmu.size),
            A_ub=np.hstack([rows, -rows]),
            b_ub=rhs,
            bounds=(0, None),
            method="highs",
        )
        if res.status == 0:
            best = min(best, res.fun)
    return best


@pytest.mark.parametrize("seed", [0, 5])
def test_linear_chain_is_lemma8(seed):
    _, chain, dmu, ref, label, _ = _setup(seed, [4])
    assert len(chain.weights) == 1
    truth = _lemma8(chain, dmu, ref, label)
    res = exact_radius(chain, dmu, ref, label, height=H, width=W)
    assert res.status == "optimal"
    assert res.upper == pytest.approx(truth, rel=1e-6)
    assert res.lower <= truth + 1e-9
    _check_witness(res, chain, dmu, ref, label)


def test_linear_ball_is_lemma7():
    _, chain, dmu, ref, label, _ = _setup(2, [4])
    wt_all, b = chain.weights[0], chain.biases[0]
    logits = chain.forward(dmu)
    lemma7 = min(
        (logits[label] - logits[t]) / np.abs(wt_all[label] - wt_all[t]).max()
        for t in range(4)
        if t != label
    )
    res = exact_radius(chain, dmu, ref, label, height=H, width=W, feasible=False)
    assert res.status == "optimal"
    assert res.upper == pytest.approx(lemma7, rel=1e-9)
    assert res.lower <= lemma7
    feas = exact_radius(chain, dmu, ref, label, height=H, width=W, feasible=True)
    assert feas.upper >= res.upper * (1 - 1e-9)  # Lemma 8 >= Lemma 7
    del b


# --------------------------------------------------------------------------- soundness


def test_random_search_adversarials_are_not_closer():
    """Random images of the same mass (mixtures of µ and random images): every one of
    another class lies at W1 >= the proven lower bound."""
    _, chain, dmu, ref, label, img = _setup(1, [6, 3])
    res = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60)
    x0 = img.reshape(-1)
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(400):
        nu = rng.uniform(0, 1, size=x0.shape) * (rng.uniform(size=x0.shape) < 0.5)
        nu *= x0.sum() / max(nu.sum(), 1e-12)
        t = rng.uniform(0.05, 1.0)
        cand = (1 - t) * x0 + t * nu
        g = np.asarray(inverse_flow(img, cand.reshape(img.shape))).reshape(-1)
        if int(np.argmax(chain.forward(dmu + g))) != label:
            found += 1
            assert np.abs(g).sum() >= res.lower - 1e-9
    assert found > 0  # the random search did reach other classes: the check is not vacuous
    assert res.upper >= res.lower


def test_timeout_gives_a_sound_lower_bound():
    _, chain, dmu, ref, label, _ = _setup(0, [6, 3])
    truth = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60).upper
    res = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=1e-4)
    assert res.status == "timeout"
    assert 0.0 <= res.lower <= truth + 1e-9
    assert res.upper >= res.lower
    assert res.upper == math.inf or res.witness_flow is not None


def test_hints_and_misclassified():
    _, chain, dmu, ref, label, _ = _setup(2, [6, 3])
    exact = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60)
    # a verified witness and an upper bound are used; a bad witness is ignored
    res = exact_radius(
        chain,
        dmu,
        ref,
        label,
        height=H,
        width=W,
        timeout=60,
        witness_flow=exact.witness_flow * 1.0,
        upper_bound=exact.upper * 1.5,
    )
    assert res.status == "optimal" and res.upper == pytest.approx(exact.upper, rel=1e-6)
    bad = exact_radius(chain, dmu, ref, label, height=H, width=W, timeout=60, witness_flow=dmu)
    assert bad.upper == pytest.approx(exact.upper, rel=1e-6)
    # a lower bound hint is reported when it is proven and consistent
    lb = exact_radius(
        chain, dmu, ref, label, height=H, width=W, timeout=60, lower_bound=exact.lower * 0.5
    )
    assert lb.lower >= exact.lower * 0.5
    # the image of another class: radius 0
    other = int(np.argsort(chain.forward(dmu))[-2])
    zero = exact_radius(chain, dmu, ref, other, height=H, width=W)
    assert zero.status == "optimal" and zero.upper == 0.0 == zero.lower
    with pytest.raises(ValueError, match="algorithm"):
        exact_radius(chain, dmu, ref, label, height=H, width=W, algorithm="nope")
    with pytest.raises(ValueError, match="delta_mu"):
        exact_radius(chain, dmu[:-1], ref, label, height=H, width=W)


# --------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize(
    "sizes, feasible, algorithm",
    [([3], True, "bab"), ([3], False, "bab"), ([6, 3], True, "milp")],
    ids=["lemma8", "lemma7", "milp"],
)
def test_unverified_witnesses_never_claim_no_adversarial(monkeypatch, sizes, feasible, algorithm):
    """If no witness passes the exact check, the result is a bound, not "infeasible"."""
    from flowverify.verification import _bab, _bab_witness, _milp, complete

    _, chain, dmu, ref, label, _ = _setup(3, sizes)
    truth = exact_radius(
        chain, dmu, ref, label, height=H, width=W, feasible=feasible, algorithm=algorithm
    )
    assert truth.status == "optimal"
    never = lambda *a, **k: (False, None)  # noqa: E731 - every witness check fails
    monkeypatch.setattr(complete, "verify_witness", never)
    for module in (_bab, _bab_witness):
        monkeypatch.setattr(module, "verify_witness", never)
    monkeypatch.setattr(_milp, "_region_witness", lambda *a, **k: None)
    res = exact_radius(
        chain, dmu, ref, label, height=H, width=W, feasible=feasible, algorithm=algorithm
    )
    assert res.status == "unverified" and res.witness_flow is None
    assert res.lower <= truth.upper * (1 + 1e-9)  # still a proven lower bound


@pytest.mark.parametrize("seed", [1, 5])
def test_search_radius_below_the_radius_proves_no_more_than_it(seed):
    """An upper bound hint below ``r*`` restricts the search to ``P_U``: nodes closed
    there prove ``r* >= U`` only, even when an adversarial farther out is found."""
    _, chain, dmu, ref, label, _ = _setup(seed, [6, 3])
    truth = _brute_force(chain, dmu, ref, label)
    res = exact_radius(
        chain, dmu, ref, label, height=H, width=W, timeout=60, upper_bound=0.6 * truth
    )
    assert res.status == "bounded"  # an adversarial beyond ``U`` is found, not proven
    assert 0.6 * truth * (1 - 1e-9) <= res.upper < math.inf
    assert res.lower <= truth + 1e-9, (res.lower, truth)


@pytest.mark.parametrize("seed, sizes", [(0, [6, 3]), (1, [6, 3]), (8, [4, 4, 3]), (13, [4, 4, 3])])
@pytest.mark.parametrize("frac", [0.3, 0.9, 0.999])
def test_stepped_search_from_a_lower_bound_is_exact(seed, sizes, frac):
    """Searches over growing radii from a proven lower bound end at the exact radius."""
    _, chain, dmu, ref, label, _ = _setup(seed, sizes)
    truth = _brute_force(chain, dmu, ref, label)
    res = exact_radius(
        chain, dmu, ref, label, height=H, width=W, timeout=60, lower_bound=frac * truth
    )
    assert res.status == "optimal", res.solver_status
    assert res.lower <= truth + 1e-9 <= res.upper + 2e-9
    assert res.upper == pytest.approx(truth, rel=1e-5)
    _check_witness(res, chain, dmu, ref, label)


def test_highs_time_limit_is_per_run():
    """HiGHS counts ``time_limit`` against its cumulative run time; ``set_time_limit``
    gives every run of a re-used solver its own budget."""
    import highspy

    from flowverify.verification._highs import new_highs, set_time_limit

    rng = np.random.default_rng(0)
    n, m = 300, 200
    h = new_highs()
    h.addVars(n, np.zeros(n), np.ones(n))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), -rng.random(n))
    cols = np.arange(n, dtype=np.int32)
    for _ in range(m):
        h.addRow(-highspy.kHighsInf, 5.0 * rng.random(), n, cols, rng.random(n))
    per_run = 0.0
    for _ in range(2):
        h.clearSolver()
        before = h.getRunTime()
        h.run()
        per_run = max(per_run, h.getRunTime() - before, 1e-3)
    budget = 5 * per_run + 0.02
    for _ in range(12):  # more run time in total than one run's budget
        h.clearSolver()
        set_time_limit(h, budget)
        h.run()
        assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    assert h.getRunTime() > budget
    set_time_limit(h, None)
    assert h.getOptionValue("time_limit")[1] == highspy.kHighsInf


@pytest.mark.parametrize(
    "opts", [dict(stepped=False), dict(step=0.5, step_nodes=1)], ids=["one-search", "tiny-budget"]
)
def test_branch_and_bound_search_options_stay_exact(monkeypatch, opts):
    """One search over ``P_U``, or steps cut after every node: the same exact radius."""
    import functools

    from flowverify.verification import _bab, complete

    monkeypatch.setattr(
        complete, "branch_and_bound", functools.partial(_bab.branch_and_bound, **opts)
    )
    _, chain, dmu, ref, label, _ = _setup(8, [4, 4, 3])
    truth = _brute_force(chain, dmu, ref, label)
    res = exact_radius(
        chain, dmu, ref, label, height=H, width=W, timeout=60, lower_bound=0.5 * truth
    )
    assert res.status == "optimal", res.solver_status
    assert res.lower <= truth + 1e-9 <= res.upper + 2e-9
    assert res.upper == pytest.approx(truth, rel=1e-5)


def test_complete_methods_keep_every_torch_thread():
    """One image's subdomains are bounded in batches: large products, so torch keeps its
    threads; an incomplete method on a few images of a small model runs single-threaded."""
    from types import SimpleNamespace

    from flowverify.model.loading import load_model
    from flowverify.verification import api

    model = load_model("fc")
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for method, want in (("complete", 2), ("vanilla", 1)):
            ctx = SimpleNamespace(device=torch.device("cpu"), method=method, model64=model)
            with api._torch_threads(ctx, 1):
                assert torch.get_num_threads() == want
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
