"""Benchmark of the minimal-radius attack against every other mode.

Per model (bundled ``fc`` and ``cnn``, and the outside VNN-COMP network
``mnist-net_256x2.onnx`` if present), on the first ``--n`` bundled digits, one run each of

* ``fixed``: fixed budgets 0.05, 0.1, 0.2, 0.3, 0.5, 1.0 (normalised W1), one attack
  call with the budget list (as ``flowverify attack --eps 0.05,...``);
* ``fixed-clip``: the same with ``clip_max=1`` (pixels <= 1, a subset of the threat set);
* ``minimize``: the minimal-radius mode (``eps=None``);
* ``minimize-clip``: the minimal-radius mode with ``clip_max=1``.

Every returned adversarial is checked here, independently of the attack: its class is
recomputed by a float forward pass of the model, its exact W1 to the digit by
:func:`flowverify.w1_distance` (normalised), and it must be non-negative of the digit's
mass.  Per digit, ``best`` is the smallest such W1 over all modes and budgets.

Printed, per model: the number of digits fooled by each mode; for ``minimize``, the number
of digits where it is above the smallest W1 of the fixed runs (must be 0), the median and
largest ratio ``minimize / best`` over the digits fooled by some mode (the median must be
<= 1.05), the median W1 of each mode, and the seconds per digit of each mode.

Usage::

    python benchmarks/bench_minimize.py [--n 100] [--models fc,cnn,vnn]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flowverify import __version__, w1_distance  # noqa: E402
from flowverify.attacks.pgd import WassersteinPGD  # noqa: E402
from flowverify.io.bundled import bundled_digits  # noqa: E402
from flowverify.model.flow_model import _infer_flat  # noqa: E402
from flowverify.model.loading import load_model  # noqa: E402

VNN = Path("/work/shared/models/mnist-net_256x2.onnx")
BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def _checked_w1(model, x: np.ndarray, y: np.ndarray, res) -> np.ndarray:
    """Exact W1 (normalised) of each row's adversarial, ``inf`` unless independently
    verified (misclassified by a float forward pass, non-negative, same mass)."""
    adv = np.asarray(res.adversarial, dtype=np.float64)
    idx = res.index
    inp = torch.as_tensor(adv, dtype=torch.float32)
    if _infer_flat(model):
        inp = inp.reshape(inp.shape[0], -1)
    with torch.no_grad():
        pred = model(inp).argmax(1).numpy()
    fooled = (pred != y[idx]) & res.success
    mass_ok = np.isclose(adv.sum(axis=(1, 2, 3)), x[idx].sum(axis=(1, 2, 3)), rtol=1e-4)
    ok = fooled & mass_ok & (adv.min(axis=(1, 2, 3)) >= 0)
    w1 = np.full(len(idx), math.inf)
    if ok.any():
        w1[ok] = np.asarray(w1_distance(x[idx[ok]], adv[ok], unit="normalised"))
    return w1


def _per_digit(w1: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, math.inf)
    np.minimum.at(out, index, w1)
    return out


def bench_model(name: str, model, x: np.ndarray, y: np.ndarray) -> dict:
    n = x.shape[0]
    modes = {
        "fixed": {"eps": list(BUDGETS)},
        "fixed-clip": {"eps": list(BUDGETS), "clip_max": 1.0},
        "minimize": {"eps": None},
        "minimize-clip": {"eps": None, "clip_max": 1.0},
    }
    best, seconds = {}, {}
    for mode, kw in modes.items():
        t0 = time.perf_counter()
        res = WassersteinPGD(**kw)(model, x, y)
        seconds[mode] = (time.perf_counter() - t0) / n
        best[mode] = _per_digit(_checked_w1(model, x, y, res), res.index, n)
    overall = np.minimum.reduce(list(best.values()))
    some = np.isfinite(overall)
    mini = best["minimize"]
    # misclassified digits have W1 0 in every mode: ratio 1
    ratio = np.where(overall[some] > 0, mini[some] / np.maximum(overall[some], 1e-300), 1.0)
    return {
        "model": name,
        "n": n,
        "fooled": {m: int(np.isfinite(v).sum()) for m, v in best.items()},
        "above_fixed": int((mini > best["fixed"] * (1 + 1e-9)).sum()),
        "ratio_median": float(np.median(ratio)) if ratio.size else math.nan,
        "ratio_max": float(ratio.max()) if ratio.size else math.nan,
        "median": {m: float(np.median(v)) for m, v in best.items()},
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="first N bundled digits")
    parser.add_argument("--models", default="fc,cnn,vnn", help="fc, cnn, vnn (VNN-COMP net)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_all, y_all = bundled_digits()
    x, y = x_all[: args.n].astype(np.float64), np.asarray(y_all[: args.n])
    print(
        f"flowverify {__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{args.threads} threads; first {args.n} bundled digits; W1 normalised, exact, "
        "of independently re-checked adversarials; median W1 over all digits (inf: "
        "not fooled)"
    )
    modes = ("fixed", "fixed-clip", "minimize", "minimize-clip")
    print()
    print(
        "| model | fooled (fixed / fixed-clip / minimize / minimize-clip) | minimize above "
        "best fixed | minimize / best, median (max) | median W1 (fixed / fixed-clip / "
        "minimize / minimize-clip) | s/digit (same order) |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    for name in args.models.split(","):
        if name == "vnn":
            if not VNN.is_file():
                print(f"skipping vnn: {VNN} not found")
                continue
            model = load_model(str(VNN))
        else:
            model = load_model(name)
        r = bench_model(name, model, x.astype(np.float32), y)
        fooled = " / ".join(str(r["fooled"][m]) for m in modes)
        med = " / ".join(f"{r['median'][m]:.3f}" for m in modes)
        sec = " / ".join(f"{r['seconds'][m]:.2f}" for m in modes)
        print(
            f"| {r['model']} | {fooled} | {r['above_fixed']}/{r['n']} | "
            f"{r['ratio_median']:.3f} ({r['ratio_max']:.2f}) | {med} | {sec} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
