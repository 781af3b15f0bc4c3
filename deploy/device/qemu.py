"""The rendered firmware as a real board: cross-compiled for Cortex-M4 and run under QEMU's mps2-an386.

``build_firmware`` compiles the unmodified ``firmware/`` sources (main.cc, the model's C array, the
protocol) with arm-none-eabi-g++ against a TFLM tree and links them with the board files of
``firmware_templates/qemu_mps2_an386`` (startup, linker script, UART platform). Only what the firmware
links is compiled: starting from the app's objects, every symbol the linker still misses is looked up in
the tree's sources (the op resolver's ``Register_*`` calls pull in the model's kernels, those pull in
their ``*_common.cc`` and the CMSIS-NN functions, and so on), compiled, and added to a static library
cached per (tree, flags) under ``~/.cache/edgeq/tflm/<hash>/``; a second build compiles only the app.

``running(build)`` boots the ELF under ``qemu-system-arm -machine mps2-an386`` with UART 0 on a
pseudo-terminal, checks that it answers HELLO, and yields the pty path for ``edgeq device-eval --port``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy.device.protocol import MAGIC, DeviceInfo, Frame, FrameDecoder, FrameType, encode_frame
from edgeq.errors import EdgeqError
from edgeq.io import atomic_write_text

BOARD_DIR = Path(__file__).resolve().parents[2] / "firmware_templates" / "qemu_mps2_an386"
MACHINE = "mps2-an386"
KERNELS = {"reference": "cortex-m4-reference", "cmsis-nn": "cortex-m4-cmsis-nn"}
CPU_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
# -Os and NDEBUG as the generic CMake project's MinSizeRel default; sections for --gc-sections.
OPT_FLAGS = ("-Os", "-DNDEBUG", "-ffunction-sections", "-fdata-sections", "-fno-unwind-tables")
# What TFLM's project generation defines for a cortex_m_generic tree (+ CMSIS_NN for the CMSIS-NN one).
TFLM_DEFINES = (
    "TF_LITE_STATIC_MEMORY",
    "TF_LITE_MCU_DEBUG_LOG",
    "PROJECT_GENERATION",
    "TF_LITE_DISABLE_X86_NEON",
)
CXX_FLAGS = ("-std=c++17", "-fno-exceptions", "-fno-rtti", "-fno-threadsafe-statics")
C_FLAGS = ("-std=gnu11",)
LINK_FLAGS = (
    "--specs=nano.specs",
    "--specs=nosys.specs",
    "-nostartfiles",
    "-Wl,--gc-sections",
    "-Wl,--no-warn-rwx-segments",
)
INCLUDE_DIRS = (
    "",
    "third_party/flatbuffers/include",
    "third_party/gemmlowp",
    "third_party/ruy",
    "third_party/kissfft",
    "third_party/cmsis",
    "third_party/cmsis_nn",
    "third_party/cmsis_nn/Include",
    "third_party/cmsis/CMSIS/Core/Include",
)
APP_SOURCES = ("main.cc", "edgeq_protocol.cc")
BOARD_SOURCES = ("startup_mps2_an386.c", "platform_mps2_an386.cc")
LINKER_SCRIPT = "mps2_an386.ld"
PLUGIN_SOURCE = "edgeq_insn_plugin.c"
INVOKE_SYMBOL = "_ZN6tflite16MicroInterpreter6InvokeEv"
CYCLES_SYMBOL = "edgeq_cycles"
INTERPRETER_H = "tensorflow/lite/micro/micro_interpreter.h"
# FLASH is SSRAM1 at 0 (4 MiB), RAM is SSRAM2&3 at 0x20000000 (mps2_an386.ld).
RAM_BASE = 0x20000000
MAX_LINK_ROUNDS = 40
INDEX_VERSION = 2  # bump when _definitions changes: cached indexes are then rebuilt
DEBIAN_PACKAGES = {
    "arm-none-eabi-g++": "gcc-arm-none-eabi",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi",
    "arm-none-eabi-ar": "binutils-arm-none-eabi",
    "arm-none-eabi-size": "binutils-arm-none-eabi",
    "arm-none-eabi-nm": "binutils-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}


class QemuError(EdgeqError):
    """The QEMU board cannot be built or run; the message says what is missing or what failed."""


class ToolMissing(QemuError):
    """A cross-compiler, newlib or QEMU is not installed."""


class TreeError(QemuError):
    """No TFLM tree, or a tree without the chosen kernels."""


class FirmwareBuildError(QemuError):
    """Compiling or linking the firmware failed."""


class QemuTimeout(QemuError):
    """QEMU did not boot the firmware or answer in time (it was killed)."""


@dataclass(frozen=True)
class QemuBuild:
    """A firmware ELF for mps2-an386 and what it takes: flash = .text+.rodata+.data, RAM = .data+.bss."""

    elf: Path
    flash_bytes: int
    ram_bytes: int
    kernels: str
    tree: Path
    text_bytes: int = 0  # .isr_vector + .text (+ .ARM.exidx and the init arrays)
    rodata_bytes: int = 0
    data_bytes: int = 0
    bss_bytes: int = 0  # .bss + .noinit (the tensor arena is here)
    stack_bytes: int = 0  # reserved by the linker script, not in ram_bytes
    heap_bytes: int = 0
    library: Path | None = None
    library_objects: int = 0  # TFLM/CMSIS-NN objects the library holds
    compiled_library_objects: int = 0  # of them compiled by this build (0: the cache had them all)
    seconds: float = 0.0
    firmware_dir: Path | None = None


# ---------------------------------------------------------------------------------------------- tools


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(
            f"{name} not found; install it (Debian/Ubuntu: apt-get install {DEBIAN_PACKAGES.get(name, name)})"
        )
    return path


def check_toolchain() -> dict[str, str]:
    """Paths of the arm-none-eabi tools; ToolMissing, naming the Debian package, when one is absent."""
    tools = {n: _tool(n) for n in ("arm-none-eabi-g++", "arm-none-eabi-gcc", "arm-none-eabi-ar")}
    tools.update({n: _tool(n) for n in ("arm-none-eabi-size", "arm-none-eabi-nm")})
    r = subprocess.run(
        [tools["arm-none-eabi-gcc"], *CPU_FLAGS, "-print-file-name=libc_nano.a"],
        capture_output=True,
        text=True,
    )
    if not os.path.isabs(r.stdout.strip()):
        raise ToolMissing(
            "arm-none-eabi-gcc has no newlib-nano (libc_nano.a); "
            "install it (Debian/Ubuntu: apt-get install libnewlib-arm-none-eabi)"
        )
    # TFLM and the firmware are C++: without its headers every compile fails at <cstddef>, minutes in
    r = subprocess.run(
        [tools["arm-none-eabi-g++"], *CPU_FLAGS, "-x", "c++", "-E", "-o", os.devnull, "-"],
        input="#include <cstddef>\n",
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise ToolMissing(
            "arm-none-eabi-g++ has no C++ standard headers (<cstddef>); "
            "install them (Debian/Ubuntu: apt-get install libstdc++-arm-none-eabi-newlib)"
        )
    return tools


def check_qemu() -> str:
    """Path of qemu-system-arm; ToolMissing when it is absent or lacks the mps2-an386 machine."""
    qemu = _tool("qemu-system-arm")
    r = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True, timeout=30)
    if not re.search(rf"^{re.escape(MACHINE)}\s", r.stdout, re.M):
        raise ToolMissing(
            f"{qemu} has no {MACHINE} machine (QEMU 6.0 or later has it); upgrade qemu-system-arm"
        )
    return qemu


def _version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


# ----------------------------------------------------------------------------------------------- trees


def _default_roots() -> list[Path]:
    # Not $TFLM_ROOT: the generic CMake build's tree is usually a host one, which this board cannot use.
    roots = [Path(os.environ["EDGEQ_TFLM_ROOT"])] if os.environ.get("EDGEQ_TFLM_ROOT") else []
    # This workplace keeps the trees next to the repository (../shared/tflm).
    return roots + [Path(__file__).resolve().parents[3] / "shared" / "tflm"]


def find_tree(kernels: str, tflm_root: str | Path | None = None) -> Path:
    """The TFLM tree for kernels: tflm_root itself when it is a tree, else tflm_root/cortex-m4-<kernels>.

    Without tflm_root: $EDGEQ_TFLM_ROOT, then ../shared/tflm beside the repository. TreeError when there is
    none, when it was not made for cortex_m_generic, or when it lacks the chosen kernels (CMSIS-NN sources
    for cmsis-nn; reference kernels, i.e. no kernels/cmsis_nn, for reference).
    """
    if kernels not in KERNELS:
        raise TreeError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    roots = [Path(tflm_root)] if tflm_root is not None else _default_roots()
    tried = []
    for root in roots:
        root = root.expanduser().resolve()
        for tree in (root, root / KERNELS[kernels]):
            tried.append(str(tree))
            if (tree / INTERPRETER_H).is_file():
                _check_kernels(tree, kernels)
                return tree
    where = " or ".join(tried) if tried else "(nowhere)"
    raise TreeError(
        f"no TFLM tree for --kernels {kernels} at {where}; pass --tflm-root DIR: a tree made by "
        f"tflite-micro's create_tflm_tree.py, or a folder holding {KERNELS[kernels]}/"
    )


def _check_kernels(tree: Path, kernels: str) -> None:
    if not (tree / "tensorflow/lite/micro/cortex_m_generic").is_dir():
        raise TreeError(
            f"{tree} was not made for Cortex-M (no tensorflow/lite/micro/cortex_m_generic): make it with "
            'create_tflm_tree.py --makefile_options="TARGET=cortex_m_generic TARGET_ARCH=cortex-m4 ..."'
        )
    has_cmsis = (tree / "tensorflow/lite/micro/kernels/cmsis_nn").is_dir()
    if kernels == "cmsis-nn" and not (has_cmsis and (tree / "third_party/cmsis_nn").is_dir()):
        raise TreeError(
            f"{tree} has no CMSIS-NN kernels (tensorflow/lite/micro/kernels/cmsis_nn, third_party/cmsis_nn); "
            'make it with create_tflm_tree.py --makefile_options="OPTIMIZED_KERNEL_DIR=cmsis_nn ..." '
            "or pass --kernels reference"
        )
    if kernels == "reference" and has_cmsis:
        raise TreeError(
            f"{tree} was made with the CMSIS-NN kernels (it has tensorflow/lite/micro/kernels/cmsis_nn); "
            "pass --kernels cmsis-nn, or point --tflm-root at a tree made without OPTIMIZED_KERNEL_DIR"
        )


# ----------------------------------------------------------------------------- sources and definitions

_DEF_START = re.compile(r"^(?![ \t#/*])[^;{}()\n]*?\b((?:[A-Za-z_]\w*::)*~?[A-Za-z_]\w*)\s*\(", re.M)
_VAR_DEF = re.compile(
    r"^(?![ \t#/*]|extern\b|typedef\b|using\b|return\b)"
    r"[^;{}()=\n]*?\b([A-Za-z_]\w*)\s*(?:\[[^\]\n]*\]\s*)*=",
    re.M,
)
_AFTER_PARAMS = re.compile(r"\s*(?:(?:const|override|final|noexcept)\b\s*)*([{:])")
_KEYWORDS = frozenset(
    {"if", "for", "while", "switch", "return", "sizeof", "defined", "namespace", "decltype"}
)


_NAMESPACE_OPEN = re.compile(r"^namespace\s*\{", re.M)
_LEXEME = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|[{}]', re.S)


def _internal_spans(text: str) -> list[tuple[int, int]]:
    """Offsets of the anonymous namespaces in text, each from its ``namespace {`` to its closing brace."""
    spans = []
    for m in _NAMESPACE_OPEN.finditer(text):
        depth, end = 0, len(text)
        for lex in _LEXEME.finditer(text, m.end() - 1):  # comments and literals may hold braces
            tok = lex.group(0)
            if tok in "{}":
                depth += 1 if tok == "{" else -1
                if depth == 0:
                    end = lex.end()
                    break
        spans.append((m.start(), end))
    return spans


def _definitions(text: str) -> set[str]:
    """Names of the external functions (as written, e.g. ``MicroInterpreter::Invoke``) and variables text
    defines; static ones and those in anonymous namespaces are left out (no other file can want them)."""
    internal = _internal_spans(text)

    def external(m: re.Match) -> bool:
        return not re.search(r"\bstatic\b", m.group(0)) and not any(a <= m.start() < b for a, b in internal)

    names = set()
    for m in _DEF_START.finditer(text):
        name = m.group(1)
        if name.split("::")[-1] in _KEYWORDS or not external(m):
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        after = _AFTER_PARAMS.match(text, i)
        if after and not (after.group(1) == ":" and text.startswith("::", after.start(1))):
            names.add(name)
    names.update(m.group(1) for m in _VAR_DEF.finditer(text) if external(m))
    return names


def tree_sources(tree: Path) -> list[Path]:
    """The tree's .c/.cc files that firmware could link (tests, examples and benchmarks left out), sorted."""
    out = []
    for base in ("tensorflow", "signal", "third_party"):
        for p in sorted((tree / base).rglob("*")):
            if p.suffix not in (".c", ".cc") or not p.is_file():
                continue
            rel = p.relative_to(tree).as_posix()
            if re.search(r"(_test|_benchmark)\.cc$|/(examples|benchmarks|testing|tools)/", rel):
                continue
            out.append(p)
    return out


class DefinitionIndex:
    """Which source file of a tree defines which function or variable (found by reading the sources)."""

    def __init__(self, tree: Path, cache_file: Path | None = None):
        self.tree = tree
        sources = tree_sources(tree)
        # The cached index is used while the sources and the way they are read stay the same.
        stamp = f"v{INDEX_VERSION}:{len(sources)}:{max((s.stat().st_mtime_ns for s in sources), default=0)}"
        index: dict[str, list[str]] | None = None
        if cache_file is not None and cache_file.is_file():
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                cached = json.loads(cache_file.read_text())
                index = cached["index"] if cached["stamp"] == stamp else None
        if index is None:
            index = {}
            for src in sources:
                rel = src.relative_to(tree).as_posix()
                for name in _definitions(src.read_text(errors="replace")):
                    index.setdefault(name, []).append(rel)
            if cache_file is not None:
                atomic_write_text(cache_file, json.dumps({"stamp": stamp, "index": index}, sort_keys=True))
        self._index = index
        self._by_class: dict[str, set[str]] = {}
        for name, files in index.items():
            if "::" in name:
                self._by_class.setdefault(name.split("::")[-2], set()).update(files)

    def files_for(self, symbol: str) -> list[str]:
        """Source files (relative to the tree) that may define a demangled linker symbol."""
        symbol = re.sub(r"^(?:non-)?virtual thunk to ", "", symbol)
        m = re.match(r"^(?:vtable|VTT|typeinfo|typeinfo name|construction vtable) for (.+)$", symbol)
        if m:
            cls = _components(m.group(1))[-1]
            return sorted(self._by_class.get(cls, ()))
        comps = _components(_strip_params(symbol))
        if not comps:
            return []
        name = comps[-1]
        if len(comps) >= 2:
            files = self._index.get(f"{comps[-2]}::{name}")
            if files:
                return sorted(set(files))
        files = set(self._index.get(name, ()))
        namespaces = [c for c in comps[:-1] if c and not c.startswith("(")]
        if len(files) > 1 and namespaces:
            # Prefer the files that open the symbol's namespaces.
            narrowed = {f for f in files if all(f"namespace {ns}" in self._text(f) for ns in namespaces[-1:])}
            files = narrowed or files
        return sorted(files)

    def _text(self, rel: str) -> str:
        return (self.tree / rel).read_text(errors="replace")


def _strip_params(symbol: str) -> str:
    """``a::b<c>::f(int) const`` -> ``a::b<c>::f``: the name before the parameter list."""
    depth = 0
    for i, ch in enumerate(symbol):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not symbol[:i].endswith("operator"):
            return symbol[:i]
    return symbol


def _components(name: str) -> list[str]:
    """Scope components of a demangled name, template arguments removed."""
    plain, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            plain.append(ch)
    return [c.strip() for c in "".join(plain).split("::")]


# ------------------------------------------------------------------------------------------ building


def cache_root() -> Path:
    """~/.cache/edgeq/tflm (or $XDG_CACHE_HOME/edgeq/tflm): the cached TFLM libraries."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeq" / "tflm"


@dataclass(frozen=True)
class _Flags:
    """Everything that decides how the library's objects are compiled."""

    tree: Path
    kernels: str
    defines: tuple[str, ...]
    includes: tuple[str, ...]
    compiler: str

    def common(self) -> list[str]:
        return [*CPU_FLAGS, *OPT_FLAGS, *(f"-D{d}" for d in self.defines), *(f"-I{i}" for i in self.includes)]

    def key(self) -> str:
        blob = json.dumps(
            {
                "tree": str(self.tree),
                "flags": self.common(),
                "cxx": CXX_FLAGS,
                "c": C_FLAGS,
                "cc": self.compiler,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _compile(tools: dict[str, str], src: Path, obj: Path, flags: list[str]) -> None:
    cc = tools["arm-none-eabi-gcc"] if src.suffix == ".c" else tools["arm-none-eabi-g++"]
    lang = C_FLAGS if src.suffix == ".c" else CXX_FLAGS
    obj.parent.mkdir(parents=True, exist_ok=True)
    tmp = obj.with_name(f".{obj.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    r = subprocess.run(
        [cc, *flags, *lang, "-c", str(src), "-o", str(tmp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FirmwareBuildError(f"compiling {src} failed:\n{r.stdout[-3000:]}")
    os.replace(tmp, obj)


def _compile_all(tools: dict[str, str], jobs: list[tuple[Path, Path, list[str]]], workers: int) -> None:
    if not jobs:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for f in [pool.submit(_compile, tools, *job) for job in jobs]:
            f.result()


class _Library:
    """The cached static library of one (tree, flags): objects under obj/, libtflm.a, a manifest."""

    def __init__(self, flags: _Flags, tools: dict[str, str], root: Path | None = None):
        self.flags = flags
        self.tools = tools
        self.dir = (root or cache_root()) / flags.key()
        self.archive = self.dir / "libtflm.a"
        self.manifest_path = self.dir / "manifest.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.compiled = 0
        try:
            self.manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            self.manifest = {}
        self.manifest.update(
            tree=str(flags.tree), kernels=flags.kernels, compiler=flags.compiler, flags=flags.common()
        )
        self.objects: set[str] = set(self.manifest.get("objects", []))
        # A cached object whose source changed since (or that went missing) is compiled again (refresh).
        self.stale = sorted(rel for rel in self.objects if not self._fresh(rel))
        self.objects -= set(self.stale)
        self._index: DefinitionIndex | None = None

    def _obj(self, rel: str) -> Path:
        # One flat name per source: ar keys members by file name, and kernel_util.cc, common.cc, ... recur.
        return self.dir / "obj" / (rel.replace("/", "__") + ".o")

    def refresh(self, workers: int) -> None:
        """Recompile the stale objects and make sure libtflm.a holds exactly the recorded objects."""
        if self.stale:
            self.add(self.stale, workers)
            self.stale = []
        elif self.objects and not self.archive.is_file():
            self.write()

    def _fresh(self, rel: str) -> bool:
        src, obj = self.flags.tree / rel, self._obj(rel)
        return obj.is_file() and src.is_file() and obj.stat().st_mtime >= src.stat().st_mtime

    @property
    def index(self) -> DefinitionIndex:
        if self._index is None:
            self._index = DefinitionIndex(self.flags.tree, self.dir / "definitions.json")
        return self._index

    def add(self, rels: list[str], workers: int) -> None:
        """Compile rels (tree-relative sources) into the library."""
        new = sorted(set(rels) - self.objects)
        jobs = [(self.flags.tree / r, self._obj(r), self.flags.common()) for r in new if not self._fresh(r)]
        _compile_all(self.tools, jobs, workers)
        self.compiled += len(jobs)
        self.objects.update(new)
        self.write()

    def write(self) -> None:
        """Rebuild libtflm.a from the objects and record them in the manifest."""
        tmp = self.archive.with_name(f".libtflm.{os.getpid()}.a")
        tmp.unlink(missing_ok=True)
        objs = [str(self._obj(r)) for r in sorted(self.objects)]
        if objs:
            r = subprocess.run(
                [self.tools["arm-none-eabi-ar"], "rcs", str(tmp), *objs], capture_output=True, text=True
            )
            if r.returncode != 0:
                raise FirmwareBuildError(f"arm-none-eabi-ar failed: {r.stderr[-2000:]}")
            os.replace(tmp, self.archive)
        self.manifest["objects"] = sorted(self.objects)
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on path (two builds against the same cache take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_UNDEFINED = re.compile(r"undefined reference to [`']([^'\n]+)'")


def _firmware_dir(build_dir: Path) -> Path:
    for d in (build_dir / "firmware", build_dir):
        if (d / "main.cc").is_file():
            return d
    raise FirmwareBuildError(
        f"{build_dir} holds no firmware/main.cc; pass the output folder of `edgeq run` (or its firmware/)"
    )


def _app_defines(fw: Path) -> tuple[list[str], list[str]]:
    """(library defines, app defines) the rendered CMakeLists.txt asks for beyond the defaults."""
    cmake = (fw / "CMakeLists.txt").read_text() if (fw / "CMakeLists.txt").is_file() else ""
    lib = ["USE_TFLM_COMPRESSION"] if re.search(r"tflm\s+PUBLIC\s+USE_TFLM_COMPRESSION", cmake) else []
    app = [f"EDGEQ_MAX_PAYLOAD={m}" for m in re.findall(r"EDGEQ_MAX_PAYLOAD=(\d+)", cmake)[:1]]
    return lib, app


def _model_source(fw: Path) -> Path:
    """The model's C array: the one .cc/.c of fw that is not the app, the protocol or a platform."""
    app = set(APP_SOURCES)
    found = [
        p
        for p in sorted(fw.glob("*.c*"))
        if p.suffix in (".c", ".cc") and p.name not in app and not p.name.startswith("platform_")
    ]
    if len(found) != 1:
        raise FirmwareBuildError(
            f"{fw} should hold one model array source (model_data.cc) besides main.cc, edgeq_protocol.cc and "
            f"platform_*.cc; found {', '.join(p.name for p in found) or 'none'}"
        )
    return found[0]


def _sizes(tools: dict[str, str], elf: Path) -> dict[str, int]:
    """Bytes per output section of elf, grouped: text, rodata, data, bss, stack, heap."""
    r = subprocess.run([tools["arm-none-eabi-size"], "-A", "-d", str(elf)], capture_output=True, text=True)
    out = {"text": 0, "rodata": 0, "data": 0, "bss": 0, "stack": 0, "heap": 0}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or not parts[0].startswith("."):
            continue
        name, size, addr = parts[0], int(parts[1]), int(parts[2])
        if name in (".stack", ".heap"):
            out[name[1:]] += size
        elif name in (".bss", ".noinit"):
            out["bss"] += size
        elif name == ".data":
            out["data"] += size
        elif name == ".rodata":
            out["rodata"] += size
        elif addr < RAM_BASE and size and not name.startswith((".ARM.attributes", ".comment", ".debug")):
            out["text"] += size
    return out


def _nm(tools: dict[str, str], elf: Path) -> dict[str, int]:
    r = subprocess.run([tools["arm-none-eabi-nm"], str(elf)], capture_output=True, text=True)
    syms = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


def build_firmware(
    build_dir: str | Path,
    kernels: str = "cmsis-nn",
    tflm_root: str | Path | None = None,
    *,
    jobs: int = 2,
    cache_dir: str | Path | None = None,
) -> QemuBuild:
    """Cross-compile build_dir's firmware for mps2-an386 against the tree of kernels; the ELF and its sizes.

    The ELF lands in build_dir/qemu/<kernels>/firmware.elf (with its map file). The TFLM objects it needs
    come from (and go into) the cached library of (tree, flags).
    """
    t0 = time.monotonic()
    tools = check_toolchain()
    tree = find_tree(kernels, tflm_root)
    build_dir = Path(build_dir).resolve()
    fw = _firmware_dir(build_dir)
    model_src = _model_source(fw)
    lib_defines, app_defines = _app_defines(fw)
    includes = tuple(str(tree / d) if d else str(tree) for d in INCLUDE_DIRS if (tree / d).is_dir())
    defines = (*TFLM_DEFINES, *(["CMSIS_NN"] if kernels == "cmsis-nn" else []), *lib_defines)
    flags = _Flags(tree, kernels, defines, includes, _version(tools["arm-none-eabi-g++"]))
    out = (fw.parent if fw.name == "firmware" else fw) / "qemu" / kernels
    app_flags = [*flags.common(), *(f"-D{d}" for d in app_defines), f"-I{fw}", f"-I{BOARD_DIR}"]
    app = [fw / s for s in APP_SOURCES] + [model_src] + [BOARD_DIR / s for s in BOARD_SOURCES]
    missing = [str(p) for p in app if not p.is_file()]
    if missing:
        raise FirmwareBuildError(f"firmware sources missing: {', '.join(missing)}; render the firmware again")
    app_objs = [out / "obj" / (p.name + ".o") for p in app]
    _compile_all(tools, [(s, o, app_flags) for s, o in zip(app, app_objs, strict=True)], jobs)

    elf = out / "firmware.elf"
    root = Path(cache_dir) if cache_dir is not None else None
    lib_dir = (root or cache_root()) / flags.key()
    with _locked(lib_dir / ".lock"):
        lib = _Library(flags, tools, root)
        log = _link_until_resolved(tools, lib, app_objs, elf, jobs)
    sizes = _sizes(tools, elf)
    atomic_write_text(out / "link.log", log)
    return QemuBuild(
        elf=elf,
        flash_bytes=sizes["text"] + sizes["rodata"] + sizes["data"],
        ram_bytes=sizes["data"] + sizes["bss"],
        kernels=kernels,
        tree=tree,
        text_bytes=sizes["text"],
        rodata_bytes=sizes["rodata"],
        data_bytes=sizes["data"],
        bss_bytes=sizes["bss"],
        stack_bytes=sizes["stack"],
        heap_bytes=sizes["heap"],
        library=lib.archive,
        library_objects=len(lib.objects),
        compiled_library_objects=lib.compiled,
        seconds=round(time.monotonic() - t0, 2),
        firmware_dir=fw,
    )


def _link(
    tools: dict[str, str], objs: list[Path], archive: Path | None, elf: Path, map_file: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        tools["arm-none-eabi-g++"],
        *CPU_FLAGS,
        *LINK_FLAGS,
        f"-T{BOARD_DIR / LINKER_SCRIPT}",
        f"-Wl,-Map={map_file or elf.with_suffix('.map')}",
        *map(str, objs),
        *([str(archive)] if archive is not None and archive.is_file() else []),
        "-o",
        str(elf),
    ]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _link_until_resolved(
    tools: dict[str, str], lib: _Library, app_objs: list[Path], elf: Path, jobs: int
) -> str:
    """Link; compile the tree sources that define what the linker misses; repeat until it links."""
    lib.refresh(jobs)
    tmp = elf.with_name(f".{elf.name}.{os.getpid()}.tmp")  # renamed into place once it links
    for _ in range(MAX_LINK_ROUNDS):
        r = _link(tools, app_objs, lib.archive if lib.objects else None, tmp, elf.with_suffix(".map"))
        if r.returncode == 0:
            os.replace(tmp, elf)
            return r.stdout
        undefined = sorted(set(_UNDEFINED.findall(r.stdout)))
        if not undefined:
            raise FirmwareBuildError(f"linking {elf} failed:\n{r.stdout[-3000:]}")
        want: set[str] = set()
        for sym in undefined:
            want.update(f for f in lib.index.files_for(sym) if f not in lib.objects)
        if not want:
            shown = "; ".join(undefined[:8])
            raise FirmwareBuildError(
                f"linking {elf}: no source in {lib.flags.tree} defines {shown}"
                f"{' ...' if len(undefined) > 8 else ''} (is the tree complete?)"
            )
        lib.add(sorted(want), jobs)
    raise FirmwareBuildError(f"linking {elf} did not converge after {MAX_LINK_ROUNDS} rounds")


# -------------------------------------------------------------------------------- instruction counts


def plugin_path() -> Path:
    """The instruction-counting TCG plugin (edgeq_insn_plugin.c), built once with the host's C compiler.

    QemuError when there is no host C compiler or qemu-system-arm was built without plugin support.
    """
    qemu = check_qemu()
    if b"qemu_plugin_register_vcpu_tb_trans_cb" not in Path(qemu).read_bytes():
        raise QemuError(
            f"{qemu} was built without TCG plugin support (--enable-plugins): no instruction counts"
        )
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise QemuError("no host C compiler (cc) to build the instruction-counting QEMU plugin; install gcc")
    src = BOARD_DIR / PLUGIN_SOURCE
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    so = cache_root().parent / "qemu" / f"edgeq_insn_plugin-{digest}.so"
    if so.is_file():
        return so
    so.parent.mkdir(parents=True, exist_ok=True)
    tmp = so.with_name(f".{so.name}.{os.getpid()}.tmp")
    r = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src)], capture_output=True, text=True
    )
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise QemuError(f"building the QEMU plugin {src} failed: {r.stderr.strip()[-500:]}")
    os.replace(tmp, so)
    return so


def read_instruction_counts(path: str | Path) -> list[int]:
    """Instructions per inference window as the plugin wrote them, less the boot window (setup's Invoke)."""
    try:
        lines = Path(path).read_text().split()
    except OSError:
        return []
    return [int(x) for x in lines[1:] if x.isdigit()]


# ------------------------------------------------------------------------------------------- running


class QemuBoard:
    """One QEMU mps2-an386 running a firmware ELF, its UART 0 on a pseudo-terminal."""

    def __init__(
        self,
        build: QemuBuild | str | Path,
        *,
        count_instructions: bool = False,
        boot_timeout: float = 60.0,
        max_seconds: float | None = None,
        work_dir: str | Path | None = None,
    ):
        self.elf = Path(build.elf if isinstance(build, QemuBuild) else build)
        self.count_instructions = count_instructions
        self.boot_timeout = float(boot_timeout)
        self.max_seconds = max_seconds
        self.work_dir = Path(work_dir) if work_dir is not None else self.elf.parent
        self.port: str | None = None
        self.info: DeviceInfo | None = None
        self.boot_text = ""
        self.insn_file: Path | None = None
        self.plugin: Path | None = None
        self.insn_unavailable = "" if count_instructions else "not asked for"  # why there are no counts
        self._proc: subprocess.Popen | None = None
        self._log_path = self.work_dir / "qemu.log"
        self._fd = -1
        self._timer: threading.Timer | None = None
        self.killed_for_time = False

    def command(self) -> list[str]:
        """The qemu-system-arm command line (paused with -S until start() has the pty open)."""
        cmd = [
            check_qemu(),
            "-machine",
            MACHINE,
            "-nographic",
            "-monitor",
            "stdio",
            "-chardev",
            "pty,id=edgeq0",
            "-serial",
            "chardev:edgeq0",
            "-semihosting-config",
            "enable=on,target=native",
            "-kernel",
            str(self.elf),
            "-S",
        ]
        if self.count_instructions:
            try:
                self.plugin = plugin_path()
                syms = _nm(check_toolchain(), self.elf)
                missing = [s for s in (INVOKE_SYMBOL, CYCLES_SYMBOL) if s not in syms]
                if missing:
                    raise QemuError(
                        f"{self.elf} has no symbol {', '.join(missing)} to bracket inferences with"
                    )
            except QemuError as e:
                self.insn_unavailable = str(e)
            else:
                self.insn_file = self.work_dir / "instructions.txt"
                self.insn_file.unlink(missing_ok=True)
                cmd += [
                    "-plugin",
                    f"{self.plugin},invoke={syms[INVOKE_SYMBOL]:#x},cycles={syms[CYCLES_SYMBOL]:#x},"
                    f"out={self.insn_file}",
                ]
        return cmd

    def start(self) -> str:
        """Boot the firmware, wait for its boot line and an INFO answer; return the pty path."""
        if not self.elf.is_file():
            raise QemuError(f"{self.elf} not found; build it first (build_firmware)")
        cmd = self.command()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self._log_path, "wb")
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        if self.max_seconds:
            self._timer = threading.Timer(self.max_seconds, self._time_up)
            self._timer.daemon = True
            self._timer.start()
        try:
            self.port = self._wait_for_pty(time.monotonic() + 30.0)
            self._fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(self._fd)
            self._monitor("cont")
            self.info = self._handshake(time.monotonic() + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        return self.port

    def _time_up(self) -> None:
        self.killed_for_time = True
        self._kill()

    def _monitor(self, line: str) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self._proc.stdin.write(line.encode() + b"\n")
                self._proc.stdin.flush()

    def _log(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self, what: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            tail = (self.boot_text + self._log())[-1500:].strip()
            raise QemuError(
                f"QEMU exited (status {self._proc.returncode}) {what} running {self.elf}: "
                f"{tail or 'no output'}"
            )

    def _wait_for_pty(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            m = re.search(r"char device redirected to (\S+) \(label edgeq0\)", self._log())
            if m:
                return m.group(1)
            self._check_alive("before opening its pty")
            time.sleep(0.02)
        self._kill()
        raise QemuTimeout(f"QEMU did not open a pty within 30 s for {self.elf}; killed it")

    def _handshake(self, deadline: float) -> DeviceInfo:
        """Read the boot text (the ready line, or why setup failed or the firmware faulted) and get INFO.

        HELLO goes out once the ready line is in (or every 2 s from 1 s on, for firmware that prints none);
        the UART and the pty hold it until the firmware serves.
        """
        decoder = FrameDecoder(types=frozenset({FrameType.INFO}))
        text, hello_at, ready_seen = b"", time.monotonic() + 1.0, False
        while time.monotonic() < deadline:
            alive = self.alive()  # sampled first: once QEMU is gone, what it wrote is read to the end
            chunk = self._read_available(0.05 if alive else 0.0)
            text += chunk
            # The text before the first frame is what the firmware printed.
            s = text.split(bytes([MAGIC]))[0].decode("ascii", "replace")
            self.boot_text = s
            done = s.endswith("\n") or not alive  # a whole line, or nothing more will come
            # The fault handler also writes its line to QEMU's log (semihosting) before QEMU exits. Once
            # QEMU is gone that copy is the one to trust: QEMU can exit before the UART's last bytes reach
            # the pty (seen here: "edgeq: fault, exception 0x000").
            log = "" if alive else self._log()
            said = log if "edgeq: fault" in log else s
            if "edgeq: fault" in said and done:
                line = said[said.index("edgeq: fault") :].strip().splitlines()[0]
                raise QemuError(f"the firmware faulted under QEMU ({self.elf}): {line}")
            if "setup failed" in s and done:
                raise QemuError(
                    f"the firmware's setup failed under QEMU ({self.elf}): {' / '.join(s.split())}"
                )
            for ev in decoder.feed(chunk):
                if isinstance(ev, Frame) and ev.type == FrameType.INFO:
                    return DeviceInfo.unpack(ev.payload)
            if " ready, arena " in s and done and not ready_seen:
                ready_seen, hello_at = True, time.monotonic()
            if time.monotonic() >= hello_at and alive:
                os.write(self._fd, encode_frame(FrameType.HELLO))
                hello_at = time.monotonic() + 2.0
            if not alive:  # everything it wrote has been read and said nothing better
                self._check_alive("while booting")
        self._kill()
        printed = self.boot_text.strip() or "nothing"
        raise QemuTimeout(
            f"the firmware under QEMU ({self.elf}) did not answer HELLO within {self.boot_timeout:g} s; "
            f"killed it. It printed: {printed}"
        )

    def _read_available(self, timeout: float) -> bytes:
        """What the pty holds after waiting up to timeout for the first byte (b"" when nothing)."""
        data = b""
        while select.select([self._fd], [], [], timeout)[0]:
            try:
                part = os.read(self._fd, 4096)
            except (BlockingIOError, OSError):  # EIO once QEMU has closed its side
                break
            if not part:
                break
            data, timeout = data + part, 0.0
        return data

    def instruction_counts(self) -> list[int]:
        """Instructions per inference so far (plugin), boot window dropped; [] without the plugin."""
        return read_instruction_counts(self.insn_file) if self.insn_file is not None else []

    def returncode(self) -> int | None:
        """QEMU's exit status, None while it runs (or before it started)."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        """Whether QEMU is still running."""
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        """Quit QEMU (killed if it does not go within 5 s) and close the pty."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._proc is not None and self._proc.poll() is None:
            self._monitor("quit")
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> QemuBoard:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running(build: QemuBuild | str | Path, **kwargs) -> Iterator[str]:
    """Run build's ELF under QEMU for the duration of the block; yields the pty path (for device-eval --port).

    Keyword arguments go to QemuBoard (count_instructions, boot_timeout, max_seconds, work_dir).
    """
    board = QemuBoard(build, **kwargs)
    board.start()
    try:
        yield board.port or ""
    finally:
        board.stop()


# ------------------------------------------------------------------------------------------------ CLI


def parser() -> argparse.ArgumentParser:
    """Arguments of `edgeq virtual-board --qemu`."""
    p = argparse.ArgumentParser(
        prog="edgeq virtual-board --qemu",
        description="cross-compile the firmware for a Cortex-M4 (QEMU mps2-an386) and serve it on a pty",
    )
    p.add_argument("--qemu", action="store_true", help="run the real firmware under QEMU (this command)")
    p.add_argument("--build", required=True, help="output folder of `edgeq run` (holds firmware/)")
    p.add_argument(
        "--kernels", choices=tuple(KERNELS), default="cmsis-nn", help="TFLM kernels (default cmsis-nn)"
    )
    p.add_argument(
        "--tflm-root",
        default=None,
        help="a TFLM tree, or a folder holding cortex-m4-reference/ and cortex-m4-cmsis-nn/ "
        "(default: $EDGEQ_TFLM_ROOT, then ../shared/tflm)",
    )
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    p.add_argument(
        "--count-instructions",
        action="store_true",
        help="count guest instructions per inference (TCG plugin)",
    )
    p.add_argument("--max-seconds", type=float, default=None, help="kill QEMU after this many seconds")
    return p


def main_qemu(argv: list[str] | None = None) -> int:
    """`edgeq virtual-board --qemu --build DIR [--kernels K] [--tflm-root DIR]`: serve until interrupted."""
    args = parser().parse_args(argv)
    try:
        check_qemu()  # before the build: a missing QEMU should not cost a compile first
        build = build_firmware(args.build, args.kernels, args.tflm_root, jobs=args.jobs)
        print(
            f"built {build.elf} ({build.kernels} kernels, {build.tree}): flash {build.flash_bytes:,} B, "
            f"RAM {build.ram_bytes:,} B, {build.seconds:.1f} s "
            f"({build.compiled_library_objects} of {build.library_objects} TFLM objects compiled)",
            flush=True,
        )
        board = QemuBoard(build, count_instructions=args.count_instructions, max_seconds=args.max_seconds)
        port = board.start()
    except EdgeqError as e:
        print(f"edgeq: error: {e}", file=sys.stderr)
        return 2
    info = board.info
    arena = f", arena {info.arena_used:,} B used" if info else ""
    print(
        f"QEMU {MACHINE} board on {port} ({build.elf}{arena}); "
        f"run `edgeq device-eval --port {port} --build {args.build}`; Ctrl-C to stop",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5) and board.alive():
            pass
    except KeyboardInterrupt:
        stop.set()
    finally:
        died = not stop.is_set() and not board.alive()
        status = board.returncode()
        board.stop()
    counts = sorted(board.instruction_counts())
    if counts:
        median = counts[len(counts) // 2]
        print(f"instructions per inference (QEMU TCG plugin, {len(counts)} inferences): median {median:,}")
    if board.killed_for_time:
        print(
            f"edgeq: error: QEMU ran past --max-seconds {args.max_seconds:g}; killed it ({build.elf})",
            file=sys.stderr,
        )
        return 2
    if died:
        print(f"edgeq: error: QEMU exited (status {status}) while serving {build.elf}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "QemuBoard",
    "QemuBuild",
    "QemuError",
    "build_firmware",
    "find_tree",
    "main_qemu",
    "read_instruction_counts",
    "running",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_qemu())
