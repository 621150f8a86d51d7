"""`tritonchat build`: a Hugging Face model -> a Triton model repository (pipeline.py runs the steps).

settings.py (the build config, docs/build-config.md) -> export.py (ONNX with a KV cache) -> parity.py
(ONNX Runtime vs PyTorch) -> quantize.py (precisions: precision.py, int8.py, int8_weight_only.py; graph
files: onnx_files.py; sample text: text.py) -> evaluate.py (accuracy gate, `tritonchat eval`) ->
tensorrt.py (optional plan) -> repository.py (config.pbtxt from model_repository/ templates).
synthetic.py writes seeded random models for tests and benchmarks.
"""
