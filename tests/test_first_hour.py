"""A new user's first hour (issue 15): ONNX from the base install, bad inputs refused up
front, witnesses of unknown results, the references choice, report and CLI details."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import flowverify as fv
from flowverify.cli.app import main
from flowverify.io.bundled import bundled_digits
from flowverify.model.layers import Elementwise
from flowverify.model.loading import load_model

MEAN, STD = 0.1307, 0.3081


def _conv_net() -> nn.Sequential:
    """(x - mean) / std, conv 4@5x5/2, ReLU, flatten, linear 576-10 (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        Elementwise("sub", torch.tensor(MEAN)),
        Elementwise("div", torch.tensor(STD)),
        nn.Conv2d(1, 4, 5, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 12 * 12, 10),
    ).eval()


def _write_onnx(net: nn.Sequential, path, *, extra_op: str | None = None) -> None:
    """``net`` (from :func:`_conv_net`) as ONNX: Sub, Div, Conv, Relu, Flatten, Gemm;
    ``extra_op`` appends an operator of that type to the logits."""
    conv, lin = net[2], net[5]
    arrays = {
        "mean": np.float32(MEAN),
        "std": np.float32(STD),
        "cw": conv.weight.detach().numpy(),
        "cb": conv.bias.detach().numpy(),
        "lw": lin.weight.detach().numpy(),
        "lb": lin.bias.detach().numpy(),
    }
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items()]
    last = "output" if extra_op is None else "logits"
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["a"]),
        helper.make_node("Div", ["a", "std"], ["b"]),
        helper.make_node("Conv", ["b", "cw", "cb"], ["c"], kernel_shape=[5, 5], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Flatten", ["d"], ["e"], axis=1),
        helper.make_node("Gemm", ["e", "lw", "lb"], [last], transB=1),
    ]
    if extra_op is not None:
        nodes.append(helper.make_node(extra_op, [last], ["output"]))
    graph = helper.make_graph(
        nodes,
        "conv-net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _records(path) -> list[dict]:
    recs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    return [r for r in recs if "index" in r]


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------- item 2: ONNX


def test_cli_certifies_and_attacks_an_onnx_conv_net_with_normalisation(tmp_path):
    net = _conv_net()
    path = tmp_path / "conv.onnx"
    _write_onnx(net, path)
    x, _ = bundled_digits()
    data = tmp_path / "x.npz"
    np.savez(data, x=x[:3])  # no labels: the model's predictions are certified
    common = ["--model", str(path), "--data", str(data), "--no-progress"]
    cert = tmp_path / "cert.jsonl"
    assert main(["certify", *common, "--method", "vanilla", "--out", str(cert)]) == 0
    atk = tmp_path / "atk.jsonl"
    assert main(["attack", *common, "--minimize", "--out", str(atk)]) == 0
    recs, adv = _records(cert), _records(atk)
    assert [r["index"] for r in recs] == [0, 1, 2]
    ref = fv.certify(net, x[:3], method="vanilla")
    for r, f, a in zip(recs, ref, adv, strict=True):
        assert r["status"] == "certified" and r["radius"] > 0
        assert r["radius"] == pytest.approx(f.radius, rel=5e-3)  # the same function
        if a["success"]:
            assert a["w1"] >= r["radius"] * (1 - 1e-6)  # certified <= attack


def test_cli_certifies_the_vnn_comp_onnx_network(tmp_path, outside_onnx):
    out = tmp_path / "vnn.jsonl"
    argv = ["certify", "--model", str(outside_onnx), "--indices", "0:2", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    recs = _records(out)
    assert len(recs) == 2 and all(r["status"] == "certified" for r in recs)


@pytest.mark.parametrize("command", [["certify"], ["attack", "--eps", "0.3"]])
def test_unsupported_onnx_op_is_one_line_exit_2(tmp_path, capsys, monkeypatch, command):
    import sys

    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # the base install lacks it
    path = tmp_path / "soft.onnx"
    _write_onnx(_conv_net(), path, extra_op="Softmax")
    out = tmp_path / "o.jsonl"
    argv = [*command, "--model", str(path), "--indices", "0:2", "--out", str(out)]
    assert main(argv) == 2
    _one_error_line(capsys, "--model", "Softmax")
    assert not out.exists()


def test_onnx_and_matplotlib_are_base_dependencies():
    """The README's first command installs them (no extra pulls torchvision)."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"])
    assert "onnx>=" in deps and "matplotlib>=" in deps
    for name, extra in meta["project"]["optional-dependencies"].items():
        for req in extra:
            assert not req.startswith(("onnx2torch", "torchvision")), (name, req)


# --------------------------------------------------------------- item 5: bad inputs


def _bad_data(tmp_path, kind: str):
    x, y = bundled_digits()
    if kind == "channel-last":
        x = x[:4].transpose(0, 2, 3, 1)
    else:
        x = x[:4].copy()
        x[1] = 0.0
    path = tmp_path / f"{kind}.npz"
    np.savez(path, x=x, y=y[:4])
    return path


@pytest.mark.parametrize("kind", ["channel-last", "all-zero"])
@pytest.mark.parametrize(
    "command", [["certify"], ["certify", "--method", "complete"], ["attack", "--eps", "0.3"]]
)
def test_bad_images_are_refused_up_front(tmp_path, capsys, kind, command):
    data = _bad_data(tmp_path, kind)
    out = tmp_path / "o.jsonl"
    assert main([*command, "--model", "fc", "--data", str(data), "--out", str(out)]) == 2
    needle = "channel-last" if kind == "channel-last" else "image 1 is all zero"
    _one_error_line(capsys, "--data", needle)
    assert not out.exists()


def test_api_refuses_bad_images_naming_them():
    x, y = bundled_digits()
    model = load_model("fc")
    with pytest.raises(ValueError, match=r"images: .*channel-last"):
        fv.certify(model, x[:2].transpose(0, 2, 3, 1), y[:2])
    z = x[:3].copy()
    z[2] = 0.0
    with pytest.raises(ValueError, match=r"images: .*position 2"):
        fv.certify(model, z, y[:3])
    with pytest.raises(ValueError, match="images"):
        fv.attack(model, x[:2].transpose(0, 2, 3, 1), y[:2], eps=0.3)
    with pytest.raises(ValueError, match="images"):
        fv.attack(model, z, y[:3], eps=0.3)


def test_unsupported_layer_is_refused_once_up_front(tmp_path, capsys):
    from flowverify.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(676, 10)
    )
    path = tmp_path / "pool.pt"
    save_checkpoint(net, path)
    out = tmp_path / "o.jsonl"
    # the per-node-LP search needs a Linear/Conv2d/ReLU chain (beta-crown takes MaxPool2d)
    argv = ["certify", "--model", str(path), "--method", "complete", "--certifier", "bab"]
    argv += ["--out", str(out)]
    assert main([*argv, "--indices", "0:3", "--no-progress"]) == 2
    _one_error_line(capsys, "MaxPool2d")
    assert not out.exists()
    with pytest.raises(ValueError, match="MaxPool2d"):
        fv.certify(net, bundled_digits()[0][:1], method="complete", certifier="bab")


# ----------------------------------------------------------------- item 8: references


def test_several_references_are_computed_once_and_said_so(tmp_path, capsys):
    runs = {}
    for refs in ("uniform", "random:2,point:2,data:2"):
        out = tmp_path / f"{len(refs)}.jsonl"
        argv = ["certify", "--model", "fc", "--indices", "0:3", "--references", refs]
        assert main([*argv, "--no-progress", "--out", str(out)]) == 0
        runs[refs] = (_records(out), capsys.readouterr().err)
    (one, err1), (six, err6) = runs.values()
    assert "note: --references" not in err1
    note = [ln for ln in err6.splitlines() if ln.startswith("note: --references")]
    assert len(note) == 1 and "computed once" in note[0] and "6 references" in note[0]
    assert "UserWarning" not in err6  # stated once, in the summary
    for a, b in zip(one, six, strict=True):
        assert a["radius"] == b["radius"]
        assert len(b["per_reference"]) == 6 and set(b["per_reference"].values()) == {a["radius"]}


@pytest.mark.parametrize(("method", "certifier"), [("feasible", "lp"), ("complete", "bab")])
def test_api_warns_once_that_references_change_nothing(method, certifier):
    x, y = bundled_digits()
    model = load_model("linear")  # fast for the LP and the complete search
    kw = {"timeout": 2} if method == "complete" else {}
    with pytest.warns(UserWarning, match="references: ") as rec:
        res = fv.certify(
            model, x[:2], y[:2], method=method, certifier=certifier,
            references="random:1,point:1", **kw,
        )  # fmt: skip
    assert len([w for w in rec if "references: " in str(w.message)]) == 1
    assert rec[0].filename == __file__  # points at the caller
    if method == "feasible":
        for r in res:
            assert len(set(r.per_reference.values())) == 1
            base = fv.certify(model, x[r.index : r.index + 1], y[r.index : r.index + 1],
                              method=method, certifier=certifier)[0]  # fmt: skip
            assert r.radius == pytest.approx(base.radius, rel=1e-9)


# ------------------------------------------------------ item 9: witness of unknown


def test_unknown_complete_result_writes_the_closest_found_witness(tmp_path):
    from flowverify.transport.flows import w1_distance

    out, wdir = tmp_path / "exact.jsonl", tmp_path / "w"
    argv = ["certify", "--model", "fc", "--indices", "0:2", "--method", "complete"]
    argv += ["--timeout", "0.5", "--witness-dir", str(wdir), "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    recs = _records(out)
    unknown = [r for r in recs if r["status"] == "unknown"]
    assert unknown, "expected the 0.5 s limit to stop the complete search"
    x, y = bundled_digits()
    model = load_model("fc")
    for r in unknown:
        assert r["witness_kind"] == "closest-found" and r["exact"] is False
        img = np.load(r["witness_path"])
        assert img.shape == x[0].shape
        with torch.no_grad():
            pred = int(model(torch.as_tensor(img[None], dtype=torch.float32)).argmax())
        assert pred != r["label"]  # a real adversarial image ...
        w1 = float(w1_distance(img, x[r["index"]].astype(np.float64), unit="normalised"))
        assert w1 == pytest.approx(r["upper"], rel=1e-6)  # ... at the reported upper bound
        assert r["radius"] <= w1


# ------------------------------------------------------------- items 3, 11: report


def _write_jsonl(path, recs) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _cert_rec(index, radius, status="certified"):
    return {
        "index": index,
        "label": 1,
        "prediction": 1,
        "method": "vanilla",
        "certifier": "crown",
        "status": status,
        "radius": radius,
        "exact": False,
        "seconds": 0.1,
    }


def _atk_rec(index, eps, w1, mode):
    return {
        "index": index,
        "label": 1,
        "prediction": 1,
        "eps": eps,
        "success": True,
        "w1_bound": eps,
        "w1": w1,
        "prediction_adversarial": 7,
        "seconds": 0.2,
        "mode": mode,
    }


def test_report_missing_file_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    line = _one_error_line(capsys, "FILE", "nope.jsonl", "does not exist")
    assert "matplotlib" not in line
    assert not out.exists()


def test_report_tables_minimal_attacks_apart_and_one_certified_column(tmp_path):
    cert, atk = tmp_path / "cert.jsonl", tmp_path / "atk.jsonl"
    _write_jsonl(cert, [_cert_rec(4711, 0.05), _cert_rec(17, 0.02), _cert_rec(5, 0.0, "unknown")])
    mini = [_atk_rec(4711, 0.31, 0.3, "minimal"), _atk_rec(17, 0.53, 0.5, "minimal")]
    _write_jsonl(atk, [*mini, _atk_rec(5, 0.2, 0.19, "fixed")])
    out = tmp_path / "rep"
    assert main(["report", str(cert), str(atk), "--out", str(out), "--format", "svg"]) == 0
    md = (out / "summary.md").read_text()
    cert_header = next(ln for ln in md.splitlines() if ln.startswith("| source [method]"))
    cells = [c.strip() for c in cert_header.strip("|").split("|")]
    assert len(cells) == len(set(cells)), cells  # no two columns with one name
    assert "certified fraction" in cells
    # the fixed-budget record gets its eps column; the --minimize radii do not
    eps_header = next(ln for ln in md.splitlines() if ln.startswith("| source | eps="))
    assert "eps=0.2" in eps_header and "0.31" not in eps_header and "0.53" not in eps_header
    assert "| found / attacked | median W1 found |" in md
    assert "| 2/2 | 0.4 |" in md
    # the sandwich plot's ticks are the digits' indices, not their sorted positions
    svg = (out / "sandwich.svg").read_text()
    assert ">4711<" in svg and ">17<" in svg


def test_sandwich_ticks_are_indices():
    from flowverify.report.plots import sandwich_ticks

    assert sandwich_ticks([9, 3, 120]) == ([0, 1, 2], ["9", "3", "120"])
    pos, labels = sandwich_ticks(list(range(1000, 1100)), max_ticks=5)
    assert pos == [0, 25, 50, 74, 99] and labels == ["1000", "1025", "1050", "1074", "1099"]
    assert sandwich_ticks([]) == ([], [])


# --------------------------------------------------------- item 6: reproduce's data


def test_find_data_order(tmp_path, monkeypatch):
    from flowverify.paper import common as rp

    monkeypatch.setattr(rp, "_REPO", tmp_path / "site-packages")  # an installed copy
    monkeypatch.delenv(rp.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    path, looked = rp.find_data()
    assert path is None and "../shared/data/mnist10k.npz" in looked
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist10k.npz").write_bytes(b"x")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # ../shared/data of the current folder
    path, _ = rp.find_data()
    assert path is not None and path.resolve() == tmp_path / "shared/data/mnist10k.npz"
    other = tmp_path / "other.npz"
    other.write_bytes(b"y")
    monkeypatch.setenv(rp.DATA_ENV, str(other))
    assert rp.find_data()[0] == other
    assert rp.find_data(tmp_path / "shared/data/mnist10k.npz")[0].name == "mnist10k.npz"
    monkeypatch.setenv(rp.DATA_ENV, str(tmp_path / "none.npz"))
    with pytest.raises(FileNotFoundError, match=rp.DATA_ENV):
        rp.find_data()


def test_reproduce_without_data_fails_clearly_or_says_it_uses_the_bundled_digits(
    tmp_path, monkeypatch, capsys
):
    from flowverify.paper import common as rp

    monkeypatch.setattr(rp, "_REPO", tmp_path / "site-packages")  # not a checkout
    monkeypatch.delenv(rp.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    assert main(["reproduce", "linear", "--n", "2", "--out", str(out)]) == 2
    _one_error_line(capsys, "--data", "mnist10k.npz not found", rp.DATA_ENV)
    assert not out.exists()
    argv = ["reproduce", "linear", "--quick", "--n", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "data: bundled digits" in capsys.readouterr().out


# ------------------------------------------------------------- item 12: small CLI


def test_appending_an_attack_to_a_certify_file_is_one_short_line(tmp_path, capsys):
    out = tmp_path / "mix.jsonl"
    base = ["--model", "fc", "--indices", "0:2", "--no-progress", "--out", str(out)]
    assert main(["certify", *base]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["attack", "--eps", "0.3", *base]) == 2
    line = _one_error_line(capsys, "--out", "holds certify records, not attack ones")
    assert len(line.replace(str(out), "")) < 200 and "--overwrite" in line
    assert main(["certify", "--method", "feasible", "--seed", "3", "--rtol", "0.01", *base]) == 2
    line = _one_error_line(capsys, "differing keys: method, rtol, seed;")
    assert main(["certify", "--seed", "3", "--rtol", "0.01", "--timeout", "9", *base]) == 2
    line = _one_error_line(capsys, "differing keys: rtol, seed, timeout;")
    assert out.read_bytes() == before


def test_warnings_and_logs_start_their_own_line_under_a_progress_bar(capsys):
    import logging

    from tqdm import tqdm

    from flowverify.cli import app as cli

    def after_last_cr(text: str, needle: str) -> str:
        line = next(ln for ln in text.split("\n") if needle in ln)
        return line.rsplit("\r", 1)[-1]

    bar = tqdm(total=10, desc="certify", file=None, mininterval=0)  # stderr, like the runner
    bar.update(5)
    cli._show_warning(UserWarning("boom"), UserWarning, "/x/y.py", 7)
    handler = cli._TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.emit(logging.LogRecord("flowverify.x", logging.WARNING, "f", 1, "bang", None, None))
    bar.update(5)
    bar.close()
    err = capsys.readouterr().err
    assert after_last_cr(err, "UserWarning: boom").startswith("/x/y.py:7: UserWarning: boom")
    assert after_last_cr(err, "bang").startswith("WARNING flowverify.x: bang")


def test_attack_on_channel_last_images_hints_at_the_layout():
    from flowverify.io import bundled_digits
    from flowverify.model import load_model

    x, y = bundled_digits()
    last = np.ascontiguousarray(x[:2].transpose(0, 2, 3, 1))  # (N, H, W, C)
    try:
        fv.attack(load_model("fc"), last, y[:2], eps=0.1)
    except ValueError as exc:
        assert "channel-last" in str(exc) and "transpose(0, 3, 1, 2)" in str(exc)
    else:
        raise AssertionError("channel-last images were accepted")
