"""The bundled model zoo: the named architectures and the trained models shipped with
the package.

All bundled architectures take raw pixels in data units ``[0, 1]`` with shape
``(N, 1, 28, 28)`` and return logits of shape ``(N, 10)``. The trained weights live in
``flowverify/assets/<name>.pt`` as code-free checkpoints (:mod:`.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from torch import nn

from flowverify.model.checkpoint import load_checkpoint

__all__ = ["ARCHITECTURES", "BUNDLED_MODELS", "build_architecture", "bundled_model"]

#: Names of the models whose trained weights ship with the package
#: (``flowverify/assets/<name>.pt``; see ``scripts/train_models.py``).
BUNDLED_MODELS: tuple[str, ...] = ("linear", "fc", "cnn")


def _linear() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _fc() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=5, stride=2),  # 28 -> 12
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=5, stride=2),  # 12 -> 4
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def _smoothing_base() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=4, stride=2, padding=1),  # 28 -> 14
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1),  # 14 -> 7
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


_BUILDERS: dict[str, Callable[[], nn.Sequential]] = {
    "linear": _linear,
    "fc": _fc,
    "cnn": _cnn,
    "smoothing_base": _smoothing_base,
}

#: Names accepted by :func:`build_architecture`.
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def build_architecture(name: str) -> nn.Sequential:
    """Build an untrained network of a named architecture.

    Parameters
    ----------
    name : {"linear", "fc", "cnn", "smoothing_base"}
        ``linear``: Flatten, Linear(784, 10).
        ``fc``: Flatten, Linear(784, 100), ReLU, Linear(100, 100), ReLU,
        Linear(100, 10).
        ``cnn``: Conv2d(1, 8, 5, stride 2), ReLU, Conv2d(8, 16, 5, stride 2),
        ReLU, Flatten, Linear(256, 10).
        ``smoothing_base``: the MNIST base classifier of Levine & Feizi's
        Wasserstein smoothing: Conv2d(1, 16, 4, stride 2, padding 1), ReLU,
        Conv2d(16, 32, 4, stride 2, padding 1), ReLU, Flatten,
        Linear(1568, 100), ReLU, Linear(100, 10).

    Returns
    -------
    torch.nn.Sequential
        Float32 network on the CPU, initialised from the current torch RNG.
        Input ``(N, 1, 28, 28)`` pixels in ``[0, 1]``, output ``(N, 10)`` logits.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {ARCHITECTURES}, got {name!r}")
    return _BUILDERS[name]()


def bundled_model(name: str) -> nn.Sequential:
    """Load one of the trained models shipped with flowverify.

    Parameters
    ----------
    name : str
        One of :data:`BUNDLED_MODELS` (``"linear"``, ``"fc"``, ``"cnn"``).
        They were trained by ``scripts/train_models.py`` on the first 8,000
        digits of ``mnist10k.npz``; their metadata holds the accuracy on the
        last 2,000.

    Returns
    -------
    torch.nn.Sequential
        The network in eval mode; input ``(N, 1, 28, 28)`` pixels in
        ``[0, 1]``, output ``(N, 10)`` logits.
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"name must be one of the bundled models {BUNDLED_MODELS}, got {name!r}")
    ref = resources.files("flowverify").joinpath("assets", f"{name}.pt")
    with resources.as_file(ref) as p:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"bundled model {name!r} not found at {str(p)!r}; reinstall flowverify or "
                "run scripts/train_models.py"
            )
        return load_checkpoint(p)
