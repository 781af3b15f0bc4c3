"""What every benchmark result records about where it came from: the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """CPU model, core count, platform and Python of this machine."""
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def commit(paths: tuple[str, ...] = ("benchmarks", "edgeq", "deploy")) -> str:
    """Short HEAD, plus '+uncommitted' when any of paths has changes git does not hold yet."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+uncommitted" if dirty else head


def run_header(
    script: str, argv: list[str] | None, started_at: str, seed: int, spec, float_acc: float
) -> dict:
    """The fields a benchmark that trains one pipeline once starts its results with."""
    return {
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": started_at,
        "machine": machine(),
        "seed": seed,
        "epochs": {"float": spec.epochs, "bnn": spec.bnn_epochs, "qat": spec.qat_epochs},
        "float_accuracy": round(float_acc, 2),
        "float_training": {"augment": spec.augment is not None, "lr_schedule": spec.lr_schedule},
    }


def header_lines(res: dict) -> list[str]:
    """A results file's command and provenance lines (res: command, commit, machine, seconds, beside)."""
    m = res["machine"]
    return [
        f"Command: `{res['command']}`  ",
        f"Commit: {res['commit']}; machine: {m['cpu']}, {m['nproc']} cores, Python {m['python']}; "
        f"{res['seconds']:.0f} s; ran beside it: {res['beside']}.",
    ]
