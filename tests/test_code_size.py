"""deploy.firmware.code_size: the measured code table, and that it predicts a real linked firmware's flash.

The build test needs arm-none-eabi-gcc with newlib and the TFLM trees of ../shared/tflm (as
tests/test_qemu_firmware.py); it is skipped with the reason when either is missing. It builds the tiny digits
model's firmware (int8 and LUT) for both kernel sets against the cached TFLM library (~/.cache/edgeq/tflm):
only the app compiles once the cache holds these kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.device import qemu
from deploy.firmware import code_size
from deploy.firmware.code_size import (
    DECODE_OP,
    CodeSize,
    CodeSizeError,
    code_from_entry,
    decode_code_bytes,
    firmware_code,
)
from deploy.flatbuffer import DECODE_OP as FLATBUFFER_DECODE_OP
from edgeq.errors import EdgeqError

SHARED_TFLM = Path(__file__).resolve().parents[2] / "shared" / "tflm"
TREES = {k: SHARED_TFLM / d for k, d in qemu.KERNELS.items()}
DIGITS_OPS = ["CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "CONCATENATION"]


def _toolchain_missing() -> str:
    try:
        qemu.check_toolchain()
    except qemu.ToolMissing as e:
        return str(e)
    return ""


MISSING_TOOL = _toolchain_missing()
needs_tools = pytest.mark.skipif(bool(MISSING_TOOL), reason=MISSING_TOOL or "tools present")
needs_trees = pytest.mark.skipif(
    not all((t / qemu.INTERPRETER_H).is_file() for t in TREES.values()),
    reason=f"no TFLM trees at {SHARED_TFLM} (cortex-m4-reference, cortex-m4-cmsis-nn)",
)

# A made-up entry: A and B share 100 bytes, B and C 30, all three 5.
ENTRY = {
    "runtime": 1000,
    "ops": {"A": 400, "B": 300, "C": 200},
    "own": {"A": 295, "B": 165, "C": 165},
    "shared": [
        {"ops": ["A", "B"], "bytes": 100, "objects": []},
        {"ops": ["B", "C"], "bytes": 30, "objects": []},
        {"ops": ["A", "B", "C"], "bytes": 5, "objects": []},
    ],
}


def test_the_table_covers_both_kernel_sets_and_what_edgeq_models_use():
    assert set(code_size.kernel_sets()) == set(qemu.KERNELS)
    for kernels in qemu.KERNELS:
        ops = code_size.op_bytes(kernels)
        assert {*DIGITS_OPS, "SOFTMAX", "DEPTHWISE_CONV_2D", DECODE_OP} <= set(ops)
        assert all(n > 0 for n in ops.values())
    assert DECODE_OP == FLATBUFFER_DECODE_OP  # spelled out there so the loader needs no tflite_micro
    prov = code_size.provenance()
    assert len(prov["tflm_commit"]) == 40 and "-mcpu=cortex-m4" in prov["cpu_flags"]
    assert prov["toolchain"].startswith("arm-none-eabi-g++") and prov["edgeq_commit"]


def test_known_operators_are_charged_their_measured_bytes():
    ops = code_size.op_bytes("cmsis-nn")
    alone = firmware_code("cmsis-nn", ["SOFTMAX"])
    assert isinstance(alone, CodeSize) and alone.kernels == "cmsis-nn" and not alone.estimated
    assert [op for op, _ in alone.per_op] == ["SOFTMAX"] and alone.shared == 0
    # Alone, a builtin operator pays the resolver's code fitted on firmware of several: a little over.
    assert 0 <= dict(alone.per_op)["SOFTMAX"] - ops["SOFTMAX"] <= 300
    assert alone.total == alone.runtime + dict(alone.per_op)["SOFTMAX"]
    # Several operators: each once, in the order asked; what they share is counted once, so the total is
    # at most the sum of their bytes alone.
    code = firmware_code("cmsis-nn", [*DIGITS_OPS, "CONV_2D"])
    assert [op for op, _ in code.per_op] == DIGITS_OPS and code.unknown == ()
    assert code.total == code.runtime + code.ops_bytes + code.shared
    assert code.runtime < code.total <= code.runtime + sum(ops[op] for op in DIGITS_OPS)
    hash(code)  # frozen, hashable
    assert dict(code.per_op)["CONV_2D"] <= ops["CONV_2D"]


def test_decode_costs_its_code_on_both_kernel_sets():
    for kernels in qemu.KERNELS:
        alone = code_size.op_bytes(kernels)[DECODE_OP]
        assert decode_code_bytes(kernels) == alone > 4_000  # DECODE registers through AddCustom: exact
        added = decode_code_bytes(kernels, DIGITS_OPS)
        assert 0.8 * alone < added <= alone  # beside other kernels it shares a few helpers
        with_decode = firmware_code(kernels, [DECODE_OP, *DIGITS_OPS]).total
        assert with_decode == firmware_code(kernels, DIGITS_OPS).total + added
    data = json.loads(code_size.DATA.read_text())
    assert data["kernels"]["reference"]["decode"]["links"] == ["LUT", "PRUNE", "HUFFMAN"]


def test_shared_code_is_counted_once():
    one = code_from_entry("k", ENTRY, ["A"])
    assert one.per_op == (("A", 400),) and one.shared == 0 and one.total == 1400
    both = code_from_entry("k", ENTRY, ["B", "A"])
    # B keeps what it shares with C only (C is not there); A and B's common code and all three's are shared.
    assert both.per_op == (("B", 195), ("A", 295)) and both.shared == 105
    assert both.total == 1000 + 400 + 300 - 105
    everything = code_from_entry("k", ENTRY, ["A", "B", "C"])
    assert everything.shared == 135 and everything.total == 1000 + 295 + 165 + 165 + 135


def test_an_unknown_operator_is_charged_as_the_largest_and_listed():
    ops = code_size.op_bytes("reference")
    code = firmware_code("reference", ["CONV_2D", "NOT_AN_OP", "CONV_2D", "NOT_AN_OP"])
    assert code.unknown == ("NOT_AN_OP",) and code.estimated
    assert dict(code.per_op)["NOT_AN_OP"] == max(ops.values())
    # No sharing is assumed for it: the known operators come out as without it.
    assert code.total == firmware_code("reference", ["CONV_2D"]).total + max(ops.values())
    assert firmware_code("reference", "SOFTMAX").per_op == firmware_code("reference", ["SOFTMAX"]).per_op
    assert firmware_code("reference", []).total == firmware_code("reference", []).runtime


def test_an_unknown_kernel_set_says_which_there_are():
    with pytest.raises(CodeSizeError, match=r"no measured code sizes for kernels 'ethos-u'.*reference") as e:
        firmware_code("ethos-u", ["CONV_2D"])
    assert isinstance(e.value, EdgeqError)
    with pytest.raises(CodeSizeError):
        decode_code_bytes("xtensa")


def test_an_unreadable_table_is_an_error(tmp_path):
    bad = tmp_path / "code_size.json"
    bad.write_text('{"kernels": {"reference": {"runtime": -1, "ops": {}}}}')
    with pytest.raises(CodeSizeError, match="cannot read the code-size table"):
        code_size._table(bad)
    with pytest.raises(CodeSizeError, match="cannot read"):
        code_size._table(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tiny_firmware(tiny_tflite, tiny_lut_tflite, tmp_path_factory) -> dict[str, Path]:
    """The tiny digits model's firmware, int8 and LUT-compressed (DECODE), rendered as `edgeq run` does."""
    from deploy.export.carrays import write_c_arrays
    from deploy.firmware import render_firmware
    from deploy.measure.tflm import arena_bytes, io_quant, tflm_interpreter

    out = {}
    for name, model in (("int8", tiny_tflite), ("lut", tiny_lut_tflite)):
        d = tmp_path_factory.mktemp(f"code_size_{name}")
        (d / "model.tflite").write_bytes(model)
        render_firmware(
            model,
            d,
            name="tiny_digits",
            arena_bytes=arena_bytes(model),
            input_quant=io_quant(tflm_interpreter(model), "input"),
            c_arrays=write_c_arrays(model, d, "tiny_digits"),
        )
        out[name] = d
    return out


@needs_tools
@needs_trees
@pytest.mark.parametrize("kernels", ["reference", "cmsis-nn"])
def test_the_table_predicts_a_linked_firmware_within_3_percent(tiny_firmware, kernels):
    from deploy.flatbuffer import describe

    for name, d in tiny_firmware.items():
        model = (d / "model.tflite").read_bytes()
        ops = describe(model).ops
        assert (DECODE_OP in ops) == (name == "lut")
        code = firmware_code(kernels, ops)
        assert not code.unknown
        build = qemu.build_firmware(d, kernels, SHARED_TFLM)
        predicted = code.total + len(model)
        assert abs(predicted - build.flash_bytes) <= 0.03 * build.flash_bytes, (name, predicted, build)
