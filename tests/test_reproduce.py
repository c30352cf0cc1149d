"""Smoke tests of ``flowverify reproduce --quick`` (every claim, a few digits).

The quick settings are not the claims (docs/REPRODUCTION.md has the full runs); these
tests check that every claim runs end to end, writes its files, and that the numbers are
consistent: the maximum over references is at least each reference, certified radii
never exceed the W1 of an adversarial image, L2 <= Lemma 7 <= Lemma 8, and the complete
certifier's lower bound lies between the feasible radius and the closest adversarial.
All quick claims together take well under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import math

import pytest

from flowverify.cli import app as cli
from flowverify.paper.run import CLAIMS, reproduce, run_claim

REL = 1e-9


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    # a missing model folder: the quick smoothing claim trains tiny nets under OUT
    results = reproduce(
        "all", out=out, quick=True, smoothing_models=out / "no-such-folder", threads=2
    )
    return out, {r.claim: r for r in results}


def test_all_claims_write_their_files(quick):
    out, res = quick
    assert set(res) == set(CLAIMS)
    pytest.importorskip("matplotlib")
    figures = {"fig1": "fig1.png", "fig2": "fig2.png", "linear": "fig4.png"}
    figures["smoothing"] = "smoothing.png"
    for claim, r in res.items():
        folder = out / claim
        md = (folder / f"{claim}.md").read_text(encoding="utf-8")
        assert "quick smoke test" in md and "normalised" in md
        data = json.loads((folder / f"{claim}.json").read_text(encoding="utf-8"))
        assert data["claim"] == claim and data["settings"]["quick"] is True
        assert data["unit"] == "normalised"
        assert r.seconds > 0
        if claim in figures:
            png = folder / figures[claim]
            assert png.exists() and png.stat().st_size > 1000
            assert f"]({figures[claim]})" in md


def test_fig1_max_over_references(quick):
    _, res = quick
    r = res["fig1"]
    names = r.settings["reference_names"]
    assert len(names) == 2
    checked = 0
    for rec in r.per_image:
        for method in r.settings["methods"]:
            per = rec[f"{method}_per_reference"]
            assert set(per) == set(names)
            assert all(rec[f"{method}_max"] >= v * (1 - REL) for v in per.values())
            assert rec[f"{method}_max"] == pytest.approx(max(per.values()), rel=REL)
            checked += 1
    assert checked
    # feasible is never below vanilla (Lemma 5); fractions are fractions
    for rec in r.per_image:
        if rec["correct"]:
            assert rec["feasible_max"] >= rec["vanilla_max"] * (1 - 1e-6)
    for method in r.settings["methods"]:
        s = r.summary[method]
        assert 0.0 <= s["fraction_max_beats_every_reference"] <= 1.0
        assert s["mean_max"] >= max(s["mean_per_reference"].values()) * (1 - REL)
    for row in r.tables["references"]:
        assert row["centre rel. error f64"] < 1e-9  # W̃δµ + b̃ = Wµ + b for every R
        assert row["mean W1(R, µ)"] > 0


def test_attack_sizes_are_above_certified_radii(quick):
    _, res = quick
    r = res["attack"]
    assert r.summary["sound"] is True
    for rec in r.per_image:
        for key, w in rec.items():
            if key in ("index", "label", "certified"):
                continue
            if math.isfinite(w):
                assert w >= rec["certified"] * (1 - REL), key
    ours = r.tables["attacks"][0]
    assert ours["attack"].startswith("ours, minimal") and ours["success"] > 0
    assert ours["s / image"] > 0


def test_fig2_records(quick):
    _, res = quick
    r = res["fig2"]
    assert r.per_image
    for rec in r.per_image:
        if rec["ours_success"]:
            assert 0 < rec["ours_w1"] < math.inf
            assert rec["ours_prediction"] != rec["label"]
        if rec.get("wong_success"):
            assert rec["wong_prediction"] != rec["label"] and rec["wong_w1"] > 0


def test_linear_ordering_and_witnesses(quick):
    _, res = quick
    r = res["linear"]
    assert r.summary["ordering_holds"] is True
    assert r.summary["lemma7_vs_certify_max_rel_diff"] < 1e-3
    for rec in r.per_image:
        assert 0 < rec["L2"] <= rec["vanilla_L1"] * (1 + REL)
        assert rec["vanilla_L1"] <= rec["exact"] * (1 + 1e-6)
        if rec["exact_solved"]:
            # Lemma 8's minimiser is a valid image at exactly the radius
            assert rec["exact_image_min_pixel"] >= -1e-9
            assert rec["exact_witness_w1"] == pytest.approx(rec["exact"], rel=1e-4)
        # the L1 step moves a radius' worth of mass along one edge: a negative pixel
        assert rec["L1_image_min_pixel"] < 0
    ft, l2 = r.tables["ratios"]
    assert ft["median"] >= 1 and l2["median"] >= 1


def test_smoothing_table(quick):
    _, res = quick
    r = res["smoothing"]
    rows = r.tables["comparison"]
    assert any(row["classifier"].startswith("L&F") for row in rows)
    radii = [k for k in rows[0] if k.startswith("r=")]
    for row in rows:
        accs = [row[k] for k in radii]
        assert all(a >= b for a, b in zip(accs, accs[1:], strict=False))  # non-increasing
        assert 0 <= row["median radius"]
    assert r.summary["complete_lower_le_upper"] is True
    for rec in r.per_image:
        assert rec["fc_vanilla"] <= rec["fc_feasible"] * (1 + 1e-6)
        assert rec["fc_feasible"] <= rec["fc_complete"]
        if rec["fc_complete_upper"] < math.inf and rec["fc_feasible"] > 0:
            # certified radii never exceed the W1 of an adversarial image
            assert rec["fc_complete"] <= rec["fc_complete_upper"] * (1 + REL)
            assert rec["fc_complete_bab_lower"] <= rec["fc_complete_upper"] * (1 + REL)
    assert "trained" in json.dumps(r.settings)  # the tiny nets were trained for the test


def test_cli_prints_where_outputs_went(tmp_path, capsys):
    code = cli.main(["reproduce", "linear", "--quick", "--n", "2", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "linear (quick smoke test)" in printed
    assert str(tmp_path / "linear" / "linear.md") in printed
    assert (tmp_path / "linear" / "linear.json").exists()


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="claim"):
        run_claim("fig9", out=tmp_path)
    with pytest.raises(ValueError, match="n:"):
        run_claim("linear", out=tmp_path, n=0)
    assert cli.main(["reproduce", "linear", "--quick", "--n", "0"]) == 2
    assert "--n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "fig9"])
