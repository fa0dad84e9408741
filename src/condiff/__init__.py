"""condiff: image-conditioned diffusion models for anomaly detection in medical images.

``import condiff`` stays light: it imports no torch, no runtime and none of the
``condiff.train``/``condiff.export``/``condiff.engine`` subpackages.
"""
__version__ = "0.1.0"
