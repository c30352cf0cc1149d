"""The classifier seen from flow space: the first affine layer absorbs ``A``
(``W̃ = WA``, ``b̃ = WR + b``, Corollary 2.1; :mod:`.flow_model`), and loading of
bundled, ``.pt`` and ONNX models (:mod:`.loading`, :mod:`.onnx_import`).
"""

from flowverify.model.flow_model import (
    INPUT_SCALES,
    FlowConv2d,
    FlowLinear,
    FlowModel,
    first_affine_layer,
)
from flowverify.model.loading import (
    BUNDLED_MODELS,
    build_architecture,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

__all__ = [
    "BUNDLED_MODELS",
    "FlowConv2d",
    "FlowLinear",
    "FlowModel",
    "INPUT_SCALES",
    "build_architecture",
    "first_affine_layer",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
