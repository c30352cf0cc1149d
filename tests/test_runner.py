"""The execution layer (issue 7): serial, local workers and Ray give identical files;
resume, config checks, overwrite, partial lines, errors and crashed workers."""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest

from flowverify import runner
from flowverify.cli.runner_options import add_runner_args, config_from_args, runner_kwargs
from flowverify.runner import NEUTRAL_CONFIG_KEYS, WorkerCrashedError, config_differences, run_jobs
from flowverify.runner.output import _exclusive

CONFIG = {"method": "toy", "eps": [0.1, 0.2], "seed": 3, "workers": 1}


def toy_work(batch, *, scale=1.0, delay=0.0, fail_on=(), per_image=1):
    """Deterministic per-image records; index-dependent delays shuffle completion order."""
    out = []
    for i in batch:
        if delay:
            time.sleep(delay * (1 + (7 * i) % 3))
        if i in fail_on:
            raise RuntimeError(f"bad image {i}")
        rng = np.random.default_rng(i)  # seeded by the image, not by the run
        for k in range(per_image):
            out.append({"index": i, "k": k, "value": float(rng.random() * scale), "sq": i * i})
    return out


def crash_work(batch, *, crash_on=()):
    """Kill the worker process (as the OOM killer would) on some images, in workers only."""
    for i in batch:
        if i in crash_on and multiprocessing.parent_process() is not None:
            os._exit(9)
    return toy_work(batch)


class Counter:
    """Serial-only work that counts the images it was called with."""

    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        self.seen.extend(batch)
        return toy_work(batch)


def lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


def test_serial_records_order_and_config(tmp_path):
    out = tmp_path / "r.jsonl"
    recs = run_jobs([3, 1, 2, 0], toy_work, out=out, config=CONFIG, progress=False)
    assert [r["index"] for r in recs] == [3, 1, 2, 0]
    assert lines(out) == recs
    assert all(r["config"] == CONFIG for r in recs)
    assert not list(tmp_path.glob(".*"))  # no lock or temporary file left behind


def test_workers_identical_to_serial(tmp_path):
    work = functools.partial(toy_work, delay=0.02, per_image=2)
    idx = [5, 0, 7, 2, 9, 1, 4, 3, 8, 6, 10]
    a = run_jobs(idx, work, out=tmp_path / "a.jsonl", config=CONFIG, progress=False)
    b = run_jobs(
        idx, work, out=tmp_path / "b.jsonl", config=CONFIG, workers=2, batch_size=2, progress=False
    )
    assert a == b
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert [r["index"] for r in a] == [i for i in idx for _ in range(2)]


@pytest.mark.slow
def test_ray_identical_to_serial(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # Ray workers import this module by name: make the tests folder importable for them.
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    idx = [4, 1, 3, 0, 2]
    work = functools.partial(toy_work, delay=0.01, fail_on=(3,))
    a = run_jobs(idx, work, out=tmp_path / "a.jsonl", config=CONFIG, progress=False)
    b = run_jobs(
        idx, work, out=tmp_path / "b.jsonl", config=CONFIG, workers=2, backend="ray", progress=False
    )
    assert a == b
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a[2]["status"] == "error" and "bad image 3" in a[2]["error"]


def test_resume_skips_recorded_images(tmp_path):
    out = tmp_path / "r.jsonl"
    first = Counter()
    run_jobs(range(6), first, out=out, config=CONFIG, progress=False)
    assert first.seen == list(range(6))
    second = Counter()
    cfg = {**CONFIG, "workers": 4, "out": "elsewhere", "indices": "0:10"}  # neutral keys
    recs = run_jobs(range(10), second, out=out, config=cfg, progress=False)
    assert second.seen == [6, 7, 8, 9]
    assert [r["index"] for r in recs] == list(range(10))
    assert lines(out) == recs
    third = Counter()
    assert run_jobs(range(10), third, out=out, config=CONFIG, progress=False) == recs
    assert third.seen == []


def test_resume_keeps_earlier_images_not_asked_for(tmp_path):
    out = tmp_path / "r.jsonl"
    run_jobs([0, 1, 2], toy_work, out=out, config=CONFIG, progress=False)
    recs = run_jobs([2, 3], toy_work, out=out, config=CONFIG, progress=False)
    assert [r["index"] for r in recs] == [0, 1, 2, 3]


def test_config_mismatch_refused_naming_keys(tmp_path):
    out = tmp_path / "r.jsonl"
    run_jobs(range(3), toy_work, out=out, config=CONFIG, progress=False)
    before = out.read_bytes()
    other = {**CONFIG, "eps": [0.3], "seed": 4, "extra": True}
    with pytest.raises(ValueError, match="^out: ") as info:
        run_jobs(range(5), toy_work, out=out, config=other, progress=False)
    msg = str(info.value)
    assert "eps" in msg and "seed" in msg and "extra" in msg and "overwrite=True" in msg
    assert "method" not in msg.split("differing keys:")[1].split(";")[0]
    assert out.read_bytes() == before
    assert config_differences(CONFIG, other) == ["eps", "extra", "seed"]
    assert config_differences({"eps": (0.1, 0.2)}, {"eps": [0.1, 0.2]}) == []  # as JSON
    assert {"workers", "backend", "address", "resume", "overwrite", "out"} <= NEUTRAL_CONFIG_KEYS


def test_overwrite_and_no_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    run_jobs(range(4), toy_work, out=out, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="^out: .*exists"):
        run_jobs(range(2), toy_work, out=out, config=CONFIG, resume=False, progress=False)
    other = {**CONFIG, "eps": [0.5]}
    recs = run_jobs(range(2), toy_work, out=out, config=other, overwrite=True, progress=False)
    assert [r["index"] for r in recs] == [0, 1]
    assert all(r["config"]["eps"] == [0.5] for r in lines(out))


def test_trailing_partial_line_dropped_and_rerun(tmp_path):
    out = tmp_path / "r.jsonl"
    full = run_jobs(range(4), toy_work, out=out, config=CONFIG, progress=False)
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][: len(text[2]) // 2])  # killed mid-write
    counter = Counter()
    recs = run_jobs(range(4), counter, out=out, config=CONFIG, progress=False)
    assert counter.seen == [2, 3]
    assert recs == full and lines(out) == full


def test_corrupt_line_in_the_middle_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    run_jobs(range(3), toy_work, out=out, config=CONFIG, progress=False)
    text = out.read_text().splitlines(keepends=True)
    out.write_text(text[0] + "{not json\n" + "".join(text[1:]))
    with pytest.raises(ValueError, match="^out: line 2"):
        run_jobs(range(3), toy_work, out=out, config=CONFIG, progress=False)
    out.write_text('{"no_index": 1, "config": {}}\n')
    with pytest.raises(ValueError, match="^out: .*index"):
        run_jobs(range(3), toy_work, out=out, config=CONFIG, progress=False)
    out.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="^out: .*config"):
        run_jobs(range(3), toy_work, out=out, config=CONFIG, progress=False)


def bad_work(batch):
    out = []
    for i in batch:
        if i == 1:
            out.append({"index": i, "value": object()})  # not JSON-serialisable
        elif i == 2:
            pass  # no record
        elif i == 3:
            out.append({"index": 99})  # not in the batch
        else:
            out.append({"index": i, "value": float("nan")})  # nan -> "nan" (strict JSON)
    return out


@pytest.mark.parametrize("batch_size", [1, 2])
def test_exception_in_work_gives_error_records(tmp_path, batch_size):
    out = tmp_path / "r.jsonl"
    work = functools.partial(toy_work, fail_on=(2,))
    recs = run_jobs(range(5), work, out=out, config=CONFIG, batch_size=batch_size, progress=False)
    assert [r["index"] for r in recs] == list(range(5))
    errors = [r["index"] for r in recs if r.get("status") == "error"]
    assert errors == ([2] if batch_size == 1 else [2, 3])  # the batch of the failing image
    assert recs[2]["error"] == "RuntimeError: bad image 2"
    assert recs[2]["config"] == CONFIG
    recs = run_jobs(range(5), bad_work, out=tmp_path / "b.jsonl", config=CONFIG, progress=False)
    status = [r.get("status") for r in recs]
    assert status == [None, "error", "error", "error", None]
    assert "JSON" in recs[1]["error"] or "serializable" in recs[1]["error"]
    assert "no record" in recs[2]["error"] and "99" in recs[3]["error"]
    assert recs[0]["value"] == "nan"


def test_keyboard_interrupt_leaves_valid_ordered_file(tmp_path):
    out = tmp_path / "r.jsonl"

    def interrupted(batch):
        if 4 in batch:
            raise KeyboardInterrupt
        return toy_work(batch)

    with pytest.raises(KeyboardInterrupt):
        run_jobs([5, 0, 3, 4, 1, 2], interrupted, out=out, config=CONFIG, progress=False)
    assert [r["index"] for r in lines(out)] == [5, 0, 3]
    recs = run_jobs([5, 0, 3, 4, 1, 2], toy_work, out=out, config=CONFIG, progress=False)
    assert [r["index"] for r in recs] == [5, 0, 3, 4, 1, 2]


def test_crashed_worker_leaves_its_images_unrecorded(tmp_path):
    out = tmp_path / "r.jsonl"
    work = functools.partial(crash_work, crash_on=(3,))
    with pytest.raises(WorkerCrashedError, match="re-run") as info:
        run_jobs(range(8), work, out=out, config=CONFIG, workers=2, progress=False)
    assert info.value.indices == [3]  # the culprit, found by re-running the suspects alone
    assert [r["index"] for r in lines(out)] == [0, 1, 2, 4, 5, 6, 7]
    counter = Counter()
    recs = run_jobs(range(8), counter, out=out, config=CONFIG, progress=False)
    assert counter.seen == [3]
    assert recs == run_jobs(range(8), toy_work, out=tmp_path / "s.jsonl", config=CONFIG)


def test_concurrent_run_on_same_file_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    with _exclusive(out):
        with pytest.raises(ValueError, match="^out: .*another running process"):
            run_jobs(range(2), toy_work, out=out, config=CONFIG, progress=False)
    assert not out.exists()


def test_repeated_indices_run_once(tmp_path):
    counter = Counter()
    recs = run_jobs([1, 1, 0, 1], counter, out=tmp_path / "r.jsonl", config=CONFIG)
    assert counter.seen == [1, 0] and [r["index"] for r in recs] == [1, 0]


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"workers": -1}, ValueError, "workers"),
        ({"workers": 1.5}, TypeError, "workers"),
        ({"backend": "dask"}, ValueError, "backend"),
        ({"address": "auto"}, ValueError, "address"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"config": {"f": object()}}, ValueError, "config"),
        ({"config": [1, 2]}, TypeError, "config"),
        ({"indices": ["a"]}, TypeError, "indices"),
        ({"indices": 5}, TypeError, "indices"),
        ({"work": None}, TypeError, "work"),
        ({"work": lambda b: [], "workers": 2}, TypeError, "work"),
        ({"out": None}, TypeError, "out"),
    ],
)
def test_bad_arguments_named(tmp_path, kwargs, exc, name):
    args = {"indices": [0, 1], "work": toy_work, "out": tmp_path / "r.jsonl", "config": CONFIG}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        run_jobs(args.pop("indices"), args.pop("work"), progress=False, **args)


def test_out_is_a_folder_or_below_a_file(tmp_path):
    with pytest.raises(ValueError, match="^out: .*folder"):
        run_jobs([0], toy_work, out=tmp_path, config=CONFIG, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="^out: cannot create the folder"):
        run_jobs([0], toy_work, out=tmp_path / "file" / "r.jsonl", config=CONFIG)


def test_add_runner_args_and_kwargs():
    parser = add_runner_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert runner_kwargs(args) == {
        "workers": 1,
        "backend": "local",
        "address": None,
        "resume": True,
        "overwrite": False,
    }
    args = parser.parse_args(
        ["--workers", "4", "--backend", "ray", "--address", "auto", "--no-resume", "--overwrite"]
    )
    assert runner_kwargs(args) == {
        "workers": 4,
        "backend": "ray",
        "address": "auto",
        "resume": False,
        "overwrite": True,
    }
    args.func = print
    cfg = config_from_args(args)
    assert "func" not in cfg and cfg["workers"] == 4


def test_work_and_records_pickle_across_processes():
    work = functools.partial(toy_work, scale=2.0)
    assert pickle.loads(pickle.dumps(work))([1]) == work([1])


def batch_work(batch, *, attach=False, stop_at=None):
    """Records that show their batch; optional attachments; KeyboardInterrupt on a batch."""
    if stop_at is not None and stop_at in batch:
        raise KeyboardInterrupt
    out = []
    for i in batch:
        for k in range(2):
            rec = {"index": i, "k": k, "batch": list(batch)}
            if attach:
                rec[runner.ATTACH_KEY] = np.full(3, 10 * i + k) if k == 0 else None
            out.append(rec)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_attachments_saved_before_their_records(tmp_path, workers):
    out = tmp_path / "r.jsonl"
    seen = {}

    def save(index, payloads):
        written = [r["index"] for r in lines(out)] if out.exists() else []
        assert index not in written, "the attachment must be saved before the record"
        seen[index] = payloads

    work = functools.partial(batch_work, attach=True)
    recs = run_jobs(
        range(5), work, out=out, config=CONFIG, workers=workers, batch_size=2, on_attachment=save
    )
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for i, payloads in seen.items():
        assert len(payloads) == 2 and payloads[1] is None  # aligned with the records
        np.testing.assert_array_equal(payloads[0], [10 * i] * 3)
    assert all(runner.ATTACH_KEY not in r for r in recs)
    assert "__attachment__" not in out.read_text()


def test_batches_fixed_across_interruption_and_resume(tmp_path):
    """An interrupted run resumes with the batches of the uninterrupted run."""
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_jobs(range(8), functools.partial(batch_work, stop_at=4), out=out, config=CONFIG,
                 batch_size=3)  # fmt: skip
    assert [r["index"] for r in lines(out)] == [0, 0, 1, 1, 2, 2]
    recs = run_jobs(range(8), batch_work, out=out, config=CONFIG, batch_size=3, workers=2)
    full = run_jobs(range(8), batch_work, out=tmp_path / "f.jsonl", config=CONFIG, batch_size=3)
    assert recs == full
    assert [r["batch"] for r in recs[::2]] == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[6, 7]] * 2


def test_scattered_records_of_an_image_are_gathered_not_dropped(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = [{"index": i, "eps": e, "config": CONFIG} for e in (0.1, 0.2) for i in (0, 1)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))  # budget-major, as before
    counter = Counter()
    recs = run_jobs(range(3), counter, out=out, config=CONFIG, progress=False)
    assert counter.seen == [2]
    assert [(r["index"], r.get("eps")) for r in recs[:4]] == [
        (0, 0.1),
        (0, 0.2),
        (1, 0.1),
        (1, 0.2),
    ]
    assert lines(out) == recs and len(recs) == 5


def test_existing_records(tmp_path):
    out = tmp_path / "r.jsonl"
    assert runner.existing_records(out, CONFIG) == []
    recs = run_jobs(range(3), toy_work, out=out, config=CONFIG, progress=False)
    assert runner.existing_records(out, {**CONFIG, "workers": 3}) == recs
    assert runner.existing_records(out, {**CONFIG, "seed": 9}, overwrite=True) == []
    with pytest.raises(ValueError, match="^out: .*seed"):
        runner.existing_records(out, {**CONFIG, "seed": 9})
    with pytest.raises(ValueError, match="^out: .*exists"):
        runner.existing_records(out, CONFIG, resume=False)


def test_run_that_cannot_start_leaves_no_output(tmp_path):
    out = tmp_path / "r.jsonl"
    with pytest.raises(TypeError, match="work"):
        run_jobs(range(4), lambda b: [], out=out, config=CONFIG, workers=2)
    assert not out.exists() and not list(tmp_path.iterdir())
    run_jobs(range(2), toy_work, out=out, config=CONFIG)
    before = out.read_bytes()
    with pytest.raises(TypeError, match="work"):  # --overwrite: the old file is kept
        run_jobs(range(4), lambda b: [], out=out, config=CONFIG, workers=2, overwrite=True)
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- the CLIs
# The real `flowverify certify` / `attack` on a few digits of the bundled `linear` model:
# local workers and Ray give the serial run's records; resume, refusal, --overwrite.


def certify_argv(eps="0.5", indices="0:4"):
    return ["certify", "--model", "linear", "--method", "feasible", "--eps", eps,
            "--indices", indices, "--batch-size", "1", "--no-progress"]  # fmt: skip


CERTIFY = certify_argv()


def _cli(argv, capsys=None):
    from flowverify.cli.app import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def _strip(records, drop=("seconds",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def _witnesses(folder):
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


@pytest.fixture(scope="module")
def serial_certify(tmp_path_factory):
    """The serial `flowverify certify` run every execution backend must reproduce."""
    tmp = tmp_path_factory.mktemp("serial")
    out, wit = tmp / "serial.jsonl", tmp / "wit"
    code, _ = _cli([*CERTIFY, "--out", out, "--witness-dir", wit])
    assert code == 0
    recs = lines(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert any(r["status"] == "falsified" for r in recs)  # witnesses are exercised
    return recs, _witnesses(wit)


def _check_same_as_serial(serial, out, wit):
    recs, witnesses = serial
    got = lines(out)
    assert [r["index"] for r in got] == [0, 1, 2, 3]  # input order restored
    drop = ("seconds", "witness_path")
    assert _strip(got, drop) == _strip(recs, drop)
    assert [os.path.basename(r.get("witness_path", "")) for r in got] == [
        os.path.basename(r.get("witness_path", "")) for r in recs
    ]
    mine = _witnesses(wit)
    assert mine.keys() == witnesses.keys() and mine
    for name, arr in witnesses.items():
        np.testing.assert_array_equal(mine[name], arr)


def test_cli_certify_two_workers_identical_to_serial(serial_certify, tmp_path):
    out, wit = tmp_path / "w2.jsonl", tmp_path / "wit"
    code, _ = _cli([*CERTIFY, "--out", out, "--witness-dir", wit, "--workers", "2"])
    assert code == 0
    _check_same_as_serial(serial_certify, out, wit)


@pytest.mark.slow
def test_cli_certify_ray_identical_to_serial(serial_certify, tmp_path):
    pytest.importorskip("ray")
    out, wit = tmp_path / "ray.jsonl", tmp_path / "wit"
    argv = [*CERTIFY, "--out", out, "--witness-dir", wit, "--backend", "ray", "--workers", "2"]
    code, _ = _cli(argv)  # a local Ray instance on loopback, shut down afterwards
    assert code == 0
    _check_same_as_serial(serial_certify, out, wit)


def test_cli_certify_resume_refusal_and_overwrite(serial_certify, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    first = certify_argv(indices="0:2")
    assert _cli([*first, "--out", out], capsys)[0] == 0
    before = out.read_bytes()
    # the same command again: nothing to do, the file is unchanged
    assert _cli([*first, "--out", out], capsys)[0] == 0
    assert out.read_bytes() == before
    # more images: only the new ones run; the result is the serial run's
    assert _cli([*CERTIFY, "--out", out], capsys)[0] == 0
    drop = ("seconds", "config", "witness_path")
    assert _strip(lines(out), drop) == _strip(serial_certify[0], drop)
    kept = out.read_bytes()
    # another config: refused on one line naming --out and the key, file untouched
    code, err = _cli([*certify_argv(eps="0.25"), "--out", out], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "--out" in err and "eps" in err and "--overwrite" in err
    assert out.read_bytes() == kept
    code, err = _cli([*CERTIFY, "--out", out, "--no-resume"], capsys)
    assert code == 2 and "--out" in err and out.read_bytes() == kept
    # --overwrite starts afresh with the new config
    code, _ = _cli([*certify_argv(eps="0.25"), "--out", out, "--overwrite"], capsys)
    assert code == 0
    recs = lines(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert all(r["config"]["eps"] == 0.25 and r["eps"] == 0.25 for r in recs)


ATTACK = ["attack", "--model", "linear", "--data", "bundled", "--eps", "0.05,0.2"]
ATTACK += ["--steps", "10", "--restarts", "1", "--batch-size", "2", "--no-progress"]


def test_cli_attack_resume_keeps_every_npz_row(tmp_path, capsys):
    """A resumed attack (and one on two workers) gives the serial records and npz."""
    full, npz_full = tmp_path / "full.jsonl", tmp_path / "full.npz"
    assert (
        _cli([*ATTACK, "--indices", "0:6", "--out", full, "--save-adversarial", npz_full])[0] == 0
    )
    out, npz = tmp_path / "r.jsonl", tmp_path / "r.npz"
    assert _cli([*ATTACK, "--indices", "0:2", "--out", out, "--save-adversarial", npz])[0] == 0
    assert not (tmp_path / "r.npz.parts").exists()  # the npz holds them all
    argv = [*ATTACK, "--indices", "0:6", "--out", out, "--save-adversarial", npz]
    assert _cli([*argv, "--workers", "2"])[0] == 0
    recs = lines(out)
    assert [(r["index"], r["eps"]) for r in recs] == [(i, e) for i in range(6) for e in (0.05, 0.2)]
    drop = ("seconds", "config")
    assert _strip(recs, drop) == _strip(lines(full), drop)
    with np.load(npz) as a, np.load(npz_full) as b:
        assert a["adversarial"].shape == (12, 1, 28, 28)
        for key in ("adversarial", "index", "eps", "success", "w1"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a["index"], [r["index"] for r in recs])
    capsys.readouterr()
    # the npz lost: resuming would leave rows without images, so it is refused
    npz.unlink()
    code, err = _cli(argv, capsys)
    assert code == 2 and "--save-adversarial" in err and "--overwrite" in err
    assert not npz.exists()
    assert _cli([*argv, "--overwrite"], capsys)[0] == 0
    with np.load(npz) as a, np.load(npz_full) as b:
        np.testing.assert_array_equal(a["adversarial"], b["adversarial"])
