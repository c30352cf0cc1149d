"""`flowverify certify` / `attack` through the runner (issue 7): every argument is checked
before anything is written (one line naming the flag, exit code 2, no output left), and a
failing image gives an error record while the run goes on."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from flowverify.cli.app import main


def run_cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, err.getvalue()


def lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


CERTIFY = ["certify", "--model", "linear", "--indices", "0:3", "--no-progress"]
ATTACK = ["attack", "--model", "linear", "--data", "bundled", "--indices", "0:3"]
ATTACK += ["--eps", "0.1", "--steps", "5", "--no-progress"]

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--references", "bogus:1"], "--references"),
        (["--references", "data:600"], "--references"),
        (["--device", "bogus"], "--device"),
        pytest.param(["--device", "cuda"], "--device", marks=no_cuda),
        (["--device", "meta"], "--device"),
        (["--method", "bogus"], "--method"),
        (["--method", "vanilla", "--certifier", "bab"], "--certifier"),
        (["--indices", "600"], "--indices"),
        (["--indices", "0:1000"], "--indices"),
        (["--indices", "x"], "--indices"),
        (["--eps", "nan"], "--eps"),
        (["--eps", "-1"], "--eps"),
        (["--eps", "abc"], "--eps"),
        (["--timeout", "0"], "--timeout"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", "-1"], "--seed"),
        (["--workers", "-1"], "--workers"),
        (["--address", "auto"], "--address"),
        (["--backend", "dask"], "--backend"),
        (["--model", "resnet"], "--model"),
        (["--data", "{tmp}/none.npz"], "--data"),
        (["--witness-dir", "{tmp}/a_file"], "--witness-dir"),
        (["--out", "{tmp}"], "--out"),
    ],
)
def test_certify_bad_argument_one_line_no_output(tmp_path, argv, flag):
    (tmp_path / "a_file").write_text("")
    out, wit = tmp_path / "o.jsonl", tmp_path / "wit"
    argv = [a.format(tmp=tmp_path) for a in argv]
    base = [*CERTIFY, "--out", out] if "--out" not in argv else CERTIFY
    if "--witness-dir" not in argv:
        argv += ["--witness-dir", wit]
    code, err = run_cli([*base, *argv])
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert flag in err, err
    assert not out.exists() and not wit.exists(), "output left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--eps", "0.1,x"], "--eps"),
        (["--eps", "nan"], "--eps"),
        (["--eps", "-0.5"], "--eps"),
        (["--device", "bogus"], "--device"),
        pytest.param(["--device", "cuda:0"], "--device", marks=no_cuda),
        (["--indices", "600"], "--indices"),
        (["--loss", "x"], "--loss"),
        (["--steps", "0"], "--steps"),
        (["--reference", "x"], "--reference"),
        (["--workers", "-2"], "--workers"),
        (["--model", "resnet"], "--model"),
        (["--save-adversarial", "{tmp}"], "--save-adversarial"),
        (["--save-adversarial", "{tmp}/a_file/x.npz"], "--save-adversarial"),
    ],
)
def test_attack_bad_argument_one_line_no_output(tmp_path, argv, flag):
    (tmp_path / "a_file").write_text("")
    out, npz = tmp_path / "o.jsonl", tmp_path / "adv.npz"
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--save-adversarial" not in argv:
        argv += ["--save-adversarial", npz]
    code, err = run_cli([*ATTACK, "--out", out, *argv])
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert flag in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], "output left behind"


def test_certify_failing_image_gives_error_record(tmp_path, monkeypatch):
    """An exception on one image: its record says so, the others are as usual."""
    from flowverify.verification import api

    argv = [
        "certify",
        "--model",
        "linear",
        "--indices",
        "0:4",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    good = tmp_path / "good.jsonl"
    assert run_cli([*argv, "--out", good])[0] == 0
    real = api._iter_certify

    def failing(model, images, labels=None, *, indices, **kw):
        if 2 in np.asarray(indices).tolist():
            raise RuntimeError("boom on image 2")
        return real(model, images, labels, indices=indices, **kw)

    monkeypatch.setattr(api, "_iter_certify", failing)
    out = tmp_path / "o.jsonl"
    assert run_cli([*argv, "--out", out])[0] == 0
    recs = lines(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    bad = recs[2]
    assert bad["status"] == "error" and "boom on image 2" in bad["error"]
    assert bad["message"] == bad["error"] and bad["label"] == lines(good)[2]["label"]
    drop = ("seconds", "config")
    same = [{k: v for k, v in r.items() if k not in drop} for r in (recs[0], recs[1], recs[3])]
    ref = lines(good)
    assert same == [{k: v for k, v in r.items() if k not in drop} for r in (ref[0], ref[1], ref[3])]
    # the record is a certify record for `flowverify report` (which skips errors)
    from flowverify.report.records import load_results

    assert len(load_results([out])[0].records) == 4


def test_attack_failing_image_gives_error_records_and_nan_rows(tmp_path, monkeypatch):
    from flowverify.attacks.pgd import WassersteinPGD
    from flowverify.io.bundled import bundled_digits

    bad_image = bundled_digits()[0][1]
    real = WassersteinPGD.__call__

    def failing(self, model, images, labels=None):
        if any(np.array_equal(img, bad_image) for img in np.asarray(images)):
            raise ValueError("boom on image 1")
        return real(self, model, images, labels)

    monkeypatch.setattr(WassersteinPGD, "__call__", failing)
    out, npz = tmp_path / "o.jsonl", tmp_path / "adv.npz"
    argv = ["attack", "--model", "linear", "--data", "bundled", "--indices", "0:3", "--eps",
            "0.1,0.3", "--steps", "5", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert run_cli([*argv, "--out", out, "--save-adversarial", npz])[0] == 0
    recs = lines(out)
    assert [(r["index"], r["eps"]) for r in recs] == [(i, e) for i in range(3) for e in (0.1, 0.3)]
    status = [r["status"] for r in recs]
    assert [s == "error" for s in status] == [False, False, True, True, False, False]
    assert {s for s in status if s != "error"} <= {"falsified", "unknown", "misclassified"}
    assert {r["kind"] for r in recs} == {"attack"}
    assert "boom on image 1" in recs[2]["error"] and recs[2]["success"] is False
    with np.load(npz) as d:
        adv = d["adversarial"]
        assert adv.shape == (6, 1, 28, 28)
        assert np.isnan(adv[2:4]).all() and np.isfinite(adv[[0, 1, 4, 5]]).all()
        np.testing.assert_array_equal(d["index"], [0, 0, 1, 1, 2, 2])


def test_certify_smoothing_cli_matches_the_api(tmp_path):
    """--method smoothing runs Levine & Feizi's CERTIFY, the same records as the API."""
    from flowverify.baselines.smoothing import smoothed_certify
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model

    out = tmp_path / "s.jsonl"
    argv = ["certify", "--model", "cnn", "--indices", "0:3", "--method", "smoothing"]
    argv += ["--sigma", "0.02", "--n0", "16", "--n-samples", "64", "--batch-size", "2"]
    code, err = run_cli([*argv, "--out", str(out), "--no-progress"])
    assert code == 0, err
    recs = lines(out)
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert all(r["method"] == "smoothing" and r["config"]["sigma"] == 0.02 for r in recs)
    x, y = bundled_digits()
    api = smoothed_certify(load_model("cnn"), x[:3], y[:3], sigma=0.02, n0=16, n=64)
    for rec, res in zip(recs, api, strict=True):
        assert rec["status"] == str(res.status) and rec["radius"] == pytest.approx(res.radius)
    code, err = run_cli(["certify", "--model", "cnn", "--method", "smoothing", "--out",
                            str(tmp_path / "t.jsonl")])  # fmt: skip
    assert code == 2 and "--sigma" in err and not (tmp_path / "t.jsonl").exists()
