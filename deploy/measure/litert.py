"""LiteRT (ai-edge-litert): the reference the TFLM outputs are held against, with either op resolver."""

from __future__ import annotations

import numpy as np

from deploy.measure.tflm import RuntimeFailure, io_quant, quantize_input

RESOLVERS = ("BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES")


def litert_interpreter(model: bytes, resolver: str = "BUILTIN_REF"):
    """A LiteRT interpreter without the default XNNPACK delegate (it refuses INT4 FULLY_CONNECTED)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interp = Interpreter(
            model_content=bytes(model), experimental_op_resolver_type=OpResolverType[resolver]
        )
        interp.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        raise RuntimeFailure(f"LiteRT could not load the model: {str(e).splitlines()[0]}") from e
    return interp


def invoke_all(interp, x: np.ndarray) -> np.ndarray:
    """Raw (integer) outputs of a LiteRT interpreter for every float input row of x."""
    q = io_quant(interp, "input")
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    outs = []
    for row in quantize_input(x, q):
        interp.set_tensor(inp, row.reshape(q.shape))
        interp.invoke()
        outs.append(interp.get_tensor(out).reshape(1, -1).copy())
    return np.concatenate(outs)


def run_litert(model: bytes, x: np.ndarray, resolver: str = "BUILTIN_REF") -> np.ndarray:
    """Raw (integer) outputs of LiteRT for every float input row of x."""
    return invoke_all(litert_interpreter(model, resolver), x)


def set_sample(interp, sample: np.ndarray) -> None:
    """Put one float sample, quantized, into a LiteRT interpreter's input."""
    q = io_quant(interp, "input")
    interp.set_tensor(interp.get_input_details()[0]["index"], quantize_input(sample, q).reshape(q.shape))
