"""A/B timing of ``certify()``: this checkout against another one, alternating, same run.

The other checkout is typically a git worktree of the commit to compare with::

    git worktree add /tmp/base 7e3324d
    python benchmarks/bench_ab.py --baseline /tmp/base --rounds 3

Each round times, in a fresh process per checkout (so that each imports its own
``flowverify``), vanilla on the bundled ``fc`` (median of 5), feasible on ``fc`` and
vanilla/feasible on the bundled ``cnn``.  Digits: the correctly classified ones among the
first ``--n`` (``--n-conv``) bundled evaluation digits.  Prints the median over rounds of
each figure and the ratio this/baseline (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

_MEASURE = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
import flowverify as fv
try:
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model
except ImportError:  # a checkout from before the layout by pipeline stage
    from flowverify.datasets import bundled_digits
    from flowverify.models import load_model
x, y = bundled_digits()
out = {}
for name, n in (("fc", int(sys.argv[2])), ("cnn", int(sys.argv[3]))):
    m = load_model(name)
    with torch.no_grad():
        ok = m(torch.as_tensor(x[:n])).argmax(1).numpy() == y[:n]
    xs, ys = x[:n][ok], y[:n][ok]
    for method in ("vanilla", "feasible"):
        fv.certify(m, xs[:2], ys[:2], method=method)  # warm-up
        reps = 5 if (name, method) == ("fc", "vanilla") else 1
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            res = fv.certify(m, xs, ys, method=method)
            ts.append(time.perf_counter() - t)
        out[f"{name} {method}"] = (float(np.median(ts)) / len(xs),
                                   float(np.median([r.radius for r in res])))
print(json.dumps(out))
"""


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="root of the other checkout")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=100, help="fc digits")
    p.add_argument("--n-conv", type=int, default=10, help="cnn digits")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def _run(root: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), NUMBA_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-c", _MEASURE, str(args.threads), str(args.n), str(args.n_conv)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    import numpy as np

    args = _parse()
    base = Path(args.baseline).resolve()
    if not (base / "src" / "flowverify").is_dir():
        raise SystemExit(f"--baseline: no src/flowverify under {base}")
    runs: dict[str, list[dict]] = {"this": [], "baseline": []}
    for _ in range(args.rounds):
        runs["baseline"].append(_run(base, args))
        runs["this"].append(_run(HERE, args))
    print(f"\n{args.rounds} rounds, {args.threads} threads; baseline {base}\n")
    print(
        "| measurement | this s/image | baseline s/image | this/baseline | radius this | "
        "radius baseline |"
    )
    print("|---|---|---|---|---|---|")
    for key in runs["this"][0]:
        t = float(np.median([r[key][0] for r in runs["this"]]))
        b = float(np.median([r[key][0] for r in runs["baseline"]]))
        print(
            f"| {key} | {t:.4f} | {b:.4f} | {t / b:.2f} | {runs['this'][0][key][1]:.4f} | "
            f"{runs['baseline'][0][key][1]:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
