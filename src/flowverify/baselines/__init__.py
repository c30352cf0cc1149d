"""Methods the paper compares against: randomised smoothing with Laplace
flow noise (Levine and Feizi 2020, :mod:`.smoothing`).
"""

from flowverify.baselines.smoothing import (
    ABSTAIN,
    SmoothingResult,
    add_flow_noise,
    clopper_pearson_lower,
    laplace_radius,
    laplace_scale,
    levine_feizi_radius,
    smoothed_certify,
    smoothed_counts,
    smoothed_predict,
    train_smoothed_model,
)

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
