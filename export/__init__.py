"""edmrt.export: ONNX export and TensorRT engine builds live here (issue 5); nothing is exported yet."""

__all__: list[str] = []
