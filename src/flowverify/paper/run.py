r"""Run the paper's experimental claims (``flowverify reproduce``).

Five claims, each a function writing a markdown table, a JSON file and figures into
``OUT/<claim>/`` (see ``docs/REPRODUCTION.md`` for the measured numbers):

``fig1``
    Reference fine-tuning (section 3.2.2, Fig. 1): certified radii of the ``fc`` model
    for six references (``random:2,point:2,data:2``), vanilla CROWN and feasible CROWN,
    per reference and their maximum (:mod:`flowverify.paper.reference_finetuning`).
``fig2``
    Adversarial examples (section 4, Fig. 2): original, our Wasserstein PGD and Wong et
    al.'s projected-Sinkhorn attack (ART ``Wasserstein``), exact W1 under each image
    (:mod:`flowverify.paper.adversarial_examples`).
``attack``
    Attack size and time (section 4): median exact W1 of successful adversarials and
    seconds per image of both attacks on the same digits, same machine, same run
    (:mod:`flowverify.paper.attack_comparison`).
``linear``
    Linear classifiers (Appendix A, Fig. 4): Lemma 7 (vanilla, L1), the analogous L2
    certificate and Lemma 8 (exact LP), with the closest adversarial "images"
    (:mod:`flowverify.paper.linear_certificates`).
``smoothing``
    Against Wasserstein smoothing (section 3.3): Levine & Feizi's smoothed classifiers
    against our feasible and complete certificates of the ``fc`` model
    (:mod:`flowverify.paper.smoothing_comparison`).

Here: the registry :data:`CLAIMS`, the settings of the full claims (:data:`SETTINGS`)
and of ``--quick`` (:data:`QUICK`), and the drivers :func:`run_claim` and
:func:`reproduce`.  Data and units: :mod:`flowverify.paper.common`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowverify.core.results import jsonable
from flowverify.paper.adversarial_examples import _claim_fig2
from flowverify.paper.attack_comparison import _claim_attack
from flowverify.paper.common import ClaimResult, _Env, _load_env, _timer
from flowverify.paper.linear_certificates import _claim_linear
from flowverify.paper.reference_finetuning import _claim_fig1
from flowverify.paper.smoothing_comparison import _claim_smoothing

__all__ = ["CLAIMS", "SETTINGS", "reproduce", "run_claim"]

logger = logging.getLogger(__name__)

#: Claims, in the order ``all`` runs them.
CLAIMS = ("fig1", "fig2", "attack", "linear", "smoothing")

#: Settings of the full claims (the defaults of ``flowverify reproduce``).
SETTINGS: dict[str, dict[str, Any]] = {
    "fig1": {
        "model": "fc",
        "n": 100,
        "references": "random:2,point:2,data:2",
        "methods": ("vanilla", "feasible"),
    },
    "fig2": {
        "model": "fc",
        "n": 4,
        "candidates": 8,
        "steps": 30,
        "search_steps": 6,
        "wong_iters": 30,
    },
    "attack": {
        "model": "fc",
        "n": 40,
        "steps": 30,
        "search_steps": 6,
        "wong_iters": 30,
        "fixed_eps": 0.5,
        "extra_runs": True,
    },
    "linear": {"model": "linear", "n": 100, "show": 3},
    "smoothing": {
        "model": "fc",
        "n": 100,
        "sigmas": (0.01, 0.02, 0.05),
        "n0": 1000,
        "n_samples": 10000,
        "alpha": 0.05,
        "complete_timeout": 5.0,
        "radii": (0.01, 0.02, 0.05, 0.1, 0.2),
    },
}

#: Overrides of ``--quick`` (smoke tests: a few digits, few samples, short runs).
QUICK: dict[str, dict[str, Any]] = {
    "fig1": {"n": 2, "references": "point:1,data:1"},
    "fig2": {"n": 1, "candidates": 1, "wong_iters": 3, "search_steps": 2},
    "attack": {"n": 1, "wong_iters": 3, "search_steps": 2, "extra_runs": False},
    "linear": {"n": 3, "show": 2},
    "smoothing": {
        "n": 2,
        "sigmas": (0.02,),
        "n0": 32,
        "n_samples": 200,
        "complete_timeout": 1.0,
    },
}

#: The units line of every markdown report.
UNITS = (
    "Units: radii and W1 distances are normalised W1 (images scaled to mass 1; L1 ground "
    "cost between pixel coordinates, one pixel step costs 1); raw = mass x normalised."
)


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return format(float(v), spec)
    return str(v)


def _md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(columns or rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return out


#: The function reproducing each claim.
_RUNNERS: dict[str, Callable[[_Env, dict[str, Any]], ClaimResult]] = {
    "fig1": _claim_fig1,
    "fig2": _claim_fig2,
    "attack": _claim_attack,
    "linear": _claim_linear,
    "smoothing": _claim_smoothing,
}


def _markdown(res: ClaimResult, env: _Env) -> str:
    md = [f"# {res.title}", ""]
    md += [f"Paper: {res.paper}.", ""]
    mode = "quick smoke test (NOT the full claim)" if env.quick else "full"
    md += [
        f"Run: `{res.claim}` ({mode}), {res.seconds:.1f} s; machine: {env.machine}.",
        f"Data: {env.source}.",
        "",
        UNITS,
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(jsonable(res.settings), indent=1, sort_keys=True),
        "```",
        "",
        "## Summary",
        "",
        "```json",
        json.dumps(jsonable(res.summary), indent=1, sort_keys=True),
        "```",
        "",
    ]
    for name, rows in res.tables.items():
        md += [f"## {name}", "", *_md_table(rows), ""]
    if res.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    pngs = [p for p in res.files if p.endswith(".png")]
    for p in pngs:
        md += [f"![{p}]({p})", ""]
    return "\n".join(md)


def _check_args(*, out, quick, n, data, smoothing_models, seed, threads) -> None:
    """Validate the arguments of :func:`run_claim` / :func:`reproduce` before any work."""

    def is_int(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, np.integer))

    for name, value in (("out", out), ("smoothing_models", smoothing_models)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a folder path, got {type(value).__name__}")
        if str(value) == "":
            raise ValueError(f"{name}: expected a folder path, got an empty string")
        if Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{name}: {str(value)!r} exists and is not a folder")
    if data is not None:
        if not isinstance(data, (str, os.PathLike)):
            raise TypeError(f"data: expected a path to mnist10k.npz, got {type(data).__name__}")
        if not Path(data).is_file():
            raise FileNotFoundError(f"data: no such file: {str(data)!r}")
    if not isinstance(quick, (bool, np.bool_)):
        raise TypeError(f"quick: expected True or False, got {quick!r}")
    if n is not None and (not is_int(n) or n < 1):
        raise ValueError(f"n: expected a positive number of digits, got {n!r}")
    if not is_int(seed):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed}")
    if threads is not None:
        if not is_int(threads):
            raise TypeError(f"threads: expected a positive int or None, got {threads!r}")
        if threads < 1:
            raise ValueError(f"threads: expected a positive int or None, got {threads}")


def run_claim(
    claim: str,
    *,
    out: str | os.PathLike = "results",
    quick: bool = False,
    n: int | None = None,
    data: str | os.PathLike | None = None,
    smoothing_models: str | os.PathLike = "results/smoothing_models",
    seed: int = 0,
    threads: int | None = 2,
    _env: _Env | None = None,
) -> ClaimResult:
    """Run one claim and write ``OUT/<claim>/<claim>.md``, ``.json`` and figures.

    Parameters
    ----------
    claim : str
        One of :data:`CLAIMS`.
    out : str or path-like
        Output folder (``OUT/<claim>/`` is created).
    quick : bool
        Smoke-test settings (:data:`QUICK`): a few digits, few samples.  Not the claim.
    n : int, optional
        Number of evaluation digits (``fig2``: digits shown), overriding the default.
    data : str or path-like, optional
        ``mnist10k.npz``; default: found by :func:`find_data` (``FLOWVERIFY_DATA``,
        ``./shared/data``, ``../shared/data``, next to a source checkout).  Without it a
        full claim fails (ValueError naming ``data``); a ``quick`` run uses the bundled
        digits (no training pool: see the module docstring) and says so in its outputs.
    smoothing_models : str or path-like
        Folder of the smoothed base nets ``smoothing_sigma<σ>.pt``
        (``scripts/train_smoothing.py``); missing ones are trained and saved there
        (``quick``: tiny ones under ``OUT``).
    seed : int
        Seed of references, attacks and smoothing noise.
    threads : int or None
        ``torch.set_num_threads`` during the run (restored afterwards); None leaves it.

    Returns
    -------
    ClaimResult
    """
    if not isinstance(claim, str) or claim not in CLAIMS:
        hint = " (reproduce() runs 'all')" if claim == "all" else ""
        raise ValueError(f"claim: expected one of {', '.join(CLAIMS)}{hint}, got {claim!r}")
    _check_args(
        out=out,
        quick=quick,
        n=n,
        data=data,
        smoothing_models=smoothing_models,
        seed=seed,
        threads=threads,
    )
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        env = _env or _load_env(out, quick, seed, data, smoothing_models)
        cfg = dict(SETTINGS[claim])
        if quick:
            cfg.update(QUICK[claim])
        if n is not None:
            cfg["n"] = int(n)
            if claim == "fig2":
                cfg["candidates"] = max(cfg["candidates"], int(n))
        (env.out / claim).mkdir(parents=True, exist_ok=True)
        logger.info("reproduce %s: %s", claim, cfg)
        t = _timer()
        res = _RUNNERS[claim](env, cfg)
        res.seconds = t()
        res.settings.update(
            quick=bool(quick), seed=env.seed, data=env.source, threads=torch.get_num_threads()
        )
        res.settings["machine"] = env.machine
        base = env.out / claim / claim
        res.files[f"{claim}.md"] = str(base.with_suffix(".md"))
        res.files[f"{claim}.json"] = str(base.with_suffix(".json"))
        base.with_suffix(".json").write_text(
            json.dumps(res.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8"
        )
        base.with_suffix(".md").write_text(_markdown(res, env), encoding="utf-8")
        logger.info("reproduce %s: done in %.1f s", claim, res.seconds)
        return res
    finally:
        torch.set_num_threads(old_threads)


def reproduce(
    claims: str | Sequence[str] = "all",
    *,
    out: str | os.PathLike = "results",
    quick: bool = False,
    n: int | None = None,
    data: str | os.PathLike | None = None,
    smoothing_models: str | os.PathLike = "results/smoothing_models",
    seed: int = 0,
    threads: int | None = 2,
) -> list[ClaimResult]:
    """Run several claims one after the other (``"all"``: every claim in :data:`CLAIMS`).

    Parameters are those of :func:`run_claim`; the data are loaded once.

    Returns
    -------
    list of ClaimResult
    """
    if isinstance(claims, str):
        names = list(CLAIMS) if claims == "all" else [claims]
    elif isinstance(claims, Sequence) and claims:
        names = list(claims)
    else:
        raise ValueError(f"claims: expected 'all', a claim or a list of claims, got {claims!r}")
    for c in names:
        if not isinstance(c, str) or c not in CLAIMS:
            raise ValueError(f"claims: expected some of {', '.join(CLAIMS)} or all, got {c!r}")
    _check_args(
        out=out,
        quick=quick,
        n=n,
        data=data,
        smoothing_models=smoothing_models,
        seed=seed,
        threads=threads,
    )
    env = _load_env(out, quick, seed, data, smoothing_models)
    return [
        run_claim(
            c,
            out=out,
            quick=quick,
            n=n,
            seed=seed,
            threads=threads,
            smoothing_models=smoothing_models,
            _env=env,
        )
        for c in names
    ]
