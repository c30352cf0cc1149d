"""One record vocabulary: every operation's JSON records carry a ``kind`` and a shared
``status``, ``mass`` means the image's largest channel mass everywhere, and the report
reads a record's kind from its ``kind`` field."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

import flowverify as fv
from flowverify.baselines import smoothed_certify
from flowverify.core.results import Status
from flowverify.io import bundled_digits
from flowverify.report.records import load_results


def _two_channel_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double().eval()


def _two_channel_images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, size=(2, 2, 6, 6))
    x[:, 1] *= 0.5  # channel 1 has about half the mass of channel 0
    return x


def test_certify_attack_and_smoothing_records_share_kind_status_and_mass():
    model, x = _two_channel_net(), _two_channel_images()
    with torch.no_grad():
        y = model(torch.as_tensor(x)).argmax(1).numpy()
    largest = x.sum(axis=(2, 3)).max(axis=1)

    cert = [r.to_dict() for r in fv.certify(model, x, y, method="vanilla")]
    assert [r["kind"] for r in cert] == ["certify", "certify"]
    assert all(r["status"] in {s.value for s in Status} for r in cert)
    np.testing.assert_allclose([r["mass"] for r in cert], largest, rtol=1e-12)

    smooth = smoothed_certify(model, x, y, sigma=0.01, n0=20, n=50, batch_size=50)
    recs = [r.to_dict() for r in smooth]
    assert [r["kind"] for r in recs] == ["smoothing", "smoothing"]
    np.testing.assert_allclose([r["mass"] for r in recs], largest, rtol=1e-6)
    assert all(r["config"]["n_samples"] == 50 for r in recs)
    smallest = x.sum(axis=(2, 3)).min(axis=1)
    for r, s in zip(recs, smallest, strict=True):  # raw radii stay sound per channel
        np.testing.assert_allclose(r["radius_raw"], r["radius"] * s, rtol=1e-6)

    res = fv.attack(model, x, y, eps=[0.05, 1.0])
    rows = res.to_records()
    assert {r["kind"] for r in rows} == {"attack"}
    for r in rows:
        want = Status.FALSIFIED.value if r["success"] else Status.UNKNOWN.value
        assert r["status"] == want


def test_attack_rows_of_a_misclassified_image_say_so():
    from flowverify.model import load_model

    x, y = bundled_digits()
    model = load_model("fc")
    with torch.no_grad():
        pred = model(torch.as_tensor(x)).argmax(1).numpy()
    wrong = int(np.flatnonzero(pred != y)[0])
    rows = fv.attack(model, x[wrong : wrong + 1], y[wrong : wrong + 1], eps=0.1).to_records()
    assert [r["status"] for r in rows] == [Status.MISCLASSIFIED.value]


def test_report_reads_the_kind_field(tmp_path):
    """A record is grouped by its ``kind``, not by guessing from its keys."""
    cert = {
        "kind": "certify",
        "index": 0,
        "label": 1,
        "prediction": 1,
        "status": "certified",
        "radius": 0.1,
        "method": "vanilla",
        "certifier": "crown",
        "seconds": 0.1,
    }
    atk = {
        "kind": "attack",
        "index": 0,
        "label": 1,
        "prediction": 1,
        "eps": 0.1,
        "success": True,
        "w1": 0.05,
        "w1_bound": 0.1,
        "prediction_adversarial": 2,
        "seconds": 0.1,
        "status": "falsified",
    }
    odd = dict(cert, kind="something-else")
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (cert, atk)) + "\n")
    groups = load_results([path])
    assert sorted(g.kind for g in groups) == ["attack", "certify"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(odd) + "\n")
    try:
        load_results([bad])
    except ValueError as exc:
        assert "bad.jsonl" in str(exc)
    else:
        raise AssertionError("a record of an unknown kind was accepted")
