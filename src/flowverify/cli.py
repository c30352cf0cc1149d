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
import importlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np

from . import __version__

UNITS_HELP = (
    "Units: 'normalised' W1 is between images scaled to mass 1 (the paper's unit); 'raw' W1 "
    "is between the images as given (pixels in [0,1]); raw = mass x normalised. Ground cost: "
    "L1 distance between pixel coordinates."
)

# Subcommands that live in their own modules: name -> module (imported lazily, so a
# subcommand whose optional parts are missing does not break the others).
_PLUGINS = ("_cli_certify", "_cli_attack", "_cli_report", "_cli_reproduce")


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
        help="run the pipeline on the bundled fc model and bundled digits",
        description="Flows, exact W1 and (when available) certified radii and attacks on the "
        "bundled 'fc' model and the first bundled evaluation digits. " + UNITS_HELP,
    )
    demo.add_argument("--model", default="fc", help="model (bundled name, .onnx, .pt)")
    demo.add_argument("--n", type=int, default=20, help="number of bundled digits (default 20)")
    demo.add_argument(
        "--out", default="flowverify-demo.jsonl", help="JSONL output (default %(default)s)"
    )
    demo.add_argument(
        "--fast", action="store_true", help="skip the complete certifier and the attack"
    )
    demo.add_argument(
        "--complete-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time limit of the complete certifier per digit (default %(default)s); a digit "
        "it does not finish shows its proven lower bound as '>=r'",
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
            mod = importlib.import_module(f"flowverify.{name}")
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


def _optional(module: str):
    try:
        return importlib.import_module(f"flowverify.{module}")
    except ImportError:
        return None


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .datasets import bundled_digits
    from .flows import apply_flow, inverse_flow, w1_distance
    from .models import load_model
    from .references import make_reference
    from .results import JsonlWriter

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
    mass = x.sum(axis=(1, 2, 3))

    certify_mod = None if args.fast else _optional("certify")
    certify_fn = getattr(certify_mod, "certify", None) if certify_mod else None
    attack_mod = None if args.fast else _optional("attack")
    attack_fn = getattr(attack_mod, "attack", None) if attack_mod else None

    cols = ["idx", "label", "pred", "W1(R,x)", "|flow|_1", "Δ(R,Δ⁻¹)=x"]
    if certify_fn is not None:
        cols += ["vanilla", "feasible"]
        if args.model in ("fc", "linear"):
            cols.append("complete")
    if attack_fn is not None:
        cols.append("attack")

    rows = []
    t0 = time.perf_counter()
    out = JsonlWriter(args.out, name="--out")
    with _removed_on_error(args.out), out:  # closed first, then removed on error
        for i in tqdm(range(len(x)), desc="demo", unit="img", file=sys.stderr, leave=False):
            xi = x[i : i + 1]
            flow = inverse_flow(ref[i : i + 1], xi, method="minimal")
            w1 = float(w1_distance(ref[i : i + 1], xi, unit="normalised")[0])
            norm = float(np.abs(flow).sum()) / mass[i]
            err = float(np.abs(apply_flow(ref[i : i + 1], flow) - xi).max())
            ok = err <= 1e-9 * max(1.0, float(np.abs(xi).max()))
            rec: dict[str, object] = {
                "index": i,
                "label": int(y[i]),
                "prediction": int(pred[i]),
                "w1_uniform": w1,
                "flow_l1": norm,
                "roundtrip_max_error": err,
                "roundtrip_ok": ok,
                "unit": "normalised",
            }
            rec.update(_demo_extras(args, model, xi, int(y[i]), certify_fn, attack_fn))
            out.write(rec)
            rows.append(rec)
    _print_demo_table(rows, cols)
    print(
        f"\n{len(rows)} digits in {time.perf_counter() - t0:.1f} s; radii and W1 in the "
        f"normalised unit (image mass 1, L1 ground cost). Records: {args.out}"
    )
    if "complete" in cols:
        print(
            "certified (vanilla, feasible) <= exact (complete) <= attack; '>=r': the complete "
            f"certifier hit its {args.complete_timeout:g} s limit, r is its proven lower bound"
        )
    return 0


def _demo_predictions(model, x: np.ndarray, *, num_classes: int) -> np.ndarray:
    """The model's predictions on the digits ``x``; ValueError naming --model if it does
    not take them or does not return ``(N, num_classes)`` logits."""
    import torch

    from .flowmodel import _infer_flat

    tensors = [*model.parameters(), *model.buffers()]
    param = next((t for t in tensors if t.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    inp = torch.as_tensor(x, dtype=dtype, device=device)
    if _infer_flat(model):
        inp = inp.reshape(len(x), -1)
    try:
        with torch.no_grad():
            logits = model(inp)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"--model: the model cannot run on the bundled digits (input shape "
            f"{tuple(inp.shape)}): {reason}"
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


def _demo_extras(args, model, xi, label, certify_fn, attack_fn) -> dict[str, object]:
    out: dict[str, object] = {}
    if certify_fn is not None:
        for method in ("vanilla", "feasible"):
            res = certify_fn(model, xi, np.array([label]), method=method)
            r = res[0] if isinstance(res, list) else res
            out[f"radius_{method}"] = float(r.radius)
        if args.model in ("fc", "linear"):
            res = certify_fn(
                model, xi, np.array([label]), method="complete", timeout=args.complete_timeout
            )
            r = res[0] if isinstance(res, list) else res
            out["radius_complete"] = float(r.radius)
            out["complete_exact"] = bool(r.exact)
    if attack_fn is not None:
        res = attack_fn(model, xi, np.array([label]), eps=None)
        out["attack_w1"] = float(np.asarray(res.w1).reshape(-1)[0])
    return out


def _print_demo_table(rows: list[dict[str, object]], cols: list[str]) -> None:
    keys = {
        "idx": "index",
        "label": "label",
        "pred": "prediction",
        "W1(R,x)": "w1_uniform",
        "|flow|_1": "flow_l1",
        "Δ(R,Δ⁻¹)=x": "roundtrip_ok",
        "vanilla": "radius_vanilla",
        "feasible": "radius_feasible",
        "complete": "radius_complete",
        "attack": "attack_w1",
    }
    widths = [max(len(c), 9) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for rec in rows:
        cells = []
        for c in cols:
            v = rec.get(keys[c], "")
            if isinstance(v, bool):
                s = "yes" if v else "NO"
            elif isinstance(v, float):
                s = f"{v:.4f}"
                if c == "complete" and not rec.get("complete_exact", True):
                    s = ">=" + s  # time limit: the proven lower bound
            else:
                s = str(v)
            cells.append(s)
        print("  ".join(s.rjust(w) for s, w in zip(cells, widths, strict=True)))


# ----------------------------------------------------------------------- distance


def _run_distance(args: argparse.Namespace) -> int:
    from .datasets import load_images
    from .flows import w1_distance

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
