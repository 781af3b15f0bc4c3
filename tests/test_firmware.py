"""deploy.firmware: the rendered TFLM project matches the model and its README, and compiles here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deploy.boards import load_board
from deploy.export.carrays import write_c_arrays
from deploy.firmware import (
    PROTOCOL_FILES,
    TEMPLATES,
    FirmwareError,
    arena_with_margin,
    render_firmware,
)
from deploy.flatbuffer import UnsupportedOperator, operators, resolver_calls
from deploy.measure.tflm import arena_bytes, io_quant, tflm_interpreter

ARM_GXX = shutil.which("arm-none-eabi-g++")
CMAKE = shutil.which("cmake")
HAVE_PROTOCOL = all((TEMPLATES / "common" / p).is_file() for p in PROTOCOL_FILES)
needs_protocol = pytest.mark.skipif(
    not HAVE_PROTOCOL, reason="firmware_templates/common/edgeq_protocol.* not there yet"
)


def _run(cmd, cwd, ok=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=120, **kw)
    if ok:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stderr.decode(errors='replace')}"
    return r


def _render(model: bytes, out: Path, name: str, board=None) -> Path:
    arr = write_c_arrays(model, out, name)
    return render_firmware(
        model,
        out,
        name=name,
        arena_bytes=arena_bytes(model),
        input_quant=io_quant(tflm_interpreter(model), "input"),
        c_arrays=arr,
        board=board,
    )


@pytest.fixture(scope="module")
def project(tiny_tflite, tmp_path_factory) -> Path:
    return _render(tiny_tflite, tmp_path_factory.mktemp("fw"), "tiny_digits", load_board("nrf52840"))


@pytest.fixture(scope="module")
def lut_project(tiny_lut_tflite, tmp_path_factory) -> tuple[Path, bytes]:
    model = tiny_lut_tflite
    return _render(model, tmp_path_factory.mktemp("fwlut"), "my-model 2.0!"), model


def _resolver_calls_in(main_cc: str) -> list[str]:
    return re.findall(r"if \(resolver\.(Add\w+)\(\) != kTfLiteOk\)", main_cc)


def test_layout(project, umask):
    import stat

    assert stat.S_IMODE(project.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    for rel in (
        "main.cc",
        "CMakeLists.txt",
        "README.md",
        "model_data.h",
        "model_data.cc",
        "platform_generic.cc",
        "zephyr/CMakeLists.txt",
        "zephyr/prj.conf",
        "zephyr/src/main.cc",
        "zephyr/src/platform_zephyr.cc",
        "arduino/tiny_digits/tiny_digits.ino",
        "arduino/tiny_digits/edgeq_app.cpp",
        "arduino/tiny_digits/model_data.cpp",
        "arduino/tiny_digits/platform_arduino.cpp",
    ):
        assert (project / rel).is_file(), rel
    assert not list(project.parent.glob(".firmware*"))  # no temp or old folder left behind


def test_main_cc_matches_the_model(project, tiny_tflite):
    main = (project / "main.cc").read_text()
    calls = _resolver_calls_in(main)
    assert calls == resolver_calls(operators(tiny_tflite)) == ["AddConv2D", "AddReshape", "AddFullyConnected"]
    assert "tflite::MicroMutableOpResolver<kOpCount>" in main and f"kOpCount = {len(calls)};" in main
    arena = int(re.search(r"constexpr int kArenaSize = (\d+);", main).group(1))
    measured = arena_bytes(tiny_tflite)
    assert arena == arena_with_margin(measured) and arena % 16 == 0 and arena > measured
    assert "alignas(16) uint8_t g_tensor_arena[kArenaSize];" in main
    q = io_quant(tflm_interpreter(tiny_tflite), "input")
    scale = float(re.search(r"kInputScale = ([0-9.e+-]+)f;", main).group(1))
    assert np.float32(scale) == np.float32(q.scale)
    assert f"kInputZeroPoint = {q.zero_point};" in main
    assert "g_tiny_digits_model_data" in main and '#include "model_data.h"' in main
    assert (
        '#include "edgeq_protocol.h"' in main
        and "edgeq_protocol_serve(&g_info, edgeq_infer, g_interpreter)" in main
    )
    # Every flavour runs the same app.
    assert (project / "zephyr/src/main.cc").read_text() == main
    assert (project / "arduino/tiny_digits/edgeq_app.cpp").read_text() == main
    assert "EDGEQ_CLOCK_HZ=64000000u" in (project / "CMakeLists.txt").read_text()


def test_embedded_arrays_are_the_model(project, tiny_tflite):
    from deploy.export.carrays import parse_c_array

    for rel in ("model_data.cc", "zephyr/src/model_data.cc", "arduino/tiny_digits/model_data.cpp"):
        assert parse_c_array((project / rel).read_text()) == tiny_tflite


def test_lut_model_registers_decode(lut_project):
    project, model = lut_project
    ops = operators(model)
    assert "TFLM_DECODE" in ops
    main = (project / "main.cc").read_text()
    assert _resolver_calls_in(main) == resolver_calls(ops) and "AddDecode" in _resolver_calls_in(main)
    assert "AddDecode()" in (project / "README.md").read_text()
    ident = re.search(r"arduino/(\w+)/", (project / "README.md").read_text()).group(1)
    assert re.fullmatch(r"my_model_2_0_[0-9a-f]{4}", ident)
    assert (project / "arduino" / ident / f"{ident}.ino").is_file()


def test_alt_decompression_gets_its_own_region(tiny_tflite, tiny_lut_tflite, tmp_path):
    """--decompress-to alt: DECODE's share leaves the arena array for a region given to TFLM."""
    from deploy.firmware import arena_with_margin
    from deploy.measure import alt_decompression_size

    model = tiny_lut_tflite
    alt = alt_decompression_size(model)
    total = arena_bytes(model, alt_decompression=alt)  # includes the alt region, as the report does
    arr = write_c_arrays(model, tmp_path, "alt")
    q = io_quant(tflm_interpreter(model), "input")
    fw = render_firmware(
        model,
        tmp_path,
        name="alt",
        arena_bytes=total,
        input_quant=q,
        c_arrays=arr,
        alt_decompression_bytes=alt,
    )
    main = (fw / "main.cc").read_text()
    assert f"constexpr int kAltDecompressionSize = {alt};" in main
    assert f"constexpr int kArenaSize = {arena_with_margin(total - alt)};" in main
    assert "edgeq_set_alt(interpreter, alt_region, 0)" in main
    assert main.index("edgeq_set_alt(interpreter") < main.index("interpreter.AllocateTensors()")
    assert "USE_TFLM_COMPRESSION" in (fw / "CMakeLists.txt").read_text()
    assert f"{alt}-byte region" in (fw / "README.md").read_text()
    with pytest.raises(FirmwareError, match="needs a model with DECODE"):
        render_firmware(
            tiny_tflite,
            tmp_path / "x",
            name="m",
            arena_bytes=4096,
            input_quant=q,
            c_arrays=write_c_arrays(tiny_tflite, tmp_path / "x", "m"),
            alt_decompression_bytes=512,
        )


def _mentioned_paths(readme: str) -> list[str]:
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)  # commands and layouts in fences are not our files
    tokens = re.findall(r"`([^`\s]+)`", prose)
    return [t for t in tokens if "/" in t or re.search(r"\.(cc|cpp|c|h|ino|txt|conf|md)$", t)]


@pytest.mark.parametrize("which", ["project", "lut_project"])
def test_every_file_the_readme_mentions_exists(request, which):
    p = request.getfixturevalue(which)
    project = p if isinstance(p, Path) else p[0]
    readme = (project / "README.md").read_text()
    mentioned = _mentioned_paths(readme)
    assert len(mentioned) > 20
    missing = [m for m in mentioned if not (project / m).is_file()]
    assert not missing
    on_disk = {str(f.relative_to(project)) for f in project.rglob("*") if f.is_file()}
    assert on_disk <= set(mentioned)  # and the README lists every file it ships


def test_readme_board_section(project):
    readme = (project / "README.md").read_text()
    assert "fits nrf52840" in readme and "west build -b nrf52840dk/nrf52840 zephyr" in readme
    assert "pyocd flash --target nrf52840" in readme and "TFLM_ROOT" in readme


def test_rerender_replaces_the_project_whole(tiny_tflite, tmp_path):
    first = _render(tiny_tflite, tmp_path, "tiny_digits")
    (first / "stale.txt").write_text("from an older render")
    again = _render(tiny_tflite, tmp_path, "tiny_digits")
    assert again == first and not (again / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["firmware", "model_data.cc", "model_data.h"]


def test_unsupported_operator_leaves_nothing_behind(tiny_tflite, tmp_path):
    from tflite_micro.tensorflow.lite.micro.compression import model_editor as me
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    model = me.read(tiny_tflite)
    op = model.subgraphs[0].operators[0]
    op.opcode, op.custom_code = schema.BuiltinOperator.CUSTOM, "FANCY_OP"
    bad = bytes(model.build())
    assert "FANCY_OP" in operators(bad)
    arr = write_c_arrays(bad, tmp_path, "bad")
    with pytest.raises(UnsupportedOperator, match="TFLM has no kernel for: FANCY_OP"):
        render_firmware(
            bad,
            tmp_path,
            name="bad",
            arena_bytes=4096,
            input_quant={"dtype": "int8", "scale": 0.1},
            c_arrays=arr,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_data.cc", "model_data.h"]


def test_bad_render_inputs(tiny_tflite, tiny_lut_tflite, tmp_path):
    arr = write_c_arrays(tiny_tflite, tmp_path, "m")
    q = {"dtype": "int8", "scale": 0.0039, "zero_point": -128, "shape": (1, 8, 8, 1)}
    other = tiny_lut_tflite
    with pytest.raises(FirmwareError, match="does not hold this model"):
        render_firmware(other, tmp_path, name="m", arena_bytes=4096, input_quant=q, c_arrays=arr)
    with pytest.raises(FirmwareError, match="arena_bytes"):
        render_firmware(tiny_tflite, tmp_path, name="m", arena_bytes=0, input_quant=q, c_arrays=arr)
    with pytest.raises(FirmwareError, match="scale"):
        render_firmware(
            tiny_tflite, tmp_path, name="m", arena_bytes=4096, input_quant={**q, "scale": 0.0}, c_arrays=arr
        )
    with pytest.raises(FirmwareError, match="not supported"):
        render_firmware(
            tiny_tflite,
            tmp_path,
            name="m",
            arena_bytes=4096,
            input_quant={**q, "dtype": "int64"},
            c_arrays=arr,
        )
    assert not (tmp_path / "firmware").exists() and not list(tmp_path.glob(".firmware*"))


@needs_protocol
def test_protocol_and_platform_compile_on_host(project, tmp_path):
    for src in ("edgeq_protocol.cc", "platform_generic.cc"):
        _run(
            [
                "g++",
                "-std=c++17",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-c",
                str(project / src),
                "-o",
                str(tmp_path / f"{src}.o"),
            ],
            project,
        )


@needs_protocol
def test_platform_generic_speaks_the_protocol_on_host(project, tmp_path):
    """Link the real protocol with the generic platform hooks; the host codec talks to it over stdio."""
    from deploy.device import protocol as proto

    driver = tmp_path / "driver.cc"
    driver.write_text(
        '#include <string.h>\n#include "edgeq_platform.h"\n#include "edgeq_protocol.h"\n'
        "static int echo(void*, const uint8_t* in, uint32_t n, uint8_t* out, uint32_t cap, uint32_t* len,"
        " uint32_t* cycles) {\n  if (n > cap) return 1;\n  memcpy(out, in, n);\n  *len = n;\n  *cycles = 0;\n"
        "  return 0;\n}\n"
        "int main() {\n  edgeq_platform_init();\n  EdgeqDeviceInfo info = EdgeqDeviceInfo();\n"
        "  info.model_len = 1234;\n  info.clock_hz = edgeq_platform_clock_hz();\n"
        "  info.flags = edgeq_platform_flags();\n  info.boot_nonce = edgeq_platform_boot_nonce();\n"
        "  info.input.dtype = EDGEQ_DTYPE_INT8;\n  info.input.ndim = 2;\n  info.input.dims[0] = 1;\n"
        "  info.input.dims[1] = 4;\n  info.output = info.input;\n  edgeq_protocol_serve(&info, echo, 0);\n}\n"
    )
    exe = tmp_path / "driver"
    _run(
        [
            "g++",
            "-std=c++17",
            "-Wall",
            "-Werror",
            f"-I{project}",
            str(driver),
            str(project / "edgeq_protocol.cc"),
            str(project / "platform_generic.cc"),
            "-o",
            str(exe),
        ],
        tmp_path,
    )
    request = proto.hello_frame() + proto.infer_frame(7, b"\x01\x02\x03\x04")
    r = _run([str(exe)], tmp_path, input=request)  # exits 0 when stdin ends
    frames = proto.FrameDecoder().feed(r.stdout)
    assert [f.type for f in frames] == [proto.FrameType.INFO, proto.FrameType.RESULT]
    info = proto.DeviceInfo.unpack(frames[0].payload)
    assert info.model_len == 1234 and info.clock_hz == 1_000_000_000 and info.cycles_are_host_ns
    res = proto.Result.unpack(frames[1].payload)
    assert res.seq == 7 and res.output == b"\x01\x02\x03\x04"


@needs_protocol
@pytest.mark.skipif(ARM_GXX is None, reason="arm-none-eabi-g++ not installed")
@pytest.mark.parametrize("cpu", ["cortex-m4", "cortex-m0plus", "cortex-m7"])
def test_protocol_and_platform_cross_compile_for_cortex_m(project, tmp_path, cpu):
    fpu = ["-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"] if cpu == "cortex-m4" else []
    for src in ("edgeq_protocol.cc", "platform_generic.cc", "model_data.cc"):
        _run(
            [
                ARM_GXX,
                "-std=c++17",
                f"-mcpu={cpu}",
                "-mthumb",
                *fpu,
                "-Os",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-ffunction-sections",
                "-c",
                str(project / src),
                "-o",
                str(tmp_path / f"{src}.o"),
            ],
            project,
        )
    syms = _run(["arm-none-eabi-nm", str(tmp_path / "platform_generic.cc.o")], project).stdout.decode()
    # The protocol's hooks keep C linkage (edgeq_protocol.h declares them extern "C") and stay weak.
    for hook in ("edgeq_cycles", "edgeq_serial_read_byte", "edgeq_serial_write"):
        assert re.search(rf"\bW {hook}$", syms, re.M), hook


@pytest.mark.skipif(CMAKE is None, reason="cmake not installed")
def test_cmake_errors_clearly_without_tflm_root(project, tmp_path):
    def said(r: subprocess.CompletedProcess) -> str:
        # CMake re-wraps message(FATAL_ERROR) text at ~80 columns, so where a line breaks depends on
        # the length of the temp path in it: compare words, not line breaks or runs of spaces.
        return " ".join(r.stderr.decode(errors="replace").split())

    env = {"PATH": "/usr/bin:/bin"}
    r = _run([CMAKE, "-S", str(project), "-B", str(tmp_path / "b1")], tmp_path, ok=False, env=env)
    assert r.returncode != 0 and "TFLM_ROOT is not set" in said(r), said(r)
    r = _run(
        [CMAKE, "-S", str(project), "-B", str(tmp_path / "b2"), f"-DTFLM_ROOT={tmp_path}"],
        tmp_path,
        ok=False,
        env=env,
    )
    needle = f"TFLM_ROOT={tmp_path} does not hold tensorflow/lite/micro/micro_interpreter.h"
    assert r.returncode != 0 and needle in said(r), said(r)
