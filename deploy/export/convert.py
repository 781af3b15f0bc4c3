"""Keras -> TFLite: the full-integer flatbuffer (int8 in/out, INT4 where QAT asked for <= 4 bits)."""

from __future__ import annotations

import numpy as np

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.errors import EdgeqError


class ExportError(EdgeqError):
    """Conversion failed."""


# Ops of functional control flow (an LSTM's time loop): the converter's frozen-graph path crashes the
# process on them (a segfault in TF 2.21, not an exception), so such graphs keep the SavedModel path.
_CONTROL_FLOW = frozenset({"While", "StatelessWhile", "If", "StatelessIf", "TensorListReserve"})


def _converter(model, *, via_saved_model: bool = True):
    """A TFLiteConverter over the model traced at batch 1 (inference mode).

    A microcontroller runs one sample at a time; a static batch lets the converter fold shape
    arithmetic, so Keras Reshape layers become one RESHAPE with a constant shape (from_keras_model
    leaves SHAPE/STRIDED_SLICE/PACK ops for the dynamic batch). `via_saved_model=False` converts the
    frozen graph instead of exporting a SavedModel first (the converter's default): 10x faster on small
    models, the same operators and weights, no signature; graphs with control flow ignore it.
    """
    import tensorflow as tf

    specs = [tf.TensorSpec([1, *t.shape[1:]], t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    fn = tf.function(lambda *x: model(list(x) if len(x) > 1 else x[0], training=False))
    concrete = fn.get_concrete_function(*specs)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    conv.experimental_lower_to_saved_model = via_saved_model or _has_control_flow(concrete)
    return conv


def _has_control_flow(concrete) -> bool:
    """Whether the traced graph, or a function it calls, holds a loop or a conditional."""
    graph = concrete.graph.as_graph_def()
    ops = {n.op for n in graph.node}
    ops.update(n.op for f in graph.library.function for n in f.node_def)
    return not ops.isdisjoint(_CONTROL_FLOW)


def convert(model, representative: np.ndarray, *, samples: int = 200, via_saved_model: bool = True) -> bytes:
    """Full-integer TFLite flatbuffer (int8 in/out); QAT models keep their per-layer bit widths.

    The peers convert as the converter does by default (via a SavedModel); edgeq's own exports pass
    `via_saved_model=False`, the faster frozen-graph path (see _converter).
    """
    import tensorflow as tf

    conv = _converter(model, via_saved_model=via_saved_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rep = np.asarray(representative[:samples], dtype=np.float32)
    conv.representative_dataset = lambda: ([rep[i : i + 1]] for i in range(len(rep)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    try:
        return bytes(conv.convert())
    except Exception as e:  # noqa: BLE001  (the converter raises many types)
        raise ExportError(f"TFLite conversion failed: {str(e).splitlines()[0]}") from e


def convert_float(model) -> bytes:
    """The float32 TFLite flatbuffer (no optimisation): the reference size for flash comparisons."""
    try:
        return bytes(_converter(model).convert())
    except Exception as e:  # noqa: BLE001  (the converter raises many types)
        raise ExportError(f"float TFLite conversion failed: {str(e).splitlines()[0]}") from e
