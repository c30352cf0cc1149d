"""Wasserstein PGD in the flow domain: soundness, strength, minimal radius, API and CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import relu_net
from flowverify.attacks import LOSSES, AttackResult, WassersteinPGD, attack
from flowverify.cli import attack_cmd as _cli_attack
from flowverify.model.flow_model import FlowModel
from flowverify.transport.flows import w1_distance


def _mlp(seed: int = 0, side: int = 8, hidden: int = 16, classes: int = 4, dtype=torch.float32):
    return relu_net(seed, [hidden, hidden, classes], h=side, w=side, dtype=dtype)


def _conv(seed: int = 0, channels: int = 1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def _images(seed: int, n: int = 6, c: int = 1, side: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, side, side)).astype(np.float32)
    x[x < 0.55] = 0  # sparse, like digits: many empty pixels
    x[..., 3, 3] = 1.0
    return x


@pytest.fixture(scope="module")
def digits():
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model

    x, y = bundled_digits()
    model = load_model("fc")
    with torch.no_grad():
        pred = model(torch.from_numpy(x[:60])).argmax(1).numpy()
    ok = np.nonzero(pred == y[:60])[0][:12]
    return model, x[ok], y[ok]


def _check_sound(res: AttackResult, images: np.ndarray, model, clip_max=None, input_scale="raw"):
    adv = res.adversarial
    imgs = images[res.index].astype(np.float64)
    assert adv.shape == imgs.shape and adv.dtype == np.float64
    assert adv.min() >= 0
    np.testing.assert_allclose(adv.sum(axis=(2, 3)), imgs.sum(axis=(2, 3)), rtol=1e-12)
    if clip_max is not None:
        assert adv.max() <= clip_max
    fin = np.isfinite(res.w1)
    assert np.all(res.w1[fin] <= res.w1_bound[fin])
    assert np.all(res.w1_bound[fin] <= res.eps[fin] * (1 + 1e-6) + 1e-15)
    # the exact W1 is reported for the returned image
    np.testing.assert_allclose(res.w1[fin], w1_distance(imgs[fin], adv[fin]), rtol=1e-9, atol=1e-12)
    # every success re-checked by a forward pass on the returned image
    x = torch.as_tensor(adv, dtype=next(model.parameters()).dtype)
    if input_scale == "normalised":
        x = x / x.sum(dim=(2, 3), keepdim=True)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    np.testing.assert_array_equal(pred, res.prediction_adversarial)
    np.testing.assert_array_equal(res.success, pred != res.label)


def test_fixed_budget_on_bundled_model(digits):
    model, x, y = digits
    res = WassersteinPGD(eps=[0.0, 0.05, 1.0], steps=20)(model, x, y)
    n = len(x)
    assert len(res) == 3 * n
    np.testing.assert_array_equal(res.index, np.tile(np.arange(n), 3))
    np.testing.assert_array_equal(res.eps, np.repeat([0.0, 0.05, 1.0], n))
    _check_sound(res, x, model)
    m = res.success_matrix()
    assert m.shape == (n, 3)
    assert not m[:, 0].any()  # eps 0: the clean images are correctly classified
    assert m[:, 2].sum() >= 1  # a generous budget fools at least one digit
    assert np.all(m[:, 1] <= m[:, 2])  # adversarials are reused for larger budgets
    assert np.all(res.w1[:n] == 0)
    assert res.threat_model == "w1" and res.mode == "fixed"


def test_pixel_upper_bound_is_a_labelled_threat_model(digits):
    model, x, y = digits
    res = attack(model, x[:6], y[:6], eps=0.6, clip_max=1.0)
    _check_sound(res, x[:6], model, clip_max=1.0)
    assert res.threat_model == "w1+pixels<=1"
    assert res.success.any()
    with pytest.raises(ValueError, match="clip_max"):
        attack(model, x[:2], y[:2], eps=0.1, clip_max=0.5)


def test_minimal_radius_on_bundled_model(digits):
    model, x, y = digits
    res = attack(model, x[:4], y[:4], search_steps=2, steps=10)
    assert res.mode == "minimal" and len(res) == 4
    _check_sound(res, x[:4], model)
    assert np.all(res.success == np.isfinite(res.w1))
    assert res.success.all()
    # the fixed-budget attack at the found radius (+ margin) does not contradict it
    assert np.all(res.w1 > 0)


@pytest.mark.slow
def test_minimal_radius_never_below_the_exact_radius():
    """On a small net: attack radius >= the complete certifier's exact radius, close to it."""
    from flowverify import certify

    net = _mlp(1, hidden=8, classes=3, dtype=torch.float64)
    x = _images(5, n=2).astype(np.float64)
    cert = certify(net, x, method="complete", timeout=30)
    exact = np.array([r.radius for r in cert])
    done = np.array([r.exact for r in cert])
    assert done.any()  # the comparison below is not vacuous
    res = attack(net, x, search_steps=4, steps=20)
    assert np.all(res.w1[done] >= exact[done] * (1 - 1e-6))  # never below a proof
    assert np.all(res.w1[done] <= exact[done] * 1.25)  # and not far above it


def test_linear_model_minimal_radius_is_near_exact(digits):
    """For a linear model DeepFool-W1 solves the LP of Lemma 8 (up to the reach)."""
    from flowverify import certify
    from flowverify.model.loading import load_model

    _, x, y = digits
    model = load_model("linear")
    with torch.no_grad():
        ok = model(torch.from_numpy(x)).argmax(1).numpy() == y
    x, y = x[ok][:3], y[ok][:3]
    cert = certify(model, x, y, method="feasible")
    exact = np.array([r.radius for r in cert])
    res = attack(model, x, y, search_steps=2)
    assert np.all(res.w1 >= exact * (1 - 1e-5))
    assert np.all(res.w1 <= exact * 1.1)


def test_model_modes_and_gradients_are_restored(digits):
    model, x, y = digits
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    try:
        attack(model, x[:2], y[:2], eps=0.1, steps=2)
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        model.eval()


def test_seeded_and_deterministic(digits):
    model, x, y = digits
    a = attack(model, x[:3], y[:3], eps=0.05, steps=5, restarts=1, seed=3)
    b = attack(model, x[:3], y[:3], eps=0.05, steps=5, restarts=1, seed=3)
    np.testing.assert_array_equal(a.adversarial, b.adversarial)
    np.testing.assert_array_equal(a.success, b.success)


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_and_conv_model(loss):
    net = _conv()
    x = _images(2, n=4)
    res = attack(net, x, eps=[0.3, 2.0], loss=loss, steps=10)
    _check_sound(res, x, net)
    assert res.success_matrix()[:, 1].sum() >= 1


def test_reference_and_fused_flow_model_agree_with_default():
    net = _mlp(2, dtype=torch.float64)  # float64: the paths agree up to rounding
    x = _images(3, n=5).astype(np.float64)
    base = attack(net, x, eps=0.4, steps=10)
    for kw in ({"reference": "uniform"}, {"reference": "uniform", "fuse": True}):
        res = attack(net, x, eps=0.4, steps=10, **kw)
        _check_sound(res, x, net)
        np.testing.assert_array_equal(res.success, base.success)
        np.testing.assert_allclose(res.w1_bound, base.w1_bound, rtol=1e-6, atol=1e-9)
    # a FlowModel as the model: its reference and fusion are used
    from flowverify.transport.references import make_reference

    fm = FlowModel(net, make_reference("uniform", x), fuse=True)
    res = attack(fm, x, eps=0.4, steps=10)
    _check_sound(res, x, net)
    np.testing.assert_array_equal(res.success, base.success)


def test_normalised_input_and_multichannel():
    net = _conv(channels=3)
    x = _images(4, n=3, c=3)
    res = attack(net, x, eps=0.5, steps=10, input_scale="normalised")
    _check_sound(res, x, net, input_scale="normalised")
    clean = torch.as_tensor(x) / torch.as_tensor(x).sum(dim=(2, 3), keepdim=True)
    with torch.no_grad():
        np.testing.assert_array_equal(res.prediction, net(clean).argmax(1).numpy())


def test_result_records_are_json(digits):
    model, x, y = digits
    res = attack(model, x[:2], y[:2], eps=0.1, steps=5)
    recs = res.to_records(indices=[10, 20], config={"k": 1})
    assert [r["index"] for r in recs] == [10, 20]
    keys = {
        "index", "label", "prediction", "eps", "success", "w1_bound", "w1", "w1_raw",
        "prediction_adversarial", "seconds", "unit", "threat_model", "config",
    }  # fmt: skip
    for r in recs:
        assert keys <= r.keys()
        json.dumps(r, allow_nan=False)
    json.dumps(res.to_dict(), allow_nan=False)
    rng = np.random.default_rng(0)
    fail = AttackResult(
        adversarial=np.zeros((1, 1, 2, 2)), index=np.array([0]), eps=np.array([math.inf]),
        success=np.array([False]), w1_bound=np.array([math.inf]), w1=np.array([math.inf]),
        w1_raw=np.array([math.inf]), label=np.array([1]), prediction=np.array([1]),
        prediction_adversarial=np.array([1]), iterations=np.array([3]),
        seconds=rng.random(1), threat_model="w1", mode="minimal",
    )  # fmt: skip
    assert fail.to_records()[0]["w1"] == "inf"


def test_repr_lists_hyperparameters():
    text = repr(WassersteinPGD(eps=0.3, steps=12, loss="margin", seed=4))
    for part in ("eps=0.3", "steps=12", "step_size=", "loss='margin'", "reference=", "seed=4"):
        assert part in text


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"eps": [0.1, float("nan")]}, ValueError, "eps"),
        ({"eps": "0.1"}, TypeError, "eps"),
        ({"loss": "hinge"}, ValueError, "loss.*ce, margin, cw, dlr"),
        ({"schedule": "linear"}, ValueError, "schedule"),
        ({"steps": 0}, ValueError, "steps"),
        ({"step_size": 0.0}, ValueError, "step_size"),
        ({"restarts": -1}, ValueError, "restarts"),
        ({"clip_max": -1.0}, ValueError, "clip_max"),
        ({"input_scale": "unit"}, ValueError, "input_scale"),
        ({"reference": "gaussian"}, ValueError, "reference"),
        ({"fuse": True}, ValueError, "fuse"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        WassersteinPGD(**kwargs)


def test_bad_inputs_raise_clear_errors():
    net = _mlp()
    x = _images(0, n=2)
    with pytest.raises(ValueError, match="images.*shape"):
        attack(net, x[0], eps=0.1)
    with pytest.raises(ValueError, match="images.*non-negative"):
        attack(net, -x, eps=0.1)
    with pytest.raises(ValueError, match="labels.*shape"):
        attack(net, x, np.array([0, 1, 2]), eps=0.1)
    with pytest.raises(ValueError, match="labels.*classes"):
        attack(net, x, np.array([0, 9]), eps=0.1)
    with pytest.raises(TypeError, match="images"):
        attack(net, x.tolist(), eps=0.1)
    with pytest.raises(TypeError, match="model"):
        attack("fc", x, eps=0.1)
    with pytest.raises(ValueError, match="mass"):
        attack(net, np.zeros((1, 1, 8, 8), np.float32), eps=0.1)


def test_torch_inputs_and_device(digits):
    model, x, y = digits
    res = attack(model, torch.from_numpy(x[:2]), torch.from_numpy(y[:2]), eps=0.1, device="cpu")
    assert isinstance(res.adversarial, np.ndarray)
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        res = attack(model.cuda(), x[:2], y[:2], eps=0.3, device="cuda")
        _check_sound(res, x[:2], model)
        model.cpu()


def _cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    _cli_attack.add_parser(sub)
    return _cli_attack.run(parser.parse_args(["attack", *argv]))


def test_cli_fixed_budget_writes_records_and_npz(tmp_path, capsys):
    out, npz = tmp_path / "a.jsonl", tmp_path / "a.npz"
    code = _cli(
        ["--model", "fc", "--data", "bundled", "--indices", "3:6", "--eps", "0.05,0.5",
         "--steps", "10", "--out", str(out), "--save-adversarial", str(npz), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6
    assert [r["index"] for r in recs] == [3, 3, 4, 4, 5, 5]  # per image, budgets in order
    assert [r["eps"] for r in recs] == [0.05, 0.5] * 3
    cfg = recs[0]["config"]
    assert cfg["model"] == "fc" and cfg["steps"] == 10 and "flowverify_version" in cfg
    with np.load(npz) as d:
        assert d["adversarial"].shape == (6, 1, 28, 28)
        np.testing.assert_array_equal(d["index"], [3, 3, 4, 4, 5, 5])
        np.testing.assert_array_equal(d["eps"], [0.05, 0.5] * 3)
    assert "success" in capsys.readouterr().out


def test_cli_minimize_and_errors(tmp_path):
    out = tmp_path / "m.jsonl"
    argv = ["--model", "linear", "--data", "bundled", "--indices", "0:2", "--minimize"]
    assert _cli([*argv, "--search-steps", "1", "--out", str(out), "--no-progress"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all(r["mode"] == "minimal" for r in recs)
    with pytest.raises(ValueError, match="--eps"):
        _cli(["--model", "fc", "--data", "bundled", "--eps", "0.1,x", "--out", str(out)])
    with pytest.raises(ValueError, match="--loss"):
        _cli(
            ["--model", "fc", "--data", "bundled", "--eps", "0.1", "--loss", "x", "--out", str(out)]
        )
    with pytest.raises(FileNotFoundError):
        _cli(["--model", "fc", "--data", str(tmp_path / "none.npz"), "--eps", "0.1",
              "--out", str(out)])  # fmt: skip


# ----------------------------------------------------------------------------- issue 15

_SCHEDULE = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def _first_fixed_success(model, x, y, **kwargs) -> np.ndarray:
    """Smallest exact W1 a fixed-budget run at the schedule's budgets fools (inf: none)."""
    fixed = attack(model, x, y, eps=_SCHEDULE, **kwargs)
    w1 = np.where(fixed.success, fixed.w1, np.inf).reshape(len(_SCHEDULE), len(x))
    return w1.min(0)


def test_minimal_radius_never_above_a_fixed_budget(digits):
    """Issue 15.1: the minimal mode is never above what a fixed-budget run fools at."""
    model, x, y = digits
    x, y = x[:6], y[:6]
    best_fixed = _first_fixed_success(model, x, y, search_steps=1)  # same options
    res = attack(model, x, y, eps=None, search_steps=1)
    _check_sound(res, x, model)
    assert np.isfinite(best_fixed).any()
    assert np.all(res.w1 <= best_fixed * (1 + 1e-9)), (res.w1, best_fixed)


def test_minimal_radius_on_the_outside_network(outside_net):
    """Issue 15.1 on the VNN-COMP net (digits 19 and 1 of the report: 0.713 and 0.967)."""
    from flowverify.io.bundled import bundled_digits

    x, y = bundled_digits()
    pick = [1, 19]
    x, y = x[pick], y[pick]
    best_fixed = _first_fixed_success(outside_net, x, y, search_steps=2)
    res = attack(outside_net, x, y, eps=None, search_steps=2)
    assert res.success.all()
    assert np.all(best_fixed <= 0.2)  # digit 1 resisted every budget up to 1.0 in the issue
    assert np.all(res.w1 <= best_fixed * (1 + 1e-9)), (res.w1, best_fixed)
    # measured exactly between image and adversarial; misclassified by the float model
    np.testing.assert_allclose(res.w1, w1_distance(x.astype(np.float64), res.adversarial))
    with torch.no_grad():
        pred = outside_net(torch.as_tensor(res.adversarial, dtype=torch.float32).flatten(1))
    assert np.all(pred.argmax(1).numpy() != y)
    assert np.all(res.w1 < 0.3)  # the report's 0.713 / 0.967 are far from minimal


def test_max_pixel_is_recorded(digits):
    """Issue 15.7: each row records the adversarial's largest pixel (data units)."""
    model, x, y = digits
    res = attack(model, x[:3], y[:3], eps=1.0, steps=10)
    np.testing.assert_array_equal(res.max_pixel, res.adversarial.reshape(3, -1).max(1))
    recs = res.to_records()
    assert [r["max_pixel"] for r in recs] == res.max_pixel.tolist()
    clipped = attack(model, x[:3], y[:3], eps=1.0, steps=10, clip_max=1.0)
    assert np.all(clipped.max_pixel <= 1.0)


def test_cli_notes_pixels_above_the_data_range(tmp_path, capsys):
    """Issue 15.7: the summary states the threat model and points at --clip-max."""
    out = tmp_path / "r.jsonl"
    argv = ["--model", "fc", "--data", "bundled", "--indices", "0:4", "--eps", "1.0",
            "--steps", "10", "--no-progress"]  # fmt: skip
    assert _cli([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    above = [r for r in recs if r["success"] and r["max_pixel"] > 1.0]
    assert "threat model w1 (the paper's)" in text
    assert above  # this model's adversarials pile mass above 1 (the finding)
    assert f"note: {len(above)} of" in text and "--clip-max 1" in text
    assert _cli([*argv, "--clip-max", "1", "--out", str(tmp_path / "c.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "w1+pixels<=1" in text and "note:" not in text


def test_attack_function_lists_its_options():
    """Issue 15.10: ``attack`` has explicit keyword-only options, the class's own."""
    import inspect

    params = inspect.signature(attack).parameters
    init = inspect.signature(WassersteinPGD.__init__).parameters
    options = [name for name in init if name != "self"]
    assert [p for p in params if p not in ("model", "images", "labels")] == options
    for name in options:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == init[name].default
        assert f"{name} :" in attack.__doc__
    with pytest.raises(TypeError, match="bogus"):
        attack(_mlp(), _images(0, n=1), bogus=1)


def test_attack_function_and_class_share_their_options():
    """``attack`` (functional form) spells out the options of :class:`WassersteinPGD`
    with the same defaults, so that the two cannot drift apart."""
    import inspect

    def options(fn):
        params = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}

    assert options(attack) == options(WassersteinPGD.__init__)
