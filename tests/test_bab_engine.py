"""Complete verification on the engine (``certifier="beta-crown"``): branch and bound on
ReLU splits with optimised slopes and split multipliers (:mod:`flowverify.verification.engine.bab`).

Exactness against a brute-force enumeration of activation patterns (one LP per pattern and
target, ``tests/test_complete.py``) and the MILP on small seeded networks; fixed-ε
decisions on both sides of the exact radius; a time limit never certifies; networks
outside the chain family (convolution, BatchNorm, residual block).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import flowverify as fv
from flowverify.core.results import Status
from test_complete import H, W, _block_a, _brute_force, _setup


def _complete(model, img, label, **kw):
    kw.setdefault("timeout", 60)
    return fv.certify(
        model,
        img[None],
        np.array([label]),
        method="complete",
        certifier="beta-crown",
        unit="raw",
        **kw,
    )[0]


def _misclassified(model, img, label) -> bool:
    with torch.no_grad():
        return int(model(torch.as_tensor(img[None])).argmax()) != label


@pytest.mark.parametrize("seed,sizes", [(0, [6, 3]), (1, [6, 3]), (2, [6, 3]), (8, [4, 4, 3])])
def test_exact_radius_equals_brute_force_and_milp(seed, sizes):
    model, chain, dmu, ref, label, img = _setup(seed, sizes)
    truth = _brute_force(chain, dmu, ref, label)
    milp = fv.certify(
        model, img[None], np.array([label]), method="complete", certifier="milp", unit="raw"
    )[0]
    res = _complete(model, img, label, rtol=1e-7)
    assert res.status == Status.CERTIFIED and res.exact, res.message
    assert res.radius_raw <= truth * (1 + 1e-9)
    assert res.radius_raw == pytest.approx(truth, rel=1e-6)
    assert res.radius_raw == pytest.approx(milp.radius_raw, rel=1e-6)
    assert res.upper_raw >= truth * (1 - 1e-9)
    assert _misclassified(model, res.witness, label)
    assert float(fv.w1_distance(res.witness, img, unit="raw")) <= res.upper_raw * (1 + 1e-9)


@pytest.mark.parametrize("seed,sizes", [(1, [6, 3]), (13, [4, 4, 3])])
def test_decisions_on_both_sides_of_the_exact_radius(seed, sizes):
    model, chain, dmu, ref, label, img = _setup(seed, sizes)
    truth = _brute_force(chain, dmu, ref, label)
    below = _complete(model, img, label, eps=0.9 * truth)
    above = _complete(model, img, label, eps=1.1 * truth)
    assert below.status == Status.CERTIFIED
    assert above.status == Status.FALSIFIED
    assert _misclassified(model, above.witness, label)
    assert float(fv.w1_distance(above.witness, img, unit="raw")) <= 1.1 * truth
    assert above.witness.min() >= 0.0  # the polytope: a non-negative image of the same mass
    assert above.witness.sum() == pytest.approx(img.sum(), rel=1e-9)


def test_a_tiny_time_limit_never_certifies():
    model, chain, dmu, ref, label, img = _setup(2, [6, 3])
    truth = _brute_force(chain, dmu, ref, label)
    res = _complete(model, img, label, timeout=1e-3)
    assert res.status == Status.UNKNOWN and not res.exact
    assert res.message
    assert res.radius_raw <= truth * (1 + 1e-9) <= res.upper_raw * (1 + 1e-9)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * H * W, 3)

    def forward(self, x):
        z = torch.relu(self.bn(self.conv(x)))
        z = torch.relu(z + self.inner(z))
        return self.head(z.flatten(1))


@pytest.mark.slow
def test_networks_outside_the_chain_family():
    """Convolution, BatchNorm (eval) and a residual block: complete's bracket holds the
    exact radius (proven <= every misclassified image found) and starts at CROWN's."""
    torch.manual_seed(3)
    model = _Residual().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1, size=(1, H, W))
    with torch.no_grad():
        label = int(model(torch.as_tensor(img[None])).argmax())
    feas = fv.certify(model, img[None], np.array([label]), method="feasible", unit="raw")[0]
    res = _complete(model, img, label, timeout=20)
    assert res.radius_raw >= feas.radius_raw * (1 - 1e-9)
    assert res.status in (Status.CERTIFIED, Status.UNKNOWN)
    assert res.status == Status.CERTIFIED or res.message
    if math.isfinite(res.upper_raw):
        assert res.radius_raw <= res.upper_raw * (1 + 1e-9)
    atk = fv.attack(model, img[None], np.array([label]), eps=None)
    w1 = float(np.asarray(atk.w1).ravel()[0]) * img.sum()
    assert res.radius_raw <= w1 * (1 + 1e-6)


def test_refined_bounds_of_a_subdomain_hold_on_its_points():
    """The second layer's bounds recomputed through the first layer's splits are tighter
    than the root's and hold at every sampled image of ``D_ε`` that obeys the splits."""
    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    model, _, _, _, label, img = _setup(8, [6, 6, 3])
    graph = build_graph(model.double().eval(), torch.as_tensor(img[None]))
    bab = SplitBab(graph, img, label)
    first, second = bab.relus
    eps = 0.5 * img.sum()
    root = bab._root(eps)

    def pre_activations(images):
        z, out = torch.as_tensor(images), []
        with torch.no_grad():
            for layer in model:
                z = layer(z)
                if isinstance(layer, nn.Linear):
                    out.append(z.numpy().copy())
        return out

    lo1, up1 = (t.reshape(-1) for t in root[0][graph.nodes[first].inputs[0]])
    unstable = torch.nonzero((lo1 < 0) & (up1 > 0)).flatten()[:2]
    assert unstable.numel() == 2
    sign = np.where(pre_activations(img[None])[0][0, unstable] >= 0, 1, -1)
    sub = bab._fresh()
    sub.splits[first][unstable] = torch.as_tensor(sign, dtype=torch.int8)
    _, lohi, _, _, empty = bab.relaxations([sub], root, eps)
    assert not bool(empty[0])
    lo2, up2 = (t[0].numpy() for t in lohi[second])
    r_lo, r_up = (t.reshape(-1).numpy() for t in root[0][graph.nodes[second].inputs[0]])
    assert (lo2 >= r_lo).all() and (up2 <= r_up).all()
    assert (up2 - lo2).sum() < (r_up - r_lo).sum()  # tighter somewhere
    # images of D_ε: µ + s(ν' - µ) for random ν' of the same mass, s W1(µ, ν') <= ε
    rng = np.random.default_rng(0)
    other = rng.exponential(size=(3000, *img.shape)) ** 3
    other *= img.sum() / other.sum(axis=(1, 2, 3), keepdims=True)
    w1 = np.array([float(fv.w1_distance(o, img, unit="raw")) for o in other])
    s = np.minimum(1.0, eps * rng.uniform(size=len(other)) / w1)
    nus = img[None] + s[:, None, None, None] * (other - img[None])
    # and the images of D_ε that push each second-layer neuron furthest, linearised at µ
    from flowverify.verification.polytope import polytope_plan

    x = torch.tensor(img[None], requires_grad=True)
    z = x
    for layer in list(model)[:4]:
        z = layer(z)
    rows = np.stack(
        [
            torch.autograd.grad(z[0, j], x, retain_graph=True)[0][0].numpy()
            for j in range(z.shape[1])
        ]
    ).reshape(z.shape[1], -1)
    for frac in (0.5, 1.0):
        ext = polytope_plan(np.concatenate([rows, -rows]), img, frac * eps * (1 - 1e-9))
        nus = np.concatenate([nus, ext])
    z1, z2 = pre_activations(nus)[:2]
    inside = ((z1[:, unstable] * sign) >= 0).all(axis=1)
    assert inside.sum() >= 100
    assert (z2[inside] >= lo2 - 1e-9).all() and (z2[inside] <= up2 + 1e-9).all()


def test_the_region_lp_keeps_to_the_deadline(monkeypatch):
    """A fully split subdomain's LPs (:func:`~.engine.region.region_lp`) get the time left
    as their limit and none starts after the deadline: the decision then says the time
    limit was reached (here every subdomain is treated as fully split)."""
    import copy
    import time

    from flowverify.verification.engine import bab as _bab
    from flowverify.verification.engine import region as _region
    from flowverify.verification.engine.graph import build_graph

    model, chain, dmu, ref, label, img = _setup(1, [6, 3])
    truth = _brute_force(chain, dmu, ref, label)
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    seen = []

    def slow_lp(*args, options=None, **kw):
        seen.append(dict(options or {}))
        time.sleep(0.2)
        return type("Res", (), {"status": 1})()  # HiGHS stopped at its time limit

    monkeypatch.setattr(_region, "linprog", slow_lp)
    monkeypatch.setattr(_bab.SplitBab, "_branch", lambda self, sub, choice: None)
    bab = _bab.SplitBab(graph, img, label)
    start = time.perf_counter()
    dec = bab.decide(0.99 * truth, deadline=start + 0.1)  # open root, no witness
    assert dec.status == "unknown" and dec.message == "time limit reached"
    assert len(seen) == 1 and 0 < seen[0]["time_limit"] <= 0.1  # none after the deadline


@pytest.mark.parametrize("candidates", [1, 3])
def test_branching_rules_reach_the_same_exact_radius(monkeypatch, candidates):
    """BaBSR alone (1 candidate) and filtered smart branching (:mod:`.engine.branching`)
    split only candidates (unstable, unsplit neurons) and find the brute-force radius."""
    from flowverify.verification.engine import bab as _bab
    from flowverify.verification.engine import bab_search as _search

    model, chain, dmu, ref, label, img = _setup(8, [4, 4, 3])
    truth = _brute_force(chain, dmu, ref, label)
    init, choose, seen = _bab.SplitBab.__init__, _search.fsb_choices, []

    def init_k(self, *a, **kw):
        init(self, *a, candidates=candidates, **kw)

    def check(bab, ctx, scores, k, keep):
        out = choose(bab, ctx, scores, k, keep)
        seen.extend(math.isfinite(float(scores[c[0]][b, c[1]])) for b, c in out.items() if c)
        return out

    monkeypatch.setattr(_bab.SplitBab, "__init__", init_k)
    monkeypatch.setattr(_search, "fsb_choices", check)
    res = _complete(model, img, label, rtol=1e-7)
    assert res.status == Status.CERTIFIED and res.exact, res.message
    assert res.radius_raw == pytest.approx(truth, rel=1e-6)
    assert seen and all(seen)


def test_a_decision_out_of_time_proves_the_radius_of_what_it_left_open(monkeypatch):
    """A decision stopped by its deadline reports the smallest proven radius of the
    subdomains it left open (each from its bound's relaxation, valid on every smaller
    region): positive, at most ``ε`` and never above the brute-force radius; the radius
    search keeps it (a clock that ticks once per look stops both after a few rounds)."""
    import copy

    from flowverify.verification.engine import bab_search as _search
    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    class Clock:
        now = 0.0

        def perf_counter(self):
            self.now += 1.0
            return self.now

    model, chain, dmu, ref, label, img = _setup(3, [4, 4, 3])
    truth = _brute_force(chain, dmu, ref, label)
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    monkeypatch.setattr(_search, "time", Clock())
    bab = SplitBab(graph, img, label, batch=4)
    eps = 0.999 * truth  # below the radius: no witness
    dec = bab.decide(eps, deadline=6.0)
    assert dec.status == "unknown" and dec.message == "time limit reached"
    assert 0 < dec.proven <= eps
    assert dec.proven <= truth * (1 + 1e-9)
    monkeypatch.setattr(_search, "time", Clock())
    res = SplitBab(graph, img, label, batch=4).radius(0.0, 2 * truth, deadline=12.0)
    assert 0 < res.lower <= truth * (1 + 1e-9) and not res.exact


@pytest.mark.parametrize("seed,sizes", [(0, [6, 3]), (2, [6, 3]), (8, [4, 4, 3])])
def test_a_polished_witness_lies_between_the_exact_radius_and_the_attack(seed, sizes):
    """:func:`~.engine.region.polish` (LPs on the witness's linear regions): still
    misclassified, never farther than the attack's image, never closer than the exact
    radius (brute force over activation patterns)."""
    import copy

    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph
    from flowverify.verification.engine.region import polish

    model, chain, dmu, ref, label, img = _setup(seed, sizes)
    truth = _brute_force(chain, dmu, ref, label)
    atk = fv.attack(model, img[None], np.array([label]), eps=None)
    start = np.asarray(atk.adversarial, dtype=np.float64)[0]
    w1_start = float(fv.w1_distance(start, img, unit="raw"))
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    found = polish(SplitBab(graph, img, label), start)
    assert found is not None and _misclassified(model, found[0], label)
    w1 = float(fv.w1_distance(found[0], img, unit="raw"))
    assert found[1] == pytest.approx(w1, rel=1e-12)  # the W1 it reports is the exact one
    assert truth * (1 - 1e-9) <= w1 <= w1_start * (1 + 1e-9)
    assert w1 < w1_start * (1 - 1e-6) or w1_start <= truth * (1 + 1e-6)  # it moved closer


def test_a_batch_with_no_open_margin_is_bounded_without_error():
    """A batch whose subdomains are all empty (a split against the root's bounds) has no
    open margin to bound: every bound is +inf (closed), no plan is searched, no error."""
    import copy

    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    model, chain, dmu, ref, label, img = _setup(8, [4, 4, 3])
    truth = _brute_force(chain, dmu, ref, label)
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    bab = SplitBab(graph, img, label)
    eps = 0.1 * truth
    root = bab._root(eps)
    subs = []
    for i in bab.relus:
        lo, up = (t.reshape(-1) for t in root[0][graph.nodes[i].inputs[0]])
        stable = [(j, 1) for j in torch.nonzero(up < 0).flatten().tolist()]  # inactive
        stable += [(j, -1) for j in torch.nonzero(lo > 0).flatten().tolist()]  # active
        for j, sign in stable:  # split against its phase: an empty subdomain
            sub = bab._fresh()
            sub.splits[i][j] = sign
            subs.append(sub)
    assert subs, "the test net needs a neuron stable at the root"
    lb, _, _ = bab._bound(subs, eps, root, 2)
    assert bool(torch.isinf(lb).all()) and all(not bool(s.open.any()) for s in subs)
    q = torch.zeros((2, bab.m, *img.shape), dtype=torch.float64)
    gain, slope = bab._gain(q, eps, torch.zeros((2, bab.m), dtype=torch.bool))
    assert bool(torch.isinf(gain).all()) and not bool(slope.any())


@pytest.mark.parametrize("seed,sizes", [(3, [4, 4, 3]), (8, [4, 4, 3])])
def test_decisions_share_one_search_tree(seed, sizes):
    """Decisions of one :class:`~.engine.bab.SplitBab` work on one tree: after a proof at
    ``ε``, a decision at the same ``ε`` bounds nothing; a decision that ran out of time
    is resumed (not restarted) by the next at the same ``ε``, which still proves it; a
    larger ``ε`` past the radius is falsified on the same tree."""
    import copy

    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    model, chain, dmu, ref, label, img = _setup(seed, sizes)
    truth = _brute_force(chain, dmu, ref, label)
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    eps = 0.97 * truth
    fresh = SplitBab(graph, img, label, batch=2)
    assert fresh.decide(eps).status == "certified"
    n_full = fresh.nodes
    assert fresh.decide(eps).status == "certified" and fresh.nodes == n_full  # all proven
    assert fresh.decide(0.5 * eps).status == "certified"

    bab = SplitBab(graph, img, label, batch=2)
    first = bab.decide(eps, deadline=0.0)  # one batch, then out of time
    assert first.status == "unknown" and 0 < bab.nodes < n_full
    assert bab.decide(eps).status == "certified"
    assert bab.nodes <= n_full + 2  # resumed: at most the first batch bounded again
    above = bab.decide(1.05 * truth)
    assert above.status == "falsified" and _misclassified(model, above.witness, label)


def test_the_search_tree_keeps_small_copies_of_its_warm_starts():
    """A subdomain kept in the tree holds its own copies, never views of a batch's
    tensors (which would keep the whole batch alive): intermediate bounds in float64,
    ``α`` on every neuron and ``β`` on split neurons only, in float32.  The search's
    freed memory goes back to the system (glibc)."""
    import copy
    import sys

    from flowverify.core.memory import release_free_memory
    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    model, chain, dmu, ref, label, img = _setup(13, [4, 4, 3])
    truth = _brute_force(chain, dmu, ref, label)
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    bab = SplitBab(graph, img, label, batch=2)
    assert bab.decide(0.97 * truth).status == "certified"

    def own(t):
        return t.untyped_storage().nbytes() == t.numel() * t.element_size()

    stack, seen = [bab._tree], 0
    while stack:
        sub = stack.pop()
        stack.extend(sub.kids or ())
        for lo, up in (sub.bounds or {}).values():
            assert lo.dtype == torch.float64 and own(lo) and own(up)
        if sub.alpha is None:
            continue
        seen += 1
        for i in bab.relus:
            va, (ib, vb) = sub.alpha[i], sub.beta[i]
            assert va.dtype == vb.dtype == torch.float32 and own(va) and own(vb)
            assert va.shape == (bab.m, bab.graph.nodes[i].size)
            assert vb.shape == (bab.m, ib.numel())
            assert bool((sub.splits[i][ib] != 0).all())  # β: split neurons only
    assert seen > 2
    assert release_free_memory(every=0.0) == sys.platform.startswith("linux")
    assert not release_free_memory(every=3600.0)  # at most once per interval


@pytest.mark.parametrize("seed,sizes", [(1, [6, 3]), (13, [4, 4, 3])])
def test_a_radius_search_with_a_target_decides_it(monkeypatch, seed, sizes):
    """``radius(target=ε)`` (how ``certify(..., eps=)`` decides on the engine) climbs from
    the proven side and never decides above ``ε``: below the exact radius it proves
    ``ε``; above it, it stops at a misclassified witness within ``ε``."""
    import copy

    from flowverify.verification.engine import bab_search as _search
    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    model, chain, dmu, ref, label, img = _setup(seed, sizes)
    truth = _brute_force(chain, dmu, ref, label)
    graph = build_graph(copy.deepcopy(model).double(), torch.as_tensor(img[None]))
    probed, decide = [], _search.BabSearch.decide

    def spy(self, eps, **kw):
        probed.append(eps)
        return decide(self, eps, **kw)

    monkeypatch.setattr(_search.BabSearch, "decide", spy)
    below = SplitBab(graph, img, label).radius(0.0, 4 * truth, target=0.9 * truth)
    assert below.lower >= 0.9 * truth and max(probed) <= 0.9 * truth
    assert len(probed) > 1  # it climbed
    probed.clear()
    above = SplitBab(graph, img, label).radius(0.0, 4 * truth, target=1.1 * truth)
    assert above.upper <= 1.1 * truth and max(probed) <= 1.1 * truth
    assert _misclassified(model, above.witness, label)
    assert float(fv.w1_distance(above.witness, img, unit="raw")) <= above.upper * (1 + 1e-9)


@pytest.mark.parametrize("climb", [0.0, 0.25, 1.0])
def test_a_decision_climbs_then_decides_from_the_root(monkeypatch, climb):
    """``certify(..., eps=)`` on the engine: the climb for a share of the time, then one
    decision at ``ε`` on a tree of its own (share 0: that decision alone; share 1: the
    climb alone).  Each certifies below the brute-force radius; a tiny time limit gives
    ``unknown`` with a message and a proven radius never above the truth."""
    from flowverify.verification import exact_driver as _driver

    model, chain, dmu, ref, label, img = _setup(2, [6, 3])
    truth = _brute_force(chain, dmu, ref, label)
    monkeypatch.setattr(_driver, "CLIMB_SHARE", climb)
    eps = 0.97 * truth
    res = _complete(model, img, label, eps=eps)  # raw units
    assert res.status == Status.CERTIFIED, res.message
    assert res.radius_raw == pytest.approx(eps, rel=1e-9) and res.radius_raw <= truth
    late = _complete(model, img, label, eps=eps, timeout=1e-3)
    assert late.status == Status.UNKNOWN and late.message
    assert late.radius_raw <= truth * (1 + 1e-9)


@pytest.mark.parametrize("seed", [3, 8])
def test_optimised_root_bounds_lie_between_crown_and_the_triangle_lp(seed):
    """The root's second-layer bounds with optimised slopes (engine/intermediate.py) are
    at least CROWN's, at most the triangle LP's with the same first-layer bounds over
    the W1 polytope (its optimum: no relaxation of these bounds is tighter), close most
    of the gap between them, and hold at the LP's own minimisers."""
    from scipy.optimize import linprog as _linprog

    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.graph import build_graph

    model, _, _, _, label, img = _setup(seed, [12, 12, 3])
    graph = build_graph(model.double().eval(), torch.as_tensor(img[None]))
    eps = 0.5 * img.sum()
    plain = SplitBab(graph, img, label, root_iterations=0)
    tuned = SplitBab(graph, img, label, root_iterations=30)
    first, second = plain.relus
    at1, at2 = (graph.nodes[j].inputs[0] for j in (first, second))
    b0, b1 = plain._root(eps)[0], tuned._root(eps)[0]
    l1, u1 = (t.reshape(-1).numpy() for t in b0[at1])
    assert np.allclose(l1, b1[at1][0].reshape(-1).numpy())  # exact there either way
    c_lo, c_up = (t.reshape(-1).numpy() for t in b0[at2])
    o_lo, o_up = (t.reshape(-1).numpy() for t in b1[at2])
    assert ((l1 < 0) & (u1 > 0)).sum() >= 3
    # the triangle LP over (ν, p, q, a): ν = µ + A(p - q), Σ(p + q) <= ε, ν >= 0
    lin1, lin2 = [m for m in model if isinstance(m, nn.Linear)][:2]
    w1, bias1 = lin1.weight.detach().double().numpy(), lin1.bias.detach().double().numpy()
    w2, bias2 = lin2.weight.detach().double().numpy(), lin2.bias.detach().double().numpy()
    amat = _block_a(H, W, 1).toarray()
    npx, ne, n1 = amat.shape[0], amat.shape[1], w1.shape[0]
    nv = npx + 2 * ne + n1
    a_eq = np.hstack([np.eye(npx), -amat, amat, np.zeros((npx, n1))])
    a_ub, b_ub = [np.r_[np.zeros(npx), np.ones(2 * ne), np.zeros(n1)]], [eps]
    fix = []
    for j in range(n1):
        zrow = np.r_[w1[j], np.zeros(2 * ne), np.zeros(n1)]
        arow = np.zeros(nv)
        arow[npx + 2 * ne + j] = 1.0
        if l1[j] >= 0:  # a = z
            fix.append((arow - zrow, bias1[j]))
        elif u1[j] <= 0:
            fix.append((arow, 0.0))
        else:  # a >= z, a >= 0, a <= u (z - l) / (u - l)
            s = u1[j] / (u1[j] - l1[j])
            a_ub += [zrow - arow, arow - s * zrow]
            b_ub += [-bias1[j], s * (bias1[j] - l1[j])]
    a_eq = np.vstack([a_eq] + [r for r, _ in fix])
    b_eq = np.r_[img.reshape(-1), [v for _, v in fix]]
    box = [(0, None)] * (npx + 2 * ne) + [(0, None)] * n1
    unstable = np.flatnonzero((c_lo < 0) & (c_up > 0))
    assert unstable.size >= 3
    gap = closed = 0.0
    points = []
    for j in unstable:
        for sgn in (1.0, -1.0):
            cost = np.r_[np.zeros(npx + 2 * ne), sgn * w2[j]]
            res = _linprog(cost, A_ub=np.array(a_ub), b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=box)
            assert res.status == 0
            points.append(res.x[:npx].reshape(img.shape))
            lp = sgn * res.fun + bias2[j]
            crown, opt = (c_lo[j], o_lo[j]) if sgn > 0 else (c_up[j], o_up[j])
            assert sgn * opt >= sgn * crown  # never looser than CROWN's
            assert sgn * opt <= sgn * lp + 1e-7 * (1 + abs(lp))  # nor tighter than the LP's
            gap, closed = gap + sgn * (lp - crown), closed + sgn * (opt - crown)
    assert gap > 1e-3 and closed >= 0.8 * gap
    # sound at images of D_ε: the LP minimisers (ν >= 0 up to the solver's tolerance)
    nus = np.clip(np.stack(points), 0.0, None)
    z = torch.as_tensor(nus)
    with torch.no_grad():
        for layer in model:
            z = layer(z)
            if layer is lin2:
                break
    z2 = z.numpy()
    assert (z2 >= o_lo - 1e-6).all() and (z2 <= o_up + 1e-6).all()
