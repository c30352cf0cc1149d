"""Wasserstein smoothing: closed-form radii, confidence bounds, the noise and soundness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from torch import nn

from flowverify import apply_flow, inverse_flow, make_reference
from flowverify.baselines import (
    ABSTAIN,
    add_flow_noise,
    clopper_pearson_lower,
    laplace_radius,
    laplace_scale,
    levine_feizi_radius,
    smoothed_certify,
    smoothed_counts,
    smoothed_predict,
    train_smoothed_model,
)
from flowverify.core.results import Status
from flowverify.io.bundled import bundled_digits
from flowverify.transport.flows import flow_dim

# --------------------------------------------------------------------------- closed forms


def test_radius_closed_forms():
    sigma = 0.02
    b = sigma / math.sqrt(2)
    assert laplace_scale(sigma) == pytest.approx(b)
    # p = 0.9: -b ln(0.2) = b ln 5 ; (b/2) ln(0.9/0.1) = b ln 3
    assert laplace_radius(0.9, sigma=sigma) == pytest.approx(b * math.log(5), rel=1e-12)
    assert levine_feizi_radius(0.9, sigma=sigma) == pytest.approx(b * math.log(3), rel=1e-12)
    # p = 0.75: -b ln(0.5) = b ln 2 ; (b/2) ln 3
    assert laplace_radius(0.75, sigma=sigma) == pytest.approx(b * math.log(2), rel=1e-12)
    assert levine_feizi_radius(0.75, sigma=sigma) == pytest.approx(b / 2 * math.log(3))
    for f in (laplace_radius, levine_feizi_radius):
        assert f(0.5, sigma=sigma) == 0.0
        assert f(0.2, sigma=sigma) == 0.0
        assert f(1.0, sigma=sigma) == math.inf
    arr = laplace_radius(np.array([0.3, 0.9, 1.0]), sigma=sigma)
    np.testing.assert_allclose(arr, [0.0, b * math.log(5), np.inf])
    with pytest.raises(ValueError, match="sigma"):
        laplace_radius(0.9, sigma=0.0)
    with pytest.raises(ValueError, match="p"):
        laplace_radius(1.5, sigma=sigma)


@settings(max_examples=200, deadline=None)
@given(p=st.floats(0.5000001, 0.9999999), sigma=st.floats(1e-4, 1.0))
def test_tight_radius_dominates_levine_feizi(p, sigma):
    tight = laplace_radius(p, sigma=sigma)
    lf = levine_feizi_radius(p, sigma=sigma)
    assert 0 < lf <= tight * (1 + 1e-12)


@pytest.mark.parametrize(
    "k,n,alpha",
    [(0, 10, 0.05), (1, 10, 0.05), (9, 10, 0.05), (10, 10, 0.05), (990, 1000, 0.001),
     (10000, 10000, 0.05), (5123, 10000, 0.01), (37, 100, 0.2)],
)  # fmt: skip
def test_clopper_pearson_matches_scipy(k, n, alpha):
    ref = binomtest(k, n, alternative="greater").proportion_ci(
        confidence_level=1 - alpha, method="exact"
    )
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(ref.low, rel=1e-9, abs=1e-14)


def test_clopper_pearson_all_successes_closed_form():
    # k = n: the bound solves p^n = alpha
    assert clopper_pearson_lower(500, 500, 0.01) == pytest.approx(0.01 ** (1 / 500))
    with pytest.raises(ValueError, match="k"):
        clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(1, 10, 1.0)


# --------------------------------------------------------------------------- the noise


def test_noise_is_a_flow_of_the_normalised_image():
    """x + s·Aη = s·Δ(R, Δ⁻¹(R, µ) + η) for the uniform reference and the minimal flow."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((2, 1, 6, 7)))  # float64, masses != 1
    s = x.sum(dim=(-2, -1), keepdim=True)
    mu = x / s
    ref = make_reference("uniform", mu)
    delta = inverse_flow(ref, mu, method="minimal")
    sigma = 0.03
    noisy = add_flow_noise(x, sigma=sigma, generator=torch.Generator().manual_seed(5))
    from flowverify.baselines.noise import _laplace

    eta = _laplace(
        (2, 1, flow_dim(6, 7)), laplace_scale(sigma), torch.Generator().manual_seed(5), x
    )
    expected = s * apply_flow(ref, delta + eta)
    torch.testing.assert_close(noisy, expected, rtol=1e-10, atol=1e-12)
    # mass is conserved, pixels may become negative
    torch.testing.assert_close(noisy.sum(dim=(-2, -1)), x.sum(dim=(-2, -1)))
    assert noisy.min() < 0


def test_laplace_noise_statistics():
    from flowverify.baselines.noise import _laplace

    b = 0.7
    eta = _laplace((400_000,), b, torch.Generator().manual_seed(1), torch.zeros(1)).double()
    assert abs(float(eta.mean())) < 0.01
    assert float(eta.abs().mean()) == pytest.approx(b, rel=0.01)  # E|η| = b
    assert float(eta.var()) == pytest.approx(2 * b * b, rel=0.02)  # Var = 2b² = σ²
    assert float((eta > 0).double().mean()) == pytest.approx(0.5, abs=0.005)


# --------------------------------------------------------------------------- fixed models


class _PixelSign(nn.Module):
    """Class 0 iff the first pixel exceeds ``c``: on a constant image, a fair coin."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        z = x[:, 0, 0, 0] - self.c
        return torch.stack([z, -z], dim=1)


class _Constant(nn.Module):
    def __init__(self, cls: int, k: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(k), requires_grad=False)
        self.logits.data[cls] = 10.0

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_certify_fixed_models_statuses():
    x = torch.full((3, 1, 8, 8), 0.5)
    sigma, n, alpha = 0.01, 400, 0.01
    res = smoothed_certify(_Constant(3), x, [3, 4, 3], sigma=sigma, n0=20, n=n, alpha=alpha)
    p = alpha ** (1 / n)
    assert [r.status for r in res] == [Status.CERTIFIED, Status.MISCLASSIFIED, Status.CERTIFIED]
    assert res[0].p_lower == pytest.approx(p)
    assert res[0].radius == pytest.approx(-sigma / math.sqrt(2) * math.log(2 * (1 - p)))
    assert res[0].radius_lf == pytest.approx(sigma / math.sqrt(8) * math.log(p / (1 - p)))
    assert res[0].radius_raw == pytest.approx(res[0].radius * 32.0)  # mass 64 x 0.5
    assert res[1].radius == 0.0 and res[1].prediction == 3
    abst = smoothed_certify(_PixelSign(0.5), x[:1], [0], sigma=sigma, n0=20, n=n, alpha=alpha)[0]
    assert abst.status == Status.UNKNOWN and abst.prediction == ABSTAIN and abst.radius == 0
    assert 0.3 < abst.p_lower < 0.5 and abst.guess in (0, 1)
    assert smoothed_predict(_PixelSign(0.5), x, sigma=sigma, n=400).tolist() == [ABSTAIN] * 3
    own = smoothed_certify(_Constant(6), x[:1], sigma=sigma, n0=20, n=n, alpha=alpha)[0]
    assert own.label == 6 and own.status == Status.CERTIFIED
    rec = res[0].to_dict()
    json.dumps(rec, allow_nan=False)
    for key in ("index", "label", "prediction", "method", "certifier", "references", "status",
                "radius", "radius_raw", "exact", "per_reference", "seconds", "config",
                "radius_lf", "p_lower"):  # fmt: skip
        assert key in rec
    assert rec["status"] == "certified" and rec["method"] == "smoothing" and not rec["exact"]
    assert rec["config"]["sigma"] == sigma and rec["config"]["unit"] == "normalised"


def test_counts_seeded_per_index():
    x = torch.full((3, 1, 8, 8), 0.5)
    m = _PixelSign(0.5)
    all3 = smoothed_counts(m, x, sigma=0.01, num=300, seed=4, indices=[10, 11, 12])
    one = smoothed_counts(m, x[1:2], sigma=0.01, num=300, seed=4, indices=[11])
    np.testing.assert_array_equal(all3[1], one[0])
    assert all3.sum(axis=1).tolist() == [300] * 3
    assert not np.array_equal(all3[0], all3[1])  # different streams per index
    again = smoothed_counts(m, x, sigma=0.01, num=300, seed=4, indices=[10, 11, 12])
    np.testing.assert_array_equal(all3, again)


def test_validation_errors():
    m = _Constant(0)
    x = torch.full((2, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="sigma"):
        smoothed_certify(m, x, [0, 0], sigma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        smoothed_certify(m, x, [0, 0], sigma=0.1, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        smoothed_certify(m, x, [0], sigma=0.1)
    with pytest.raises(ValueError, match="images: expected non-negative"):
        smoothed_certify(m, -x, [0, 0], sigma=0.1)
    with pytest.raises(ValueError, match="images: expected shape"):
        smoothed_certify(m, x[0], [0], sigma=0.1)
    with pytest.raises(ValueError, match="n0"):
        smoothed_certify(m, x, [0, 0], sigma=0.1, n0=0)
    with pytest.raises(TypeError, match="images: expected floating-point"):
        smoothed_certify(m, np.full((2, 1, 8, 8), 128, np.uint8), [0, 0], sigma=0.1)


# --------------------------------------------------------------------------- trained model


def _project_l1(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of a vector onto the L1 ball of radius eps (Duchi et al.)."""
    if float(v.abs().sum()) <= eps:
        return v
    u = v.abs().sort(descending=True).values
    css = u.cumsum(0)
    k = torch.arange(1, u.numel() + 1, dtype=v.dtype)
    rho = int((u - (css - eps) / k > 0).nonzero().max())
    theta = (css[rho] - eps) / (rho + 1)
    return v.sign() * (v.abs() - theta).clamp(min=0)


def _attack_smoothed(model, x, label, *, sigma, eps, steps=20, samples=32, seed=0):
    """Flow-domain PGD on the smoothed classifier's soft loss within ‖δ‖₁ <= eps.

    Returns the perturbed image ``x + s·Aδ`` (δ in normalised flow units) and ‖δ‖₁.  The
    image may have negative pixels: the smoothing certificate covers every flow
    perturbation of L1 norm <= radius, valid image or not, which is what is tested.
    """
    gen = torch.Generator().manual_seed(seed)
    s = x.sum()
    d = flow_dim(x.shape[-2], x.shape[-1])
    delta = torch.zeros(1, 1, d)
    y = torch.full((samples,), label)
    for _ in range(steps):
        delta.requires_grad_(True)
        adv = apply_flow(x[None], s * delta)
        noisy = add_flow_noise(adv.expand(samples, -1, -1, -1), sigma=sigma, generator=gen)
        loss = nn.functional.cross_entropy(model(noisy), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g = grad.flatten()
            top = g.abs().topk(20).indices
            step = torch.zeros_like(g)
            step[top] = g[top].sign()
            delta = _project_l1(delta.flatten() + step * (eps / 4 / 20), eps).view(1, 1, d)
    return apply_flow(x[None], s * delta)[0].detach(), float(delta.abs().sum())


def _smoothed_prediction(model, image, *, sigma, n, alpha, seed):
    """Cohen's PREDICT at an image that may have negative pixels (fresh noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        noisy = add_flow_noise(image[None].expand(n, -1, -1, -1), sigma=sigma, generator=gen)
        counts = np.bincount(model(noisy).argmax(1).numpy(), minlength=10)
    top2 = np.argsort(-counts, kind="stable")[:2]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
    return int(top2[0]) if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha else ABSTAIN


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small nets: threads only add overhead
    yield
    torch.set_num_threads(n)


def test_certified_radius_is_not_broken_by_pgd(one_thread):
    x_all, y_all = bundled_digits()
    x_all = torch.from_numpy(x_all)
    sigma = 0.005
    model = train_smoothed_model(
        sigma, data=(x_all[:400], y_all[:400]), epochs=15, seed=0, batch_size=32, lr=2e-3
    )
    xs, ys = x_all[400:408], y_all[400:408]
    res = smoothed_certify(model, xs, ys, sigma=sigma, n0=64, n=600, alpha=0.001, seed=1)
    certified = [r for r in res if r.status == Status.CERTIFIED]
    assert len(certified) >= 5, [(r.status, r.p_lower) for r in res]
    fooled_far = 0
    for r in certified:
        k, label = r.index, int(ys[r.index])
        adv, l1 = _attack_smoothed(model, xs[k], label, sigma=sigma, eps=r.radius)
        assert 0 < l1 <= r.radius * (1 + 1e-6)
        pred = _smoothed_prediction(model, adv, sigma=sigma, n=600, alpha=0.001, seed=7)
        assert pred in (label, ABSTAIN), (k, r.radius, pred)
        # the same attack with a 40x larger budget does fool the smoothed classifier
        adv, _ = _attack_smoothed(model, xs[k], label, sigma=sigma, eps=40 * r.radius)
        pred = _smoothed_prediction(model, adv, sigma=sigma, n=600, alpha=0.001, seed=7)
        fooled_far += pred not in (label, ABSTAIN)
    assert fooled_far >= 1


def test_train_smoothed_model_is_seeded():
    x, y = bundled_digits()
    data = (x[:64], y[:64])
    state = torch.random.get_rng_state()
    a = train_smoothed_model(0.01, data=data, epochs=1, seed=3, batch_size=32)
    assert torch.equal(state, torch.random.get_rng_state())
    b = train_smoothed_model(0.01, data=data, epochs=1, seed=3, batch_size=32)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not a.training
    with pytest.raises(ValueError, match="epochs"):
        train_smoothed_model(0.01, data=data, epochs=0)
