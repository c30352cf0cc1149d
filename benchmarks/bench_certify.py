"""Benchmark of :func:`flowverify.certify` on the bundled models: speed, radii, tightness.

On the bundled ``fc`` model (784-100-100-10) and the first ``--n`` bundled evaluation
digits (the held-out part of ``mnist10k.npz``), with ``--threads`` CPU threads:

* vanilla CROWN: images/s including the radius search (goal: >= 200 images/s);
* feasible (polytope CROWN; optionally alpha-CROWN and the LP): seconds per image
  (goal: <= 1 s);
* complete (exact radius, ``--timeout`` s per image): median time and the fraction that
  finished (goal: median <= 60 s);
* tightness: median vanilla/exact and feasible/exact ratios over the images whose exact
  radius was found (goal: feasible/exact >= 0.8), and an upper bound of the median over
  every complete digit (the ratio to the proven radius; the exact ones alone are the easy
  digits);
* the bundled ``cnn`` with vanilla and feasible.

Usage::

    python benchmarks/bench_certify.py --n 100 --threads 2 --timeout 60 --out bench.json

Numba kernels are compiled (or loaded from the cache) by a warm-up on two digits before
timing.  Prints a Markdown table; ``--out`` also writes every per-image record as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="digits (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and numba)")
    p.add_argument("--timeout", type=float, default=60.0, help="complete: seconds per image")
    p.add_argument("--complete-n", type=int, default=None, help="digits for complete (default n)")
    p.add_argument("--skip-complete", action="store_true")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--extra", action="store_true", help="also feasible alpha-crown and lp")
    p.add_argument("--repeats", type=int, default=5, help="timings of vanilla (median)")
    p.add_argument("--out", default=None, help="JSON file with every record")
    return p.parse_args()


def main() -> int:
    args = _parse()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    import numba
    import numpy as np
    import torch

    from flowverify.api import certify
    from flowverify.io.images import load_images

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    x, y = load_images("bundled", indices=f"0:{args.n}")
    records: dict[str, list[dict]] = {}
    rows: list[tuple[str, str]] = []

    def run(name, model, method, certifier=None, n=None, **kw):
        xs, ys = (x, y) if n is None else (x[:n], y[:n])
        certify(model, x[:2], y[:2], method=method, certifier=certifier, **kw)  # warm-up
        t0 = time.perf_counter()
        res = certify(model, xs, ys, method=method, certifier=certifier, **kw)
        dt = time.perf_counter() - t0
        records[name] = [r.to_dict() for r in res]
        print(f"{name}: {len(xs)} images in {dt:.1f} s", file=sys.stderr, flush=True)
        return res, dt

    def radii(res):
        return np.array([r.radius for r in res])

    ok = None
    # vanilla takes about 0.5 s for 100 digits: one timing varies by about 10% on a shared
    # machine, so the median of --repeats timings is reported, with their range
    van_times = []
    for _ in range(max(1, args.repeats)):
        van, dt = run("fc/vanilla/crown", "fc", "vanilla")
        van_times.append(dt)
    t_van = float(np.median(van_times))
    ok = np.array([r.status.value not in ("misclassified", "error") for r in van])
    rows.append(
        (
            "fc vanilla CROWN",
            f"{len(x) / t_van:.0f} images/s ({1000 * t_van / len(x):.1f} ms/image; median of "
            f"{len(van_times)} timings, {len(x) / max(van_times):.0f}-"
            f"{len(x) / min(van_times):.0f} images/s)",
        )
    )
    fea, t_fea = run("fc/feasible/crown", "fc", "feasible")
    rows.append(("fc feasible CROWN (polytope)", f"{t_fea / len(x):.3f} s/image"))
    tight = {"vanilla CROWN": radii(van), "feasible CROWN": radii(fea)}
    if args.extra:
        base = radii(fea)
        for cert in ("alpha-crown", "lp"):
            res, dt = run(f"fc/feasible/{cert}", "fc", "feasible", cert)
            q = radii(res)[ok] / base[ok]
            rows.append(
                (
                    f"fc feasible {cert}",
                    f"{dt / len(x):.3f} s/image, radius / feasible CROWN radius median "
                    f"{np.median(q):.3f} (min {q.min():.3f}, max {q.max():.3f})",
                )
            )
            tight[f"feasible {cert}"] = radii(res)
        res, dt = run("fc/vanilla/alpha-crown", "fc", "vanilla", "alpha-crown")
        rows.append(("fc vanilla alpha-crown", f"{dt / len(x):.3f} s/image"))
        tight["vanilla alpha-crown"] = radii(res)
    if not args.skip_complete:
        nc = args.complete_n or len(x)
        comp, _ = run("fc/complete/beta-crown", "fc", "complete", n=nc, timeout=args.timeout)
        secs = np.array([r.seconds for r in comp])
        exact = np.array([r.exact for r in comp])
        valid = np.array([r.status.value not in ("misclassified", "error") for r in comp])
        rows.append(
            (
                f"fc complete (timeout {args.timeout:g} s)",
                f"median {np.median(secs[valid]):.1f} s/image, mean {secs[valid].mean():.1f} s, "
                f"finished {exact[valid].sum()}/{valid.sum()}",
            )
        )
        ex = radii(comp)
        m = exact & valid & (ex > 0)
        for name, r in tight.items() if m.any() else ():
            q = r[:nc][m] / ex[m]
            rows.append(
                (
                    f"tightness {name} / exact",
                    f"median {np.median(q):.3f} (min {q.min():.3f}, max {q.max():.3f}; "
                    f"{m.sum()} images)",
                )
            )
        # every complete digit: exact >= proven radius, so r / proven bounds r / exact above
        # (the exact ones alone are a selection of easy digits)
        mv = valid & (ex > 0)
        for name, r in tight.items() if mv.any() else ():
            q = r[:nc][mv] / ex[mv]
            rows.append(
                (
                    f"tightness {name} / exact, all {mv.sum()} complete digits",
                    f"median <= {np.median(q):.3f} (per digit {name} / proven radius)",
                )
            )
    if not args.skip_cnn:
        cv, dt = run("cnn/vanilla/crown", "cnn", "vanilla")
        rows.append(
            (
                "cnn vanilla CROWN",
                f"{dt / len(x):.3f} s/image, median radius {np.median(radii(cv)):.4f}",
            )
        )
        cf, dt = run("cnn/feasible/crown", "cnn", "feasible")
        rows.append(
            (
                "cnn feasible CROWN",
                f"{dt / len(x):.3f} s/image, median radius {np.median(radii(cf)):.4f}",
            )
        )
    med = np.median(radii(van)[ok])
    medf = np.median(radii(fea)[ok])
    rows.append(("fc median radius (normalised)", f"vanilla {med:.4f}, feasible {medf:.4f}"))
    print(
        f"\n{len(x)} bundled digits, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}\n"
    )
    print("| measurement | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "records": records}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
