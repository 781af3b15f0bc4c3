"""deploy: export edgeq models to TFLite / TFLM artifacts and measure them in the real runtimes."""

from __future__ import annotations

import edgeq  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
