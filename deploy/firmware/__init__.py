"""Render a TFLM firmware project (generic CMake, Zephyr, Arduino) for one model from firmware_templates/."""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.export.carrays import CArrays, c_identifier, parse_c_array, safe_text
from deploy.flatbuffer import DECODE_OP, describe, resolver_calls
from edgeq.errors import EdgeqError
from edgeq.io import atomic_write_bytes, atomic_write_text, usual_mode

TEMPLATES = Path(__file__).resolve().parents[2] / "firmware_templates"
APP_TEMPLATES = TEMPLATES / "tflm_app"
# The serial evaluation protocol (firmware_templates/common), copied into every flavour.
PROTOCOL_FILES = ("edgeq_protocol.h", "edgeq_protocol.cc", "edgeq_crc32.h")
_PROTOCOL_WHAT = {
    "edgeq_protocol.h": "edgeq's serial evaluation protocol (API)",
    "edgeq_protocol.cc": "edgeq's serial evaluation protocol",
    "edgeq_crc32.h": "CRC-32 of the model, as zlib.crc32",
}
# The protocol's frame buffers hold this much unless EDGEQ_MAX_PAYLOAD says more (edgeq_protocol.h).
DEFAULT_MAX_PAYLOAD = 4096
MAX_PAYLOAD_LIMIT = 65535

# numpy dtype name -> (C type, TfLiteType, TfLitePtrUnion member, qmin, qmax)
_INPUT_TYPES = {
    "int8": ("int8_t", "kTfLiteInt8", "int8", -128, 127),
    "uint8": ("uint8_t", "kTfLiteUInt8", "uint8", 0, 255),
    "int16": ("int16_t", "kTfLiteInt16", "i16", -32768, 32767),
    "float32": ("float", "kTfLiteFloat32", "f", 0, 0),
}


class FirmwareError(EdgeqError):
    """A firmware project that cannot be rendered from the given inputs."""


@dataclass(frozen=True)
class _File:
    """One file of the rendered project: where it goes, where it comes from, what it is."""

    path: str
    what: str
    template: str | None = None  # a .j2 under tflm_app/, rendered
    copy: Path | None = None  # a file copied as is


def arena_with_margin(arena_bytes: int) -> int:
    """kArenaSize for a measured arena: +10% +1 KiB (target kernels differ from the host's), 16-aligned."""
    total = int(arena_bytes) + 1024 + int(arena_bytes) // 10
    return (total + 15) // 16 * 16


def _float_literal(x: float) -> str:
    # repr round-trips the float32 value TFLM stores; the f suffix keeps it single precision in C++.
    r = repr(float(x))
    return f"{r}f" if any(c in r for c in ".en") else f"{r}.0f"


def _input_vars(q: Any) -> dict:
    """Template variables for the model input's type and quantization (a TensorQuant or a dict)."""
    get = q.get if isinstance(q, dict) else lambda k, d=None: getattr(q, k, d)
    try:
        dtype = np.dtype(get("dtype", "int8")).name
        scale = float(get("scale", 0.0))
        zero_point = int(get("zero_point", 0))
        shape = tuple(int(s) for s in get("shape", ()) or ())
    except (TypeError, ValueError) as e:
        raise FirmwareError(
            f"input_quant {q!r} is not a tensor quantization (dtype, scale, zero_point)"
        ) from e
    if dtype not in _INPUT_TYPES:
        raise FirmwareError(
            f"input type {dtype} is not supported by the firmware app; use int8, uint8, int16 or float32"
        )
    ctype, tfl, union, qmin, qmax = _INPUT_TYPES[dtype]
    quantized = dtype != "float32"
    if quantized and not (np.isfinite(scale) and scale > 0):
        raise FirmwareError(f"input is {dtype} but its scale is {scale}; the model's input must be quantized")
    return {
        "in_type_name": dtype,
        "in_ctype": ctype,
        "in_tflite_type": tfl,
        "in_union": union,
        "in_qmin": qmin,
        "in_qmax": qmax,
        "in_quantized": quantized,
        "in_scale": _float_literal(scale if quantized else 1.0),
        "in_scale_text": f"{scale:.9g}",
        "in_zero_point": zero_point,
        "in_shape": list(shape),
    }


def _cmake_files(ident: str, source: Path, header: Path, proto: list[tuple[str, str]]) -> list[_File]:
    """The generic CMake project at the top of firmware/ (host, or bare metal with a toolchain file)."""
    files = [
        _File(
            "main.cc",
            "the TFLM app: op resolver, tensor arena, input quantization, inference callback, main()",
            "main.cc.j2",
        ),
        _File("edgeq_app.h", "the app's entry points (setup, serve)", copy=APP_TEMPLATES / "edgeq_app.h"),
        _File(
            "edgeq_platform.h",
            "the platform hooks besides the protocol's",
            copy=APP_TEMPLATES / "edgeq_platform.h",
        ),
        _File(
            "edgeq_cycles.h",
            "the DWT cycle counter on Cortex-M3/M4/M7/M33/M55",
            copy=APP_TEMPLATES / "edgeq_cycles.h",
        ),
        _File(
            "platform_generic.cc",
            "serial on stdin/stdout, DWT or std::chrono cycles (weak defaults)",
            copy=APP_TEMPLATES / "cmake" / "platform_generic.cc",
        ),
        _File(header.name, "the model's C array (declaration)", copy=header),
        _File(source.name, "the model's C array: the .tflite bytes, 16-byte aligned", copy=source),
        _File(
            "CMakeLists.txt", "generic CMake build against a TFLM tree (TFLM_ROOT)", "cmake/CMakeLists.txt.j2"
        ),
    ]
    return files + [_File(p, w, copy=TEMPLATES / "common" / p) for p, w in proto]


def _zephyr_files(ident: str, source: Path, header: Path, proto: list[tuple[str, str]]) -> list[_File]:
    """A Zephyr application in firmware/zephyr (west build)."""
    z = "zephyr"
    files = [
        _File(f"{z}/CMakeLists.txt", "Zephyr application build", "zephyr/CMakeLists.txt.j2"),
        _File(f"{z}/prj.conf", "Zephyr configuration (C++17, tflite-micro module)", "zephyr/prj.conf.j2"),
        _File(f"{z}/src/main.cc", "the TFLM app (as main.cc)", "main.cc.j2"),
        _File(f"{z}/src/edgeq_app.h", "the app's entry points", copy=APP_TEMPLATES / "edgeq_app.h"),
        _File(f"{z}/src/edgeq_platform.h", "platform hooks", copy=APP_TEMPLATES / "edgeq_platform.h"),
        _File(
            f"{z}/src/platform_zephyr.cc",
            "serial by uart_poll on the console UART, k_cycle_get_32 cycles",
            copy=APP_TEMPLATES / "zephyr" / "platform_zephyr.cc",
        ),
        _File(f"{z}/src/{header.name}", "the model's C array (declaration)", copy=header),
        _File(f"{z}/src/{source.name}", "the model's C array", copy=source),
    ]
    return files + [_File(f"{z}/src/{p}", w, copy=TEMPLATES / "common" / p) for p, w in proto]


def _arduino_files(ident: str, source: Path, header: Path, proto: list[tuple[str, str]]) -> list[_File]:
    """An Arduino sketch in firmware/arduino/<name> (arduino-cli)."""
    # Arduino builds only .c/.cpp/.S of a sketch folder named like its .ino.
    a = f"arduino/{ident}"
    arduino_src = source.name if source.suffix == ".c" else f"{source.stem}.cpp"
    files = [
        _File(f"{a}/{ident}.ino", "Arduino sketch: setup() runs the app", "arduino/sketch.ino.j2"),
        _File(f"{a}/edgeq_app.cpp", "the TFLM app (main.cc; no main() under Arduino)", "main.cc.j2"),
        _File(f"{a}/edgeq_app.h", "the app's entry points", copy=APP_TEMPLATES / "edgeq_app.h"),
        _File(f"{a}/edgeq_platform.h", "platform hooks", copy=APP_TEMPLATES / "edgeq_platform.h"),
        _File(f"{a}/edgeq_cycles.h", "the DWT cycle counter", copy=APP_TEMPLATES / "edgeq_cycles.h"),
        _File(
            f"{a}/platform_arduino.cpp",
            "serial on Serial; DWT, ESP32 or micros() cycles",
            copy=APP_TEMPLATES / "arduino" / "platform_arduino.cpp",
        ),
        _File(f"{a}/{header.name}", "the model's C array (declaration)", copy=header),
        _File(f"{a}/{arduino_src}", "the model's C array", copy=source),
    ]
    return files + [
        _File(f"{a}/{p.replace('.cc', '.cpp')}", w, copy=TEMPLATES / "common" / p) for p, w in proto
    ]


# The firmware flavours a board profile's `templates:` may name, each the files it renders.
FLAVOURS = {"cmake": _cmake_files, "zephyr": _zephyr_files, "arduino": _arduino_files}


def _plan(
    ident: str, source: Path, header: Path, has_protocol: bool, flavours: tuple[str, ...]
) -> list[_File]:
    """Every file of the project: the README and each flavour's files."""
    proto = [(p, _PROTOCOL_WHAT[p]) for p in PROTOCOL_FILES] if has_protocol else []
    files = [_File("README.md", "this file")]
    for flavour in flavours:
        files += FLAVOURS[flavour](ident, source, header, proto)
    return files


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(APP_TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace final with tmp by renames, so no reader ever sees a half-written project."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def render_firmware(
    model_bytes: bytes,
    out_dir: str | Path,
    *,
    name: str,
    arena_bytes: int,
    input_quant: Any,
    c_arrays: CArrays,
    board: Any = None,
    alt_decompression_bytes: int = 0,
    kernels: str = "reference",
) -> Path:
    """Render out_dir/firmware (CMake app, zephyr/, arduino/<name>/, README.md); returns its path.

    arena_bytes is the measured total; with alt_decompression_bytes > 0 (--decompress-to alt) that many
    of them become a separate DECODE region and the arena array shrinks by as much.
    """
    model = bytes(model_bytes)
    info = describe(model)
    ops = info.ops
    calls = resolver_calls(ops)
    if not isinstance(arena_bytes, (int, np.integer)) or arena_bytes <= 0:
        raise FirmwareError(f"arena_bytes must be the measured arena (> 0 bytes), got {arena_bytes!r}")
    source, header = Path(c_arrays.source), Path(c_arrays.header)
    if not source.is_file() or not header.is_file():
        raise FirmwareError(f"C arrays {source} / {header} do not exist; call write_c_arrays first")
    if parse_c_array(source.read_text()) != model:
        raise FirmwareError(
            f"{source} does not hold this model's bytes; write the C arrays of the same model"
        )

    alt = int(alt_decompression_bytes)
    if alt and (DECODE_OP not in ops or not 0 < alt < arena_bytes):
        raise FirmwareError(
            f"alt_decompression_bytes={alt} needs a model with DECODE and 0 < alt < arena_bytes "
            f"({arena_bytes}): pass 0 for a model whose DECODE output goes to the arena"
        )
    arena_measured = int(arena_bytes) - alt  # what the tensor arena itself must hold
    ident = c_identifier(name)
    arena_size = arena_with_margin(arena_measured)
    has_protocol = all((TEMPLATES / "common" / p).is_file() for p in PROTOCOL_FILES)
    fit_message = ""
    if board is not None:
        from deploy.boards import fit_check
        from deploy.firmware.code_size import firmware_code

        code = firmware_code(kernels, ops).total  # TFLM's runtime and these operators' kernels
        fit_message = fit_check(board, len(model), arena_size + alt, code).message
    flash_args = " ".join(getattr(board, "flash_args", ()) or ())
    flash_args = flash_args.replace("{image}", "<firmware image>").replace("{port}", "<serial port>")
    # INFER carries a 4-byte sequence number + the input, RESULT 8 bytes + the output.
    payload = max(
        [4 + info.io_bytes(i) for i in info.inputs[:1]] + [8 + info.io_bytes(i) for i in info.outputs[:1]]
    )
    if payload > MAX_PAYLOAD_LIMIT:
        raise FirmwareError(
            f"the model's input/output needs {payload} bytes per protocol frame; "
            f"the serial protocol carries at most {MAX_PAYLOAD_LIMIT}: shrink the input or output"
        )
    flavours = tuple(board.templates) if board is not None else tuple(FLAVOURS)
    files = _plan(ident, source, header, has_protocol, flavours)
    values = {
        "name": safe_text(name),  # into comments and the README title: one line, nothing to inject
        "ident": ident,
        "symbol": c_arrays.symbol,
        "length_symbol": c_arrays.length_symbol,
        "header": header.name,
        "source_name": source.name,
        "ops": ops,
        "calls": calls,
        "has_decode": DECODE_OP in ops,
        "arena_measured": arena_measured,
        "arena_size": arena_size,
        "arena_margin": arena_size - arena_measured,
        "alt_bytes": alt,
        "model_len": len(model),
        "model_crc32": zlib.crc32(model),
        "clock_hz": int(getattr(board, "clock_hz", 0) or 0),
        "fpu": bool(board is not None and board.has_fpu),
        "cpu_flags": " ".join(board.cpu_flags) if board is not None else "",
        "flavours": flavours,
        "board": board,
        "fit_message": fit_message,
        "flash_args": flash_args,
        "zephyr_board": getattr(board, "zephyr_board", None) or "<your zephyr board>",
        "arduino_fqbn": getattr(board, "arduino_fqbn", None) or "<your board's FQBN>",
        "has_protocol": has_protocol,
        "files": [(f.path, f.what) for f in files],
        "max_payload": payload if payload > DEFAULT_MAX_PAYLOAD else 0,
        **_input_vars(input_quant),
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = usual_mode(tempfile.mkdtemp(prefix=".firmware.", suffix=".tmp", dir=out))
    try:
        env = _environment()
        for f in files:
            dest = tmp / f.path
            if f.copy is not None:
                atomic_write_bytes(dest, f.copy.read_bytes())
            elif f.template is not None:
                atomic_write_text(dest, env.get_template(f.template).render(**values))
        atomic_write_text(tmp / "README.md", env.get_template("README.md.j2").render(**values))
        _swap_into_place(tmp, out / "firmware")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "firmware"
