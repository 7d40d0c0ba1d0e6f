"""Checkpoint -> model repository (ONNX graphs L1..L4 + manifest) and its evaluation.

This package's __init__ imports nothing: `unetpp.export.evaluate` runs without torch, while
`unetpp.export.repository` (the exporter) needs torch, onnx and onnxruntime.
"""
