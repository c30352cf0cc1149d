"""The classifier seen from flow space: the first affine layer absorbs ``A``
(``W̃ = WA``, ``b̃ = WR + b``, Corollary 2.1; :mod:`.flow_model`), and getting a
classifier: the bundled architectures and trained models (:mod:`.zoo`), the code-free
checkpoint format (:mod:`.checkpoint`), ONNX conversion (:mod:`.onnx_import`), one
loader for all of them (:mod:`.loading`) and the input shape a model expects
(:mod:`.input_shape`).
"""

from flowverify.model.checkpoint import load_checkpoint, save_checkpoint
from flowverify.model.flow_model import (
    INPUT_SCALES,
    FlowConv2d,
    FlowLinear,
    FlowModel,
    first_affine_layer,
)
from flowverify.model.loading import load_model
from flowverify.model.zoo import BUNDLED_MODELS, build_architecture

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
