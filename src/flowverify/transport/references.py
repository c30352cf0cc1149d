r"""Reference distributions ``R`` of the flow domain (paper section 3.2.2, SPEC section 2).

Every image ``µ`` is written as a flow ``δµ`` from a reference ``R`` of the same mass:
``µ = R + Aδµ``.  Any ``R`` is valid (Theorem 1); for incomplete certifiers the choice
matters per image, so the fine-tuned certificate takes the maximum over several
references.  The paper's references: uniform; uniform-random pixels in ``[0, 1]``,
normalised; a point mass on one (random) pixel; a data image.  All are scaled to the
image's mass, per channel.

Spec strings (CLI and :func:`parse_references`): ``uniform``, ``random:K``, ``point:K``,
``data:K`` (K digits of the data set other than the image itself), comma separated; the
paper's six are ``random:2,point:2,data:2``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flowverify.core.validation import (
    Array,
    as_batch,
    check_array,
    check_finite_nonnegative,
    restore_rank,
    to_numpy64,
)

__all__ = ["REFERENCE_KINDS", "Reference", "make_reference", "parse_references"]

REFERENCE_KINDS = ("uniform", "random", "point", "data")


def _check_seed(seed: object, name: str = "seed") -> int:
    """A seed for ``numpy.random.default_rng``: an int >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: expected a non-negative int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {seed}")
    return int(seed)


def _scale_to_mass(shape_img: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Scale ``shape_img (N, C, H, W)`` so that each channel has the mass of ``target``."""
    peak = shape_img.max(axis=(-2, -1), keepdims=True)
    if (peak <= 0).any():
        raise ValueError("reference: expected positive mass in every channel, got a zero channel")
    unit = shape_img / peak  # peak 1 first: a tiny (subnormal) pattern does not overflow
    m_target = target.sum(axis=(-2, -1), keepdims=True)
    return unit * (m_target / unit.sum(axis=(-2, -1), keepdims=True))


def make_reference(kind: str | Array, image: Array, *, seed: int = 0) -> Array:
    """A reference distribution with the mass of ``image`` in every channel.

    Parameters
    ----------
    kind : {"uniform", "random", "point"} or ndarray or Tensor
        ``"uniform"``: constant pixels.  ``"random"``: i.i.d. uniform ``[0, 1]`` pixels
        (seeded).  ``"point"``: all mass on one seeded pixel (the same pixel in every
        channel).  An image ``(C, H, W)`` / ``(H, W)`` / ``(N, C, H, W)``: used as the
        shape of the reference and rescaled.
    image : ndarray or Tensor
        Images ``(N, C, H, W)`` (or ``(C, H, W)``, ``(H, W)``) whose masses the reference
        takes; each channel must have positive mass.
    seed : int
        Seed of ``"random"`` and ``"point"`` (``numpy.random.default_rng(seed)``).

    Returns
    -------
    ndarray or Tensor
        References of the shape, kind, dtype and device of ``image``; ``R[n]`` has the
        mass of ``image[n]`` per channel.  The draw of ``"random"``/``"point"`` is one
        pattern shared by the whole batch.
    """
    seed = _check_seed(seed)
    img_b, rank = as_batch(image, "image")
    check_finite_nonnegative(img_b, "image")
    img64 = to_numpy64(img_b)
    n, c, height, width = img64.shape
    if isinstance(kind, str):
        rng = np.random.default_rng(seed)
        if kind == "uniform":
            pattern = np.ones((1, c, height, width))
        elif kind == "random":
            pattern = rng.uniform(0.0, 1.0, size=(1, c, height, width))
        elif kind == "point":
            pattern = np.zeros((1, c, height, width))
            pos = rng.integers(height * width)
            pattern[..., pos // width, pos % width] = 1.0
        else:
            raise ValueError(
                f"kind: unknown reference {kind!r}; valid kinds: uniform, random, point, "
                "or an image array"
            )
    else:
        ref_b, _ = as_batch(kind, "kind")
        check_finite_nonnegative(ref_b, "kind")
        pattern = to_numpy64(ref_b)
        if pattern.shape[1:] != (c, height, width) or pattern.shape[0] not in (1, n):
            raise ValueError(
                f"kind: expected a reference image of shape {(c, height, width)}, got "
                f"{tuple(pattern.shape)}"
            )
    with np.errstate(over="ignore"):  # an overflowing mass is inf, refused below
        mass = img64.sum(axis=(-2, -1))
    if (mass <= 0).any():
        raise ValueError("image: expected positive mass in every channel, got an all-zero channel")
    if not np.isfinite(mass).all():
        raise ValueError(
            "image: expected pixel values whose sum per channel is finite, got a mass that "
            f"overflows float64 (largest pixel {float(img64.max()):g})"
        )
    ref = _scale_to_mass(np.broadcast_to(pattern, img64.shape), img64)
    if isinstance(image, torch.Tensor):
        dtype = image.dtype if image.is_floating_point() else torch.get_default_dtype()
        out = torch.as_tensor(ref, dtype=dtype, device=image.device)
    else:
        dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float64
        out = ref.astype(dtype)
    return restore_rank(out, rank)


@dataclass(frozen=True)
class Reference:
    """One reference of a fine-tuning set.

    Attributes
    ----------
    kind : str
        ``uniform``, ``random``, ``point`` or ``data``.
    seed : int
        Seed of ``random``/``point``; for ``data``, the index of the data image.
    name : str
        A stable label, e.g. ``uniform``, ``random#0``, ``point#1``, ``data#1234``.
    """

    kind: str
    seed: int = 0
    name: str = ""
    pattern: np.ndarray | None = field(default=None, repr=False, compare=False)

    def build(self, image: Array) -> Array:
        """The reference for ``image`` (same shape, mass per channel)."""
        if self.kind == "data":
            if self.pattern is None:
                raise ValueError(f"references: {self.name} has no data image attached")
            return make_reference(self.pattern, image)
        return make_reference(self.kind, image, seed=self.seed)


_SPEC = re.compile(r"^(uniform|random|point|data)(?::(\d+))?$")


def parse_references(
    spec: str | Sequence[str],
    *,
    data: np.ndarray | None = None,
    exclude_index: int | None = None,
    seed: int = 0,
) -> list[Reference]:
    """Resolve reference specs into :class:`Reference` objects.

    Parameters
    ----------
    spec : str or sequence of str
        Comma-separated specs: ``uniform``, ``random:K``, ``point:K``, ``data:K``
        (``K`` defaults to 1; ``uniform`` takes no count).
    data : ndarray, optional
        The data set ``(M, C, H, W)`` from which ``data:K`` draws; required for ``data``.
    exclude_index : int, optional
        Index (into ``data``) of the image being certified; never used as its own
        reference.
    seed : int
        Base seed: ``random#k`` and ``point#k`` use ``seed + k``; data images are drawn
        with ``default_rng(seed)``, the same draw for every image, skipping the image
        itself.

    Returns
    -------
    list of Reference
    """
    if isinstance(spec, str):
        items = [spec]
    elif (
        isinstance(spec, Sequence)
        and not isinstance(spec, (bytes, bytearray))
        and all(isinstance(item, str) for item in spec)
    ):
        items = list(spec)
    else:
        shown = type(spec).__name__
        if isinstance(spec, (list, tuple)):
            shown += " holding " + ", ".join(sorted({type(i).__name__ for i in spec}))
        raise TypeError(
            "references: expected a spec string like 'random:2,point:2,data:2' or a list of "
            f"such strings, got {shown}"
        )
    seed = _check_seed(seed)
    _check_data(data)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise ValueError("references: expected at least one reference spec, got none")
    out: list[Reference] = []
    for part in parts:
        m = _SPEC.match(part)
        if m is None:
            raise ValueError(
                f"references: unknown reference spec {part!r}; valid: uniform, random:K, "
                "point:K, data:K"
            )
        kind, count = m.group(1), int(m.group(2) or 1)
        if count < 1:
            raise ValueError(f"references: expected K >= 1 in {part!r}, got {count}")
        if kind == "uniform":
            if m.group(2) is not None and count != 1:
                raise ValueError(f"references: 'uniform' takes no count, got {part!r}")
            out.append(Reference("uniform", 0, "uniform"))
        elif kind in ("random", "point"):
            out.extend(Reference(kind, seed + k, f"{kind}#{k}") for k in range(count))
        else:
            if data is None:
                raise ValueError(f"references: {part!r} needs a data set to draw images from")
            m_data = len(data)
            if m_data - (exclude_index is not None) < count:
                raise ValueError(
                    f"references: {part!r} asks for {count} data images, the data set has {m_data}"
                )
            order = np.random.default_rng(seed).permutation(m_data)
            chosen = [int(i) for i in order if i != exclude_index][:count]
            for idx in chosen:
                image = as_batch(data[idx], "data")[0]
                try:
                    check_finite_nonnegative(image, "data")
                except ValueError as exc:
                    raise ValueError(f"{exc} (data image {idx}, drawn by {part!r})") from None
                pattern = to_numpy64(image)
                out.append(Reference("data", idx, f"data#{idx}", pattern))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"references: duplicate references in {spec!r}")
    return out


def _check_data(data: object) -> None:
    """The data set of ``data:K`` references: ``(M, C, H, W)`` or ``(M, H, W)`` images.

    Only the shape is checked here (O(1)); the values of the images that are drawn are
    checked when they are drawn.
    """
    if data is None:
        return
    check_array(data, "data")
    if data.ndim not in (3, 4):
        raise ValueError(
            "data: expected a data set of images of shape (M, C, H, W) or (M, H, W), got "
            f"shape {tuple(data.shape)}"
        )
    if data.shape[-2] == 0 or data.shape[-1] == 0:
        raise ValueError(
            f"data: expected images of at least 1x1 pixels, got shape {tuple(data.shape)}"
        )
