"""The rendered firmware cross-compiled for a Cortex-M4 and run under QEMU (mps2-an386) as a real board.

Needs arm-none-eabi-gcc with newlib and its C++ library (Debian: gcc-arm-none-eabi, libnewlib-arm-none-eabi,
libstdc++-arm-none-eabi-newlib), qemu-system-arm and the TFLM trees of ../shared/tflm (cortex-m4-reference,
cortex-m4-cmsis-nn): the only TFLM sources this workplace has. Each is skipped with the reason when missing.
The first run compiles the TFLM objects the digits firmware links into ~/.cache/edgeq/tflm (a few minutes on
two cores for both trees); later runs compile only the app.
"""

from __future__ import annotations

import json
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


# (lut, cmsis-nn) runs only with -m slow: its DECODE path is the (lut, reference) run's and its kernels the
# (int4, cmsis-nn) run's; benchmarks/qemu_firmware.py measures the pair as well.
COMBOS = [
    pytest.param(s, k, marks=pytest.mark.slow) if (s, k) == ("lut", "cmsis-nn") else (s, k)
    for s in ("int4", "lut")
    for k in ("reference", "cmsis-nn")
]


class _BoardRuns(dict):
    """(storage, kernels) -> the folder of that `edgeq run`, made the first time a test asks for it."""

    def __init__(self, factory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, key: tuple[str, str]) -> Path:
        from deploy.cli import main

        storage, kernels = key
        out = self.factory.mktemp(f"digits_{storage}_{kernels}")
        argv = ["run", str(ROOT / "pipelines" / "digits.py"), "--out", str(out), "--storage", storage]
        argv += ["--board", "mps2-an386", "--kernels", kernels, "--epochs", "1", "--quiet"]
        assert main(argv) == 0
        self[key] = out
        return out


@pytest.fixture(scope="module")
def board_runs(tmp_path_factory) -> _BoardRuns:
    """`edgeq run pipelines/digits.py --board mps2-an386 --kernels K --storage S` per (S, K) a test asks for:
    the run cross-compiles its own firmware and measures it under QEMU before it writes the report."""
    return _BoardRuns(tmp_path_factory)


@needs_tools
@needs_trees
@pytest.mark.parametrize(("storage", "kernels"), COMBOS)
def test_the_report_is_the_device_s_arena_flash_and_outputs(board_runs, storage, kernels):
    out = board_runs[storage, kernels]
    rep = json.loads((out / "report.json").read_text())
    dev = json.loads((out / "device_report.json").read_text())
    target, fw = rep["target"], rep["target"]["firmware"]
    assert target["board"] == "mps2-an386" and target["kernels"] == fw["kernels"] == kernels
    assert rep["models"]["deployed"]["storage"] == storage
    # Every test row through the firmware under QEMU, bit-identical to host TFLM.
    assert dev["samples"] == dev["samples_counted"] == dev["bit_identical_rows"] == 270, dev
    assert dev["device"] == dev["host_tflm"]
    assert not dev["virtual_board"] and dev["cycles"]["median"] is None  # QEMU has no cycle counter

    # The report's flash is the ELF's, read here again with arm-none-eabi-size.
    elf = out / fw["elf"]
    assert elf == out / "qemu" / kernels / "firmware.elf" and elf.is_file()
    sizes = qemu._sizes(qemu.check_toolchain(), elf)
    assert fw["flash_bytes"] == sizes["text"] + sizes["rodata"] + sizes["data"]
    assert (
        fw["flash_from"].startswith("the ELF") and fw["model_bytes"] == (out / "model.tflite").stat().st_size
    )
    assert sizes["rodata"] > fw["model_bytes"] and fw["flash_bytes"] < 256 * 1024
    # The per-operator code table predicts it closely (deploy/firmware/code_size.json).
    assert abs(fw["estimated_flash_bytes"] - fw["flash_bytes"]) <= 0.03 * fw["flash_bytes"], fw
    assert ("TFLM_DECODE" in fw["operator_code_bytes"]) == (storage == "lut")

    # The report's arena is the device's: boot the ELF again and read the firmware's own line.
    assert target["arena_bytes"] == dev["arena"]["device_bytes"] > 0
    assert "mps2-an386" in target["arena_measured_with"] and kernels in target["arena_measured_with"]
    with QemuBoard(elf, max_seconds=120) as board:
        assert f" ready, arena {target['arena_bytes']} of" in board.boot_text
        assert board.info.arena_used == target["arena_bytes"]
    assert rep["board"]["fits"] and "model + " in rep["board"]["message"]
    assert fw["instructions_per_inference"] > 10_000
    md = (out / "report.md").read_text()
    assert "## On-device evaluation" in md and "## Firmware on the target" in md


@needs_tools
@needs_trees
@pytest.mark.slow
def test_a_model_stored_lut_and_int4_per_layer_runs_bit_identical_on_the_board(tmp_path):
    # The planner's int4+lut plan (a model-file budget, so no DECODE code weighed) deployed on the board:
    # DECODE restores the LUT layers into the arena while CMSIS-NN reads the other layers' INT4 packed.
    # Only with -m slow: its DECODE path is the (lut, reference) run's, its INT4 kernels the (int4,
    # cmsis-nn) run's, and test_cost_model checks the same file bit for bit in host TFLM.
    from dataclasses import replace

    from deploy.app import RunOptions, StageClock, deploy, make_candidate, prepare, train_pipeline
    from deploy.export import ExportOptions, export
    from deploy.planning import lut_ops_for, plan_layers
    from deploy.target import load_target
    from edgeq.pipeline import load_pipeline

    spec = load_pipeline(ROOT / "pipelines" / "digits.py").with_epochs(1)
    target = load_target(board="mps2-an386", kernels="cmsis-nn")
    opts = RunOptions(out=tmp_path / "run", prune_channels=0.0, target=target)
    prepare(spec, opts)
    trained = train_pipeline(spec, opts)
    plan = plan_layers(trained, 3.0, spec, kernels="cmsis-nn").plan
    assert plan.meta["storage"] == "int4+lut"
    cand = make_candidate(trained, spec, opts, "planner", 3.0, 1, plan=plan)
    s = trained.splits
    options = ExportOptions(
        "auto",
        target.decode_budget,
        target.model_ram,
        kernels="cmsis-nn",
        count_code=False,
        lut_ops=lut_ops_for(plan, target.decode_budget),
    )
    cand = replace(cand, exported=export(cand.qat, s.x_train, s.x_test, options))
    assert cand.exported.deployed.kind == "int4+lut"
    deploy(trained, cand, spec, opts, StageClock())
    out = opts.out
    rep = json.loads((out / "report.json").read_text())
    dev = json.loads((out / "device_report.json").read_text())
    assert rep["models"]["deployed"]["storage"] == "int4+lut"
    stored = {w["stored"] for w in rep["models"]["deployed"]["weights"] if not w["lut_bits"]}
    assert "INT4" in stored and any(w["lut_bits"] for w in rep["models"]["deployed"]["weights"])
    assert dev["samples"] == dev["bit_identical_rows"] == 270, dev
    assert "TFLM_DECODE" in rep["target"]["firmware"]["operator_code_bytes"]


@needs_tools
@needs_trees
def test_cmsis_nn_reads_int4_packed_so_nothing_is_sliced(board_runs):
    ref, cmsis = (
        json.loads((board_runs["int4", k] / "report.json").read_text()) for k in ("reference", "cmsis-nn")
    )
    # The reference kernels unpack each INT4 tensor into the arena; CMSIS-NN reads it packed.
    assert "slicing" not in cmsis and cmsis["target"]["arena_bytes"] < ref["target"]["arena_bytes"]


@needs_tools
@needs_trees
def test_second_build_compiles_only_the_app(board_runs):
    again = build_firmware(board_runs["int4", "cmsis-nn"], "cmsis-nn", SHARED_TFLM)
    assert again.compiled_library_objects == 0 and again.library_objects > 20


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


@needs_tools
def test_a_cross_compiler_without_its_cxx_headers_names_the_debian_package(tmp_path, monkeypatch):
    """The real arm-none-eabi tools, with g++ made blind to its C++ headers (-nostdinc++): what a machine
    with gcc-arm-none-eabi but not libstdc++-arm-none-eabi-newlib has. Refused up front, not minutes in."""
    import shutil

    for name in ("arm-none-eabi-gcc", "arm-none-eabi-ar", "arm-none-eabi-size", "arm-none-eabi-nm"):
        (tmp_path / name).symlink_to(shutil.which(name))
    gxx = tmp_path / "arm-none-eabi-g++"
    gxx.write_text(f'#!/bin/sh\nexec {shutil.which("arm-none-eabi-g++")} -nostdinc++ "$@"\n')
    gxx.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match="apt-get install libstdc\\+\\+-arm-none-eabi-newlib"):
        qemu.check_toolchain()


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


def test_a_virtual_board_without_its_tools_is_refused_before_training(tmp_path, monkeypatch, capfd):
    from deploy.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no arm-none-eabi-gcc, no qemu-system-arm
    out = tmp_path / "out"
    argv = ["run", str(ROOT / "pipelines" / "digits.py"), "--out", str(out), "--board", "mps2-an386"]
    assert main([*argv, "--quiet"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("edgeq: error: ") and "\n" not in err and "apt-get install" in err
    assert not out.exists() or not any(out.iterdir())  # refused before any training or writing
