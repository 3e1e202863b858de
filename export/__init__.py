"""edmrt.export: ONNX export with a dynamic batch, verified in ONNX Runtime (TensorRT engine builds: issue 5)."""
from .onnx import ExportVerificationError, OnnxReport, export_onnx, load_onnx_session

__all__ = ["export_onnx", "load_onnx_session", "OnnxReport", "ExportVerificationError"]
