"""unetpp: train a UNet++ once, export it as four pruned ONNX graphs (L1-L4), serve them.

Subpackages: core (torch-free shared pieces), model (PyTorch), export (ONNX), server (FastAPI).
"""

__version__ = "0.1.0"
