"""Untrusted .tflite files never crash `edgeq inspect`: a seeded fuzz of real models, old opcodes, hybrids.

Every mutant must end in exit status 0 (still a readable model) or 2 (refused with one line), never a
traceback and never a signal. The models are real converter output (int8, INT4, TFLM LUT); the
mutations are byte flips, truncation, and out-of-range indices, empty subgraphs and absurd shapes
written with the schema's own object API.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy.cli import main
from deploy.flatbuffer import FlatbufferError, operators
from deploy.inspect import inspect_model, op_sequence
from deploy.sandbox import tflm_arena_isolated
from deploy.verify import verify_tflite

ROOT = Path(__file__).resolve().parents[1]
MLPERF = ROOT.parent / "shared" / "peers" / "mlperf_tiny_ic_resnet8_int8.tflite"
SEED = 1414
MUTANTS_PER_MODEL = 130
SUBPROCESS_SAMPLE = 15  # the installed command on every 1 in len/15 mutants (each costs a TF import)


def _schema():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def _digits_like(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _conv_net(keras, name: str):
    """Conv2D -> Flatten -> Dense -> Dense on 8x8x1 (the digits shape)."""
    return keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(16, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ],
        name=name,
    )


def _residual_net(keras):
    """Conv, depthwise conv, a residual ADD, pooling and softmax on 12x12x3."""
    inp = keras.layers.Input((12, 12, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    b = keras.layers.DepthwiseConv2D(3, padding="same", name="dw1")(a)
    c = keras.layers.Add(name="add")([a, b])
    c = keras.layers.MaxPooling2D(2, name="pool")(c)
    c = keras.layers.GlobalAveragePooling2D(name="gap")(c)
    out = keras.layers.Dense(10, activation="softmax", name="fc")(c)
    return keras.Model(inp, out, name="residual")


def build_models() -> dict[str, bytes]:
    """Four small real .tflite files: int8 conv net, int8 residual net, INT4 weights, TFLM LUT weights."""
    import tensorflow as tf
    import tf_keras as keras

    from deploy.export import convert
    from deploy.storage import lut
    from edgeq.optimize import quantize_model
    from edgeq.plan import BitPlan

    tf.keras.utils.set_random_seed(SEED)
    x8, x12 = _digits_like(64, (8, 8, 1)), _digits_like(64, (12, 12, 3), 1)
    models = {
        "int8_conv": convert(_conv_net(keras, "conv"), x8),
        "int8_residual": convert(_residual_net(keras), x12),
    }
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    y = np.arange(64) % 10
    for name, bits in (("int4", 4), ("lut", 3)):
        qat = quantize_model(
            _conv_net(keras, name), BitPlan.from_bits({"conv1": bits, "fc1": bits, "fc2": 8})
        )
        qat.compile("adam", loss)
        qat.fit(x8, y, epochs=1, batch_size=32, verbose=0)
        models[name] = convert(qat, x8)
    models["lut"] = lut.build(models["lut"]).model
    return models


def hybrid_model() -> bytes:
    """Dynamic-range quantized (Optimize.DEFAULT, no representative data): int8 weights, float activations."""
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(SEED)
    conv = tf.lite.TFLiteConverter.from_keras_model(_conv_net(keras, "hybrid"))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return bytes(conv.convert())


# ---- mutations -------------------------------------------------------------------------------------


def _unpack(model: bytes):
    return _schema().ModelT.InitFromPackedBuf(bytearray(model), 0)


def _pack(m) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _data_mask(model: bytes) -> np.ndarray:
    """True on bytes inside buffer data (weights), False on the flatbuffer structure."""
    s = _schema()
    m = s.Model.GetRootAs(model, 0)
    mask = np.zeros(len(model), bool)
    for i in range(m.BuffersLength()):
        b = m.Buffers(i)
        n = b.DataLength()
        if n:
            start = b._tab.Vector(b._tab.Offset(4))
            mask[start : start + n] = True
    return mask


def _flip(model: bytes, rng: np.random.Generator, structure: np.ndarray) -> bytes:
    buf = bytearray(model)
    for _ in range(int(rng.integers(1, 5))):
        # Mostly the structure: flips in weight data are harmless to a reader.
        in_structure = rng.random() < 0.8 and structure.size
        pos = int(rng.choice(structure)) if in_structure else int(rng.integers(len(buf)))
        buf[pos] = int(rng.integers(256)) if rng.random() < 0.5 else buf[pos] ^ (1 << int(rng.integers(8)))
    return bytes(buf)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _out_of_range(rng: np.random.Generator, n: int) -> int:
    return int(_pick(rng, [n, n + 1, n + 1000, 2**31 - 1, -2, -(2**31)]))


def _structured(model: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One schema-level corruption of model, as (what, bytes)."""
    m = _unpack(model)
    sg = m.subgraphs[0]
    ops, tensors = sg.operators, sg.tensors
    op = _pick(rng, ops)
    t = _pick(rng, tensors)
    const = [x for x in tensors if x.buffer and m.buffers[x.buffer].data is not None]
    kind = _pick(
        rng,
        [
            "tensor-buffer",
            "op-input",
            "op-output",
            "opcode-index",
            "intermediates",
            "sg-input",
            "sg-output",
            "empty-subgraph",
            "no-subgraphs",
            "no-opcodes",
            "huge-shape",
            "negative-shape",
            "deep-shape",
            "tensor-type",
            "short-buffer",
            "unknown-builtin",
            "deprecated-only",
            "quant-mismatch",
            "buffer-offset",
            "metadata-buffer",
            "swap-inputs",
            "wrong-opcode",
            "drop-options",
            "drop-inputs",
            "weight-shape",
        ],
    )
    if kind == "tensor-buffer":
        t.buffer = int(_pick(rng, [len(m.buffers), len(m.buffers) + 7, 2**32 - 1]))
    elif kind == "op-input":
        op.inputs[int(rng.integers(len(op.inputs)))] = _out_of_range(rng, len(tensors))
    elif kind == "op-output":
        op.outputs[0] = _out_of_range(rng, len(tensors))
    elif kind == "opcode-index":
        op.opcodeIndex = int(_pick(rng, [len(m.operatorCodes), len(m.operatorCodes) + 3, 2**32 - 1]))
    elif kind == "intermediates":
        op.intermediates = [_out_of_range(rng, len(tensors))]
    elif kind == "sg-input":
        sg.inputs = [_out_of_range(rng, len(tensors))]
    elif kind == "sg-output":
        sg.outputs = [_out_of_range(rng, len(tensors))]
    elif kind == "empty-subgraph":
        sg.operators = []
    elif kind == "no-subgraphs":
        m.subgraphs = []
    elif kind == "no-opcodes":
        m.operatorCodes = []
    elif kind == "huge-shape":
        t.shape = [int(_pick(rng, [2**30, 2**31 - 1, 65536]))] * int(rng.integers(2, 5))
    elif kind == "negative-shape":
        t.shape = [1, -int(rng.integers(1, 100)), 3]
    elif kind == "deep-shape":
        t.shape = [1] * int(_pick(rng, [7, 9, 64, 1000]))
    elif kind == "tensor-type":
        t.type = int(_pick(rng, [2, 4, 5, 10, 17, 19, 99, 127]))
    elif kind == "short-buffer" and const:
        buf = m.buffers[_pick(rng, const).buffer]
        buf.data = buf.data[: int(rng.integers(len(buf.data)))]
    elif kind == "unknown-builtin":
        oc = _pick(rng, m.operatorCodes)
        oc.builtinCode, oc.deprecatedBuiltinCode = int(_pick(rng, [250, 1000, 2**30])), 0
    elif kind == "deprecated-only":
        for oc in m.operatorCodes:
            if oc.builtinCode < 127:
                oc.deprecatedBuiltinCode, oc.builtinCode = oc.builtinCode, 0
    elif kind == "quant-mismatch":
        q = [x for x in tensors if x.quantization is not None and x.quantization.scale is not None]
        if q:
            qp = _pick(rng, q).quantization
            choice = int(rng.integers(3))
            if choice == 0:
                qp.zeroPoint = []
            elif choice == 1:
                qp.scale = list(qp.scale) * 3
            else:
                qp.quantizedDimension = int(_pick(rng, [5, 100, 2**31 - 1]))
    elif kind == "buffer-offset" and const:
        buf = m.buffers[_pick(rng, const).buffer]
        buf.data, buf.offset, buf.size = None, int(_pick(rng, [len(model) * 4, 2**40])), len(buf.data)
    elif kind == "metadata-buffer":
        meta = _schema().MetadataT()
        meta.name, meta.buffer = "junk", _out_of_range(rng, len(m.buffers)) % 2**32
        m.metadata = [*(m.metadata or []), meta]
    elif kind == "swap-inputs" and len(op.inputs) > 1:
        op.inputs = list(reversed(list(op.inputs)))
    elif kind == "wrong-opcode" and len(m.operatorCodes) > 1:
        n = len(m.operatorCodes)
        op.opcodeIndex = (op.opcodeIndex + 1 + int(rng.integers(n - 1))) % n
    elif kind == "drop-options":
        op.builtinOptionsType, op.builtinOptions = 0, None
    elif kind == "drop-inputs":
        op.inputs = list(op.inputs)[:1]
    elif kind == "weight-shape" and const:
        _pick(rng, const).shape = [int(rng.integers(1, 4))]
    else:
        kind = "noop"
    return kind, _pack(m)


def mutants(
    models: dict[str, bytes], seed: int = SEED, per_model: int = MUTANTS_PER_MODEL
) -> Iterator[tuple[str, bytes]]:
    """(label, bytes) of per_model seeded mutants of each model: flips, truncations, structure edits."""
    rng = np.random.default_rng(seed)
    for name, model in models.items():
        structure = np.flatnonzero(~_data_mask(model))
        for k in range(per_model):
            r = rng.random()
            if r < 0.4:
                yield f"{name}/{k}/flip", _flip(model, rng, structure)
            elif r < 0.5:
                yield f"{name}/{k}/truncate", model[: int(rng.integers(len(model)))]
            else:
                kind, data = _structured(model, rng)
                if rng.random() < 0.2:  # structure edit plus a flip: corrupt and inconsistent at once
                    data = _flip(data, rng, np.flatnonzero(~_data_mask(data)))
                yield f"{name}/{k}/{kind}", data


# ---- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return build_models()


def _inspect(path: Path, *args: str) -> tuple[int, str, str]:
    """`edgeq inspect` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["inspect", str(path), *args])
    return code, out.getvalue(), err.getvalue()


def _inspect_process(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "inspect", str(path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_the_real_models_inspect_cleanly(models, tmp_path):
    for name, data in models.items():
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(data)
        code, out, err = _inspect(path, "--json")
        assert code == 0 and err == "", err
        d = json.loads(out)
        assert d["arena_bytes"] > 0 and d["peak_memory_operator"]["op"] in d["operators"]
    # The fuzz covers what edgeq writes: packed INT4 weights and DECODE with LUT tables.
    assert "INT4" in {t["type"] for t in inspect_model(tmp_path / "int4.tflite")["tensors"]}
    assert "TFLM_DECODE" in operators(models["lut"])


def test_fuzzed_files_never_crash_inspect(models, tmp_path):
    cases = list(mutants(models))
    every = len(cases) // SUBPROCESS_SAMPLE
    tally: collections.Counter[int] = collections.Counter()
    path = tmp_path / "mutant.tflite"
    for k, (label, data) in enumerate(cases):
        path.write_bytes(data)
        # In this process: a crash inside TFLM would kill pytest itself, so reaching the assert is the test.
        code, _, err = _inspect(path)
        assert code in (0, 2), f"{label}: exit {code}\n{err}"
        assert "Traceback" not in err and "internal error" not in err, f"{label}: {err}"
        if code == 2:
            assert err.startswith("edgeq: error: ") and len(err.strip().splitlines()) == 1, f"{label}: {err}"
        tally[code] += 1
        if k % every == 0:  # the installed command too, where a signal would show as a negative status
            r = _inspect_process(path)
            assert r.returncode == code, (
                f"{label}: in-process exit {code}, subprocess {r.returncode}\n{r.stderr}"
            )
            assert "Traceback" not in r.stderr, f"{label}: {r.stderr}"
    assert len(cases) >= 500
    # Not a vacuous fuzz: many mutants are refused, and many still read as (different) models.
    assert tally[2] >= 200 and tally[0] >= 50, tally


_RAW_TFLM = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
it = runtime.Interpreter.from_bytes(sys.stdin.buffer.read(), arena_size=8 << 20)
d = it.get_input_details(0)
it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
it.invoke()
"""


def test_a_file_that_crashes_tflm_costs_one_line(models, tmp_path):
    m = _unpack(models["int8_residual"])
    mean_code = _schema().BuiltinOperator.MEAN
    mean = next(
        op for op in m.subgraphs[0].operators if m.operatorCodes[op.opcodeIndex].builtinCode == mean_code
    )
    mean.inputs = list(mean.inputs)[:1]  # MEAN without its axis tensor: every index still in range
    data = _pack(m)
    verify_tflite(data, "mean.tflite")  # nothing the verifier can see
    raw = subprocess.run(
        [sys.executable, "-P", "-c", _RAW_TFLM], input=data, capture_output=True, timeout=120
    )
    assert raw.returncode < 0, "TFLM no longer crashes on MEAN without an axis; pick another crasher"
    with pytest.raises(FlatbufferError, match=r"TFLM crashed reading mean\.tflite \(signal \d+, SIG\w+\); "):
        tflm_arena_isolated(data, "mean.tflite")
    path = tmp_path / "mean.tflite"
    path.write_bytes(data)
    r = _inspect_process(path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "TFLM crashed reading" in r.stderr, r.stderr


def _deprecated_only(model: bytes) -> bytes:
    """The model as files from before TF 2.3 store it: builtin_code 0, the code in deprecated_builtin_code."""
    m = _unpack(model)
    for oc in m.operatorCodes:
        assert oc.builtinCode < 127
        oc.deprecatedBuiltinCode, oc.builtinCode = oc.builtinCode, 0
    return _pack(m)


def test_deprecated_only_opcodes_are_named_by_the_schema_rule(models, tmp_path):
    from deploy.flatbuffer import read, weight_inputs

    new, old = models["int8_residual"], _deprecated_only(models["int8_residual"])
    # What a reader of builtin_code alone sees (model_editor, and inspect before the fix): all ADD.
    assert {op.opcode_name for op in read(old).subgraphs[0].operators} == {"ADD"}
    assert [op[0] for op in op_sequence(old)] == [op[0] for op in op_sequence(new)]
    assert operators(old) == operators(new) and "DEPTHWISE_CONV_2D" in operators(old)
    weights = [name for _, name in weight_inputs(read(new))]
    assert weights and [name for _, name in weight_inputs(read(old))] == weights
    (tmp_path / "new.tflite").write_bytes(new)
    (tmp_path / "old.tflite").write_bytes(old)
    d_new, d_old = inspect_model(tmp_path / "new.tflite"), inspect_model(tmp_path / "old.tflite")
    assert d_old["peak_memory_operator"] == d_new["peak_memory_operator"]
    assert d_old["arena_bytes"] == d_new["arena_bytes"]  # TFLM reads the same rule


@pytest.mark.skipif(not MLPERF.is_file(), reason="MLPerf Tiny reference model not in ../shared/peers")
def test_mlperf_tiny_peak_operator_is_one_the_model_has():
    code, out, err = _inspect(MLPERF, "--json")
    d = json.loads(out)
    assert code == 0 and err == "" and d["arena_bytes"] > 0
    assert d["peak_memory_operator"]["op"] in d["operators"]
    assert {op[0] for op in op_sequence(MLPERF.read_bytes())} == set(d["operators"])


def test_hybrid_model_gets_one_line_reason(tmp_path):
    path = tmp_path / "hybrid.tflite"
    path.write_bytes(hybrid_model())
    r = _inspect_process(path)
    # TFLM's own C output stays in the child: nothing raw on stderr, the reason in the report.
    assert r.returncode == 0 and r.stderr == "", r.stderr
    first = r.stdout.splitlines()[0]
    assert "arena n/a (operator #" in first and "FLOAT32" in first and "hybrid model" in first, first


def test_unsupported_operator_gets_one_line_reason(models, tmp_path):
    m = _unpack(models["int8_conv"])
    oc = _schema().OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.customCode, oc.version = 32, 32, "FANCY_OP", 1
    m.operatorCodes.append(oc)
    op = m.subgraphs[0].operators[1]
    op.opcodeIndex, op.builtinOptionsType, op.builtinOptions = len(m.operatorCodes) - 1, 0, None
    path = tmp_path / "fancy.tflite"
    path.write_bytes(_pack(m))
    d = inspect_model(path)
    assert d["arena_bytes"] is None and "FANCY_OP" in d["operators"]
    assert d["arena_note"].startswith("TFLM has no kernel for FANCY_OP; ")


def _set(path: str, value) -> Callable:
    """An edit of a ModelT that sets the attribute at a dotted path ("subgraphs.0.tensors.3.buffer")."""
    *parents, leaf = path.split(".")

    def edit(m) -> None:
        obj = m
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        if leaf.isdigit():
            obj[int(leaf)] = value
        else:
            setattr(obj, leaf, value)

    return edit


def _shrink_int4(m) -> None:
    t = next(t for t in m.subgraphs[0].tensors if t.type == 17)
    m.buffers[t.buffer].data = m.buffers[t.buffer].data[:-1]


@pytest.mark.parametrize(
    "name, edit, needle",
    [
        ("int8_conv", _set("subgraphs.0.operators.0.opcodeIndex", 9), "uses operator code 9 of"),
        ("int8_conv", _set("subgraphs.0.tensors.3.buffer", 999), "names buffer 999, but"),
        ("int8_conv", _set("subgraphs.0.operators.1.inputs.0", 99), "names tensor 99, but"),
        ("int8_conv", _set("subgraphs.0.operators", []), "the main subgraph has no operators"),
        ("int8_conv", _set("subgraphs.0.outputs", [-1]), "an output of subgraph 0 names tensor -1"),
        ("int8_conv", _set("subgraphs.0.tensors.0.shape", [1, 2**20, 2**20, 8]), "over 2 GiB"),
        ("int8_conv", _set("subgraphs.0.tensors.0.shape", [1, -8, 8, 1]), "negative dimension"),
        ("int8_conv", _set("operatorCodes.0.builtinCode", 4000), "builtin 4000, which this"),
        ("int4", _shrink_int4, "type INT4 needs 36 bytes, its buffer holds 35"),
    ],
)
def test_verifier_says_what_is_wrong(models, name, edit, needle):
    m = _unpack(models[name])
    edit(m)
    with pytest.raises(FlatbufferError) as e:
        verify_tflite(_pack(m), "bad.tflite")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert msg.startswith("bad.tflite is not a TFLite flatbuffer (")
    assert msg.endswith("; pass a .tflite written by the TFLite converter")
