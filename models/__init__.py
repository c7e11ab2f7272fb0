"""Bundled models (the ONNX task classifier) and the data they were trained on."""
