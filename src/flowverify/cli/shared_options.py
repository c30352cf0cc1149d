"""The options that ``flowverify certify`` and ``flowverify attack`` share (``--model``,
``--data``, ``--indices``, ``--device``, ``--no-progress``), declared once
(:class:`flowverify.cli.options.Option`); a subcommand that words one differently
derives its own with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from flowverify.cli.options import Option

__all__ = ["DATA", "DEVICE", "INDICES", "MODEL", "NO_PROGRESS"]

MODEL = Option(
    "--model",
    required=True,
    help="bundled name (linear, fc, cnn), an .onnx file or a flowverify checkpoint (.pt)",
    record_value=str,
)
DATA = Option(
    "--data",
    default="bundled",
    help="images: 'bundled' (500 bundled digits), .npz (x, optional y), MNIST IDX file "
    "or folder, or a PNG (default %(default)s)",
    record_value=str,
)
INDICES = Option("--indices", help="which images, e.g. '0:100' or '1,5,9' (default: all)")
DEVICE = Option(
    "--device",
    default="cpu",
    help="cpu (default), cuda or cuda:N (with --backend ray, each task asks for a quarter "
    "of a GPU)",
    keyword="device",
)
NO_PROGRESS = Option(
    "--no-progress", action="store_true", help="no progress bar on stderr", record=False
)
