"""Kill real runs part-way (SIGTERM, SIGINT, SIGKILL) and resume them (issue 7).

A small script runs :func:`flowverify.runner.run_jobs` in a subprocess with a slow work
function, as the CLI does (KeyboardInterrupt -> exit 130).  Each variant is killed once
some records are on disk; the JSONL must then be valid (every complete line parses, no
index twice, no orphan worker left running), and resuming must give every index exactly
once, in input order, with the records of an uninterrupted run.

The same holds for the real ``flowverify certify`` and ``flowverify attack`` commands,
killed part-way and re-run with the same command line (witnesses and the
``--save-adversarial`` npz included).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowverify.runner.jobs import run_jobs

N = 60
SCRIPT = """
import functools, logging, os, sys, time

from flowverify.runner.jobs import run_jobs


def slow(batch, *, pidfile, delay):
    with open(pidfile, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    out = []
    for i in batch:
        time.sleep(delay)
        out.append({"index": i, "value": i * i, "label": f"img{i}"})
    return out


def config(n):
    return {"command": "interrupt-test", "n": n}


if __name__ == "__main__":
    out, workers, n, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    work = functools.partial(slow, pidfile=out + ".pids", delay=delay)
    try:
        run_jobs(range(n), work, out=out, config=config(n), workers=workers, progress=False)
    except KeyboardInterrupt:
        print("interrupt-test: interrupted", file=sys.stderr)
        sys.exit(130)
"""

VARIANTS = {
    "SIGTERM": (signal.SIGTERM, 2),
    "SIGINT": (signal.SIGINT, 1),
    "SIGKILL": (signal.SIGKILL, 2),
}


def _complete_lines(path: Path) -> tuple[list[dict], bool]:
    data = path.read_text() if path.exists() else ""
    partial = bool(data) and not data.endswith("\n")
    body = data.rsplit("\n", 1)[0] if partial else data
    return [json.loads(s) for s in body.splitlines()], partial


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc: fall back to kill(0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Start every variant at once, kill each after 5 records, return what was left."""
    tmp = tmp_path_factory.mktemp("interrupt")
    script = tmp / "interrupt_job.py"
    script.write_text(SCRIPT)
    procs = {}
    for name, (_, workers) in VARIANTS.items():
        out = tmp / f"{name}.jsonl"
        cmd = [sys.executable, str(script), str(out), str(workers), str(N), "0.1"]
        procs[name] = (subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), out)
    sent: dict[str, float] = {}
    deadline = time.monotonic() + 90
    while len(sent) < len(procs) and time.monotonic() < deadline:
        for name, (proc, out) in procs.items():
            if name not in sent and len(_complete_lines(out)[0]) >= 5:
                proc.send_signal(VARIANTS[name][0])
                sent[name] = time.monotonic()
        time.sleep(0.02)
    results = {}
    for name, (proc, out) in procs.items():
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang is a failure
            proc.kill()
            _, err = proc.communicate()
        results[name] = {"rc": proc.returncode, "stderr": err, "out": out, "pid": proc.pid}
    spec = importlib.util.spec_from_file_location("interrupt_job", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return results, module, sent


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_run_leaves_valid_jsonl_and_resumes(killed_runs, variant, tmp_path):
    results, module, sent = killed_runs
    assert variant in sent, f"{variant}: the run never recorded 5 images"
    res = results[variant]
    out = res["out"]
    if variant == "SIGKILL":
        assert res["rc"] == -signal.SIGKILL
    else:
        assert res["rc"] == 130, res["stderr"]
        assert "interrupted" in res["stderr"] and "Traceback" not in res["stderr"]
        assert "re-run the same command to resume" in res["stderr"]
    recs, partial = _complete_lines(out)
    idx = [r["index"] for r in recs]
    assert len(set(idx)) == len(idx), "an image recorded twice"
    assert 5 <= len(idx) < N, "killed part-way"
    if variant != "SIGKILL":  # clean interruption: no partial line, input order restored
        assert not partial and idx == sorted(idx)
    assert all(r["value"] == r["index"] ** 2 for r in recs)

    # No worker process outlives the run (SIGKILL included: they watch the main process).
    pids = {int(p) for p in Path(str(out) + ".pids").read_text().split()} - {res["pid"]}
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "orphan worker processes"

    # Resume: every index exactly once, in order, as an uninterrupted run gives.
    work = functools.partial(module.slow, pidfile=str(tmp_path / "pids"), delay=0.0)
    cfg = module.config(N)
    done = run_jobs(range(N), work, out=out, config=cfg, progress=False)
    final, partial = _complete_lines(out)
    assert not partial and final == done
    assert [r["index"] for r in final] == list(range(N))
    calls = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(calls) == N - len(idx), "resume re-ran recorded images"
    fresh = run_jobs(range(N), work, out=tmp_path / "fresh.jsonl", config=cfg, progress=False)
    assert final == fresh


# ------------------------------------------------------------------ the real CLI
# A real `flowverify` run on the bundled `linear` model, killed part-way and re-run with
# the same command: `certify --method complete` (one image per batch, with witnesses) on
# two local workers, killed by SIGTERM; `attack --minimize` (with --save-adversarial)
# serially, killed by SIGINT.

N_CLI = 12


def _flowverify() -> list[str]:
    exe = Path(sys.executable).with_name("flowverify")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flowverify.cli"]


def _cli_argv(variant: str, folder: Path) -> list[str]:
    common = ["--model", "linear", "--indices", f"0:{N_CLI}", "--no-progress"]
    out = str(folder / f"{variant}.jsonl")
    if variant == "SIGTERM":
        return ["certify", *common, "--method", "complete", "--workers", "2", "--out", out,
                "--witness-dir", str(folder / "witnesses")]  # fmt: skip
    return ["attack", *common, "--data", "bundled", "--minimize", "--batch-size", "1",
            "--out", out, "--save-adversarial", str(folder / "adv.npz")]  # fmt: skip


CLI_VARIANTS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@pytest.fixture(scope="module")
def killed_cli_runs(tmp_path_factory):
    """Start both CLI runs, kill each after 3 records, resume them; and serial references."""
    base = tmp_path_factory.mktemp("cli_interrupt")
    procs = {}
    for name in CLI_VARIANTS:
        folder = base / name
        folder.mkdir()
        cmd = [*_flowverify(), *_cli_argv(name, folder)]
        procs[name] = (subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), folder, cmd)
    sent: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while len(sent) < len(procs) and time.monotonic() < deadline:
        for name, (proc, folder, _) in procs.items():
            if name not in sent and proc.poll() is None:
                recs, _ = _complete_lines(folder / f"{name}.jsonl")
                if len(recs) >= 3:
                    proc.send_signal(CLI_VARIANTS[name])
                    sent[name] = len(recs)
        time.sleep(0.02)
    results = {}
    for name, (proc, folder, _) in procs.items():
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang is a failure
            proc.kill()
            _, err = proc.communicate()
        out = folder / f"{name}.jsonl"
        results[name] = {"rc": proc.returncode, "stderr": err, "left": _complete_lines(out)}
        if name == "SIGINT" and (folder / "adv.npz").exists():
            with np.load(folder / "adv.npz") as d:
                results[name]["npz_left"] = d["index"].tolist()
    resumed = {
        name: subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for name, (_, _, cmd) in procs.items()
    }
    for name, proc in resumed.items():
        _, err = proc.communicate(timeout=180)
        results[name].update(resume_rc=proc.returncode, resume_stderr=err)
    # uninterrupted serial references, in this process
    from flowverify.cli.app import main

    for name in CLI_VARIANTS:
        ref = base / f"{name}-ref"
        ref.mkdir()
        argv = _cli_argv(name, ref)
        if name == "SIGTERM":
            argv[argv.index("--workers") + 1] = "1"
        assert main(argv) == 0
        results[name]["ref"] = ref
    return results, procs, sent


def _strip_timing(records, drop=("seconds", "witness_path")):
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CLI_VARIANTS))
def test_killed_cli_run_resumes_to_the_serial_records(killed_cli_runs, variant):
    results, procs, sent = killed_cli_runs
    assert variant in sent, f"{variant}: the run never recorded 3 images"
    res = results[variant]
    folder = procs[variant][1]
    assert res["rc"] == 130, res["stderr"]
    assert "interrupted" in res["stderr"] and "Traceback" not in res["stderr"]
    assert "re-run the same command to resume" in res["stderr"]
    left, partial = res["left"]
    idx = [r["index"] for r in left]
    assert not partial, "a half-written line"
    assert idx == sorted(set(idx)), "input order, each image once"
    assert 3 <= len(idx) < N_CLI, "killed part-way"

    assert res["resume_rc"] == 0, res["resume_stderr"]
    assert "Traceback" not in res["resume_stderr"]
    final, partial = _complete_lines(folder / f"{variant}.jsonl")
    assert not partial
    assert [r["index"] for r in final] == list(range(N_CLI)), "every image exactly once"
    assert final[: len(left)] == left, "recorded images were not re-run"
    ref, _ = _complete_lines(res["ref"] / f"{variant}.jsonl")
    assert _strip_timing(final) == _strip_timing(ref)

    if variant == "SIGTERM":  # every witness, as the serial run wrote them
        mine = sorted(p.name for p in (folder / "witnesses").glob("*.npy"))
        theirs = sorted(p.name for p in (res["ref"] / "witnesses").glob("*.npy"))
        assert mine == theirs and len(mine) == sum("witness_path" in r for r in final) > 0
        for name in mine:
            a = np.load(folder / "witnesses" / name)
            np.testing.assert_array_equal(a, np.load(res["ref"] / "witnesses" / name))
    else:  # the npz followed the interrupted JSONL, then holds every row, in order
        assert res.get("npz_left") == idx
        assert not (folder / "adv.npz.parts").exists()
        with np.load(folder / "adv.npz") as a, np.load(res["ref"] / "adv.npz") as b:
            np.testing.assert_array_equal(a["index"], list(range(N_CLI)))
            for key in ("adversarial", "index", "eps", "success", "w1"):
                np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------- wrapped
# A SIGTERM that arrives while a numba kernel calls back into Python (seen: the runner's
# handler raised KeyboardInterrupt inside numba's constant unpickling during the complete
# certifier's bound propagation) reaches Python code as a SystemError whose cause is the
# KeyboardInterrupt.  It must stop the run, not become the image's "error" record (which a
# resume would keep as a result).


def _wrapped_interrupt(*args, **kwargs):
    try:
        raise KeyboardInterrupt("SIGTERM")
    except KeyboardInterrupt as ki:
        raise SystemError(
            "CPUDispatcher(<function _maximise_dual>) returned a result with an exception set"
        ) from ki


def test_raise_if_interrupted_finds_an_interrupt_in_the_chain():
    from flowverify.core.interrupt import raise_if_interrupted

    with pytest.raises(SystemError) as info:
        _wrapped_interrupt()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        raise_if_interrupted(info.value)
    raise_if_interrupted(ValueError("an ordinary failure"))  # no-op
    a, b = ValueError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle ends the walk
    raise_if_interrupted(a)


def test_wrapped_interrupt_in_certify_stops_it(monkeypatch):
    import flowverify
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model
    from flowverify.verification import exact_driver

    x, y = bundled_digits()
    model = load_model("linear")
    monkeypatch.setattr(exact_driver, "_complete_one", _wrapped_interrupt)
    with pytest.raises(KeyboardInterrupt):
        flowverify.certify(model, x[:1], y[:1], method="complete")

    def plain_failure(*args, **kwargs):
        raise SystemError("not an interrupt")

    monkeypatch.setattr(exact_driver, "_complete_one", plain_failure)
    res = flowverify.certify(model, x[:1], y[:1], method="complete")[0]
    assert res.status.value == "error" and "not an interrupt" in res.message


def test_wrapped_interrupt_in_work_stops_the_run_unrecorded(tmp_path):
    out = tmp_path / "r.jsonl"

    def work(batch):
        if 2 in batch:
            _wrapped_interrupt()
        return [{"index": i, "value": i} for i in batch]

    with pytest.raises(KeyboardInterrupt):
        run_jobs(range(4), work, out=out, config={"t": 1}, progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1]  # image 2 left for a resume, no error record
