"""The radius search: the largest certified ε, on any network (also one we did not train)."""

from __future__ import annotations

import numpy as np
import pytest

import flowverify as fv
from flowverify.core.results import Status
from flowverify.io.bundled import bundled_digits
from flowverify.verification import search as _search


def _cliff_oracle(e_star):
    """Like a real relaxation: steep ``F`` below the fixed point, ``0`` (no news) above."""

    def oracle(idx, e):
        es = e_star[idx]
        return np.where(e <= es, es + 50.0 * (es - e), 0.0)

    return oracle


def test_search_reaches_a_small_radius_far_below_the_first_estimate():
    # F(0) overestimates the radius by ~50x and every failing probe returns 0: regula
    # falsi anchored at the failing end used to creep down and stop at lower = 0
    e_star = np.array([1e-3, 0.02, 2.0])
    res = _search.search_radius(_cliff_oracle(e_star), np.full(3, 100.0), rtol=1e-3)
    assert np.all(res.converged), res
    assert np.all(res.lower <= e_star * (1 + 1e-12))
    assert np.all(res.lower >= e_star / (1 + 1e-3))
    assert np.all(res.probes <= 30), res.probes


def test_search_cut_by_its_probe_limit_says_so():
    e_star = np.array([0.02])
    res = _search.search_radius(_cliff_oracle(e_star), np.full(1, 100.0), rtol=1e-3, max_probes=4)
    assert not res.converged[0] and res.lower[0] <= e_star[0]


@pytest.fixture(scope="module")
def digits():
    x, y = bundled_digits()
    return x[:6], y[:6]


@pytest.mark.parametrize("method", ["vanilla", "feasible"])
def test_outside_network_radius_is_at_least_every_certified_decision(outside_net, digits, method):
    """On the VNN-COMP net, digits 1, 2, 4, 5 used to get radius 0 with no message."""
    x, y = digits
    if method == "feasible":
        x, y = x[:3], y[:3]
    res = fv.certify(outside_net, x, y, method=method)
    grid = [0.005, 0.01, 0.015, 0.02, 0.03, 0.045, 0.07]
    for r in res:
        assert r.prediction == r.label  # all six are classified correctly
        assert r.status == Status.CERTIFIED and r.radius > 0, r
        assert r.converged and r.message is None, r
    for eps in grid:
        dec = fv.certify(outside_net, x, y, method=method, eps=eps)
        for r, d in zip(res, dec, strict=True):
            if d.status == Status.CERTIFIED:
                assert r.radius >= eps / (1 + 1e-3), (r.index, eps, r.radius)
            else:  # and the search certifies nothing that the decision refuses
                assert r.radius <= eps * (1 + 1e-9), (r.index, eps, r.radius)
