"""The ``flowverify`` command line.

Subcommands: ``demo`` (bundled model and digits), ``distance`` (exact W1 between two
images), ``certify`` (certified / exact radii) and ``attack`` (Wasserstein PGD).

Units, everywhere: ``normalised`` W1 is measured between images scaled to mass 1 per
channel (the unit of the paper and the attack literature); ``raw`` W1 between the images
as given (pixels in [0, 1], mass = sum of pixels), so raw = mass x normalised.  The
ground cost is the L1 distance between pixel coordinates (one pixel step costs 1).

Bad input (missing file, wrong shape, negative or NaN pixels, unknown names) prints one
line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np

from flowverify import __version__

UNITS_HELP = (
    "Units: 'normalised' W1 is between images scaled to mass 1 (the paper's unit); 'raw' W1 "
    "is between the images as given (pixels in [0,1]); raw = mass x normalised. Ground cost: "
    "L1 distance between pixel coordinates."
)

# Subcommands that live in their own modules: name -> module (imported lazily, so a
# subcommand whose optional parts are missing does not break the others).
_PLUGINS = ("certify_cmd", "attack_cmd", "report_cmd", "reproduce_cmd")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flowverify",
        description="Verify image classifiers against Wasserstein (W1) perturbations. "
        + UNITS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"flowverify {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="certify, bracket and attack the first bundled digits with the bundled fc model",
        description="For each of the first bundled evaluation digits: the certified W1 radius "
        "(a proof), the exact radius or a bracket from the complete certifier, and the closest "
        "adversarial image found. " + UNITS_HELP,
    )
    demo.add_argument("--model", default="fc", help="model (bundled name, .onnx, .pt)")
    demo.add_argument("--n", type=int, default=20, help="number of bundled digits (default 20)")
    demo.add_argument(
        "--out", default="flowverify-demo.jsonl", help="JSONL output (default %(default)s)"
    )
    demo.add_argument(
        "--fast",
        action="store_true",
        help="certified radii only: skip the complete certifier and the attack",
    )
    demo.add_argument(
        "--complete-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time limit of the complete certifier per digit (default %(default)s); a digit "
        "it does not finish shows the bracket [proven, closest adversarial]",
    )
    demo.set_defaults(func=_run_demo)

    dist = sub.add_parser(
        "distance",
        help="exact W1 between two images (.npz first image, or PNG)",
        description="Exact W1 with L1 ground cost between two images given as .npz (first "
        "image, key 'x') or PNG files. " + UNITS_HELP,
    )
    dist.add_argument("a", help="first image (.npz or .png)")
    dist.add_argument("b", help="second image (.npz or .png)")
    dist.set_defaults(func=_run_distance)

    for name in _PLUGINS:
        try:
            mod = importlib.import_module(f"flowverify.cli.{name}")
        except ImportError as exc:
            logging.getLogger(__name__).debug("subcommand module %s unavailable: %s", name, exc)
            continue
        p = mod.add_parser(sub)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowverify`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _run(args)
    finally:
        warnings.showwarning = shown


class _TqdmHandler(logging.Handler):
    """Log records on stderr, each on its own line above any progress bar (tqdm.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_above_bars(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def _write_above_bars(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text.rstrip("\n"), file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the command: the usual text, on its own stderr line
    (a progress bar that was drawn there is cleared and redrawn below it)."""
    if file is not None and file is not sys.stderr:
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    _write_above_bars(warnings.formatwarning(message, category, filename, lineno, line))


def _run(args: argparse.Namespace) -> int:
    try:
        code = args.func(args)
    except _user_errors() as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename:
            msg = f"file not found: {exc.filename}"
        print(f"flowverify {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowverify {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


# --------------------------------------------------------------------------- demo


_DEMO_LEGEND = """\
How to read this: a digit's pixels are mass, and the W1 distance between two images is
the least total cost of moving mass to turn one into the other (one pixel step costs
1; normalised unit: image mass 1).  'certified' is a proof: every image within that W1
distance of the digit is classified as its label.  'exact' is the true distance to the
nearest misclassified image; where the complete certifier did not finish within its
time limit it shows the bracket [proven, found] that contains it.  'adversarial' is the
W1 distance of the closest misclassified image found (a witness, checked by the model):
certified <= exact <= adversarial.  Adversarials are non-negative images of the digit's
mass (the paper's threat model).  --verbose adds the flow quantities of the paper."""

_DEMO_LEGEND_VERBOSE = """\
Paper quantities: R is the reference image (uniform, the digit's mass spread evenly);
the digit is written as R plus the divergence of a flow, Δ(R, δ) = R + Aδ; 'W1(R,x)' is
the exact W1 from R to the digit and '|flow|_1' the L1 norm of the minimal flow found
(Theorem 1: equal); 'roundtrip' checks Δ(R, Δ⁻¹(R, x)) = x; 'vanilla' is the radius
certified over the W1 ball (Theorem 3), 'certified' the feasible one over the W1
polytope (Theorem 6)."""


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from flowverify.core.results import JsonlWriter
    from flowverify.io.bundled import bundled_digits
    from flowverify.model.loading import load_model
    from flowverify.transport.references import make_reference

    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of digits, got {args.n}")
    if not args.complete_timeout > 0:  # also NaN
        raise ValueError(f"--complete-timeout: expected seconds > 0, got {args.complete_timeout}")
    x_all, y_all = bundled_digits()
    if args.n > len(x_all):
        raise ValueError(f"--n: the bundled sample has {len(x_all)} digits, got {args.n}")
    x = x_all[: args.n].astype(np.float64)
    y = y_all[: args.n]
    model = load_model(args.model)
    pred = _demo_predictions(model, x, num_classes=int(y_all.max()) + 1)
    ref = make_reference("uniform", x)
    verbose = bool(getattr(args, "verbose", False))

    from flowverify.api import certify as certify_fn
    from flowverify.attacks import attack

    attack_fn = None if args.fast else attack
    complete = certify_fn is not None and not args.fast

    cols = ["digit", "label", "pred"]
    if verbose:
        cols += ["W1(R,x)", "|flow|_1", "roundtrip", "vanilla"]
    if certify_fn is not None:
        cols.append("certified")
    if complete:
        cols.append("exact")
    if complete or attack_fn is not None:
        cols.append("adversarial")
    widths = {c: (19 if c == "exact" else max(len(c), 7)) for c in cols}
    emit = functools.partial(tqdm.write, file=sys.stdout)
    emit("  ".join(c.rjust(widths[c]) for c in cols))

    rows = []
    t0 = time.perf_counter()
    out = JsonlWriter(args.out, name="--out")
    with _removed_on_error(args.out), out:  # closed first, then removed on error
        for i in tqdm(range(len(x)), desc="demo", unit="digit", file=sys.stderr, leave=False):
            rec = _demo_record(i, x[i : i + 1], int(y[i]), int(pred[i]), ref[i : i + 1])
            rec.update(
                _demo_extras(args, model, x[i : i + 1], int(y[i]), certify_fn, attack_fn, complete)
            )
            out.write(rec)
            rows.append(rec)
            emit(_demo_row(rec, cols, widths))
    print(
        f"\n{len(rows)} digits in {time.perf_counter() - t0:.1f} s, model {args.model!r}; "
        f"records: {args.out}\n"
    )
    print(_DEMO_LEGEND)
    if complete:
        print(
            f"The complete certifier had {args.complete_timeout:g} s per digit "
            "(--complete-timeout)."
        )
    if verbose:
        print("\n" + _DEMO_LEGEND_VERBOSE)
    return 0


def _demo_record(i, xi, label, pred, ref) -> dict[str, object]:
    """The flow quantities of one digit (Theorem 1): W1 from the reference, the minimal
    flow's L1 norm and the round trip ``Δ(R, Δ⁻¹(R, x)) = x``."""
    from flowverify.transport.flows import apply_flow, inverse_flow, w1_distance

    mass = float(xi.sum())
    flow = inverse_flow(ref, xi, method="minimal")
    err = float(np.abs(apply_flow(ref, flow) - xi).max())
    return {
        "index": i,
        "label": label,
        "prediction": pred,
        "w1_uniform": float(w1_distance(ref, xi, unit="normalised")[0]),
        "flow_l1": float(np.abs(flow).sum()) / mass,
        "roundtrip_max_error": err,
        "roundtrip_ok": err <= 1e-9 * max(1.0, float(np.abs(xi).max())),
        "unit": "normalised",
    }


def _demo_predictions(model, x: np.ndarray, *, num_classes: int) -> np.ndarray:
    """The model's predictions on the digits ``x``; ValueError naming --model if it does
    not take them or does not return ``(N, num_classes)`` logits."""
    import torch

    from flowverify.cli.common import first_line, model_input

    inp = model_input(model, x)
    try:
        with torch.no_grad():
            logits = model(inp)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"--model: the model cannot run on the bundled digits (input shape "
            f"{tuple(inp.shape)}): {first_line(exc)}"
        ) from None
    expected = (len(x), num_classes)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        if isinstance(logits, torch.Tensor):
            got = f"shape {tuple(logits.shape)}"
        else:
            got = f"a {type(logits).__name__}"
        raise ValueError(
            f"--model: expected logits of shape (N, {num_classes}) for the {num_classes} digit "
            f"classes, got {got}"
        )
    return logits.argmax(1).cpu().numpy()


@contextlib.contextmanager
def _removed_on_error(path: str):
    """Delete the output file if the block fails: no half-written results are left."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


def _demo_extras(args, model, xi, label, certify_fn, attack_fn, complete) -> dict[str, object]:
    out: dict[str, object] = {}
    if certify_fn is None:
        return out
    for method in ("vanilla", "feasible"):
        r = certify_fn(model, xi, np.array([label]), method=method)[0]
        out[f"radius_{method}"] = float(r.radius)
    upper = math.inf
    if complete:
        r = certify_fn(
            model, xi, np.array([label]), method="complete", timeout=args.complete_timeout
        )[0]
        # both are proofs: the bracket starts at the larger
        out["radius_complete"] = max(float(r.radius), out["radius_feasible"])
        out["complete_exact"] = bool(r.exact)
        if r.upper is not None and math.isfinite(r.upper):
            upper = float(r.upper)
            out["complete_upper"] = upper
    if attack_fn is not None and not complete:  # complete runs its own attacks
        res = attack_fn(model, xi, np.array([label]), eps=None)
        w1 = float(np.asarray(res.w1).reshape(-1)[0])
        out["attack_w1"] = w1
        upper = min(upper, w1) if math.isfinite(w1) else upper
    if math.isfinite(upper):
        out["adversarial_w1"] = upper
    return out


def _demo_row(rec: dict[str, object], cols: list[str], widths: dict[str, int]) -> str:
    """One table row; the exact column shows a bracket where complete did not finish."""

    def cell(c: str) -> str:
        if c == "exact":
            if rec.get("prediction") != rec.get("label"):
                return "misclassified"
            lo = rec.get("radius_complete")
            if lo is None:
                return ""
            if rec.get("complete_exact"):
                return f"{lo:.4f}"
            hi = rec.get("complete_upper")
            return f"[{lo:.4f}, {hi:.4f}]" if hi is not None else f">= {lo:.4f}"
        key = {
            "digit": "index",
            "label": "label",
            "pred": "prediction",
            "W1(R,x)": "w1_uniform",
            "|flow|_1": "flow_l1",
            "roundtrip": "roundtrip_ok",
            "vanilla": "radius_vanilla",
            "certified": "radius_feasible",
            "adversarial": "adversarial_w1",
        }[c]
        v = rec.get(key, "")
        if isinstance(v, bool):
            return "ok" if v else "FAILED"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v) if v != "" else "-"

    return "  ".join(cell(c).rjust(widths[c]) for c in cols)


# ----------------------------------------------------------------------- distance


def _run_distance(args: argparse.Namespace) -> int:
    from flowverify.io.images import load_images
    from flowverify.transport.flows import w1_distance

    xa, _ = load_images(args.a)
    xb, _ = load_images(args.b)
    a, b = xa[0].astype(np.float64), xb[0].astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"b: expected an image of shape {a.shape} like a, got {b.shape}")
    norm = float(w1_distance(a, b, unit="normalised"))
    ma, mb = a.sum(axis=(-2, -1)), b.sum(axis=(-2, -1))
    print(f"W1 normalised: {norm:.10g}  (images scaled to mass 1 per channel)")
    if np.allclose(ma, mb, rtol=1e-9, atol=0):
        raw = float(w1_distance(a, b, unit="raw"))
        print(f"W1 raw:        {raw:.10g}  (mass {float(ma.sum()):.6g})")
    else:
        print(
            f"W1 raw:        n/a (masses differ: {float(ma.sum()):.6g} vs {float(mb.sum()):.6g}; "
            "raw W1 needs equal mass)"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
