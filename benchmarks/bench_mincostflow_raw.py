"""Raw speed of the grid min-cost-flow solver (``flowverify.transport.mincostflow``) against POT.

On real MNIST evaluation digits (mnist10k.npz indices 8000.., the first 8,000 are the
training pool), normalised to mass 1, float64, reference uniform 1/784: ``grid_w1`` and
``grid_min_cost_flow`` (one image per call, and one batch on 1 and on N threads) versus POT's
``ot.emd`` / ``ot.emd2`` on the full 784 x 784 L1 cost matrix, in the same run.  Also one
digit against another digit (a degenerate problem: both backgrounds are 0).

Usage::

    python benchmarks/bench_mincostflow_raw.py [--n 200] [--threads 2] [--repeat 5] [--clock cpu]

``--clock cpu`` times with ``time.process_time`` (CPU seconds of this process, summed over its
threads) instead of the wall clock: use it on a loaded machine, where wall-clock figures are
inflated by other processes; the N-thread rows then show total CPU, not elapsed time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numba
import numpy as np
import ot

from flowverify.transport.mincostflow import grid_min_cost_flow, grid_w1

ROOT = Path(__file__).resolve().parents[1]


def _cost(h: int, w: int) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    return (np.abs(ii[:, None] - ii[None]) + np.abs(jj[:, None] - jj[None])).astype(np.float64)


CLOCK = time.perf_counter


def _best_of(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=min(2, numba.config.NUMBA_NUM_THREADS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time

    with np.load(args.data) as d:
        x = d["x"][8000 : 8000 + args.n + 1].astype(np.float64)
    x /= x.sum(axis=(1, 2), keepdims=True)
    n = args.n
    u = np.full((28, 28), 1.0 / 784)
    sup_u = u[None] - x[:n]  # digit -> uniform
    sup_d = x[1 : n + 1] - x[:n]  # digit -> next digit

    t0 = time.perf_counter()
    grid_w1(sup_u[:1])
    grid_min_cost_flow(sup_u[:1])
    warm = time.perf_counter() - t0

    def per_call(fn, sup):
        def run():
            for i in range(n):
                fn(sup[i : i + 1])

        return run

    timings = {}
    for tag, sup in (("uniform", sup_u), ("digit", sup_d)):
        numba.set_num_threads(1)
        timings[tag, "w1 1/call"] = _best_of(per_call(grid_w1, sup), args.repeat)
        timings[tag, "flow 1/call"] = _best_of(per_call(grid_min_cost_flow, sup), args.repeat)
        timings[tag, "w1 batch 1t"] = _best_of(lambda s=sup: grid_w1(s), args.repeat)
        timings[tag, "flow batch 1t"] = _best_of(lambda s=sup: grid_min_cost_flow(s), args.repeat)
        numba.set_num_threads(args.threads)
        timings[tag, "w1 batch Nt"] = _best_of(lambda s=sup: grid_w1(s), args.repeat)
        timings[tag, "flow batch Nt"] = _best_of(lambda s=sup: grid_min_cost_flow(s), args.repeat)

    cost = _cost(28, 28)
    pot = {}
    pot_t = {}
    for tag, tgt in (("uniform", lambda i: u.ravel()), ("digit", lambda i: x[i + 1].ravel())):
        vals = np.empty(n)
        t0 = CLOCK()
        for i in range(n):
            plan = ot.emd(x[i].ravel(), tgt(i), cost, numItermax=10**7)
            vals[i] = float((plan * cost).sum())
        pot_t[tag, "emd"] = CLOCK() - t0
        t0 = CLOCK()
        for i in range(n):
            ot.emd2(x[i].ravel(), tgt(i), cost, numItermax=10**7)
        pot_t[tag, "emd2"] = CLOCK() - t0
        pot[tag] = vals

    ms = 1e3 / n
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"numpy {np.__version__}, numba {numba.__version__}, POT {ot.__version__}")
    print(f"{n} MNIST evaluation digits (mnist10k.npz 8000..{8000 + n}), mass 1, float64")
    print(f"first call (numba compile or cache load): {warm:.2f} s")
    print(f"best of {args.repeat} runs ({args.clock} clock), batches of {n}\n")
    for tag in ("uniform", "digit"):
        sup = sup_u if tag == "uniform" else sup_d
        flows, costs = grid_min_cost_flow(sup)
        w1 = grid_w1(sup)
        t_emd = pot_t[tag, "emd"]
        print(f"target: {'uniform 1/784' if tag == 'uniform' else 'the next digit'}")
        print(f"| {'operation':<40} | {'ms/image':>9} | {'speed-up vs ot.emd':>18} |")
        print(f"|{'-' * 42}|{'-' * 11}|{'-' * 20}|")
        rows = [
            ("grid_w1, one image per call", timings[tag, "w1 1/call"]),
            ("grid_min_cost_flow, one image per call", timings[tag, "flow 1/call"]),
            ("grid_w1, batch, 1 thread", timings[tag, "w1 batch 1t"]),
            ("grid_min_cost_flow, batch, 1 thread", timings[tag, "flow batch 1t"]),
            (f"grid_w1, batch, {args.threads} threads", timings[tag, "w1 batch Nt"]),
            (f"grid_min_cost_flow, batch, {args.threads} threads", timings[tag, "flow batch Nt"]),
            ("POT ot.emd (784x784 cost)", t_emd),
            ("POT ot.emd2 (784x784 cost)", pot_t[tag, "emd2"]),
        ]
        for name, t in rows:
            print(f"| {name:<40} | {t * ms:9.4f} | {t_emd / t:17.1f}x |")
        print(f"max |W1 - POT|: grid_w1 {np.abs(w1 - pot[tag]).max():.2e}, ", end="")
        print(f"grid_min_cost_flow {np.abs(costs - pot[tag]).max():.2e}\n")


if __name__ == "__main__":
    main()
