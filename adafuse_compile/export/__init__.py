"""Export: the static per-token decode step to ONNX (and TensorRT), and an ONNX Runtime decoder.

    from adafuse_compile.export import to_onnx, OnnxDecoder
    to_onnx(model, "exported/", capacity=512)
    tokens, logits = OnnxDecoder("exported/").generate(prompt_ids, 64)

onnx / onnxruntime / tensorrt are imported only when used: importing this package needs torch only.
"""
from .families import FAMILIES, ExportError
from .onnx import OPSET, ExportResult, check_exported, to_onnx
from .runtime import OnnxDecoder
from .tensorrt import TensorRTDecoder, TensorRTUnavailableError, check_tensorrt_facts, to_tensorrt

__all__ = [
    "FAMILIES", "OPSET", "ExportError", "ExportResult", "OnnxDecoder", "TensorRTDecoder", "TensorRTUnavailableError",
    "check_exported", "check_tensorrt_facts", "to_onnx", "to_tensorrt",
]
