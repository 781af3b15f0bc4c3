"""Benchmark: one real `edgeq run` timed end to end, with what its report measured and what ran beside it.

    python benchmarks/run_timed.py --name NAME [--limit-s S] [--repeat N] -- PIPELINE [edgeq run flags]

Runs `python -m deploy.cli run PIPELINE FLAGS --out WORK --force` as a subprocess and writes
benchmarks/results/NAME.md and .json: the command, commit and machine; the run's wall seconds and peak
memory (the largest child's max RSS); the seconds per stage its report recorded; the deployed model
(TFLM accuracy over the whole test split, model bytes, arena for its kernel set, storage, bits) beside
the run's own int8 PTQ baseline (the converter, same model and split). What else used the CPU is sampled
with ps every 20 s while the run lasts, not only at its end. With --limit-s, one target row: wall < S.
With --repeat N the run is made N times one after another (a shared 2-core machine varies by 20-30%
between identical runs): the row judges the median run, every wall time is listed, the tables are the
median run's.
Peers (after the timed runs, not in their wall time): the converter's int8 PTQ and plain TF-MOT uniform
QAT at each bit width of the deployed plan, of the float model the run left in its folder (after
--prune-channels, the smaller model: the same model edgeq quantized), on the run's split and the
pipeline's QAT epochs, scored in host TFLM, for the reference and CMSIS-NN kernel sets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import commit, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class _Beside(threading.Thread):
    """ps every `every` seconds until stopped: the busy processes (>= 20% CPU) outside this benchmark and
    the run it watches (the run's own workers are its descendants), seen at any sample."""

    def __init__(self, every: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.every, self.seen, self.stop, self.root = every, {}, threading.Event(), os.getpid()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            ps = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args"], capture_output=True, text=True).stdout
            rows = [ln.split(None, 3) for ln in ps.splitlines()[1:]]
            rows = [r for r in rows if len(r) == 4]
            parent = {int(r[0]): int(r[1]) for r in rows}
            for pid, _, cpu, args in rows:
                if float(cpu) >= 20.0 and not self._ours(int(pid), parent):
                    self.seen[args[:100]] = None

    def _ours(self, pid: int, parent: dict[int, int]) -> bool:
        while pid > 1:
            if pid == self.root:
                return True
            pid = parent.get(pid, 1)
        return False

    def text(self) -> str:
        return "; ".join(f"`{b}`" for b in list(self.seen)[:4]) or "nothing else at >= 20% CPU in any sample"


def timed_run(run_args: list[str], work: Path) -> dict:
    """`edgeq run` with run_args into work: wall seconds, peak RSS and its report."""
    cmd = [sys.executable, "-m", "deploy.cli", "run", *run_args, "--out", str(work), "--force", "--quiet"]
    watcher = _Beside()
    watcher.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.monotonic() - t0, 1)
    watcher.stop.set()
    if proc.returncode:
        raise SystemExit(f"edgeq run {' '.join(run_args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # Linux: KiB
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "beside": watcher.text(), "report": _report(work)}


def _report(work: Path) -> dict:
    rep = json.loads((work / "report.json").read_text())
    dep, int8, tgt = rep["models"]["deployed"], rep["models"]["int8"], rep["target"]
    pr = rep.get("pruning") or {}
    return {
        "pipeline": rep["pipeline"],
        "seed": rep["seed"],
        "kernels": tgt["kernels"],
        "float_accuracy": rep["models"]["float"]["accuracy"],
        "deployed": {
            "tflm_accuracy": dep["accuracy_tflm"],
            "model_bytes": dep["flash_bytes"],
            "arena_bytes": tgt["arena_bytes"],
            "storage": dep["storage"],
            "method": rep["plan"]["method"],
            "mean_bits": rep["plan"]["mean_bits"],
            "bits": {lay["name"]: lay["bits"] for lay in rep["plan"]["layers"]},
        },
        "int8": {
            "tflm_accuracy": int8["accuracy_tflm"],
            "model_bytes": int8["flash_bytes"],
            "arena_bytes": int8["arena_bytes"],
        },
        "channels_removed": f"{pr.get('channels_removed', 0)} of {pr.get('channels_total', 0)}",
        "stage_seconds": rep.get("stage_seconds", {}),
    }


def markdown(res: dict) -> str:
    m, r = res["machine"], res["run"]
    rep, dep, int8 = r["report"], r["report"]["deployed"], r["report"]["int8"]
    bits = ", ".join(f"{k} {v}" for k, v in dep["bits"].items())
    lines = [
        f"# `edgeq run {' '.join(res['run_args'])}`, timed",
        "",
        f"Command: `{res['command']}`  ",
        f"Commit: {res['commit']}; machine: {m['cpu']}, {m['nproc']} cores, Python {m['python']}; "
        f"ran beside it (ps every 20 s): {r['beside']}.",
        "",
        f"Wall time {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min), peak memory {r['peak_rss_mb']:,} MB. "
        f"Channels removed: {rep['channels_removed']}. Accuracy: host TFLM over the whole test split; "
        f"model = .tflite bytes; arena = host TFLM, {rep['kernels']} kernels.",
        "",
    ]
    walls = res.get("walls_s") or [r["seconds"]]
    if len(walls) > 1:
        each = ", ".join(f"{w:.0f}" for w in walls)
        lines += [f"Runs: {len(walls)}, wall seconds {each}; the median run is shown.", ""]
    if res.get("limit_s"):
        met = "yes" if r["seconds"] < res["limit_s"] else "NO"
        what = f"median of {len(walls)}: " if len(walls) > 1 else ""
        lines += [
            "| target | measured | met |",
            "|---|---|---|",
            f"| the whole run under {res['limit_s']:.0f} s | {what}{r['seconds']:.0f} s | {met} |",
            "",
        ]
    lines += [
        "| model | TFLM acc | model B | arena B | storage |",
        "|---|---:|---:|---:|---|",
        f"| edgeq ({dep['method']}: {bits}; mean {dep['mean_bits']:.2f}) | "
        f"{100 * dep['tflm_accuracy']:.2f}% | {dep['model_bytes']:,} | {dep['arena_bytes']:,} | "
        f"{dep['storage']} |",
        f"| int8 PTQ (converter, the run's baseline) | {100 * int8['tflm_accuracy']:.2f}% | "
        f"{int8['model_bytes']:,} | {int8['arena_bytes']:,} | int8 |",
        "",
        f"Float (Keras): {100 * rep['float_accuracy']:.2f}%.",
        "",
        "| stage | s |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in rep["stage_seconds"].items()),
        *peer_table(res.get("peers", [])),
    ]
    return "\n".join(lines) + "\n"


def peers(run_args: list[str], work: Path, bits: list[int], seed: int) -> list[dict]:
    """The peer rows for a run of a pipeline script at the seed its report records (none for --model runs:
    no pipeline to load)."""
    from digits_targets import peer_rows

    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--data", default=None)
    flags.add_argument("--model", default=None)
    known, _ = flags.parse_known_args(run_args)
    if known.model is not None or not run_args[0].endswith(".py"):
        return []
    return peer_rows(seed, work, bits, pipeline=ROOT / run_args[0], data=known.data)


def peer_table(rows: list[dict]) -> list[str]:
    """The peers as markdown lines."""
    if not rows:
        return []
    out = [
        "",
        "Peers (same float model, split and QAT epochs; plain TF-MOT + converter; host TFLM):",
        "",
        "| peer | kernels | TFLM acc | model B | firmware B | arena B |",
        "|---|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r['row']} | {r['kernels']} | {r['tflm_accuracy']:.2f}% | {r['model_bytes']:,} | "
        f"{r['firmware_flash_bytes']:,} | {r['arena_bytes']:,} |"
        for r in rows
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    from edgeq.io import atomic_write_text

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="results file stem")
    ap.add_argument("--limit-s", type=float, default=None, help="a wall-time target for the whole run")
    ap.add_argument("--work", type=Path, default=None, help="the run's folder (default: /tmp/edgeq_NAME)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--repeat", type=int, default=1, help="runs, one after another; the median is judged")
    ap.add_argument("--no-peers", action="store_true", help="skip the int8 PTQ and TF-MOT QAT peer rows")
    ap.add_argument("run", nargs=argparse.REMAINDER, help="-- PIPELINE and its edgeq run flags")
    args = ap.parse_args(argv)
    run_args = args.run[1:] if args.run[:1] == ["--"] else args.run
    if not run_args:
        ap.error("give the run after --, e.g. -- pipelines/digits.py --seed 0")
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat} must be at least 1")
    started_at = commit()  # the code that runs: later commits must not relabel it
    work = args.work or Path(f"/tmp/edgeq_{args.name}")
    runs = [timed_run(run_args, work) for _ in range(args.repeat)]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    # The runs are one seeded command: the peers quantize the float model the last of them left.
    last = runs[-1]["report"]
    bits = sorted({min(max(b, 2), 8) for b in last["deployed"]["bits"].values()})
    peer = [] if args.no_peers else peers(run_args, work, bits, last["seed"])
    res = {
        "command": "python benchmarks/run_timed.py " + " ".join(argv),
        "commit": started_at,
        "machine": machine(),
        "run_args": run_args,
        "limit_s": args.limit_s,
        "run": run,
        "walls_s": [r["seconds"] for r in runs],
        "peers": peer,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out / f"{args.name}.md", markdown(res))
    print(f"{args.name}: {run['seconds']:.0f} s, {run['peak_rss_mb']:,} MB, beside: {run['beside']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
