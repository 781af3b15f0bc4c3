"""edgeq: uncertainty-driven mixed-precision quantization of Keras models for TFLite Micro."""

from __future__ import annotations

import os

# TF-MOT and tfp.layers need Keras 2 (tf_keras). This must be set before TensorFlow is
# imported anywhere, so the package sets it on import and users never have to.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
