"""edmrt.export: files for the backends to run: ONNX export with a dynamic batch, verified in ONNX Runtime
(``onnx.py``); TensorRT engines built from those files, cached and verified (``tensorrt.py``).  Exporters may
import the runtime (``edmrt.backends``); the runtime imports an exporter only to build a missing file."""
from .onnx import ExportVerificationError, OnnxReport, export_onnx

__all__ = ["export_onnx", "OnnxReport", "ExportVerificationError"]
