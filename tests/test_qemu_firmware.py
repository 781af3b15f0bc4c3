"""The rendered firmware cross-compiled for a Cortex-M4 and run under QEMU (mps2-an386) as a real board.

Needs arm-none-eabi-gcc with newlib (Debian: gcc-arm-none-eabi, libnewlib-arm-none-eabi), qemu-system-arm
and the TFLM trees of ../shared/tflm (cortex-m4-reference, cortex-m4-cmsis-nn): the only TFLM sources this
workplace has. Each is skipped with the reason when missing. The first run compiles the TFLM objects the
digits firmware links into ~/.cache/edgeq/tflm (a few minutes on two cores for both trees); later runs
compile only the app.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.device import qemu
from deploy.device.qemu import (
    DefinitionIndex,
    FirmwareBuildError,
    QemuBoard,
    QemuError,
    QemuTimeout,
    ToolMissing,
    TreeError,
    build_firmware,
    find_tree,
    main_qemu,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_TFLM = Path(__file__).resolve().parents[2] / "shared" / "tflm"
TREES = {k: SHARED_TFLM / d for k, d in qemu.KERNELS.items()}


def _toolchain_missing() -> str:
    try:
        qemu.check_toolchain()
        qemu.check_qemu()
    except ToolMissing as e:
        return str(e)
    return ""


MISSING_TOOL = _toolchain_missing()
needs_tools = pytest.mark.skipif(bool(MISSING_TOOL), reason=MISSING_TOOL or "tools present")
needs_trees = pytest.mark.skipif(
    not all((t / qemu.INTERPRETER_H).is_file() for t in TREES.values()),
    reason=f"no TFLM trees at {SHARED_TFLM} (cortex-m4-reference, cortex-m4-cmsis-nn)",
)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """`edgeq run pipelines/digits.py --epochs 2` with INT4 and with LUT storage: storage -> output folder."""
    from deploy.cli import main

    runs = {}
    for storage in ("int4", "lut"):
        out = tmp_path_factory.mktemp(f"digits_{storage}")
        argv = ["run", str(ROOT / "pipelines" / "digits.py"), "--out", str(out), "--storage", storage]
        assert main([*argv, "--epochs", "2", "--quiet"]) == 0
        runs[storage] = out
    return runs


@needs_tools
@needs_trees
@pytest.mark.parametrize("kernels", ["reference", "cmsis-nn"])
@pytest.mark.parametrize("storage", ["int4", "lut"])
def test_firmware_under_qemu_is_bit_identical_to_host_tflm(digits_runs, storage, kernels):
    from deploy.device.evaluate import evaluate_on_device

    out = digits_runs[storage]
    build = build_firmware(out, kernels, SHARED_TFLM)
    assert build.tree == TREES[kernels].resolve() and build.kernels == kernels
    assert build.elf == out / "qemu" / kernels / "firmware.elf" and build.elf.is_file()
    model_len = (out / "model.tflite").stat().st_size
    # The ELF holds the model (in .rodata), the interpreter and the kernels; RAM holds the arena.
    assert build.flash_bytes == build.text_bytes + build.rodata_bytes + build.data_bytes
    assert build.rodata_bytes > model_len and build.flash_bytes < 256 * 1024
    assert build.ram_bytes == build.data_bytes + build.bss_bytes
    assert build.library is not None and build.library.is_file() and build.library_objects > 20
    if storage == "lut":  # DECODE and its LUT decoder are linked only where the model has DECODE
        assert "kernels/decode.cc" in (build.library.parent / "manifest.json").read_text()

    with QemuBoard(build, count_instructions=True, max_seconds=300) as board:
        assert board.port and Path(board.port).exists()
        assert " ready, arena " in board.boot_text  # MicroPrintf reaches the UART (debug-log callback)
        rep = evaluate_on_device(board.port, out)
        counts = board.instruction_counts()
    assert rep["samples"] == 270 and rep["samples_counted"] == 270
    assert rep["bit_identical_rows"] == 270, rep
    assert rep["device"] == rep["host_tflm"]
    assert not rep["virtual_board"] and rep["cycles"]["median"] is None  # QEMU says it has no cycle counter
    assert rep["arena"]["device_bytes"] == board.info.arena_used > 0
    assert f"arena {board.info.arena_used} of" in board.boot_text
    if not board.insn_unavailable:
        assert len(counts) == 270 and min(counts) > 10_000


@needs_tools
@needs_trees
def test_second_build_compiles_only_the_app(digits_runs):
    build_firmware(digits_runs["int4"], "cmsis-nn", SHARED_TFLM)
    again = build_firmware(digits_runs["int4"], "cmsis-nn", SHARED_TFLM)
    assert again.compiled_library_objects == 0 and again.library_objects > 0


def test_find_tree_says_what_is_missing(tmp_path):
    with pytest.raises(TreeError, match="no TFLM tree for --kernels cmsis-nn"):
        find_tree("cmsis-nn", tmp_path)
    tree = tmp_path / "cortex-m4-cmsis-nn"
    (tree / "tensorflow/lite/micro").mkdir(parents=True)
    (tree / qemu.INTERPRETER_H).write_text("")
    with pytest.raises(TreeError, match="not made for Cortex-M"):  # e.g. a host tree
        find_tree("cmsis-nn", tmp_path)
    (tree / "tensorflow/lite/micro/cortex_m_generic").mkdir()
    with pytest.raises(TreeError, match="has no CMSIS-NN kernels"):
        find_tree("cmsis-nn", tmp_path)
    (tree / "tensorflow/lite/micro/kernels/cmsis_nn").mkdir(parents=True)
    (tree / "third_party/cmsis_nn").mkdir(parents=True)
    assert find_tree("cmsis-nn", tmp_path) == tree.resolve()
    assert find_tree("cmsis-nn", tree) == tree.resolve()  # the tree itself
    with pytest.raises(TreeError, match="made with the CMSIS-NN kernels"):
        find_tree("reference", tree)
    with pytest.raises(TreeError, match="unknown kernels"):
        find_tree("ethos-u", tmp_path)


def test_missing_cross_compiler_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match="apt-get install gcc-arm-none-eabi"):
        qemu.check_toolchain()
    with pytest.raises(ToolMissing, match="apt-get install qemu-system-arm"):
        qemu.check_qemu()


def test_definition_index_leaves_out_internal_names(tmp_path):
    src = tmp_path / "tensorflow" / "lite" / "micro" / "thing.cc"
    src.parent.mkdir(parents=True)
    src.write_text(
        "namespace tflite {\n"
        "namespace {}  // namespace\n"
        "namespace {\n"
        "int Helper(int x) { return x; }\n"
        'const char* Brace() { return "}"; }  // a brace in a literal\n'
        "}  // anonymous namespace.\n"
        "int Public(int x) { return x; }\n"
        "static int Local(int x) { return x; }\n"
        "Thing::Thing(int a,\n"
        "             int b)\n"
        "    : a_(a) {}\n"
        "TfLiteStatus Thing::Run() const {\n"
        "  return Helper(1);\n"
        "}\n"
        "TFLMRegistration Register_THING() { return {}; }\n"
        "const int kThingTable[4] = {1, 2, 3, 4};\n"
        "}  // namespace tflite\n"
    )
    idx = DefinitionIndex(tmp_path)
    rel = "tensorflow/lite/micro/thing.cc"
    assert idx.files_for("tflite::Register_THING()") == [rel]
    assert idx.files_for("tflite::Thing::Thing(int, int)") == [rel]
    assert idx.files_for("tflite::Thing::Run() const") == [rel]
    assert idx.files_for("vtable for tflite::Thing") == [rel]
    assert idx.files_for("tflite::kThingTable") == [rel]
    assert idx.files_for("tflite::Public(int)") == [rel]
    assert idx.files_for("tflite::(anonymous namespace)::Helper(int)") == []
    assert idx.files_for("tflite::(anonymous namespace)::Brace()") == []
    assert idx.files_for("Local") == []


def _bare_elf(tmp_path: Path, main_body: str) -> Path:
    """A firmware of the board files alone with main() = main_body (no TFLM), linked like the real one."""
    tools = qemu.check_toolchain()
    main_c = tmp_path / "main.cc"  # C++, as the real main.cc: edgeq_platform.h has C++ linkage
    main_c.write_text(
        '#include <stdint.h>\n#include "edgeq_platform.h"\n'
        f"int main(void) {{ edgeq_platform_init(); {main_body} }}\n"
    )
    (tmp_path / "edgeq_platform.h").write_bytes(
        (ROOT / "firmware_templates/tflm_app/edgeq_platform.h").read_bytes()
    )
    (tmp_path / "edgeq_protocol.h").write_bytes(
        (ROOT / "firmware_templates/common/edgeq_protocol.h").read_bytes()
    )
    objs = []
    for src in [main_c, qemu.BOARD_DIR / "startup_mps2_an386.c", qemu.BOARD_DIR / "platform_mps2_an386.cc"]:
        obj = tmp_path / (src.name + ".o")
        flags = [*qemu.CPU_FLAGS, "-Os", f"-I{tmp_path}", f"-I{qemu.BOARD_DIR}"]
        qemu._compile(tools, src, obj, flags)
        objs.append(obj)
    elf = tmp_path / "bare.elf"
    r = qemu._link(tools, objs, None, elf)
    assert r.returncode == 0, r.stdout
    return elf


@needs_tools
def test_qemu_that_never_answers_is_killed_and_the_elf_named(tmp_path):
    elf = _bare_elf(tmp_path, "for (;;) { }")
    board = QemuBoard(elf, boot_timeout=2)
    with pytest.raises(QemuTimeout, match=f"{elf.name}.* did not answer HELLO within 2 s"):
        board.start()
    assert not board.alive()


@needs_tools
def test_a_fault_prints_on_the_uart_and_ends_qemu(tmp_path):
    elf = _bare_elf(tmp_path, '__asm volatile("udf #0"); return 0;')
    with pytest.raises(QemuError, match=r"faulted under QEMU .*bare\.elf.*exception 0x00000003"):
        QemuBoard(elf, boot_timeout=20).start()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main_qemu(["--qemu", "--build", str(tmp_path), "--tflm-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeq: error: ") and "\n" not in err


@needs_tools
@needs_trees
def test_a_folder_without_firmware_is_refused(tmp_path):
    with pytest.raises(FirmwareBuildError, match="holds no firmware/main.cc"):
        build_firmware(tmp_path, "cmsis-nn", SHARED_TFLM)
