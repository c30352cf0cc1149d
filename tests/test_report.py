"""The report: tables, numbers and plots from small synthetic certify/attack files."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from flowverify.baselines.result import SmoothingResult
from flowverify.core.results import JsonlWriter, Status
from flowverify.report.records import load_results
from flowverify.report.summary import (
    attack_radii,
    certified_accuracy,
    not_fooled_fraction,
    sandwich,
    summarize,
)
from flowverify.report.writer import write_report


def _cert(index, status, radius, *, method="vanilla", exact=False, label=1, prediction=None):
    if prediction is None:
        prediction = label if status != "misclassified" else (label + 1) % 10
    return {
        "index": index,
        "label": label,
        "prediction": prediction,
        "method": method,
        "certifier": "",
        "references": ["uniform"],
        "status": status,
        "radius": radius,
        "radius_raw": radius * 100 if isinstance(radius, float) else radius,
        "exact": exact,
        "per_reference": {},
        "seconds": 0.5,
        "config": {},
    }


def _att(index, eps, success, w1, *, label=1, prediction=1):
    return {
        "index": index,
        "label": label,
        "prediction": prediction,
        "eps": eps,
        "success": success,
        "w1_bound": w1 if success else "nan",
        "w1": w1 if success else "nan",
        "w1_raw": w1 * 100 if success else "nan",
        "prediction_adversarial": (label + 3) % 10 if success else label,
        "seconds": 0.25,
        "config": {},
    }


def _smoothing(index, status, radius):
    return SmoothingResult(
        index=index,
        label=1,
        prediction=1 if status == Status.CERTIFIED else -1,
        status=status,
        radius=radius,
        radius_lf=radius / 2,
        radius_raw=radius * 100,
        radius_lf_raw=radius * 50,
        p_lower=0.9 if radius else 0.4,
        guess=1,
        count=90,
        counts=[0, 90, 10] + [0] * 7,
        mass=100.0,
        seconds=1.0,
        config={"sigma": 0.01},
    )


@pytest.fixture
def files(tmp_path):
    cert = tmp_path / "cert.jsonl"
    with JsonlWriter(cert) as w:
        for rec in [
            _cert(0, "certified", 0.1),
            _cert(1, "certified", 0.2),
            {**_cert(2, "unknown", 0.05), "upper": 0.35},  # a timed-out complete search
            _cert(3, "misclassified", 0.0),
            _cert(4, "error", float("nan")),
            _cert(5, "certified", 0.5),  # deliberately unsound: > exact and > attack
            _cert(0, "certified", 0.15, method="exact", exact=True),
            _cert(1, "certified", 0.25, method="exact", exact=True),
            _cert(2, "falsified", 0.3, method="exact", exact=True),
            _cert(3, "misclassified", 0.0, method="exact", exact=True),
            _cert(5, "certified", 0.4, method="exact", exact=True),
        ]:
            w.write(rec)
        w.write(_smoothing(0, Status.CERTIFIED, 0.03).to_dict())
        w.write(_smoothing(1, Status.UNKNOWN, 0.0).to_dict())
    att = tmp_path / "attack.jsonl"
    with JsonlWriter(att) as w:
        for rec in [
            _att(0, 0.2, True, 0.18),
            _att(0, 0.5, True, 0.3),
            _att(1, 0.2, False, 0.0),
            _att(1, 0.5, True, 0.4),
            _att(2, 0.2, False, 0.0),
            _att(2, 0.5, False, 0.0),
            _att(3, 0.2, True, 0.0, prediction=7),
            _att(3, 0.5, True, 0.0, prediction=7),
            _att(5, 0.5, True, 0.45),
        ]:
            w.write(rec)
    rng = np.random.default_rng(0)
    npz = tmp_path / "adv.npz"
    np.savez(
        npz,
        adversarial=rng.random((3, 1, 28, 28)).astype(np.float32),
        index=np.array([0, 1, 5]),
        eps=np.array([0.2, 0.5, 0.5]),
    )
    return cert, att, npz


def _group(groups, label_part):
    (g,) = [g for g in groups if label_part in g.label]
    return g


def test_groups_and_curves(files):
    cert, att, _ = files
    groups = load_results([cert, att])
    assert [g.label for g in groups] == [
        "cert.jsonl [vanilla]",
        "cert.jsonl [exact]",
        "cert.jsonl [smoothing/laplace-cohen]",
        "attack.jsonl [attack]",
    ]
    van = _group(groups, "vanilla")
    np.testing.assert_allclose(
        certified_accuracy(van, [0, 0.05, 0.1, 0.2, 0.5, 1.0]),
        [4 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0],
    )
    a = _group(groups, "attack")
    assert attack_radii(a) == {0: 0.18, 1: 0.4, 2: math.inf, 3: 0.0, 5: 0.45}
    np.testing.assert_allclose(not_fooled_fraction(a, [0, 0.2, 0.5]), [0.8, 0.6, 0.2])
    rows = sandwich(groups)
    assert sorted(rows) == [0, 1, 2, 5]  # 3 misclassified, 4 error only
    assert rows[0]["cert"] == 0.1 and rows[0]["exact"] == 0.15 and rows[0]["attack"] == 0.18
    assert rows[5]["cert_by"] == "cert.jsonl [vanilla]"
    assert rows[2]["attack"] == 0.35  # the certifier's closest adversarial (attack: never)


def test_summary_numbers(files):
    cert, att, _ = files
    s = summarize(load_results([cert, att]), radii=[0, 0.1, 0.2])
    van, exact, smooth, a = s["groups"]
    assert van["count"] == 6
    assert van["status_counts"] == {
        "certified": 3,
        "falsified": 0,
        "unknown": 1,
        "misclassified": 1,
        "error": 1,
    }
    assert van["clean_accuracy"] == pytest.approx(4 / 6)
    assert van["certified_fraction"] == pytest.approx(0.5)
    assert van["mean_radius"] == pytest.approx((0.1 + 0.2 + 0.05 + 0.5) / 4)
    assert van["median_radius"] == pytest.approx(0.15)
    assert van["certified_accuracy"] == pytest.approx({0.0: 4 / 6, 0.1: 0.5, 0.2: 2 / 6})
    assert van["mean_seconds"] == pytest.approx(0.5)
    assert exact["exact_count"] == 5
    # the abstaining smoothed classifier (prediction -1) is not counted as correct
    assert smooth["clean_accuracy"] == pytest.approx(0.5)
    assert a["digits"] == 5 and a["count"] == 9
    assert a["clean_accuracy"] == pytest.approx(0.8)
    assert a["success_per_eps"] == {
        0.2: {"attacked": 3, "success": 1, "success_rate": pytest.approx(1 / 3)},
        0.5: {"attacked": 4, "success": 3, "success_rate": pytest.approx(0.75)},
    }
    assert a["median_w1_successful"] == pytest.approx(0.35)
    assert a["median_attack_radius"] == pytest.approx(0.425)
    assert a["not_fooled"] == pytest.approx({0.0: 0.8, 0.1: 0.8, 0.2: 0.6})
    sw = s["sandwich"]
    assert sw["digits"] == 4
    assert sw["cert<=exact"]["compared"] == 4
    assert sw["cert<=exact"]["violating_indices"] == [5]
    assert sw["exact<=attack"]["violations"] == 0
    assert sw["cert<=attack"]["violating_indices"] == [5]


def test_write_report_files_and_markdown(files, tmp_path):
    pytest.importorskip("matplotlib")
    cert, att, npz = files
    out = tmp_path / "rep"
    paths = write_report(
        [cert, att], out, adversarial=npz, images="bundled", note="synthetic test data"
    )
    for stem in ("certified_accuracy", "sandwich", "radius_histograms", "adversarials"):
        for ext in ("png", "svg"):
            p = out / f"{stem}.{ext}"
            assert p.exists() and p.stat().st_size > 1000, p
            assert paths[f"{stem}.{ext}"] == p
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "sandwich.svg").read_text()
    md = (out / "summary.md").read_text()
    assert md.startswith("# flowverify report\n\nsynthetic test data")
    assert "normalised" in md
    assert (
        "| cert.jsonl [vanilla] | 6 | 3 | 0 | 1 | 1 | 1 | 0 | 0.667 | 0.500 | 0.2125 | 0.15 |" in md
    )
    assert "| attack.jsonl [attack] | 5 | 9 | 0.800 | 0.35 | 0.425 | 0.25 |" in md
    assert "1/3 (0.333)" in md and "3/4 (0.750)" in md
    assert "| cert<=exact | 4 | 1 |" in md and "| exact<=attack | 4 | 0 |" in md
    assert "![certified_accuracy](certified_accuracy.png)" in md
    data = json.loads((out / "summary.json").read_text())
    assert data["groups"][0]["certified_accuracy"]["0.1"] == pytest.approx(0.5)
    assert data["groups"][3]["median_attack_radius"] == pytest.approx(0.425)


def test_summary_only_without_matplotlib(files, tmp_path, monkeypatch):
    cert, att, _ = files
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"matplotlib \(a dependency of flowverify\)"):
        write_report([cert], tmp_path / "a")
    paths = write_report([cert, att], tmp_path / "b", plots=False)
    assert sorted(paths) == ["summary.json", "summary.md"]
    assert not (tmp_path / "a").exists()


def test_bad_inputs(files, tmp_path):
    cert, att, npz = files
    with pytest.raises(FileNotFoundError, match="files"):
        load_results([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "label": 1}\n')
    with pytest.raises(ValueError, match="line 1: neither a certify record"):
        load_results([bad])
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: invalid JSON"):
        load_results([bad])
    bad.write_text(json.dumps(_cert(0, "safe", 0.1)) + "\n")
    with pytest.raises(ValueError, match="unknown status 'safe'"):
        load_results([bad])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no records"):
        load_results([empty])
    # an interrupted write: the trailing partial line is ignored
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps(_cert(0, "certified", 0.1)) + "\n" + '{"index": 1, "la')
    (g,) = load_results([partial])
    assert len(g.records) == 1
    with pytest.raises(ValueError, match="radii"):
        summarize(load_results([cert]), radii=[-1.0])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="adversarial: .* no key 'adversarial'"):
        write_report([cert], tmp_path / "o", adversarial=wrong, plots=False)


def test_cli_report(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from flowverify.cli.app import main

    cert, att, npz = files
    out = tmp_path / "cli"
    code = main(
        [
            "report",
            str(cert),
            str(att),
            "--out",
            str(out),
            "--adversarial",
            str(npz),
            "--radii",
            "0,0.1",
            "--format",
            "png",
        ]
    )
    assert code == 0
    assert (out / "summary.md").exists() and (out / "adversarials.png").exists()
    assert not (out / "adversarials.svg").exists()
    assert "| r=0 | r=0.1 |" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jsonl" in err
    assert main(["report", str(cert), "--radii", "a,b", "--no-plots", "--out", str(out)]) == 2
    assert "--radii" in capsys.readouterr().err
    # an .npz among the files is the adversarial file; a binary "JSONL" is one clear line
    out2 = tmp_path / "cli2"
    assert (
        main(["report", str(cert), str(att), str(npz), "--format", "png", "--out", str(out2)]) == 0
    )
    assert (out2 / "adversarials.png").exists()
    capsys.readouterr()
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(npz.read_bytes()[:200])
    assert main(["report", str(binary), "--no-plots", "--out", str(out2)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "binary.jsonl" in err and "UTF-8" in err


def test_cli_report_help_mentions_units(capsys):
    from flowverify.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "normalised W1" in text and "NOT fooled" in text
