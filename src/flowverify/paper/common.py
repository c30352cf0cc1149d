r"""Shared infrastructure of the reproduced claims: data, result type and helpers.

Every claim of :mod:`flowverify.paper` (Fig. 1: reference fine-tuning; Fig. 2:
adversarial examples; section 4: attack size and time; Appendix A and Fig. 4: linear
classifiers; section 3.3: Wasserstein smoothing) reads its digits through :class:`_Env`,
reports a :class:`ClaimResult` and uses the helpers here.

Data: the evaluation digits are the first ``n`` of the held-out part of
``mnist10k.npz`` (indices 8000, 8001, ...; the bundled 500 digits are 8000-8499, so the
claims run without the file).  The training part (indices 0-7999) gives the ``data``
references of ``fig1`` and the training set of the smoothed base nets; without the file,
the bundled digits ``250..499`` stand in (``quick`` smoke tests only; stated in the
outputs).  The file is looked for by :func:`find_data`: ``--data``, the environment
variable ``FLOWVERIFY_DATA``, ``shared/data`` and ``../shared/data`` under the current
folder, and ``../shared/data`` next to a source checkout; a full claim without it fails
with a message saying where it looked.

Units: every radius and W1 is *normalised* (images scaled to mass 1; L1 ground cost
between pixel coordinates, one pixel step costs 1); raw = mass x normalised.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.core.results import jsonable

__all__ = ["DATA_ENV", "ClaimResult", "find_data"]

logger = logging.getLogger(__name__)

#: Index of the first evaluation digit in ``mnist10k.npz`` (train: 0-7999).
EVAL_START = 8000
N_TRAIN = 8000

#: Where a source checkout keeps the shared data (``<repo>/../shared/data``); used only
#: when this module runs from a checkout (``<repo>/pyproject.toml`` exists), not from an
#: installed copy in a virtual environment.
_REPO = Path(__file__).resolve().parents[3]
_DEFAULT_DATA = _REPO.parent / "shared" / "data" / "mnist10k.npz"

#: Environment variable naming ``mnist10k.npz`` (after ``--data``, before the folders).
DATA_ENV = "FLOWVERIFY_DATA"


def find_data(data: str | os.PathLike | None = None) -> tuple[Path | None, list[str]]:
    """Locate ``mnist10k.npz``.

    Parameters
    ----------
    data : str or path-like, optional
        An explicit path: it must exist.

    Returns
    -------
    path : Path or None
        The first of: ``data``; the file named by the environment variable
        ``FLOWVERIFY_DATA``; ``shared/data/mnist10k.npz`` and
        ``../shared/data/mnist10k.npz`` under the current folder; ``../shared/data``
        next to a source checkout this module runs from.  None if none exists.
    looked : list of str
        The places looked at, in order (for messages).

    Raises
    ------
    FileNotFoundError
        If ``data`` or ``FLOWVERIFY_DATA`` names a file that does not exist.
    """
    if data is not None:
        p = Path(data)
        if not p.is_file():
            raise FileNotFoundError(f"data: no such file: {str(data)!r}")
        return p, [str(p)]
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{DATA_ENV}: no such file: {env!r}")
        return Path(env), [f"${DATA_ENV}"]
    looked = [f"${DATA_ENV} (unset)"]
    candidates = [Path("shared/data/mnist10k.npz"), Path("../shared/data/mnist10k.npz")]
    if (_REPO / "pyproject.toml").is_file():
        candidates.append(_DEFAULT_DATA)
    for c in candidates:
        looked.append(str(c))
        if c.is_file():
            return c, looked
    return None, looked


# --------------------------------------------------------------------------- results


@dataclass
class ClaimResult:
    """The outcome of one claim.

    Attributes
    ----------
    claim : str
        One of :data:`flowverify.paper.CLAIMS`.
    title : str
        What is reproduced (paper section).
    paper : str
        The paper's statement.
    settings : dict
        The settings used (digits, references, samples, ...).
    summary : dict
        The headline numbers (ratios, means, medians).
    tables : dict
        Table name -> list of row dicts (also written as markdown).
    per_image : list of dict
        One record per digit.
    notes : list of str
        Deviations and caveats.
    seconds : float
        Wall time of the claim.
    files : dict
        Name -> path of every file written.
    """

    claim: str
    title: str
    paper: str
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_image: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return jsonable(
            {
                "claim": self.claim,
                "title": self.title,
                "paper": self.paper,
                "settings": self.settings,
                "summary": self.summary,
                "tables": self.tables,
                "per_image": self.per_image,
                "notes": self.notes,
                "seconds": self.seconds,
                "files": self.files,
                "unit": "normalised",
            }
        )


# --------------------------------------------------------------------------- data


@dataclass
class _Env:
    """Data, output folder and options shared by the claims."""

    out: Path
    quick: bool
    seed: int
    x_eval: np.ndarray  # (M, 1, 28, 28) float32, evaluation digits from index 8000
    y_eval: np.ndarray
    x_train: np.ndarray | None  # training part (None without mnist10k.npz)
    y_train: np.ndarray | None
    source: str
    smoothing_models: Path
    machine: str

    def eval_digits(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``n`` evaluation digits, their labels and mnist10k indices."""
        if n > len(self.x_eval):
            raise ValueError(f"n: at most {len(self.x_eval)} evaluation digits here, got {n}")
        return self.x_eval[:n], self.y_eval[:n], EVAL_START + np.arange(n)

    def pool(self, n_eval: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Training digits (or a stand-in disjoint from the first ``n_eval`` digits)."""
        if self.x_train is not None:
            return self.x_train, self.y_train, "training part of mnist10k.npz (0-7999)"
        start = max(250, n_eval)
        if start >= len(self.x_eval):
            raise ValueError("a training pool needs mnist10k.npz (--data)")
        return (
            self.x_eval[start:],
            self.y_eval[start:],
            f"stand-in: bundled evaluation digits {EVAL_START + start}-"
            f"{EVAL_START + len(self.x_eval) - 1} (mnist10k.npz not found)",
        )


def _load_env(out, quick, seed, data, smoothing_models) -> _Env:
    from flowverify.io.bundled import bundled_digits
    from flowverify.io.images import load_images

    path, looked = find_data(data)
    if path is not None:
        x, y = load_images(path)
        if y is None or len(x) != N_TRAIN + 2000:
            raise ValueError(f"data: expected mnist10k.npz (10,000 labelled digits), got {path}")
        x_eval, y_eval = x[N_TRAIN:], y[N_TRAIN:]
        x_train, y_train = x[:N_TRAIN], y[:N_TRAIN]
        source = f"{path.resolve()}: train 0-7999, evaluation from 8000"
        logger.info("reproduce: data %s", source)
    elif not quick:
        raise ValueError(
            f"data: mnist10k.npz not found (looked at {', '.join(looked)}); pass --data "
            f"PATH or set {DATA_ENV} (the bundled digits stand in for --quick smoke tests "
            "only)"
        )
    else:
        x_eval, y_eval = bundled_digits()
        x_train = y_train = None
        source = "bundled digits (mnist10k.npz indices 8000-8499); mnist10k.npz not found"
        logger.warning("reproduce: mnist10k.npz not found, the quick run uses the bundled digits")
    return _Env(
        out=Path(out),
        quick=bool(quick),
        seed=int(seed),
        x_eval=np.ascontiguousarray(x_eval, dtype=np.float32),
        y_eval=np.asarray(y_eval, dtype=np.int64),
        x_train=None if x_train is None else np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=None if y_train is None else np.asarray(y_train, dtype=np.int64),
        source=source,
        smoothing_models=Path(smoothing_models),
        machine=_machine(),
    )


def _machine() -> str:
    cpus = os.cpu_count() or 1
    try:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return f"{cpus} CPU cores, torch {torch.__version__}; load average at start {load}"


def _predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = []
        for s in range(0, len(x), 500):
            out.append(model(torch.as_tensor(x[s : s + 500])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- helpers


def _stats(values) -> dict[str, float]:
    v = np.asarray([float(a) for a in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "q1": float(np.quantile(v, 0.25)),
        "q3": float(np.quantile(v, 0.75)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _frac(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else float("nan")


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a test dependency
        logger.warning("reproduce: matplotlib missing, figures skipped (pip install matplotlib)")
        return None
    return Figure


def _save_fig(fig, path: Path, res: ClaimResult) -> None:
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Software": None})
    res.files[path.name] = str(path)


def _timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def _mass(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).sum(axis=1).astype(np.float64)
