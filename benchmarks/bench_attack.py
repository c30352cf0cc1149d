"""Benchmark of the Wasserstein PGD attack: strength, speed, soundness.

Setting (the published reference points): 100 real MNIST digits, a 784-256-256-10 ReLU net
on raw [0, 1] pixels, 30 iterations, batch 100, 2 torch threads.  The net is trained here
(seeded, first 8,000 digits of ``mnist10k.npz``, about a minute) and cached under
``benchmarks/.cache/`` (git-ignored); the digits are the first ``--n`` correctly
classified ones among the last 2,000 (the held-out part).

Measured, in one run on the same digits:

* ours, fixed budgets 0.1 / 0.3 / 0.5 / 1.0 (normalised W1, L1 ground cost, whole grid),
  without and with the pixel upper bound ``clip_max=1``: success, median exact W1 of the
  successes, seconds per image (median and minimum over ``--repeats`` runs), soundness
  (``w1 <= w1_bound <= eps (1 + 1e-6)``, non-negative images of the input's mass, pixels
  ``<= 1`` with ``clip_max``, every success re-checked by an independent forward pass);
* ours, minimal-radius mode: the distribution of the exact W1 of the closest adversarial
  found;
* ``art.attacks.evasion.Wasserstein`` (Wong et al. 2019, projected Sinkhorn; optional
  dependency ``adversarial-robustness-toolbox``) with 30 iterations, batch 100 and its
  own defaults otherwise (note: it grows its budget by 1.1 every 10 iterations for the
  digits not yet fooled, and clamps pixels to [0, 1], which changes the mass): success,
  exact W1 (our unit) of its outputs, seconds per image, and the speed ratio;
* the complete certifier of :mod:`flowverify.certify` (``--complete K`` digits, with a
  timeout) and, for the bundled linear model, the exact LP radius: ratio of our
  minimal radius to the exact one.

Usage::

    python benchmarks/bench_attack.py [--n 100] [--repeats 3] [--no-art] [--complete 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flowverify import __version__  # noqa: E402
from flowverify.attacks.pgd import WassersteinPGD  # noqa: E402
from flowverify.transport.flows import w1_distance  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
BUDGETS = (0.1, 0.3, 0.5, 1.0)
RADII = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0)
# The published reference points (published attacks; their unit: normalised image,
# Euclidean ground cost, 5x5 window, looser than ours).
PUBLISHED = [
    ("Wong et al. 2019, projected Sinkhorn", (0.01, 0.12, 0.36, 0.81), "1.1-1.8"),
    ("same, ART port", (0.01, 0.12, 0.32, 0.76), "1.3-1.9"),
    ("Wu et al. 2020, PGD + dual projection (no upper bound)", (0.35, 1.0, 1.0, 1.0), "0.24-1.0"),
    ("same + post-processing to pixels <= 1", (0.25, 0.96, 1.0, 1.0), "5.7-5.8"),
    ("Wu et al. 2020, Frank-Wolfe (no upper bound)", (0.35, 0.99, 1.0, 1.0), "0.09-0.24"),
    ("Hu et al. 2020 (outputs within the budget)", (0.02, 0.71, 0.92, 0.99), "0.03-0.68"),
]


# --------------------------------------------------------------------------- the net


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def train_or_load(data: Path, seed: int, log) -> tuple[nn.Sequential, dict]:
    """The 784-256-256-10 net, trained on the first 8,000 digits (cached)."""
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    path = CACHE / f"mlp256_seed{seed}_{sha[:12]}.pt"
    meta_path = path.with_suffix(".json")
    net = _net()
    if path.exists() and meta_path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval(), json.loads(meta_path.read_text())
    with np.load(data, allow_pickle=False) as d:
        x = torch.from_numpy(d["x"][:8000].astype(np.float32) / 255).unsqueeze(1)
        y = torch.from_numpy(d["y"][:8000].astype(np.int64))
    torch.manual_seed(seed)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    epochs, batch = 10, 64
    net.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    net.eval()
    meta = {
        "architecture": "784-256-256-10 ReLU, raw [0,1] pixels",
        "train": "first 8000 digits of mnist10k.npz",
        "optimizer": f"Adam lr 1e-3, batch {batch}, {epochs} epochs, seed {seed}",
        "train_seconds": round(time.perf_counter() - t0, 1),
        "data_sha256": sha,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"trained the net in {meta['train_seconds']} s -> {path}")
    return net, meta


def select_digits(net, data: Path, n: int):
    with np.load(data, allow_pickle=False) as d:
        x = (d["x"][8000:].astype(np.float32) / 255)[:, None]
        y = d["y"][8000:].astype(np.int64)
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    acc = float((pred == y).mean())
    ok = np.nonzero(pred == y)[0][:n]
    return x[ok], y[ok], ok + 8000, acc


# --------------------------------------------------------------------------- checks


def soundness(res, x: np.ndarray, net, clip_max=None) -> dict:
    """Independent checks of every returned row."""
    adv = res.adversarial
    imgs = x[res.index].astype(np.float64)
    fin = np.isfinite(res.w1)
    with torch.no_grad():
        pred = net(torch.as_tensor(adv, dtype=torch.float32)).argmax(1).numpy()
    mass_err = np.abs(adv.sum(axis=(2, 3)) - imgs.sum(axis=(2, 3))) / imgs.sum(axis=(2, 3))
    out = {
        "rows": len(res),
        "w1_le_bound": bool(np.all(res.w1[fin] <= res.w1_bound[fin])),
        "bound_le_eps": bool(np.all(res.w1_bound[fin] <= res.eps[fin] * (1 + 1e-6))),
        "min_pixel": float(adv.min()),
        "max_relative_mass_error": float(mass_err.max()),
        "recheck_agrees": bool(np.all((pred != res.label) == res.success)),
        "max_bound_over_eps": float(np.max(res.w1_bound[fin] / np.maximum(res.eps[fin], 1e-300)))
        if fin.any()
        else 0.0,
    }
    if clip_max is not None:
        out["max_pixel"] = float(adv.max())
    out["ok"] = bool(
        out["w1_le_bound"]
        and out["bound_le_eps"]
        and out["min_pixel"] >= 0
        and out["max_relative_mass_error"] < 1e-12
        and out["recheck_agrees"]
        and (clip_max is None or out["max_pixel"] <= clip_max)
    )
    return out


def _median(v) -> float:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


# --------------------------------------------------------------------------- runs


def run_ours(net, x, y, repeats: int, clip_max, log) -> list[dict]:
    rows = []
    for eps in BUDGETS:
        times, cpu, res = [], [], None
        for _ in range(repeats):
            atk = WassersteinPGD(eps=eps, clip_max=clip_max)
            t0, c0 = time.perf_counter(), time.process_time()
            res = atk(net, x, y)
            times.append((time.perf_counter() - t0) / len(x))
            cpu.append((time.process_time() - c0) / len(x))
        row = {
            "eps": eps,
            "clip_max": clip_max,
            "success": float(res.success.mean()),
            "median_w1": _median(res.w1[res.success]),
            "median_w1_bound": _median(res.w1_bound[res.success]),
            "s_per_image_median": float(np.median(times)),
            "s_per_image_min": float(np.min(times)),
            "cpu_s_per_image_median": float(np.median(cpu)),
            "mean_iterations": float(res.iterations.mean()),
            "soundness": soundness(res, x, net, clip_max),
            "config": atk.config(),
        }
        rows.append(row)
        log(
            f"ours eps={eps} clip={clip_max}: success {row['success']:.2f}, median W1 "
            f"{row['median_w1']:.4f}, {1e3 * row['s_per_image_median']:.1f} ms/img "
            f"(min {1e3 * row['s_per_image_min']:.1f}; "
            f"cpu {1e3 * row['cpu_s_per_image_median']:.1f}), sound={row['soundness']['ok']}"
        )
    return rows


def run_minimal(net, x, y, clip_max, log) -> dict:
    atk = WassersteinPGD(clip_max=clip_max)
    t0 = time.perf_counter()
    res = atk(net, x, y)
    sec = (time.perf_counter() - t0) / len(x)
    w1 = res.w1
    out = {
        "clip_max": clip_max,
        "found": float(np.isfinite(w1).mean()),
        "median_w1": _median(w1),
        "quantiles": {q: float(np.quantile(w1, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
        "fraction_fooled_within": {r: float((w1 <= r).mean()) for r in RADII},
        "s_per_image": sec,
        "mean_iterations": float(res.iterations.mean()),
        "soundness": soundness(res, x, net, clip_max),
        "w1": w1.tolist(),
        "config": atk.config(),
    }
    log(
        f"ours minimal radius clip={clip_max}: median W1 {out['median_w1']:.4f}, "
        f"{sec:.3f} s/img, sound={out['soundness']['ok']}"
    )
    return out


def run_art(net, x, y, log) -> list[dict] | None:
    try:
        from art.attacks.evasion import Wasserstein
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        log("ART not installed (pip install adversarial-robustness-toolbox): skipped")
        return None
    import logging

    logging.getLogger("art").setLevel(logging.ERROR)
    clf = PyTorchClassifier(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    rows = []
    for eps in BUDGETS:
        atk = Wasserstein(clf, eps=eps, max_iter=30, batch_size=len(x), verbose=False)
        t0, c0 = time.perf_counter(), time.process_time()
        adv = atk.generate(x, y=y)
        sec = (time.perf_counter() - t0) / len(x)
        cpu = (time.process_time() - c0) / len(x)
        with torch.no_grad():
            pred = net(torch.from_numpy(adv.astype(np.float32))).argmax(1).numpy()
        success = pred != y
        w1 = np.asarray(w1_distance(x.astype(np.float64), adv.astype(np.float64)))
        mass = adv.sum(axis=(1, 2, 3)) / x.sum(axis=(1, 2, 3))
        row = {
            "eps": eps,
            "success": float(success.mean()),
            "success_within_eps_our_unit": float((success & (w1 <= eps)).mean()),
            "median_w1": _median(w1[success]),
            "max_mass_change": float(np.abs(mass - 1).max()),
            "s_per_image": sec,
            "cpu_s_per_image": cpu,
        }
        rows.append(row)
        log(
            f"ART Wong eps={eps}: success {row['success']:.2f} (within eps in our unit "
            f"{row['success_within_eps_our_unit']:.2f}), median W1 {row['median_w1']:.4f}, "
            f"{sec:.3f} s/img"
        )
    return rows


def run_complete(net, x, y, k: int, timeout: float, minimal: dict, log) -> dict | None:
    try:
        from flowverify.api import certify
    except ImportError as exc:
        log(f"complete certifier unavailable ({exc}): skipped")
        return None
    t0 = time.perf_counter()
    try:
        res = certify(net, x[:k], y[:k], method="complete", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - an optional comparison
        log(f"complete certifier failed ({type(exc).__name__}: {exc}): skipped")
        return {"error": f"{type(exc).__name__}: {exc}"}
    exact = np.array([r.radius if r.exact else math.nan for r in res])
    status = [str(r.status) for r in res]
    ours = np.asarray(minimal["w1"][:k])
    ratio = ours / exact
    fin = np.isfinite(ratio)
    out = {
        "k": k,
        "timeout": timeout,
        "exact_count": int(fin.sum()),
        "status": status,
        "exact": exact.tolist(),
        "ours": ours.tolist(),
        "ratio_max": float(ratio[fin].max()) if fin.any() else math.nan,
        "ratio_median": float(np.median(ratio[fin])) if fin.any() else math.nan,
        "never_below": bool(np.all(ours[fin] >= exact[fin] * (1 - 1e-6))),
        "seconds": time.perf_counter() - t0,
    }
    log(f"complete certifier on {k} digits: {fin.sum()} exact; ours/exact {ratio[fin]}")
    return out


def run_linear(data_digits, log) -> dict | None:
    """Bundled linear model: exact radius (LP, Lemma 8) vs our minimal radius."""
    try:
        from flowverify.api import certify
        from flowverify.model.loading import load_model
    except ImportError as exc:
        log(f"linear comparison unavailable ({exc})")
        return None
    x, y = data_digits
    model = load_model("linear")
    with torch.no_grad():
        ok = model(torch.from_numpy(x)).argmax(1).numpy() == y
    x, y = x[ok][:20], y[ok][:20]
    try:
        cert = certify(model, x, y, method="feasible")
    except Exception as exc:  # noqa: BLE001
        log(f"linear exact radius failed ({exc})")
        return {"error": str(exc)}
    exact = np.array([r.radius for r in cert])
    t0 = time.perf_counter()
    res = WassersteinPGD()(model, x, y)
    sec = (time.perf_counter() - t0) / len(x)
    ratio = res.w1 / exact
    out = {
        "n": len(x),
        "ratio_max": float(ratio.max()),
        "ratio_median": float(np.median(ratio)),
        "never_below": bool(np.all(res.w1 >= exact * (1 - 1e-6))),
        "s_per_image": sec,
    }
    log(f"linear model: ours/exact median {out['ratio_median']:.4f} max {out['ratio_max']:.4f}")
    return out


# --------------------------------------------------------------------------- report


def report(r: dict) -> str:
    lines = []
    ours = {(row["eps"], row["clip_max"]): row for row in r["ours"]}
    art = {row["eps"]: row for row in (r.get("art") or [])}
    lines.append(
        "| attack | " + " | ".join(f"@{e}" for e in BUDGETS) + " | median W1 @0.1/0.3/0.5/1.0 "
        "| s/image @0.1 (median; min) |"
    )
    lines.append("|---" * (len(BUDGETS) + 3) + "|")
    for clip, name in ((None, "ours (flow PGD)"), (1.0, "ours, clip_max=1")):
        rows = [ours[(e, clip)] for e in BUDGETS]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row['success']:.2f}" for row in rows)
            + " | "
            + " / ".join(f"{row['median_w1']:.3f}" for row in rows)
            + f" | {1e3 * rows[0]['s_per_image_median']:.1f} ms; "
            f"{1e3 * rows[0]['s_per_image_min']:.1f} ms |"
        )
    if art:
        rows = [art[e] for e in BUDGETS]
        lines.append(
            "| ART Wong (this run) | "
            + " | ".join(f"{row['success']:.2f}" for row in rows)
            + " | "
            + " / ".join(f"{row['median_w1']:.3f}" for row in rows)
            + f" | {rows[0]['s_per_image']:.2f} s |"
        )
        lines.append(
            "| ART Wong, success with exact W1 <= eps (our unit) | "
            + " | ".join(f"{row['success_within_eps_our_unit']:.2f}" for row in rows)
            + " | | |"
        )
    for name, succ, sec in PUBLISHED:
        lines.append(
            f"| {name} (published) | " + " | ".join(f"{s:.2f}" for s in succ) + f" | | {sec} s |"
        )
    lines.append("")
    lines.append("s/image per budget (wall, median of repeats; process CPU time in brackets): ")
    for clip in (None, 1.0):
        lines.append(
            f"- clip_max={clip}: "
            + ", ".join(
                f"@{e}: {1e3 * ours[(e, clip)]['s_per_image_median']:.1f} ms "
                f"({1e3 * ours[(e, clip)]['cpu_s_per_image_median']:.1f} ms)"
                for e in BUDGETS
            )
        )
    if art:
        ratios = [art[e]["s_per_image"] / ours[(e, None)]["s_per_image_median"] for e in BUDGETS]
        lines.append(
            "- ART Wong: "
            + ", ".join(
                f"@{e}: {art[e]['s_per_image']:.2f} s ({art[e]['cpu_s_per_image']:.2f} s)"
                for e in BUDGETS
            )
            + "; speed ratio ART/ours: "
            + ", ".join(f"@{e}: {q:.0f}x" for e, q in zip(BUDGETS, ratios, strict=True))
        )
    m = r["minimal"]
    lines.append("")
    lines.append(
        f"Minimal radius (exact W1 of the closest adversarial found, normalised): median "
        f"{m['median_w1']:.4f}, quantiles 10/25/50/75/90%: "
        + " / ".join(f"{v:.3f}" for v in m["quantiles"].values())
        + f"; {m['s_per_image']:.3f} s/image; found {m['found']:.2f}."
    )
    lines.append("")
    lines.append("| r | " + " | ".join(str(k) for k in m["fraction_fooled_within"]) + " |")
    lines.append("|---" * (len(m["fraction_fooled_within"]) + 1) + "|")
    lines.append(
        "| fooled with W1 <= r | "
        + " | ".join(f"{v:.2f}" for v in m["fraction_fooled_within"].values())
        + " |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist10k.npz")
    ap.add_argument("--n", type=int, default=100, help="digits (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-art", action="store_true", help="skip the ART Wong attack")
    ap.add_argument("--complete", type=int, default=0, help="digits for the complete certifier")
    ap.add_argument("--complete-timeout", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=CACHE / "bench_attack.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    net, meta = train_or_load(args.data, args.seed, log)
    for p in net.parameters():
        p.requires_grad_(False)
    x, y, indices, acc = select_digits(net, args.data, args.n)
    log(f"net accuracy on the last 2000 digits: {acc:.4f}; {len(x)} digits")
    WassersteinPGD(eps=0.1, steps=2)(net, x[:2], y[:2])  # warm-up (numba, allocator)
    r: dict = {
        "flowverify_version": __version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "net": meta,
        "net_accuracy_last2000": acc,
        "digits": indices.tolist(),
    }
    r["ours"] = run_ours(net, x, y, args.repeats, None, log)
    r["ours"] += run_ours(net, x, y, args.repeats, 1.0, log)
    r["minimal"] = run_minimal(net, x, y, None, log)
    r["art"] = None if args.no_art else run_art(net, x, y, log)
    with np.load(args.data, allow_pickle=False) as d:
        lin_digits = ((d["x"][8000:8100].astype(np.float32) / 255)[:, None], d["y"][8000:8100])
    r["linear"] = run_linear(lin_digits, log)
    if args.complete:
        r["complete"] = run_complete(net, x, y, args.complete, args.complete_timeout,
                                     r["minimal"], log)  # fmt: skip
    r["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1, default=str))
    print(report(r))
    print(f"\nload average start {r['load_average_start']}, end {r['load_average_end']}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
