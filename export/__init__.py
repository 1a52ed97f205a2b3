"""Build Triton model repositories (config.pbtxt from specs), ONNX exports and engines."""
