"""deploy.export.carrays: the C arrays hold exactly the .tflite and compile for the host and Cortex-M."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from deploy.export.carrays import CArrayError, c_identifier, model_symbol, parse_c_array, write_c_arrays
from deploy.flatbuffer import FlatbufferError

ARM_GXX = shutil.which("arm-none-eabi-g++")
ARM_SIZE = shutil.which("arm-none-eabi-size")


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return r


@pytest.mark.parametrize("flavour", ["cc", "c"])
def test_round_trip_is_exact(tmp_path, tiny_tflite, flavour):
    arr = write_c_arrays(tiny_tflite, tmp_path, "tiny_digits", flavour=flavour)
    assert arr.header == (tmp_path / "model_data.h").resolve()
    assert arr.source == (tmp_path / f"model_data.{flavour}").resolve()
    assert arr.symbol == "g_tiny_digits_model_data" and arr.length_symbol == "g_tiny_digits_model_data_len"
    text = arr.source.read_text()
    assert parse_c_array(text) == tiny_tflite
    assert f"const unsigned int {arr.length_symbol} = {len(tiny_tflite)};" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("  0x")]
    assert all(ln.count("0x") == 12 for ln in rows[:-1]) and 1 <= rows[-1].count("0x") <= 12
    head = arr.header.read_text()
    assert "#ifndef EDGEQ_MODEL_DATA_TINY_DIGITS_H" in head
    assert (
        f"extern const unsigned char {arr.symbol}[];" in head
        and f"extern const unsigned int {arr.length_symbol};" in head
    )
    assert (
        "alignas(16) const unsigned char" if flavour == "cc" else "EDGEQ_ALIGN16 const unsigned char"
    ) in text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cc_compiles_with_host_gxx_aligned(tmp_path, tiny_tflite):
    arr = write_c_arrays(tiny_tflite, tmp_path, "my-model 2.0!")
    _run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", arr.source.name, "-o", "m.o"], tmp_path)
    syms = _run(["nm", "m.o"], tmp_path).stdout
    assert re.search(rf"\bR {arr.symbol}$", syms, re.M) and re.search(
        rf"\bR {arr.length_symbol}$", syms, re.M
    )
    # The array's section is at least 16-byte aligned (objdump prints alignment as 2**n).
    sections = _run(["objdump", "-h", "m.o"], tmp_path).stdout
    rodata = [ln for ln in sections.splitlines() if ".rodata" in ln]
    assert rodata and all(int(ln.split("2**")[1]) >= 4 for ln in rodata)


def test_c_flavour_compiles_with_gcc_c11(tmp_path, tiny_tflite):
    arr = write_c_arrays(tiny_tflite, tmp_path, "int", flavour="c")
    _run(
        ["gcc", "-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-c", arr.source.name, "-o", "m.o"],
        tmp_path,
    )
    # A C++ translation unit can use the C array through the header (extern "C").
    (tmp_path / "use.cc").write_text(
        f'#include "model_data.h"\nunsigned first() {{ return {arr.symbol}[4] + {arr.length_symbol}; }}\n'
    )
    _run(["g++", "-std=c++17", "-Wall", "-Werror", "-c", "use.cc", "-o", "use.o"], tmp_path)


@pytest.mark.skipif(ARM_GXX is None or ARM_SIZE is None, reason="arm-none-eabi-g++/size not installed")
def test_cortex_m4_object_holds_the_model_in_rodata(tmp_path, tiny_tflite):
    arr = write_c_arrays(tiny_tflite, tmp_path, "tiny_digits")
    _run(
        [
            ARM_GXX,
            "-std=c++17",
            "-mcpu=cortex-m4",
            "-mthumb",
            "-Os",
            "-Wall",
            "-Werror",
            "-c",
            arr.source.name,
            "-o",
            "m.o",
        ],
        tmp_path,
    )
    out = _run([ARM_SIZE, "-A", "m.o"], tmp_path).stdout
    sizes = {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln.startswith(".")}
    assert sizes.get(".rodata", 0) + sizes.get(".text", 0) >= len(tiny_tflite)
    assert sizes.get(".data", 0) == 0 and sizes.get(".bss", 0) == 0  # in flash, not copied to RAM


@pytest.mark.parametrize(
    ("name", "ident"),
    [
        ("tiny_digits", "tiny_digits"),
        ("LeNet5", "lenet5"),
        ("int", "int_"),
        ("class", "class_"),
        ("", "model"),
        ("!!!", "model"),
        ("модель", "model"),
    ],
)
def test_c_identifier(name, ident):
    assert c_identifier(name) == ident


def test_hostile_names_become_valid_distinct_identifiers():
    a, b, c = c_identifier("my-model 2.0!"), c_identifier("my_model_2_0"), c_identifier("2fast")
    assert re.fullmatch(r"my_model_2_0_[0-9a-f]{4}", a) and b == "my_model_2_0" and a != b
    assert c.startswith("model_") and not c[0].isdigit()
    for s in (a, b, c, c_identifier("int"), c_identifier("")):
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", s)
    assert model_symbol("int") == "g_int__model_data"


def test_non_text_name_is_refused():
    with pytest.raises(CArrayError, match="must be text"):
        c_identifier(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("stem", ["../model_data", "/tmp/model_data", "sub/../../model_data", "..", ""])
def test_paths_outside_out_dir_are_refused(tmp_path, tiny_tflite, stem):
    out = tmp_path / "out"
    with pytest.raises(CArrayError, match="inside|escapes"):
        write_c_arrays(tiny_tflite, out, "m", stem=stem)
    assert not (tmp_path / "model_data.h").exists()


def test_subfolder_inside_out_dir_is_allowed(tmp_path, tiny_tflite):
    arr = write_c_arrays(tiny_tflite, tmp_path, "m", stem="src/model_data")
    assert arr.source == (tmp_path / "src" / "model_data.cc").resolve()


def test_bad_flavour_and_bad_model(tmp_path, tiny_tflite):
    with pytest.raises(CArrayError, match="flavour"):
        write_c_arrays(tiny_tflite, tmp_path, "m", flavour="rust")
    with pytest.raises(FlatbufferError, match="not a TFLite flatbuffer"):
        write_c_arrays(b"garbage bytes here", tmp_path, "m")
    with pytest.raises(FlatbufferError):
        write_c_arrays(tiny_tflite[:100], tmp_path, "m")
    assert not list(tmp_path.iterdir())


def test_parse_c_array_errors():
    with pytest.raises(CArrayError, match="no `name"):
        parse_c_array("int x = 3;")
    with pytest.raises(CArrayError, match="outside 0..255"):
        parse_c_array("const unsigned char a[] = {0x1ff};")
    with pytest.raises(CArrayError, match="says 3"):
        parse_c_array("const unsigned char a[] = {1, 2};\nconst unsigned int a_len = 3;")
    with pytest.raises(CArrayError, match="not an integer"):
        parse_c_array("const unsigned char a[] = {1, x};")
    # Comments with braces do not confuse it; decimal literals are fine.
    assert parse_c_array("/* {9} */ unsigned char a[] = { 1, 0x02, // {3}\n 255 };") == bytes([1, 2, 255])
