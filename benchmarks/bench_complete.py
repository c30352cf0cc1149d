"""Benchmark of complete verification (``method="complete"``): exact radii, brackets and
fixed-ε decisions, branch and bound on the engine (``beta-crown``) against the per-node-LP
search (``bab``).

Digits are the bundled evaluation digits (indices 8000+ of ``mnist10k.npz``, never used
for training), the first ``--n`` correctly classified from ``--start``.

Radius mode (default), per digit: status, the proven radius, the closest adversarial's
W1 (the bracket ``[radius, upper]``; equal within ``rtol`` when exact), their ratio,
seconds, nodes bounded and nodes per second; the summary gives the median ratio and the
median bracket ``upper / radius``.  ``--compare bab`` then runs the per-node-LP
search on the first ``--compare-n`` digits for ``--compare-timeout`` seconds each and
prints both searches' nodes per second (same run, same digits).

Decision mode (``--decide``), per digit: ``ε`` = the geometric mean of the feasible CROWN
radius and the closest adversarial of the minimal-radius attack, and the decision
(certified / falsified / unknown) within ``--timeout``.

Examples
--------
::

    python benchmarks/bench_complete.py --n 20 --timeout 60 --compare bab
    python benchmarks/bench_complete.py --model ../shared/models/mnist-net_256x2.onnx \\
        --n 20 --timeout 60 --decide
    python benchmarks/bench_complete.py --model ../shared/models/mnist-net_256x2.onnx \\
        --n 20 --timeout 60
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch

import flowverify as fv
from flowverify.io.bundled import bundled_digits
from flowverify.model.loading import load_model


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fc", help="bundled name or .onnx/.pt (default fc)")
    p.add_argument("--n", type=int, default=20, help="digits (default %(default)s)")
    p.add_argument("--start", type=int, default=0, help="first bundled digit")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per digit")
    p.add_argument("--certifier", default="beta-crown", help="complete certifier")
    p.add_argument("--decide", action="store_true", help="fixed-ε decisions (see above)")
    p.add_argument("--compare", default=None, help="second certifier for nodes/s (bab)")
    p.add_argument("--compare-n", type=int, default=2)
    p.add_argument("--compare-timeout", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def _run(model, x, y, i, certifier, timeout, eps=None):
    t = time.perf_counter()
    r = fv.certify(
        model,
        x[i : i + 1],
        y[i : i + 1],
        method="complete",
        certifier=certifier,
        timeout=timeout,
        eps=eps,
    )[0]
    return r, time.perf_counter() - t


def _nodes(r) -> int:
    return int(getattr(r, "nodes", 0) or 0)


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    x, y = bundled_digits()
    with torch.no_grad():
        pred = model(torch.as_tensor(x)).argmax(1).numpy()
    idx = [i for i in range(args.start, len(x)) if pred[i] == y[i]][: args.n]
    _run(model, x, y, idx[0], args.certifier, 2.0)  # numba kernels compiled/loaded
    print(
        f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__}; model "
        f"{args.model}, certifier {args.certifier}, {args.timeout:g} s per digit",
        flush=True,
    )
    if args.decide:
        return _decide(model, x, y, idx, args)
    print(
        "| digit | status | radius | closest adversarial | radius / closest | s | nodes | nodes/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for i in idx:
        r, sec = _run(model, x, y, i, args.certifier, args.timeout)
        up = r.upper if r.upper is not None else math.inf
        ratio = r.radius / up if math.isfinite(up) and up > 0 else float("nan")
        rows.append((r, sec, ratio))
        print(
            f"| {i} | {'exact' if r.exact else r.status.value} | {r.radius:.5f} | {up:.5f} | "
            f"{ratio:.3f} | {sec:.1f} | {_nodes(r)} | {_nodes(r) / sec:.0f} |",
            flush=True,
        )
    exact = sum(r.exact for r, _, _ in rows)
    ratios = [q for _, _, q in rows if not math.isnan(q)]
    rate = sum(_nodes(r) for r, _, _ in rows) / sum(s for _, s, _ in rows)
    brackets = [1 / q if q > 0 else math.inf for q in ratios]  # upper / radius
    print(f"\n# exact {exact}/{len(rows)}; median radius / closest adversarial ", end="")
    print(f"{statistics.median(ratios):.3f} (bracket upper / radius ", end="")
    print(f"{statistics.median(brackets):.3f}); nodes/s (all digits) {rate:.0f}")
    if args.compare:
        print(f"\n| digit | {args.certifier} nodes/s | {args.compare} nodes/s | ratio |")
        print("|---|---|---|---|")
        for i in idx[: args.compare_n]:
            a, sa = _run(model, x, y, i, args.certifier, args.compare_timeout)
            b, sb = _run(model, x, y, i, args.compare, args.compare_timeout)
            ra, rb = _nodes(a) / sa, _nodes(b) / sb
            print(f"| {i} | {ra:.0f} | {rb:.1f} | {ra / max(rb, 1e-9):.0f}x |", flush=True)
    _peak()
    return 0


def _decide(model, x, y, idx, args) -> int:
    print("| digit | feasible | closest adversarial | ε | decision | s | nodes |")
    print("|---|---|---|---|---|---|---|")
    decided = 0
    for i in idx:
        feas = fv.certify(model, x[i : i + 1], y[i : i + 1], method="feasible")[0].radius
        atk = fv.attack(model, x[i : i + 1], y[i : i + 1], eps=None)
        up = float(np.asarray(atk.w1).ravel()[0])
        eps = math.sqrt(feas * up) if math.isfinite(up) and feas > 0 else up
        r, sec = _run(model, x, y, i, args.certifier, args.timeout, eps=eps)
        decided += r.status.value in ("certified", "falsified")
        print(
            f"| {i} | {feas:.5f} | {up:.5f} | {eps:.5f} | {r.status.value} | {sec:.1f} | "
            f"{_nodes(r)} |",
            flush=True,
        )
    print(f"\n# decided {decided}/{len(idx)} within {args.timeout:g} s each")
    _peak()
    return 0


def _peak() -> None:
    """The process's peak resident memory (Linux: ``ru_maxrss`` in KiB), all digits."""
    if sys.platform.startswith("linux"):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"# peak resident memory of the process: {peak:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
