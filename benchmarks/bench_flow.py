"""Flow-domain speed against POT.

On 200 real MNIST evaluation digits (mnist10k.npz indices 8000-8199; the first 8,000 are
the training pool), reference uniform, float64: ``inverse_flow(method="minimal")`` and
``w1_distance`` versus POT's ``ot.emd`` / ``ot.emd2`` on the full 784 x 784 L1 cost matrix,
in the same run.  Targets: each at most 1 ms per image and at least 15x faster than
``ot.emd``, with ``max |W1_ours - W1_POT| <= 1e-9``.

Usage::

    python benchmarks/bench_flow.py [--n 200] [--data ../shared/data/mnist10k.npz]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import ot

import flowverify as fv

ROOT = Path(__file__).resolve().parents[1]


def _cost(h: int, w: int) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    return (np.abs(ii[:, None] - ii[None]) + np.abs(jj[:, None] - jj[None])).astype(np.float64)


def _best_of(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with np.load(args.data) as d:
        x = d["x"][8000 : 8000 + args.n].astype(np.float64)[:, None] / 255.0
    x = x / x.sum(axis=(1, 2, 3), keepdims=True)  # normalised digits, mass 1
    ref = fv.make_reference("uniform", x)
    n = len(x)

    # warm up (numba compilation / cache load)
    t0 = time.perf_counter()
    fv.inverse_flow(ref[:2], x[:2])
    fv.w1_distance(ref[:2], x[:2])
    warm = time.perf_counter() - t0

    t_inv_batch = _best_of(lambda: fv.inverse_flow(ref, x), args.repeat)
    t_w1_batch = _best_of(lambda: fv.w1_distance(ref, x), args.repeat)

    def one_by_one_inv():
        for i in range(n):
            fv.inverse_flow(ref[i], x[i])

    def one_by_one_w1():
        for i in range(n):
            fv.w1_distance(ref[i], x[i])

    t_inv_single = _best_of(one_by_one_inv, 1)
    t_w1_single = _best_of(one_by_one_w1, 1)

    cost = _cost(28, 28)
    u = ref[0, 0].ravel()
    pot_vals = np.empty(n)
    t0 = time.perf_counter()
    for i in range(n):
        plan = ot.emd(u, x[i, 0].ravel(), cost, numItermax=10**7)
        pot_vals[i] = float((plan * cost).sum())
    t_pot = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        ot.emd2(u, x[i, 0].ravel(), cost, numItermax=10**7)
    t_pot2 = time.perf_counter() - t0

    flows = fv.inverse_flow(ref, x)
    ours_flow = np.abs(flows).sum(axis=(1, 2))
    ours_w1 = fv.w1_distance(ref, x)
    resid = np.abs(fv.apply_flow(ref, flows) - x).max()

    ms = 1e3 / n
    rows = [
        (f"inverse_flow(minimal), batch of {n}", t_inv_batch * ms, t_pot / t_inv_batch),
        ("inverse_flow(minimal), one image per call", t_inv_single * ms, t_pot / t_inv_single),
        (f"w1_distance, batch of {n}", t_w1_batch * ms, t_pot / t_w1_batch),
        ("w1_distance, one image per call", t_w1_single * ms, t_pot / t_w1_single),
        ("POT ot.emd (784x784 cost), per image", t_pot * ms, 1.0),
        ("POT ot.emd2 (784x784 cost), per image", t_pot2 * ms, t_pot / t_pot2),
    ]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"numpy {np.__version__}, POT {ot.__version__}, flowverify {fv.__version__}")
    print(f"{n} MNIST evaluation digits (mnist10k.npz 8000..{8000 + n - 1}), normalised, float64")
    print(f"first call (numba compile or cache load): {warm:.2f} s\n")
    print(f"| {'operation':<44} | {'ms/image':>9} | {'speed-up vs ot.emd':>18} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 20}|")
    for name, t, r in rows:
        print(f"| {name:<44} | {t:9.4f} | {r:17.1f}x |")
    print()
    print(f"max |W1_ours - W1_POT| (w1_distance):   {np.abs(ours_w1 - pot_vals).max():.2e}")
    print(f"max |‖flow‖₁ - W1_POT| (inverse_flow):  {np.abs(ours_flow - pot_vals).max():.2e}")
    print(f"max |Δ(R, Δ⁻¹(R, x)) - x|:               {resid:.2e}")


if __name__ == "__main__":
    main()
