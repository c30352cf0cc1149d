"""Throughput of ``certify`` through the runner: serial, local workers and Ray.

For each method (``feasible`` and ``complete`` by default) the same digits are certified
through :func:`flowverify.runner.run_jobs` with 1 and N local worker processes and on a
local Ray instance with N CPUs; the records of every run are checked to be identical to
the serial run's.  The per-task overhead of each backend is measured with a no-op work
function (wall time per task when there is nothing to compute), and the start-up cost
(time to start the pool or Ray and run one no-op task per worker) separately; each timed
run is preceded by an untimed warm-up run of a few other digits on the same backend.

When :func:`flowverify.certify` is not importable, or with ``--stand-in``, the
methods are replaced by a clearly labelled STAND-IN work function (a fixed amount of
single-threaded CPU work per image), so that the runner itself can still be measured.

Usage::

    python benchmarks/bench_scale.py                       # fc, 12 digits, 1 and 2 workers
    python benchmarks/bench_scale.py --model linear --n 40 --workers 1,2,4 --no-ray
    python benchmarks/bench_scale.py --markdown benchmarks/RESULTS_scale.md
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flowverify.runner.jobs import run_jobs

try:  # imported here, so that the runner's forkserver preloads it for the workers
    from flowverify.api import certify
except ImportError:  # the certifiers are not there yet: the STAND-IN is used
    certify = None

# --------------------------------------------------------------------------- work


@functools.lru_cache(maxsize=4)
def _setup(model: str):
    """Model and bundled digits, loaded once per worker process."""
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model

    x, y = bundled_digits()
    return load_model(model), x, y


def certify_work(batch, *, model: str, method: str, timeout: float):
    """Certify the bundled digits ``batch`` (one record per image)."""
    net, x, y = _setup(model)
    idx = np.asarray(batch, dtype=np.int64)
    res = certify(
        net, x[idx], y[idx], method=method, timeout=timeout, indices=idx, batch_size=len(batch)
    )
    return [r.to_dict() for r in res]


def standin_work(batch, *, seconds: float):
    """STAND-IN for a certifier: ``seconds`` of single-threaded CPU work per image."""
    out = []
    for i in batch:
        a = np.random.default_rng(i).random((64, 64))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a = np.tanh(a @ a.T / 64.0)
        value = float(np.random.default_rng(i).random())  # deterministic, unlike the loop
        out.append({"index": i, "status": "unknown", "stand_in": True, "value": value})
    return out


def noop_work(batch):
    """Nothing to compute: the time between results is the runner's own cost per task."""
    return [{"index": i, "t": time.time()} for i in batch]


# --------------------------------------------------------------------------- timing


def _run(indices, work, *, workers, backend, out, config):
    t0 = time.perf_counter()
    recs = run_jobs(
        indices,
        work,
        out=out,
        config=config,
        workers=workers,
        backend=backend,
        overwrite=True,
        progress=False,
    )
    return time.perf_counter() - t0, recs


TIMING_FIELDS = ("seconds", "config", "solver_status")


def _same(ref: list[dict], recs: list[dict]) -> str:
    """``yes`` if the records equal the serial ones (timings aside); ``yes*`` if they do
    except for the bounds of images that hit the time limit (which depend on speed)."""
    if len(ref) != len(recs):
        return "NO"
    loose = False
    for a, b in zip(ref, recs, strict=True):
        a = {k: v for k, v in a.items() if k not in TIMING_FIELDS}
        b = {k: v for k, v in b.items() if k not in TIMING_FIELDS}
        if a == b:
            continue
        timed_out = "unknown" in (a.get("status"), b.get("status"))
        keys = ("index", "label", "prediction", "status", "method")
        if timed_out and all(a.get(k) == b.get(k) for k in keys):
            loose = True
            continue
        return "NO"
    return "yes*" if loose else "yes"


def _load() -> str:
    try:
        return "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except (AttributeError, OSError):  # pragma: no cover
        return "n/a"


def _backends(workers: list[int], ray_ok: bool) -> list[tuple[str, str, int]]:
    out = [("serial" if w == 1 else f"local x{w}", "local", w) for w in workers]
    if ray_ok:
        out.append((f"ray x{max(workers)}", "ray", max(workers)))
    return out


def measure_overhead(backends, tmp: Path, n_tasks: int) -> dict[str, dict[str, float]]:
    """Start-up (a first no-op task per worker) and the steady cost per task.

    The cost per task is the time between the first and the last of ``n_tasks`` no-op
    results divided by their number: what one task costs the pipeline (submission,
    transfer, one fsync'ed write in the main process) when workers have nothing to do,
    i.e. the bound ``1 / cost`` on the images per second a backend can ever deliver.
    """
    out = {}
    for label, backend, w in backends:
        kw = {"workers": w, "backend": backend, "out": tmp / "o.jsonl", "config": {}}
        t_start, _ = _run(list(range(w)), noop_work, **kw)
        _, recs = _run(range(n_tasks), noop_work, **kw)
        t = sorted(r["t"] for r in recs)
        per_task = (t[-1] - t[0]) / (len(t) - 1)
        out[label] = {"startup_s": t_start, "per_task_ms": 1e3 * per_task}
        logging.info("%s: start-up %.2f s, %.2f ms per task", label, t_start, 1e3 * per_task)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fc")
    p.add_argument("--methods", default="feasible,complete")
    p.add_argument("--n", type=int, default=12, help="digits per run (default 12)")
    p.add_argument("--workers", default="1,2", help="local worker counts (default 1,2)")
    p.add_argument("--timeout", type=float, default=20.0, help="per-image limit (complete)")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--stand-in", action="store_true", help="use the STAND-IN work function")
    p.add_argument("--stand-in-seconds", type=float, default=0.5)
    p.add_argument("--overhead-tasks", type=int, default=500)
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("flowverify.runner").setLevel(logging.WARNING)

    workers = [int(w) for w in args.workers.split(",")]
    try:
        import ray  # noqa: F401

        ray_ok = not args.no_ray
    except ImportError:
        ray_ok = False
    stand_in = args.stand_in
    if not stand_in and certify is None:
        logging.warning("flowverify.verification.certify not importable: using the STAND-IN")
        stand_in = True

    # Work functions are passed by reference to this file as the module `bench_scale`
    # (not `__main__`), so that local and Ray workers import them (and their lru_cache).
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    import bench_scale as mod

    backends = _backends(workers, ray_ok)
    if ray_ok:  # one local Ray instance for every Ray run (run_jobs then leaves it up)
        import ray

        t0 = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=max(workers),
            include_dashboard=False,
            logging_level=logging.WARNING,
            _node_ip_address="127.0.0.1",
        )
        ray_init = time.perf_counter() - t0
        logging.info("ray.init: %.1f s", ray_init)

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        overhead = mod.measure_overhead(backends, tmp, args.overhead_tasks)
        methods = ["STAND-IN"] if stand_in else args.methods.split(",")
        for method in methods:
            if stand_in:
                work = functools.partial(mod.standin_work, seconds=args.stand_in_seconds)
            else:
                work = functools.partial(
                    mod.certify_work, model=args.model, method=method, timeout=args.timeout
                )
            ref = None
            base = None
            for label, backend, w in backends:
                kw = {"workers": w, "backend": backend, "out": tmp / "r.jsonl"}
                cfg = {"method": method, "model": args.model}
                _run(range(args.n, args.n + w), work, config=cfg, **kw)  # warm-up, untimed
                wall, recs = _run(range(args.n), work, config=cfg, **kw)
                same = "yes" if ref is None else _same(ref, recs)
                ref = ref if ref is not None else recs
                base = base or wall
                status: dict[str, int] = {}
                for r in recs:
                    status[r.get("status", "?")] = status.get(r.get("status", "?"), 0) + 1
                rows.append(
                    {
                        "method": method,
                        "backend": label,
                        "workers": w,
                        "images": args.n,
                        "wall_s": wall,
                        "img_per_s": args.n / wall,
                        "speedup": base / wall,
                        "identical": same,
                        "status": status,
                    }
                )
                logging.info(
                    "%s %s: %.1f s (%.2f img/s) identical=%s %s",
                    method,
                    label,
                    wall,
                    args.n / wall,
                    same,
                    status,
                )
    if ray_ok:
        import ray

        ray.shutdown()

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average {_load()}; model "
        f"`{args.model}`, {args.n} bundled digits"
        + (f", timeout {args.timeout:g} s" if not stand_in else "")
        + (" — **STAND-IN work function, not a certifier**" if stand_in else ""),
        "",
        "| method | backend | workers | wall (s) | images/s | speed-up | identical | statuses |",
        "|---|---|---:|---:|---:|---:|:---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['backend']} | {r['workers']} | {r['wall_s']:.1f} | "
            f"{r['img_per_s']:.2f} | {r['speedup']:.2f} | {r['identical']} | "
            f"{json.dumps(r['status'])} |"
        )
    lines += [
        "",
        "Each timed run follows an untimed warm-up on the same backend: Ray workers stay up "
        "between runs, but every local run starts a new pool, so local wall times include "
        "its start-up (the forkserver itself is started once). `identical`: the records "
        "equal the serial run's, timings aside; `yes*`: equal except the bounds of images "
        "that hit the time limit (how far a solver gets in its time depends on load).",
        "",
        "| backend | start-up (s) | overhead per task (ms) |",
        "|---|---:|---:|",
    ]
    for label, o in overhead.items():
        lines.append(f"| {label} | {o['startup_s']:.2f} | {o['per_task_ms']:.2f} |")
    if ray_ok:
        lines.append(
            f"\n`ray.init` of the local instance (not in the wall times): {ray_init:.1f} s"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0 if all(r["identical"] != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
