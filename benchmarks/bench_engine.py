"""Benchmark of the bound-propagation engine (:mod:`flowverify.verification.engine`).

Rows (median radius normalised; digits are the bundled evaluation digits, indices
8000+ of ``mnist10k.npz``, never used for training):

* bundled ``fc`` and ``cnn``: vanilla (W1 ball) and feasible (W1 polytope) CROWN through
  ``certify()`` (the engine);
* the CIFAR-size "base" network of Wong & Kolter (3x32x32, conv 8@4x4/2, conv 16@4x4/2,
  linear 1024-100-10), trained here (seeded, ``--train-epochs``) on the first 8,000
  digits of ``mnist10k.npz`` padded to 32x32 and coloured;
* ``../shared/models/mnist-net_256x2.onnx`` (VNN-COMP): every correctly classified digit
  gets a positive radius, at least the largest ε on a grid that fixed-ε decisions
  certify (``--grid-n`` digits).

Usage::

    python benchmarks/bench_engine.py --n 100 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="digits for fc (default %(default)s)")
    p.add_argument("--n-conv", type=int, default=10, help="digits for cnn and base")
    p.add_argument("--grid-n", type=int, default=100, help="digits for the VNN-COMP grid check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-epochs", type=int, default=2)
    return p.parse_args()


def _colour_mnist(x, rng):
    import numpy as np

    pad = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    colour = rng.uniform(0.3, 1.0, size=(len(x), 3, 1, 1)).astype(np.float32)
    return pad * colour


def _base_net(args):
    """The "base" network, trained on coloured, padded MNIST (seeded)."""
    import numpy as np
    import torch
    from torch import nn

    from flowverify.io.images import load_images

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = load_images(str(SHARED / "data" / "mnist10k.npz"))
    xc = _colour_mnist(x, rng)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1024, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.as_tensor(xc[:8000]), torch.as_tensor(y[:8000], dtype=torch.long)
    for _ in range(args.train_epochs):
        perm = torch.randperm(8000)
        for s in range(0, 8000, 64):
            b = perm[s : s + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.as_tensor(xc[8000:])).argmax(1).numpy() == y[8000:]).mean()
    return net, xc[8000:], y[8000:], float(acc)


def _engine_radii(model, x, y, method):
    """``certify()`` (the engine) on the same digits, normalised radii."""
    import numpy as np

    import flowverify as fv

    return np.array([r.radius for r in fv.certify(model, x, y, method=method)])


def _table(rows, args) -> None:
    import torch

    print(f"\n{platform.machine()}, {args.threads} threads, torch {torch.__version__}\n")
    print("| network, method | digits | s/image | median radius |")
    print("|---|---|---|---|")
    for name, k, t, r in rows:
        print(f"| {name} | {k} | {t:.4f} | {r:.4f} |")


def _time(fn, repeats=1):
    import numpy as np

    ts, val = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        val = fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), val


print = functools.partial(print, flush=True)  # noqa: A001 - rows appear as they come


def main() -> int:
    args = _parse()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    import numba
    import numpy as np
    import torch

    import flowverify as fv
    from flowverify.core.results import Status
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    x, y = bundled_digits()
    rows = []

    def correct(model, xs, ys):
        with torch.no_grad():
            p = model(torch.as_tensor(xs)).argmax(1).numpy()
        return xs[p == ys], ys[p == ys]

    for name, n in (("fc", args.n), ("cnn", args.n_conv)):
        model = load_model(name)
        xs, ys = correct(model, x[:n], y[:n])
        for method in ("vanilla", "feasible"):
            _engine_radii(model, xs[:2], ys[:2], method)  # warm-up (numba cache)
            reps = 3 if method == "vanilla" else 1
            t_eng, r_eng = _time(lambda: _engine_radii(model, xs, ys, method), reps)  # noqa: B023
            rows.append((f"{name} {method}", len(xs), t_eng / len(xs), float(np.median(r_eng))))
    _table(rows, args)
    rows = []
    net, xc, yc, acc = _base_net(args)
    xs, ys = correct(net, xc[: args.n_conv], yc[: args.n_conv])
    for method in ("vanilla", "feasible"):
        t_eng, r_eng = _time(lambda: _engine_radii(net, xs, ys, method))  # noqa: B023
        rows.append(
            (f"base (acc {acc:.3f}) {method}", len(xs), t_eng / len(xs), float(np.median(r_eng)))
        )

    _table(rows, args)

    # the outside network: positive radii at least every certified grid decision
    onnx = SHARED / "models" / "mnist-net_256x2.onnx"
    model = load_model(str(onnx))
    xs, ys = correct(model, x[: args.grid_n], y[: args.grid_n])
    grid = np.round(np.arange(0.01, 0.1001, 0.01), 3)
    print(f"\nmnist-net_256x2.onnx, {len(xs)} correctly classified of the first {args.grid_n}")
    print("| method | s/image | positive radius | radius >= largest certified grid ε | median |")
    print("|---|---|---|---|---|")
    for method in ("vanilla", "feasible"):
        t, res = _time(lambda: fv.certify(model, xs, ys, method=method))  # noqa: B023
        rad = np.array([r.radius for r in res])
        best = np.zeros(len(xs))
        for e in grid:
            dec = fv.certify(model, xs, ys, method=method, eps=float(e))
            ok = np.array([d.status == Status.CERTIFIED for d in dec])
            best = np.where(ok, np.maximum(best, e), best)
        hold = int((rad >= best / (1 + 1e-3)).sum())
        print(
            f"| {method} | {t / len(xs):.4f} | {int((rad > 0).sum())}/{len(xs)} | "
            f"{hold}/{len(xs)} | {np.median(rad):.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
