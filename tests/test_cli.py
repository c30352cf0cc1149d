"""The command line: demo, distance, --help and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from flowverify.cli.app import main


def _write_png(path, img: np.ndarray) -> None:
    """A minimal 8-bit grayscale PNG writer (no dependency)."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[i].astype(np.uint8).tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def test_demo_runs_and_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "demo.jsonl"
    assert main(["-v", "demo", "--n", "3", "--fast", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header == ["digit", "label", "pred", "W1(R,x)", "|flow|_1", "roundtrip", "vanilla"] + [
        "certified"
    ]
    assert "normalised" in table and "How to read this" in table and "reference" in table
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert rec["roundtrip_ok"] is True
        assert abs(rec["w1_uniform"] - rec["flow_l1"]) <= 1e-9
        assert {"index", "label", "prediction"} <= rec.keys()
        assert 0 < rec["radius_vanilla"] <= rec["radius_feasible"]


def test_demo_brackets_the_exact_radius(tmp_path, capsys):
    """Default columns: certified <= exact (or the bracket [proven, found]) <= adversarial,
    and the paper's quantities only behind --verbose."""
    out = tmp_path / "demo.jsonl"
    assert main(["demo", "--n", "2", "--complete-timeout", "0.5", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["digit", "label", "pred", "certified", "exact", "adversarial"]
    assert "W1(R,x)" not in "\n".join(lines)
    records = [json.loads(r) for r in out.read_text().splitlines()]
    for rec, line in zip(records, lines[1:3], strict=True):
        lo, hi = rec["radius_complete"], rec["adversarial_w1"]
        assert 0 < rec["radius_feasible"] <= lo <= hi
        shown = f"{lo:.4f}" if rec["complete_exact"] else f"[{lo:.4f}, {hi:.4f}]"
        assert shown in line


def test_distance_npz_and_png(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = (rng.random((6, 6)) * 255).astype(np.uint8)
    b = a[::-1].copy()
    np.savez(tmp_path / "a.npz", x=a[None])
    _write_png(tmp_path / "b.png", b)
    assert main(["distance", str(tmp_path / "a.npz"), str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    import flowverify as fv

    expected = float(fv.w1_distance(a.astype(float) / 255, b.astype(float) / 255))
    norm = float(out.split("W1 normalised:")[1].split()[0])
    assert abs(norm - expected) <= 1e-8
    assert "W1 raw:" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["distance", "missing.npz", "missing2.npz"], "missing.npz"),
        (["demo", "--n", "0"], "--n: expected a positive number"),
        (["demo", "--model", "resnet"], "resnet"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_distance_rejects_negative_and_nan_pixels(tmp_path, capsys):
    good = np.ones((1, 4, 4))
    np.savez(tmp_path / "good.npz", x=good)
    for name, bad in (("neg", -good), ("nan", np.full((1, 4, 4), np.nan))):
        np.savez(tmp_path / f"{name}.npz", x=bad)
        assert main(["distance", str(tmp_path / "good.npz"), str(tmp_path / f"{name}.npz")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distance"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_help_explains_units(capsys):
    for cmd in (["--help"], ["demo", "--help"], ["distance", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0
        assert "normalised" in capsys.readouterr().out


def test_console_script_installed():
    exe = shutil.which("flowverify")
    cmd = [exe] if exe else [sys.executable, "-m", "flowverify.cli"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "flowverify" in proc.stdout
