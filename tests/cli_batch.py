"""Run many `edgeq` command lines in one process: each one's exit status and what it wrote on fds 1 and 2.

Usage: python tests/cli_batch.py CASES.json RESULTS.json, CASES a list of [name, cwd, argv]; or run_batch
from a test. The bad-input tests use it so that TensorFlow loads once for all their refusals, not once per
case (about 3 s each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_batch(cases: list[tuple[str, Path, list[str]]], work: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every (name, cwd, argv) through `edgeq` in one fresh subprocess: name -> its exit status and stderr."""
    spec, results = work / "cli_batch_cases.json", work / "cli_batch_results.json"
    spec.write_text(json.dumps([[name, str(cwd), list(argv)] for name, cwd, argv in cases]))
    r = subprocess.run(
        [sys.executable, __file__, str(spec), str(results)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(results.read_text())
    return {c: subprocess.CompletedProcess(c, d["returncode"], "", d["stderr"]) for c, d in done.items()}


def run_one(cwd: str, argv: list[str]) -> dict:
    """deploy.cli.main(argv) run in cwd with fds 1 and 2 captured: {"returncode", "stderr"}."""
    from deploy.cli import main

    here = os.getcwd()
    with tempfile.TemporaryFile() as tmp:
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(tmp.fileno(), 1), os.dup2(tmp.fileno(), 2)
        try:
            os.chdir(cwd)
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001  (a crash is a result here: the test shows its traceback)
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            os.chdir(here)
        tmp.seek(0)
        return {"returncode": code, "stderr": tmp.read().decode(errors="replace")}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    results = {name: run_one(cwd, argv) for name, cwd, argv in cases}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
