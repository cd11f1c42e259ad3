"""ONNX export with precision metadata; see the export issue."""
