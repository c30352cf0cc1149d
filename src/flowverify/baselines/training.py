"""Training of Wasserstein smoothing's base classifier on Laplace flow noise (paper section
3.3; Levine & Feizi, AISTATS 2020).

Every minibatch image ``x`` is replaced by one fresh noisy draw ``x + s·Aη``
(:func:`~flowverify.baselines.noise.add_flow_noise`), the input the smoothed classifier
feeds its base classifier, and the cross-entropy is minimised with Adam and a cosine
learning-rate schedule; one seed fixes the initialisation, the shuffling and the noise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from flowverify.baselines.checks import _check_count, _check_images, _check_sigma
from flowverify.baselines.noise import _image_seed, add_flow_noise
from flowverify.core.validation import check_device, check_labels

__all__ = ["train_smoothed_model"]

logger = logging.getLogger(__name__)


def _check_data(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError("data: expected a pair (images, labels)")
    x = _check_images(data[0]).float()
    y = torch.from_numpy(check_labels(data[1], x.shape[0]))
    if x.shape[0] == 0:
        raise ValueError("data: expected at least one training image, got none")
    return x, y


def train_smoothed_model(
    sigma: float,
    *,
    data: tuple[Any, Any],
    epochs: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    architecture: str = "smoothing_base",
    model: nn.Sequential | None = None,
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    r"""Train a base classifier on flow-noised images (Levine & Feizi's training).

    Each minibatch image ``x`` is replaced by one fresh draw ``x + s·Aη``
    (:func:`add_flow_noise`, ``η`` i.i.d. Laplace(0, σ/√2) in normalised flow units) and
    the cross-entropy is minimised with Adam and a cosine learning-rate schedule.

    Parameters
    ----------
    sigma : float
        Noise level, normalised flow units (as in
        :func:`~flowverify.baselines.smoothing.smoothed_certify`).
    data : (images, labels)
        Training images ``(N, C, H, W)`` in data units and integer labels ``(N,)``.
    epochs : int
        Passes over the data.
    seed : int
        Seed of the initialisation, the shuffling and the noise; the global torch RNG
        state is restored afterwards.
    batch_size : int
        Minibatch size.
    lr : float
        Initial Adam learning rate.
    architecture : str
        A :func:`flowverify.model.build_architecture` name, used when ``model`` is None;
        default the Levine–Feizi MNIST base net ``"smoothing_base"``.
    model : torch.nn.Sequential, optional
        A network to train instead (trained in place).
    device : str or torch.device
        Training device.

    Returns
    -------
    torch.nn.Sequential
        The trained base classifier, in eval mode, on the CPU, float32.
    """
    from flowverify.model.zoo import build_architecture

    sigma = _check_sigma(sigma)
    epochs = _check_count(epochs, "epochs")
    seed = _check_count(seed, "seed", minimum=0)
    batch_size = _check_count(batch_size, "batch_size")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    x, y = _check_data(data)
    device = check_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_architecture(architecture) if model is None else model
        if not isinstance(net, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(net).__name__}")
        net = net.float().to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(_image_seed(seed, 0, 99))
        rng = np.random.default_rng(seed)
        opt = torch.optim.Adam(net.parameters(), lr=float(lr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        loss_fn = nn.CrossEntropyLoss()
        net.train()
        for epoch in range(epochs):
            perm = torch.from_numpy(rng.permutation(x.shape[0]))
            total, correct, seen = 0.0, 0, 0
            for start in range(0, x.shape[0], batch_size):
                sel = perm[start : start + batch_size]
                xb, yb = x[sel].to(device), y[sel].to(device)
                noisy = add_flow_noise(xb, sigma=sigma, generator=gen)
                opt.zero_grad()
                logits = net(noisy)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(sel)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(sel)
            sched.step()
            logger.info(
                "train sigma=%g epoch %d/%d: loss %.4f, noisy accuracy %.4f",
                sigma,
                epoch + 1,
                epochs,
                total / seen,
                correct / seen,
            )
    net.eval()
    return net.cpu()
