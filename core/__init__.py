"""Torch-free pieces shared by training, export and serving.

Preprocessing, image decoding, segmentation metrics and the model-repository manifest live
here, once, so that every side of the stack sees pixels and numbers the same way.
"""
