"""Methods the paper compares against: Wasserstein smoothing, randomised smoothing with
Laplace noise on flows (Levine and Feizi 2020; paper section 3.3).

:mod:`~.smoothing` is the smoothed classifier (PREDICT and CERTIFY, with the theory of the
certificate); :mod:`~.noise` draws the Laplace flow noise, :mod:`~.sampling` counts the
base classifier's predictions under it, :mod:`~.bounds` holds the Clopper–Pearson bound
and the certified radii, :mod:`~.result` the per-image record, :mod:`~.training` trains a
base classifier on the noise and :mod:`~.checks` checks the arguments.
"""

from flowverify.baselines.bounds import clopper_pearson_lower, laplace_radius, levine_feizi_radius
from flowverify.baselines.noise import add_flow_noise, laplace_scale
from flowverify.baselines.result import ABSTAIN, SmoothingResult
from flowverify.baselines.sampling import smoothed_counts
from flowverify.baselines.smoothing import smoothed_certify, smoothed_predict
from flowverify.baselines.training import train_smoothed_model

__all__ = [
    "ABSTAIN",
    "SmoothingResult",
    "add_flow_noise",
    "clopper_pearson_lower",
    "laplace_radius",
    "laplace_scale",
    "levine_feizi_radius",
    "smoothed_certify",
    "smoothed_counts",
    "smoothed_predict",
    "train_smoothed_model",
]
