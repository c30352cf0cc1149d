r"""The result of the attack: one row per (image, budget) (paper section 4, Theorem 1).

:class:`AttackResult` holds the returned adversarial images with, per row, the in-loop
claim re-checked by the original model, the size certificate of Theorem 1
(:math:`W_1(\bar\mu, \mu) \le \|\hat\delta - \delta_\mu\|_1 \le \varepsilon`) and the
exact W1 of the returned image, and writes them as JSON-ready records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowverify.core.results import Status, jsonable

__all__ = ["AttackResult"]


@dataclass
class AttackResult:
    r"""Result of :class:`~flowverify.attacks.pgd.WassersteinPGD`: one row per (image, budget).

    Rows are ordered budget-major (all images at the first budget, then the next); in
    minimal-radius mode there is one row per image.  All arrays are numpy, length ``R``.

    Attributes
    ----------
    adversarial : ndarray
        ``(R, C, H, W)`` returned images in data units (dtype of the input images):
        non-negative, of the input's mass per channel (up to the dtype's rounding), and
        ``<= clip_max`` if set.  For failed rows, the final iterate (fixed budget) or the
        unchanged image (minimal radius).
    index : ndarray
        ``(R,)`` int, position of the image in the batch given to the attack.
    eps : ndarray
        ``(R,)`` budget, normalised.  Minimal-radius mode: the budget of the probe that
        produced the returned adversarial (``inf`` if none).
    success : ndarray
        ``(R,)`` bool, ``prediction_adversarial != label``, from a forward pass of the
        original model on ``adversarial``.
    w1_bound : ndarray
        ``(R,)`` the size certificate ``||δ̂ - δµ||_1`` in the normalised unit (plus an
        outward-rounding term for the cast to the output dtype): ``w1 <= w1_bound <= eps``.
        ``inf`` for failed rows in minimal-radius mode.
    w1 : ndarray
        ``(R,)`` exact W1 (L1 ground cost) between ``adversarial`` and the image,
        normalised.  Minimal-radius mode: the radius found (``inf`` where it failed).
    w1_raw : ndarray
        ``(R,)`` the same in data units (raw W1).
    label, prediction, prediction_adversarial : ndarray
        ``(R,)`` int: the label attacked, the model's class on the image and on
        ``adversarial``.
    iterations : ndarray
        ``(R,)`` int, gradient steps taken (all runs of the row).
    seconds : ndarray
        ``(R,)`` wall time of the row's run (attack, re-check and exact W1) divided by the
        batch size.
    threat_model : str
        ``"w1"`` or ``"w1+pixels<=U"`` (with ``clip_max=U``).
    mode : str
        ``"fixed"`` or ``"minimal"``.
    unit : str
        ``"normalised"`` (the unit of ``eps``, ``w1``, ``w1_bound``).
    config : dict
        The attack's resolved hyperparameters.
    max_pixel : ndarray
        ``(R,)`` the largest pixel of ``adversarial`` in data units.  In the default
        threat model (``"w1"``: non-negative images of the input's mass, the paper's)
        pixels are not bounded above, so an adversarial of a model trained on [0, 1]
        images may exceed 1; ``clip_max`` bounds them.
    """

    adversarial: np.ndarray
    index: np.ndarray
    eps: np.ndarray
    success: np.ndarray
    w1_bound: np.ndarray
    w1: np.ndarray
    w1_raw: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    prediction_adversarial: np.ndarray
    iterations: np.ndarray
    seconds: np.ndarray
    threat_model: str
    mode: str
    unit: str = "normalised"
    config: dict = field(default_factory=dict)
    max_pixel: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.max_pixel is None:
            adv = np.asarray(self.adversarial)
            flat = adv.reshape(adv.shape[0], int(np.prod(adv.shape[1:])))
            self.max_pixel = flat.max(axis=1, initial=-np.inf).astype(np.float64)

    _ROW_KEYS = (
        "index",
        "label",
        "prediction",
        "eps",
        "success",
        "w1_bound",
        "w1",
        "w1_raw",
        "prediction_adversarial",
        "iterations",
        "seconds",
        "max_pixel",
    )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def success_matrix(self) -> np.ndarray:
        """``(N, E)`` bool: success of image ``n`` at the ``e``-th budget (fixed mode)."""
        n = int(self.index.max()) + 1 if len(self) else 0
        return self.success.reshape(-1, n).T if n else self.success.reshape(0, 0)

    def to_records(
        self, *, indices: Sequence[int] | np.ndarray | None = None, config: Any = None
    ) -> list[dict[str, Any]]:
        """One JSON-ready dict per row.

        Keys: ``kind`` (``"attack"``), ``status`` (``misclassified`` when the clean image
        already is, ``falsified`` when an adversarial was found, else ``unknown``),
        ``index`` (``indices[index]`` when ``indices`` maps batch positions to data
        set indices), ``label``, ``prediction``, ``eps``, ``success``, ``w1_bound``,
        ``w1``, ``w1_raw``, ``prediction_adversarial``, ``iterations``, ``seconds``,
        ``max_pixel``, ``unit``, ``threat_model``, ``mode``, and ``config`` if given.
        Non-finite numbers become the strings ``"inf"``/``"nan"`` (strict JSON).
        """
        rows = []
        for r in range(len(self)):
            rec: dict[str, Any] = {"kind": "attack", "status": self.row_status(r)}
            for key in self._ROW_KEYS:
                rec[key] = getattr(self, key)[r].item()
            if indices is not None:
                rec["index"] = int(np.asarray(indices)[rec["index"]])
            rec["unit"] = self.unit
            rec["threat_model"] = self.threat_model
            rec["mode"] = self.mode
            if config is not None:
                rec["config"] = config
            rows.append(jsonable(rec))
        return rows

    def row_status(self, r: int) -> Status:
        """The shared status of row ``r``: ``misclassified`` (the clean image already is),
        ``falsified`` (an adversarial image was found) or ``unknown``."""
        if int(self.prediction[r]) != int(self.label[r]):
            return Status.MISCLASSIFIED
        return Status.FALSIFIED if bool(self.success[r]) else Status.UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        """Column-wise JSON-ready dict (without the adversarial images)."""
        out = {key: getattr(self, key) for key in self._ROW_KEYS}
        out["kind"] = "attack"
        out["status"] = [self.row_status(r).value for r in range(len(self))]
        out.update(
            unit=self.unit, threat_model=self.threat_model, mode=self.mode, config=self.config
        )
        return jsonable(out)
