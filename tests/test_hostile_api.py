"""Hostile and malformed input for the public entry points (issue 7): ``certify`` (every
method), ``attack`` / ``WassersteinPGD``, ``smoothing.smoothed_certify``,
``report.write_report`` and ``reproduce.run_claim`` / ``reproduce.reproduce``.

Each either works (and its result honours its contract) or refuses the input with a
ValueError or TypeError (FileNotFoundError for a missing path) whose message names the
argument; never a raw RuntimeError/IndexError/AssertionError from torch or numpy, never a
silent wrong result.  A last property: on tiny random nets, no certified radius exceeds
the W1 of an adversarial image found by the attack.

Everything runs on tiny images (4x4, 5x5) and tiny nets built here, with few examples.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import flowverify as fv
from flowverify.attacks import LOSSES, SCHEDULES, WassersteinPGD
from flowverify.baselines.smoothing import smoothed_certify
from flowverify.model.flow_model import INPUT_SCALES
from flowverify.paper.run import CLAIMS, reproduce, run_claim
from flowverify.report.plots import PLOT_FORMATS
from flowverify.report.writer import write_report
from flowverify.verification import CERTIFIERS, METHODS, UNITS

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CLEAR = (ValueError, TypeError)
H = W = 4
STATUSES = {"certified", "falsified", "unknown", "misclassified"}
SMOOTH = dict(sigma=0.1, n0=4, n_samples=8)  # certify(method="smoothing") options
SMOOTH_FN = dict(sigma=0.1, n0=4, n=8, batch_size=8)  # smoothed_certify options


def names(msg: str, name: str) -> bool:
    """Whether the message names the argument (as a word: ``eps:``, ``model must``...)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", msg) is not None


def raises_naming(fn, *args: str, also=()):
    """``fn()`` raises a clear error (ValueError/TypeError, or ``also``) naming one of
    ``args``; returns the exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:  # noqa: B017,PT011 - checked below
            fn()
    exc = info.value
    assert isinstance(exc, (*CLEAR, *also)), f"{type(exc).__name__}: {exc}"
    assert any(names(str(exc), a) for a in args), f"{str(exc)!r} names none of {args}"
    return exc


def mlp(seed: int = 0, *, h: int = H, w: int = W, c: int = 1, hidden: int = 6, k: int = 3):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, k)
    ).eval()


def images(n: int = 2, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 1.0, (n, 1, h, w))


NET = mlp()
X = images()


def run_certify(model, x, labels=None, *, method="vanilla", **kw):
    if method == "smoothing":
        kw = {**SMOOTH, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fv.certify(model, x, labels, method=method, **kw)


def check_certify_results(res, n: int, method: str) -> None:
    assert len(res) == n
    for r in res:
        assert str(r.status) in STATUSES, (r.status, r.message)
        assert math.isfinite(r.radius) and r.radius >= 0
        if method != "smoothing":
            assert r.method == method and r.certifier in CERTIFIERS[method]


def check_attack_result(res, n: int, k: int) -> None:
    assert len(res) == n * k
    assert res.adversarial.shape[0] == n * k and np.isfinite(res.adversarial).all()
    assert (res.adversarial >= 0).all()
    ok = res.success
    assert np.isfinite(res.w1[ok]).all() and (res.w1[ok] >= 0).all()


# ------------------------------------------------------------------------------ images

HOSTILE = st.one_of(
    st.floats(0.0, 2.0, width=64),
    st.sampled_from([np.nan, np.inf, -np.inf, -1.0, -1e-3, 0.0, 1e300, 1e308]),
)


@st.composite
def image_arrays(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=5))
    if draw(st.booleans()):  # often the model's own grid, so that values decide
        shape = [draw(st.integers(0, 2)), 1, H, W][-draw(st.sampled_from([2, 3, 4, 4, 4])) :]
    a = draw(hnp.arrays(np.float64, tuple(shape), elements=HOSTILE))
    if draw(st.booleans()):
        a = np.where(np.isfinite(a) & (a >= 0) & (a < 1e3), a, 0.5)  # values often fine
    with np.errstate(over="ignore"):  # 1e300 -> inf in float32: one more hostile value
        return a.astype(draw(st.sampled_from([np.float64, np.float32])))


def image_problem(a: np.ndarray) -> str | None:
    """Why ``a`` is no valid batch for the (N, 1, 4, 4) model (an MLP that flattens its
    input, so any grid of 16 values fits it); None if it is one."""
    if a.ndim not in (2, 3, 4):
        return "rank"
    if not np.isfinite(a).all() or (a.size and a.min() < 0):
        return "values"
    if a.shape[-1] < 2 or a.shape[-2] < 2:
        return "grid"
    b = a.reshape((1,) * (4 - a.ndim) + a.shape).astype(np.float64)
    with np.errstate(over="ignore"):
        mass = b.sum(axis=(-2, -1))
        if b.shape[0] and ((mass <= 0).any() or not np.isfinite(mass * (H + W)).all()):
            return "mass"
    if int(np.prod(b.shape[1:])) != H * W:  # the MLP flattens: any C x H' x W' of H*W values
        return "shape"
    if b.size and b.max() > 1e30:  # logits overflow the float32 model
        return "huge"
    return None


@SETTINGS
@given(
    a=image_arrays(),
    method=st.sampled_from(METHODS),
    as_torch=st.booleans(),
)
def test_certify_hostile_images(a, method, as_torch):
    x = torch.from_numpy(a) if as_torch else a
    bad = image_problem(a)
    if bad is None and method.startswith("complete"):
        method = "feasible"  # valid runs of the complete methods: test_certified_below_attack
    event(f"problem: {bad}")
    if bad:
        # smoothing takes (N, C, H, W) batches only; the model's grid is its argument
        raises_naming(lambda: run_certify(NET, x, method=method), "images", "model")
        return
    res = run_certify(NET, x, method=method)
    check_certify_results(res, a.reshape(-1, 1, H, W).shape[0], method)


@SETTINGS
@given(a=image_arrays(), as_torch=st.booleans())
def test_attack_hostile_images(a, as_torch):
    x = torch.from_numpy(a) if as_torch else a
    bad = image_problem(a) or (None if a.ndim == 4 else "rank")  # the attack takes 4-D only
    event(f"problem: {bad}")
    if bad:
        raises_naming(lambda: fv.attack(NET, x, eps=0.2, steps=3), "images", "model")
        return
    check_attack_result(fv.attack(NET, x, eps=0.2, steps=3), a.shape[0], 1)


@SETTINGS
@given(a=image_arrays(), as_torch=st.booleans())
def test_smoothed_certify_hostile_images(a, as_torch):
    x = torch.from_numpy(a) if as_torch else a
    bad = image_problem(a) or (None if a.ndim == 4 else "rank")
    event(f"problem: {bad}")
    if bad:
        raises_naming(lambda: smoothed_certify(NET, x, **SMOOTH_FN), "images", "model")
        return
    res = smoothed_certify(NET, x, **SMOOTH_FN)
    check_certify_results(res, a.shape[0], "smoothing")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arg", [[[1.0, 2.0]], "img", None, np.ones((1, 1, H, W), complex)])
def test_certify_images_not_an_array(method, arg):
    raises_naming(lambda: run_certify(NET, arg, method=method), "images")


@pytest.mark.parametrize("shape", [(0, 0, H, W), (2, 0, H, W), (1, 0, 2, 2)])
def test_zero_channels(shape):
    a = np.zeros(shape)
    for method in METHODS:
        raises_naming(lambda: run_certify(NET, a, method=method), "images")  # noqa: B023
    raises_naming(lambda: fv.attack(NET, a, eps=0.1), "images")
    raises_naming(lambda: smoothed_certify(NET, a, **SMOOTH_FN), "images")


@pytest.mark.parametrize("method", METHODS)
def test_certify_empty_batch(method):
    assert run_certify(NET, np.zeros((0, 1, H, W)), method=method) == []


def test_attack_empty_batch():
    for eps in (None, [0.1, 0.2]):
        res = fv.attack(NET, np.zeros((0, 1, H, W)), eps=eps, steps=2)
        assert len(res) == 0 and res.adversarial.shape == (0, 1, H, W)


# ------------------------------------------------------------------------------ models


class _Vector(nn.Module):
    """Logits summed to one number per image: output (N,)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H * W, 3)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1)).sum(1)


class _Rank3(_Vector):
    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1))[:, :, None]


class _Tuple(_Vector):
    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1)), None


class _Transposed(_Vector):
    """(classes, N): the batch on the wrong axis."""

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1)).T.contiguous()


def _bad_models():
    torch.manual_seed(0)
    return {
        "output (N,)": _Vector(),
        "output (N, K, 1)": _Rank3(),
        "output a tuple": _Tuple(),
        "output (K, N)": _Transposed(),
        "one class": nn.Sequential(nn.Flatten(), nn.Linear(H * W, 1)),
        "input 5x5": mlp(h=5, w=5),
        "input 2 channels": mlp(c=2),
        "conv 3 channels": nn.Sequential(
            nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
        ),
        "conv too big": nn.Sequential(nn.Conv2d(1, 2, 7), nn.Flatten(), nn.Linear(2, 3)),
    }


BAD_MODELS = _bad_models()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_certify_model_output_or_input_unfit(method, kind):
    model = BAD_MODELS[kind]
    if method == "smoothing" and kind == "one class":
        # a one-class smoothed classifier is certified everywhere: fine
        check_certify_results(run_certify(model, X, method=method), 2, method)
        return
    raises_naming(lambda: run_certify(model, X, method=method), "model")
    # an empty batch does not hide it
    raises_naming(lambda: run_certify(model, X[:0], method=method), "model")


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_attack_model_output_or_input_unfit(kind):
    model = BAD_MODELS[kind]
    raises_naming(lambda: fv.attack(model, X, eps=0.1, steps=2), "model")
    raises_naming(lambda: fv.attack(model, X, steps=2), "model")
    if kind != "one class":
        raises_naming(lambda: smoothed_certify(model, X, **SMOOTH_FN), "model")


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(H * W, 3)),
        nn.Sequential(nn.Flatten(), nn.Linear(H * W, 5), nn.Sigmoid(), nn.Linear(5, 3)),
        nn.Sequential(nn.Flatten(), nn.Linear(H * W, 3), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(H * W, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Flatten()),
        _Vector(),
    ],
    ids=["relu-first", "sigmoid", "relu-last", "two-relus", "no-layer", "not-sequential"],
)
@pytest.mark.parametrize("method", ["vanilla", "feasible", "complete", "complete-ball"])
def test_certify_unsupported_architecture_refused(model, method, request):
    """Refused up front, not one error record per image.  The bound-propagation engine
    certifies the sigmoid, ReLU-last, two-ReLU and flatten-only nets (vanilla, feasible
    and complete with beta-crown); the per-node-LP search (complete-ball's default) needs
    a Linear/Conv2d/ReLU chain."""
    kind = request.node.callspec.id.split("-", 1)[1] if "-" in request.node.callspec.id else ""
    engine_ok = kind.endswith(("sigmoid", "relu-last", "two-relus", "no-layer"))
    if engine_ok and method in ("vanilla", "feasible", "complete"):
        res = run_certify(model, X, method=method, timeout=5.0)
        check_certify_results(res, len(X), method)
        assert all(r.status.value != "error" for r in res), res
        return
    raises_naming(lambda: run_certify(model, X, method=method), "model")
    if method == "complete":
        raises_naming(lambda: run_certify(model, X, method=method, certifier="bab"), "model")


@pytest.mark.parametrize("model", [None, 3, "no-such-model", ["fc"]])
@pytest.mark.parametrize("method", METHODS)
def test_certify_model_not_a_model(model, method):
    raises_naming(lambda: run_certify(model, X, method=method), "model", also=(FileNotFoundError,))


@pytest.mark.parametrize("model", [None, 3, "fc", lambda x: x])
def test_attack_smoothing_model_not_a_module(model):
    raises_naming(lambda: fv.attack(model, X, eps=0.1), "model")
    raises_naming(lambda: smoothed_certify(model, X, **SMOOTH_FN), "model")


# ------------------------------------------------------------------------------ labels


@st.composite
def label_arrays(draw):
    kind = draw(st.sampled_from(["int", "float", "bool", "list", "scalar"]))
    n = draw(st.integers(0, 4))
    vals = draw(st.lists(st.integers(-3, 5), min_size=n, max_size=n))
    if kind == "int":  # uint8 wraps negative values round
        return np.array(vals).astype(draw(st.sampled_from([np.int64, np.int32, np.uint8])))
    if kind == "float":
        return np.array(vals, dtype=np.float64)
    if kind == "bool":
        return np.array(vals, dtype=np.int64) > 0
    if kind == "list":
        return vals
    return draw(st.integers(-3, 5))


def labels_valid(labels, n: int, k: int = 3) -> bool:
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        return False
    arr = arr.reshape(1) if arr.ndim == 0 else arr
    return arr.shape == (n,) and bool(((arr >= 0) & (arr < k)).all())


@SETTINGS
@given(labels=label_arrays(), n=st.integers(1, 2), as_torch=st.booleans())
def test_labels_hostile(labels, n, as_torch):
    x = X[:n]
    lab = torch.as_tensor(np.asarray(labels)) if as_torch else labels
    calls = {
        "certify": lambda: run_certify(NET, x, lab),
        "smoothing": lambda: run_certify(NET, x, lab, method="smoothing"),
        "attack": lambda: fv.attack(NET, x, lab, eps=0.1, steps=2),
        "smoothed_certify": lambda: smoothed_certify(NET, x, lab, **SMOOTH_FN),
    }
    valid = labels_valid(labels, n)
    for name, call in calls.items():
        # smoothed_certify needs labels of shape (N,), a scalar is no exception for n=1
        if valid and name in ("smoothing", "smoothed_certify") and np.ndim(labels) == 0:
            continue
        if not valid:
            raises_naming(call, "labels")
            continue
        res = call()
        want = np.asarray(labels).reshape(-1)
        got = res.label if name == "attack" else [r.label for r in res]
        assert np.array_equal(got, want), name


# ---------------------------------------------------------------- numeric arguments

ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([None, "0.1", True, [0.1], np.float32(0.1), np.int64(1)]),
)


def _finite_nonneg(v, *, zero=True) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(v)) and (float(v) >= 0 if zero else float(v) > 0)


@SETTINGS
@given(eps=ANY_NUMBER, method=st.sampled_from(["vanilla", "feasible"]))
def test_certify_eps(eps, method):
    if eps is None:
        return
    if not _finite_nonneg(eps):
        raises_naming(lambda: run_certify(NET, X[:1], method=method, eps=eps), "eps")
        raises_naming(lambda: run_certify(NET, X[:1], method="smoothing", eps=eps), "eps")
        return
    (r,) = run_certify(NET, X[:1], method=method, eps=eps)
    assert str(r.status) in STATUSES and r.eps == pytest.approx(float(eps))


@SETTINGS
@given(timeout=ANY_NUMBER, method=st.sampled_from(METHODS))
def test_certify_timeout(timeout, method):
    if timeout is None:
        return
    if not _finite_nonneg(timeout, zero=False):
        raises_naming(lambda: run_certify(NET, X[:1], method=method, timeout=timeout), "timeout")
        return
    if method in ("vanilla", "smoothing"):  # a valid limit: the run completes
        check_certify_results(run_certify(NET, X[:1], method=method, timeout=timeout), 1, method)


@SETTINGS
@given(seed=ANY_NUMBER, method=st.sampled_from(["vanilla", "smoothing"]))
def test_certify_seed(seed, method):
    valid = not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) and seed >= 0
    kw = {"references": "random:1"} if method == "vanilla" else {}
    if not valid:
        raises_naming(lambda: run_certify(NET, X[:1], method=method, seed=seed, **kw), "seed")
        return
    check_certify_results(run_certify(NET, X[:1], method=method, seed=seed, **kw), 1, method)


@SETTINGS
@given(eps=st.one_of(ANY_NUMBER, st.lists(ANY_NUMBER, max_size=3), hnp.arrays(np.float64, 0)))
def test_attack_eps(eps):
    if isinstance(eps, np.ndarray):
        vals = eps.reshape(-1).tolist()
    else:
        vals = eps if isinstance(eps, list) else [eps]
    if eps is None:
        check_attack_result(fv.attack(NET, X[:1], eps=None, steps=2, search_steps=1), 1, 1)
        return
    if not vals or not all(_finite_nonneg(v) for v in vals):
        raises_naming(lambda: WassersteinPGD(eps=eps), "eps")
        return
    res = fv.attack(NET, X[:1], eps=eps, steps=2)
    check_attack_result(res, 1, len(vals))
    assert (res.w1[res.success] <= res.eps[res.success] + 1e-6).all()


@SETTINGS
@given(
    name=st.sampled_from(["steps", "restarts", "search_steps", "seed"]),
    value=ANY_NUMBER,
)
def test_attack_int_options(name, value):
    minimum = 1 if name == "steps" else 0
    valid = (
        not isinstance(value, bool)
        and isinstance(value, (int, np.integer))
        and minimum <= value < (2**64 if name == "seed" else math.inf)
    )
    if not valid:
        raises_naming(lambda: WassersteinPGD(**{name: value}), name)
        return
    if value <= 3:  # large step counts: only the validation is under test
        kw = {"steps": 2, name: value} if name != "steps" else {name: value}
        check_attack_result(fv.attack(NET, X[:1], eps=0.1, **kw), 1, 1)


@SETTINGS
@given(name=st.sampled_from(["step_size", "clip_max"]), value=ANY_NUMBER)
def test_attack_float_options(name, value):
    if value is None and name == "clip_max":
        return
    if not _finite_nonneg(value, zero=False):
        raises_naming(lambda: WassersteinPGD(**{name: value}), name)
        return
    if name == "clip_max" and float(value) < X[:1].max():
        raises_naming(lambda: fv.attack(NET, X[:1], eps=0.1, clip_max=value), "clip_max")
        return
    check_attack_result(fv.attack(NET, X[:1], eps=0.1, steps=2, **{name: value}), 1, 1)


@SETTINGS
@given(
    name=st.sampled_from(["sigma", "n0", "n", "alpha", "batch_size", "seed"]),
    value=ANY_NUMBER,
)
def test_smoothed_certify_numbers(name, value):
    is_int = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    is_num = _finite_nonneg(value)
    valid = {
        "sigma": is_num and float(value) > 0,
        "alpha": is_num and 0 < float(value) < 1,
        "seed": is_int and value >= 0,
    }.get(name, is_int and value >= 1)
    kw = {**SMOOTH_FN, name: value}
    if not valid:
        raises_naming(lambda: smoothed_certify(NET, X[:1], **kw), name)
        return
    if name in ("n0", "n", "batch_size") and value > 64:
        return  # large counts: validation only
    if name == "sigma" and value > 1e30:  # noise that overflows float32: refused clearly
        try:
            res = smoothed_certify(NET, X[:1], **kw)
        except ValueError as exc:
            assert names(str(exc), "sigma"), str(exc)
            return
    else:
        res = smoothed_certify(NET, X[:1], **kw)
    check_certify_results(res, 1, "smoothing")


# ---------------------------------------------------------------- devices and choices

DEVICES = ["bogus", "", "cuda:99", "meta", "mps", "cpu", "cpu:0", "cuda", 3, None, 1.5]


def device_ok(dev, *, none_ok: bool) -> bool:
    if dev is None:
        return none_ok
    try:
        d = torch.device(dev)
    except (RuntimeError, TypeError, ValueError):
        return False
    if d.type == "cpu":
        return True
    cuda = d.type == "cuda" and torch.cuda.is_available()
    return cuda and (d.index or 0) < torch.cuda.device_count()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_devices(device):
    calls = {
        "certify": (lambda: run_certify(NET, X[:1], device=device), False),
        "smoothing": (lambda: run_certify(NET, X[:1], method="smoothing", device=device), False),
        "attack": (lambda: fv.attack(NET, X[:1], eps=0.1, steps=2, device=device), True),
        "smoothed_certify": (
            lambda: smoothed_certify(NET, X[:1], device=device, **SMOOTH_FN),
            False,
        ),
    }
    weight = NET[1].weight.detach().clone()
    for name, (call, none_ok) in calls.items():
        if device_ok(device, none_ok=none_ok):
            if device is not None and torch.device(device).type == "cuda" and name != "certify":
                continue  # the model is on the CPU: moving it is the caller's business
            call()
        else:
            raises_naming(call, "device")
    # a refused device never moved the model (e.g. to 'meta')
    assert NET[1].weight.device.type == "cpu" and torch.equal(NET[1].weight, weight)


CHOICES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["CROWN", " vanilla", "lp ", "Ce", None, 3, ["vanilla"], ("ce",)]),
    st.sampled_from([*METHODS, *LOSSES, *SCHEDULES, *UNITS, *INPUT_SCALES, "crown", "bab"]),
)


def lists_valid(exc: BaseException, valid) -> None:
    msg = str(exc)
    missing = [v for v in valid if v not in msg]
    assert not missing, f"{msg!r} does not list {missing}"


@SETTINGS
@given(value=CHOICES, which=st.sampled_from(["method", "unit", "input_scale"]))
def test_certify_choices(value, which):
    valid = {"method": METHODS, "unit": UNITS, "input_scale": INPUT_SCALES}[which]
    if isinstance(value, str) and value in valid:
        if which == "method" and value.startswith("complete"):
            return  # valid: see test_certified_below_attack
        kw = {"input_scale": "raw"} if which == "method" and value == "smoothing" else {}
        method = value if which == "method" else "vanilla"
        run = lambda: run_certify(NET, X[:1], **{which: value, **kw, "method": method})  # noqa: E731
        if which == "input_scale" and value != "raw":
            run()  # a raw-input model certified on normalised input: valid, other numbers
        else:
            check_certify_results(run(), 1, method)
        return
    exc = raises_naming(lambda: run_certify(NET, X[:1], **{which: value}), which)
    lists_valid(exc, valid)


@SETTINGS
@given(value=CHOICES, method=st.sampled_from(METHODS))
def test_certify_certifier(value, method):
    valid = CERTIFIERS[method]
    if value is None or (isinstance(value, str) and value in valid):
        return  # the default and valid pairs are exercised elsewhere
    exc = raises_naming(
        lambda: run_certify(NET, X[:1], method=method, certifier=value), "certifier"
    )
    lists_valid(exc, valid)


@SETTINGS
@given(value=CHOICES, which=st.sampled_from(["loss", "schedule", "input_scale"]))
def test_attack_choices(value, which):
    valid = {"loss": LOSSES, "schedule": SCHEDULES, "input_scale": INPUT_SCALES}[which]
    if isinstance(value, str) and value in valid:
        res = fv.attack(NET, X[:1], eps=0.1, steps=2, **{which: value})
        assert res.config[which] == value
        return
    exc = raises_naming(lambda: WassersteinPGD(**{which: value}), which)
    lists_valid(exc, valid)


REF_SPECS = [
    "uniform", "random:1", "point:2", "data:1", "random:0", "random:-1", "dirac:1",
    "uniform,", ",", "random:x", "random:1.5", "uniform,uniform", "random", "UNIFORM",
]  # fmt: skip


@SETTINGS
@given(
    spec=st.one_of(
        st.text(max_size=10),
        st.sampled_from(REF_SPECS),
        st.lists(st.sampled_from(["uniform", "point:1", "bogus", "", 3]), max_size=3),
        st.sampled_from([None, 3, b"uniform"]),
    ),
)
def test_certify_reference_specs(spec):
    """Valid specs give results; a spec with an unknown kind (or none at all) is refused
    with the valid kinds listed; anything else either works or is refused clearly."""
    items = [spec] if isinstance(spec, str) else spec
    strings = isinstance(items, list) and all(isinstance(i, str) for i in items)
    parts = [p.strip() for i in items for p in i.split(",") if p.strip()] if strings else []
    kinds = {p.split(":")[0] for p in parts}
    sure_bad = not strings or not parts or not kinds <= {"uniform", "random", "point", "data"}
    if sure_bad:
        exc = raises_naming(lambda: run_certify(NET, X[:1], references=spec), "references")
        if strings and parts:
            lists_valid(exc, ["uniform", "random", "point", "data"])
        return
    try:
        res = run_certify(NET, X[:1], references=spec)
    except CLEAR as exc:
        assert names(str(exc), "references"), str(exc)
        return
    check_certify_results(res, 1, "vanilla")
    assert res[0].references and set(res[0].per_reference) == set(res[0].references)


@pytest.mark.parametrize(
    "reference", ["bogus", "", np.ones((3, 3)), np.full((H, W), np.nan), -np.ones((H, W)), 3]
)
def test_attack_reference(reference):
    raises_naming(lambda: fv.attack(NET, X, eps=0.1, steps=2, reference=reference), "reference")


def test_attack_unknown_option_named():
    raises_naming(lambda: fv.attack(NET, X, eps=0.1, bogus=1), "bogus")


# ------------------------------------------------------------------------------ report


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "cert.jsonl"
    recs = [r.to_dict() for r in run_certify(NET, X)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"formats": None}, "formats"),
        ({"formats": []}, "formats"),
        ({"formats": ["jpg"]}, "formats"),
        ({"formats": [3]}, "formats"),
        ({"formats": {"png": 1}}, "formats"),
        ({"max_images": 0}, "max_images"),
        ({"max_images": 1.5}, "max_images"),
        ({"radii": [-1.0]}, "radii"),
        ({"radii": [math.nan]}, "radii"),
        ({"radii": [math.inf]}, "radii"),
        ({"radii": "abc"}, "radii"),
        ({"radii": []}, "radii"),
        ({"note": 3}, "note"),
        ({"plots": "no"}, "plots"),
        ({"adversarial": 3}, "adversarial"),
        ({"images": "bundled"}, "images"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_write_report_bad_options(records, tmp_path, kw, name):
    out = tmp_path / "out"
    exc = raises_naming(lambda: write_report([records], out, **{"plots": False, **kw}), name)
    if name == "formats":
        lists_valid(exc, PLOT_FORMATS)
    assert not out.exists(), "nothing written on refusal"


@pytest.mark.parametrize("out_dir", [None, 3, "", "FILE"])
def test_write_report_bad_out_dir(records, tmp_path, out_dir):
    if out_dir == "FILE":
        out_dir = tmp_path / "a_file"
        out_dir.write_text("x")
    raises_naming(lambda: write_report([records], out_dir, plots=False), "out_dir")


@pytest.mark.parametrize("files", [None, "x.jsonl", [], [3], ["missing.jsonl"], "DIR"])
def test_write_report_bad_files(tmp_path, files):
    if files == "DIR":
        files = [tmp_path]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        raises_naming(
            lambda: write_report(files, out, plots=False), "files", also=(FileNotFoundError,)
        )
        assert not out.exists()


@SETTINGS
@given(radii=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=4))
def test_write_report_radii(records, radii):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        if not radii or not all(math.isfinite(r) and r >= 0 for r in radii):
            raises_naming(lambda: write_report([records], out, plots=False, radii=radii), "radii")
            assert not out.exists()
            return
        paths = write_report([records], out, plots=False, radii=radii)
        summary = json.loads(paths["summary.json"].read_text())
        assert summary["radii"] == sorted(set(float(r) for r in radii))


# ------------------------------------------------------------------------------ reproduce


@pytest.mark.parametrize(
    "claim, kw, name",
    [
        ("all", {}, "claim"),
        ("fig3", {}, "claim"),
        (None, {}, "claim"),
        (["fig1"], {}, "claim"),
        ("fig1", {"n": 0}, "n"),
        ("fig1", {"n": -1}, "n"),
        ("fig1", {"n": 1.5}, "n"),
        ("fig1", {"n": True}, "n"),
        ("fig1", {"seed": -1}, "seed"),
        ("fig1", {"seed": "a"}, "seed"),
        ("fig1", {"seed": 1.5}, "seed"),
        ("fig1", {"seed": 2**70}, "seed"),
        ("fig1", {"threads": 0}, "threads"),
        ("fig1", {"threads": "2"}, "threads"),
        ("fig1", {"threads": math.nan}, "threads"),
        ("fig1", {"threads": 1.5}, "threads"),
        ("fig1", {"data": "MISSING"}, "data"),
        ("fig1", {"data": 3}, "data"),
        ("fig1", {"out": None}, "out"),
        ("fig1", {"out": ""}, "out"),
        ("fig1", {"out": "FILE"}, "out"),
        ("fig1", {"smoothing_models": None}, "smoothing_models"),
        ("fig1", {"smoothing_models": "FILE"}, "smoothing_models"),
        ("fig1", {"quick": "yes"}, "quick"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_run_claim_arguments(tmp_path, claim, kw, name):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    subst = {"MISSING": str(tmp_path / "missing.npz"), "FILE": str(afile)}
    kw = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    kw = {"out": tmp_path / "out", "smoothing_models": tmp_path / "sm", **kw}
    threads = torch.get_num_threads()
    raises_naming(lambda: run_claim(claim, **kw), name, also=(FileNotFoundError,))
    if claim not in ("all", ["fig1"]):  # both valid for reproduce
        raises_naming(lambda: reproduce(claim, **kw), name, "claims", also=(FileNotFoundError,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], "output left behind"
    assert torch.get_num_threads() == threads


def test_run_claim_all_points_to_reproduce():
    exc = raises_naming(lambda: run_claim("all"), "claim")
    assert "reproduce" in str(exc) and all(c in str(exc) for c in CLAIMS)


@pytest.mark.parametrize("claims", [[], "fig3", ["fig1", "bogus"], None, 3])
def test_reproduce_claims(tmp_path, claims):
    raises_naming(lambda: reproduce(claims, out=tmp_path / "o"), "claims", "claim")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- certified <= attack


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    side=st.sampled_from([4, 5]),
    hidden=st.integers(3, 8),
    classes=st.integers(2, 4),
    sparse=st.booleans(),
)
def test_certified_below_attack(seed, side, hidden, classes, sparse):
    """Sandwich on random tiny nets and images: vanilla <= feasible <= complete (exact)
    <= the W1 of any adversarial the attack finds; complete-ball <= complete (unless no
    adversarial image exists at all: then the complete radius is capped at the grid
    diameter and the attack must fail)."""
    model = mlp(seed, h=side, w=side, hidden=hidden, k=classes)
    x = images(1, seed, side, side)
    if sparse:  # mostly-empty digits: the feasibility constraint matters
        x = x * (np.random.default_rng(seed + 1).random(x.shape) < 0.4) + 1e-3
    atk = fv.attack(model, x, steps=15, restarts=1, seed=seed)
    radii = {
        m: run_certify(model, x, method=m, timeout=20.0)[0]
        for m in ("vanilla", "feasible", "complete", "complete-ball")
    }
    tol = lambda r: 1e-6 * (1 + abs(r))  # noqa: E731
    for m, r in radii.items():
        assert r.label == atk.label[0], m
        assert math.isfinite(r.radius) and r.radius >= 0, m
        if atk.success[0]:
            assert r.radius <= atk.w1[0] + tol(atk.w1[0]), (m, r.radius, atk.w1[0])
    assert radii["vanilla"].radius <= radii["feasible"].radius + tol(radii["feasible"].radius)
    assert radii["feasible"].radius <= radii["complete"].radius + tol(radii["complete"].radius)
    none = radii["complete"].exact and math.isinf(radii["complete"].upper)
    if none:  # no image of this mass is classified otherwise (radius capped at the diameter)
        assert not atk.success[0]
    elif radii["complete"].exact and radii["complete-ball"].exact:  # both exact to rtol
        assert radii["complete-ball"].radius <= radii["complete"].radius * (1 + 1e-3) + tol(
            radii["complete"].radius
        )
