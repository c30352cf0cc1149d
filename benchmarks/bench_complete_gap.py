"""Where the exact radius lies when the complete certifier stops at its time limit.

For the first ``--n`` bundled evaluation digits (the held-out part of ``mnist10k.npz``)
and the bundled ``fc`` model, prints per digit, as multiples of the feasible (polytope
CROWN) radius:

* the complete certifier's proven radius and its closest adversarial after ``--timeout``
  seconds (``flowverify.certify(..., method="complete")``);
* the closest adversarial of a stronger PGD run than the certifier's own (margin loss,
  ``--restarts`` restarts of ``--steps`` steps, ``--search-steps`` radius-search steps);

so the exact radius ``r*`` lies between the proven radius and the smaller adversarial.
If the stronger attack barely moves the upper end, the brackets say how far the proof
would have to go.

Usage::

    python benchmarks/bench_complete_gap.py --n 20 --timeout 60
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

import flowverify
from flowverify.attacks.pgd import WassersteinPGD
from flowverify.io.images import load_images
from flowverify.model.loading import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="digits (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="complete: seconds per digit")
    p.add_argument("--steps", type=int, default=200, help="stronger PGD: steps per run")
    p.add_argument("--restarts", type=int, default=4, help="stronger PGD: random restarts")
    p.add_argument("--search-steps", type=int, default=10, help="stronger PGD: radius search")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("fc")
    x, y = load_images("bundled", indices=f"0:{args.n}")
    strong = WassersteinPGD(
        steps=args.steps,
        restarts=args.restarts,
        search_steps=args.search_steps,
        loss="margin",
        seed=1,
    )
    print(
        "| digit | feasible | complete | proven / feasible | adversarial / feasible "
        "| stronger PGD / feasible | s |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        feas = flowverify.certify(model, xi, yi, method="feasible")[0]
        if feas.status.value == "misclassified":
            continue
        t0 = time.perf_counter()
        comp = flowverify.certify(model, xi, yi, method="complete", timeout=args.timeout)[0]
        secs = time.perf_counter() - t0
        atk = strong(model, xi, yi)
        s_w1 = float(np.asarray(atk.w1)[0]) if bool(np.asarray(atk.success)[0]) else math.inf
        f = feas.radius
        upper = comp.upper if comp.upper is not None else math.inf
        row = dict(
            digit=i,
            exact=bool(comp.exact),
            proven=comp.radius / f,
            upper=upper / f,
            strong=s_w1 / f,
            seconds=secs,
        )
        rows.append(row)
        status = "exact" if comp.exact else comp.status.value
        print(
            f"| {i} | {f:.5f} | {status} | {row['proven']:.3f} | {row['upper']:.3f} "
            f"| {row['strong']:.3f} | {secs:.1f} |",
            flush=True,
        )
    open_ = [r for r in rows if not r["exact"]]
    print(f"\n# {len(rows) - len(open_)}/{len(rows)} exact within {args.timeout:g} s")
    if open_:
        best = [min(r["upper"], r["strong"]) for r in open_]
        proven = statistics.median(r["proven"] for r in open_)
        print(
            f"# unfinished: proven / feasible median {proven:.3f}"
            f", closest adversarial / feasible median {statistics.median(best):.3f}"
            f", stronger PGD / certifier's adversarial median "
            f"{statistics.median(r['strong'] / r['upper'] for r in open_):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
