"""Benchmark of the complete certifier (exact W1 radius) on a bundled model.

Runs :func:`flowverify.certify.complete.exact_radius` on the first ``N`` correctly
classified digits of the bundled held-out sample (uniform reference; the exact radius
does not depend on the reference) and prints, per image, the status, the proven lower
bound, the verified upper bound (the exact radius when finished), seconds and nodes,
then the finished fraction and the median time.

Examples
--------
::

    python benchmarks/bench_complete.py --n 10            # quick
    python benchmarks/bench_complete.py                   # 100 digits, fc model
    python benchmarks/bench_complete.py --model linear --n 100
    python benchmarks/bench_complete.py --ball --n 20     # complete-ball (no feasibility)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time

import numpy as np
import torch

from flowverify.certify._chain import affine_chain
from flowverify.certify.complete import exact_radius
from flowverify.datasets import bundled_digits
from flowverify.flowmodel import FlowModel
from flowverify.flows import inverse_flow
from flowverify.models import load_model
from flowverify.references import make_reference


def _problem(model, img):
    ref = make_reference("uniform", img)
    fm = FlowModel(model, torch.as_tensor(ref), fuse=True)
    chain = affine_chain(fm, 0)
    dmu = np.asarray(inverse_flow(ref, img, method="minimal"), dtype=np.float64).reshape(-1)
    return chain, dmu, ref.reshape(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fc", help="bundled model: linear, fc or cnn")
    p.add_argument("--n", type=int, default=100, help="number of digits (default 100)")
    p.add_argument("--start", type=int, default=0, help="first digit of the sample")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per image")
    p.add_argument("--algorithm", default="bab", choices=("bab", "milp"))
    p.add_argument("--ball", action="store_true", help="complete-ball (no feasibility)")
    p.add_argument("--json", default=None, help="write per-image results to this file")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    model = load_model(args.model).double()
    x, y = bundled_digits()
    with torch.no_grad():
        pred = model(torch.as_tensor(x, dtype=torch.float64)).argmax(1).numpy()
    idx = [i for i in range(args.start, len(x)) if pred[i] == y[i]][: args.n]

    # compile the numba kernels outside the timings
    t = time.perf_counter()
    chain, dmu, ref = _problem(model, x[idx[0]].astype(np.float64))
    exact_radius(chain, dmu, ref, int(y[idx[0]]), height=28, width=28, timeout=2.0)
    print(f"# warm-up (numba compilation) {time.perf_counter() - t:.1f}s", flush=True)

    rows = []
    hdr = (
        f"{'i':>4} {'y':>2} {'status':>8} {'lower':>11} {'upper':>11} {'t':>2} "
        f"{'sec':>7} {'nodes':>6}"
    )
    print(hdr, flush=True)
    for i in idx:
        img = x[i].astype(np.float64)
        chain, dmu, ref = _problem(model, img)
        res = exact_radius(
            chain,
            dmu,
            ref,
            int(y[i]),
            height=28,
            width=28,
            feasible=not args.ball,
            timeout=args.timeout,
            algorithm=args.algorithm,
        )
        mass = float(img.sum())
        rows.append(
            dict(
                index=i,
                label=int(y[i]),
                status=res.status,
                lower=res.lower,
                upper=res.upper,
                target=res.target,
                seconds=res.seconds,
                nodes=res.nodes,
                mass=mass,
                solver_status=res.solver_status,
            )
        )
        tgt = "-" if res.target is None else str(res.target)
        print(
            f"{i:>4} {int(y[i]):>2} {res.status:>8} {res.lower:>11.6f} {res.upper:>11.6f} "
            f"{tgt:>2} {res.seconds:>7.1f} {res.nodes:>6}",
            flush=True,
        )
    n = len(rows)
    done = [r for r in rows if r["status"] in ("optimal", "infeasible")]
    secs = [r["seconds"] for r in rows]
    print("#")
    print(
        f"# model={args.model} feasible={not args.ball} algorithm={args.algorithm} "
        f"timeout={args.timeout:g}s images={n}"
    )
    print(f"# finished {len(done)}/{n} = {len(done) / max(n, 1):.0%}")
    print(f"# median seconds (timeouts counted at the limit) {statistics.median(secs):.1f}")
    if done:
        print(f"# median seconds of finished {statistics.median(r['seconds'] for r in done):.1f}")
        radii = [r["upper"] for r in done if math.isfinite(r["upper"])]
        if radii:
            norm = [r["upper"] / r["mass"] for r in done if math.isfinite(r["upper"])]
            print(
                f"# median exact radius raw {statistics.median(radii):.4f} "
                f"normalised {statistics.median(norm):.5f}"
            )
    gaps = [
        r["lower"] / r["upper"]
        for r in rows
        if r["status"] == "timeout" and math.isfinite(r["upper"]) and r["upper"] > 0
    ]
    if gaps:
        print(f"# unfinished: median lower/upper {statistics.median(gaps):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
