"""Benchmark: edgeq's planner front on LeNet-5/MNIST against plain TF-MOT uniform QAT at 8, 4, 3, 2 bits.

    python benchmarks/lenet5_front.py [--data mnist.npz] [--targets 2,3,4,6,8] [--bits 8,4,3,2]
                                      [--seed 0] [--epochs N] [--verify-rows 500]

One process trains the LeNet-5 pipeline's float model and Bayesian twin once (deploy.app.train_pipeline,
the pipeline's epochs: float 8, twin 5, QAT 2). Then, all from that one float model, split and QAT budget:

- peers, no edgeq code in their quantization path: the converter's int8 PTQ of the float model, and plain
  TF-MOT uniform QAT at each --bits (LastValueQuantizer, per-axis Conv2D, MovingAverage 8-bit
  activations; benchmarks/lowbit_qat.py tfmot_qat), QAT'd with the pipeline's epochs, lr and batch and
  converted as is;
- edgeq: the byte planner (`edgeq run`'s default allocation) at each --targets, QAT'd once per target
  (deploy.app.make_candidate, QAT from the float weights), then exported three ways: reference kernels
  with --storage auto and the default 16 KiB decode budget (slices: less unpack/decode RAM, more
  structure); reference kernels with --storage int4 unsliced (layers of > 4 bits stay INT8, which needs
  no unpack scratch); CMSIS-NN kernels with --storage auto (INT4 read packed, not sliced) and with
  --storage int4 (no DECODE buffers at all).

Every model is scored in host TFLM over all 10,000 test images. Flash: the .tflite bytes (model) and
the firmware flash = model + TFLM runtime + the model's kernels and decoders (deploy/firmware/code_size.json,
Cortex-M4, for the row's kernel set). Arena: host TFLM's figure (reference kernels), and for CMSIS-NN
deploy.measure.tflm.kernel_set_arena (the host arena without the INT4 unpack scratch; QEMU measured it
equal to the device's 25,076 B for the 4-bit model, benchmarks/results/qemu_firmware.md).

The target (issue 19): for every TF-MOT row, an edgeq model with at least its accuracy and at most its
model flash and its arena, on the same kernel set. Writes benchmarks/results/lenet5_front.md, .json, .png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from arglists import floats, ints  # noqa: E402
from provenance import commit, header_lines, run_header  # noqa: E402

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MNIST = Path("/work/shared/data/mnist.npz")
# (label, kernel set, decode budget, storage): the exports of every edgeq QAT model
EXPORTS = (
    ("reference, auto, 16 KiB slices", "reference", 16 * 1024, "auto"),
    ("reference, int4, unsliced", "reference", None, "int4"),  # layers > 4 bits INT8: no unpack scratch
    ("cmsis-nn, auto", "cmsis-nn", 16 * 1024, "auto"),
    ("cmsis-nn, int4", "cmsis-nn", None, "int4"),  # packed INT4 / INT8 weights: no decode buffers
)
KERNELS = ("reference", "cmsis-nn")


class Scorer:
    """TFLM accuracy over the test split, once per distinct model bytes (the interpreter is deterministic)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y, self.seen = x, y, {}

    def __call__(self, model: bytes) -> float:
        from deploy.measure.tflm import run_tflm

        key = hashlib.sha256(model).hexdigest()
        if key not in self.seen:
            pred = run_tflm(model, self.x).argmax(1)
            self.seen[key] = round(100.0 * float(np.mean(pred == self.y)), 2)
        return self.seen[key]


def sizes(model: bytes, kernels: str) -> dict:
    """Model bytes, firmware flash (model + runtime + kernels + decoders) and arena for a kernel set."""
    from deploy.firmware.code_size import model_code
    from deploy.measure.tflm import arena_bytes, kernel_set_arena

    host = arena_bytes(model)
    return {
        "model_bytes": len(model),
        "firmware_flash_bytes": len(model) + model_code(model, kernels).total,
        "arena_bytes": kernel_set_arena(model, kernels, host),
        "arena_host_bytes": host,
    }


def peer_rows(trained, spec, seed: int, bits_list: list[int], score, log, suffix: str = "") -> list[dict]:
    """int8 PTQ and TF-MOT uniform QAT at each bit width, each measured for both kernel sets; suffix: added
    to the rows' names (peers of a pruned model)."""
    from lowbit_qat import qat_fit, tfmot_qat

    from deploy.export import convert
    from deploy.flatbuffer import weight_tensors

    models = [("int8 PTQ (converter)", 8, convert(trained.float_model, trained.splits.x_train), 0.0)]
    for bits in bits_list:
        t0 = time.monotonic()
        qat = tfmot_qat(trained.float_model, bits)
        qat_fit(qat, trained.splits, spec, seed)
        models.append(
            (
                f"TF-MOT uniform {bits}-bit QAT",
                bits,
                convert(qat, trained.splits.x_train),
                time.monotonic() - t0,
            )
        )
    rows = []
    for name, bits, model, qat_s in models:
        acc = score(model)
        for kernels in KERNELS:
            rows.append(
                {
                    "row": name + suffix,
                    "kind": "peer",
                    "bits": bits,
                    "kernels": kernels,
                    "tflm_accuracy": acc,
                    "storage": "/".join(sorted({t.stored_type for t in weight_tensors(model)})),
                    "qat_seconds": round(qat_s, 1),
                    **sizes(model, kernels),
                }
            )
            log(_line(rows[-1]))
    return rows


def edgeq_rows(
    trained, spec, base, targets: list[float], verify_rows: int, score, log, exports=EXPORTS, suffix: str = ""
) -> list[dict]:
    """The planner at each target (planned for base.target), QAT'd once, exported for every (kernel set,
    decode budget); suffix: added to the rows' names. A target no plan reaches within base.target's
    budgets is logged and gets no row (a RAM budget below what the target's flash allows)."""
    from deploy.app import make_candidate
    from deploy.export import ExportOptions, export
    from deploy.planning import lut_ops_for
    from deploy.target import load_target
    from edgeq.errors import PlanError

    s = trained.splits
    rows = []
    for target_bits in targets:
        t0 = time.monotonic()
        try:
            cand = make_candidate(trained, spec, base, "planner", target_bits, spec.qat_epochs)
        except PlanError as e:
            log(f"edgeq planner, target {target_bits:g}{suffix}: no row, {e}")
            continue
        qat_s = time.monotonic() - t0
        for label, kernels, budget, storage in exports:
            t = load_target(kernels=kernels, decode_budget=budget if budget else "none")
            lut_ops = lut_ops_for(cand.plan, t.decode_budget)  # an int4+lut plan, exported as planned
            options = ExportOptions(
                storage, t.decode_budget, t.model_ram, kernels=kernels, count_code=True, lut_ops=lut_ops
            )
            # every variant is checked bit for bit in TFLM on verify_rows test images; the accuracy below
            # is each deployed model's own over all 10,000
            ex = export(cand.qat, s.x_train, s.x_test[:verify_rows], options)
            model = ex.deployed.model
            rows.append(
                {
                    "row": f"edgeq planner, target {target_bits:g}{suffix}",
                    "kind": "edgeq",
                    "export": label,
                    "target_bits": target_bits,
                    "kernels": kernels,
                    "decode_budget": budget,
                    "bits": dict(cand.plan.bits),
                    "mean_bits": round(cand.plan.mean_bits(trained.sizes), 3),
                    "storage": ex.deployed.kind,
                    "sliced": ex.sliced is not None,
                    "tflm_accuracy": score(model),
                    "qat_seconds": round(qat_s, 1),
                    **sizes(model, kernels),
                }
            )
            log(_line(rows[-1]))
    return rows


def _line(r: dict) -> str:
    where = r.get("export", r["kernels"])
    return (
        f"{r['row']:>32} [{where}]: TFLM {r['tflm_accuracy']:.2f}%, model {r['model_bytes']:,} B, "
        f"firmware {r['firmware_flash_bytes']:,} B, arena {r['arena_bytes']:,} B"
    )


def dominating(peer: dict, mine: list[dict]) -> dict | None:
    """The edgeq row on the peer's kernel set with accuracy >= and model flash, arena <= the peer's.

    Among those, the smallest model flash (ties: the higher accuracy)."""
    ok = [
        r
        for r in mine
        if r["kernels"] == peer["kernels"]
        and r["tflm_accuracy"] >= peer["tflm_accuracy"]
        and r["model_bytes"] <= peer["model_bytes"]
        and r["arena_bytes"] <= peer["arena_bytes"]
    ]
    return min(ok, key=lambda r: (r["model_bytes"], -r["tflm_accuracy"])) if ok else None


def verdicts(peers: list[dict], mine: list[dict]) -> list[dict]:
    """One line per TF-MOT row and kernel set: the dominating edgeq model, or none."""
    out = []
    for p in peers:
        if not p["row"].startswith("TF-MOT"):
            continue
        d = dominating(p, mine)
        keep = (
            "row",
            "export",
            "tflm_accuracy",
            "model_bytes",
            "firmware_flash_bytes",
            "arena_bytes",
            "storage",
        )
        picked = None if d is None else {k: d[k] for k in keep}
        out.append({"peer": p["row"], "kernels": p["kernels"], "met": d is not None, "edgeq": picked})
    return out


def plot(path: Path, rows: list[dict], title: str = "LeNet-5/MNIST", n_test: int = 10_000) -> None:
    """TFLM accuracy against model flash, one panel per kernel set: edgeq's front and TF-MOT's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kernels in zip(axes, KERNELS, strict=True):
        for kind, marker, label in (
            ("reference", "*", "reference model"),
            ("peer", "s", "int8 PTQ / TF-MOT uniform QAT"),
            ("edgeq", "o", "edgeq planner"),
        ):
            if not any(r["kind"] == kind for r in rows):
                continue
            pts = sorted(
                (
                    (r["model_bytes"], r["tflm_accuracy"], r)
                    for r in rows
                    if r["kind"] == kind and r["kernels"] == kernels
                ),
                key=lambda p: p[:2],
            )
            xs, ys = [p[0] / 1024 for p in pts], [p[1] for p in pts]
            style = {"peer": "--", "edgeq": "-"}.get(kind, "none")
            ax.plot(
                xs,
                ys,
                marker=marker,
                linestyle=style,
                markersize=10 if kind == "reference" else 6,
                label=label,
            )
            for x, y, r in pts:
                tag = f"t{r['target_bits']:g}" if kind == "edgeq" else f"{r['bits']}b"
                ax.annotate(tag, (x / 1024, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("model flash (KiB, .tflite)")
        ax.set_title(f"{title}, {kernels} kernels")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"TFLM accuracy, {n_test:,} test images (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # a new --out folder: the plot is its first file
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict) -> str:
    """The results file: provenance, the verdicts, every row."""
    e = res["epochs"]
    lines = [
        "# LeNet-5/MNIST: edgeq's planner front against plain TF-MOT uniform QAT (issue 19)",
        "",
        *header_lines(res),
        "",
        f"One float model (seed {res['seed']}, float {e['float']} / twin {e['bnn']} epochs; float Keras "
        f"accuracy {res['float_accuracy']:.2f}%), one split, QAT {e['qat']} epochs for every QAT row. "
        "Accuracy: host TFLM over all 10,000 test images (one image = 0.01 points). Model = .tflite bytes; "
        "firmware = model + TFLM runtime + the model's kernels and decoders on a Cortex-M4 "
        "(deploy/firmware/code_size.json) for that kernel set. Arena: reference = host TFLM's figure; "
        "cmsis-nn = host TFLM's arena without the INT4 unpack scratch (kernel_set_arena; equal to the "
        "device's on QEMU for the 4-bit model). edgeq rows: the planner (the run's default allocation) at "
        f"each target, QAT'd once from the {res.get('qat_start', 'float')} weights, then exported for "
        "reference kernels with --storage "
        "auto at the 16 KiB decode budget and with --storage int4 unsliced, and for CMSIS-NN with --storage "
        "auto and int4 (planned with the reference pricing). "
        "Peers: the converter's int8 PTQ and plain TF-MOT LastValueQuantizer QAT, converted as is.",
        "",
        "## Target: for every TF-MOT row, an edgeq model with >= its accuracy, <= its model flash and arena",
        "",
        "| TF-MOT row | kernels | TF-MOT acc / model B / arena B | edgeq model | export "
        "| edgeq acc / model B / firmware B / arena B | met |",
        "|---|---|---|---|---|---|---|",
    ]
    peers = {(p["row"], p["kernels"]): p for p in res["rows"] if p["kind"] == "peer"}
    for v in res["verdicts"]:
        p = peers[(v["peer"], v["kernels"])]
        d = v["edgeq"]
        mine = (
            "—"
            if d is None
            else (
                f"{d['tflm_accuracy']:.2f} / {d['model_bytes']:,} / "
                f"{d['firmware_flash_bytes']:,} / {d['arena_bytes']:,}"
            )
        )
        lines.append(
            f"| {v['peer']} | {v['kernels']} | {p['tflm_accuracy']:.2f} / {p['model_bytes']:,} / "
            f"{p['arena_bytes']:,} | {d['row'] if d else 'none'} | {d['export'] if d else ''} | {mine} | "
            f"{'yes' if v['met'] else 'NO'} |"
        )
    lines += [
        "",
        f"![accuracy vs flash]({res['plot']})",
        "",
        "## Every row",
        "",
        "| row | export / kernels | bits | storage | TFLM acc | model B | firmware B | arena B "
        "| host arena B |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        bits = (
            ", ".join(str(b) for b in r["bits"].values()) + f" (mean {r['mean_bits']})"
            if isinstance(r["bits"], dict)
            else str(r["bits"])
        )
        where = r.get("export", r["kernels"])
        lines.append(
            f"| {r['row']} | {where} | {bits} | {r['storage']}{', sliced' if r.get('sliced') else ''} | "
            f"{r['tflm_accuracy']:.2f} | {r['model_bytes']:,} | {r['firmware_flash_bytes']:,} | "
            f"{r['arena_bytes']:,} | {r['arena_host_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def target_lines(targets: list[dict]) -> list[str]:
    """A results file's '## Targets' table: each target, what was measured, met or not."""
    return [
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in targets],
    ]


@contextlib.contextmanager
def trained_pipeline(
    data: str, seed: int, epochs: int | None, qat_epochs: int | None = None, pipeline: str = "mnist_lenet5"
):
    """A pipeline's float model and twin trained once: (spec, run options, trained, float Keras %)."""
    from deploy.app import RunOptions, prepare, train_pipeline
    from deploy.target import load_target
    from edgeq.pipeline import load_pipeline

    spec = load_pipeline(ROOT / "pipelines" / f"{pipeline}.py")
    with tempfile.TemporaryDirectory(prefix=f"edgeq-{pipeline}-") as tmp:
        base = RunOptions(
            out=Path(tmp) / "run",
            seed=seed,
            data=data,
            method="planner",
            epochs=epochs,
            target=load_target(kernels="reference"),
        )
        spec, _, _ = prepare(spec, base)
        if qat_epochs is not None:
            spec = dataclasses.replace(spec, qat_epochs=qat_epochs)
        trained = train_pipeline(spec, base)
        s = trained.splits
        pred = trained.float_model.predict(s.x_test, verbose=0).argmax(1)
        yield spec, base, trained, 100.0 * float(np.mean(pred == s.y_test))


def beside() -> str:
    """Other processes using the CPU when the benchmark ends (ps), for the results file."""
    import os
    import subprocess

    ps = subprocess.Popen(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], stdout=subprocess.PIPE, text=True)
    out, _ = ps.communicate()
    # neither this process nor ps itself: a process just started shows its CPU share of a few ms, up to 100%
    skip = {os.getpid(), ps.pid}
    busy = [ln.split(None, 2) for ln in out.splitlines()[1:]]
    busy = [b[2][:70] for b in busy if len(b) == 3 and int(b[0]) not in skip and float(b[1]) >= 20.0]
    return "; ".join(f"`{b}`" for b in busy[:4]) or "nothing else at >= 20% CPU"


def lenet_parser(doc: str, targets: str, bits: str) -> argparse.ArgumentParser:
    """The flags the LeNet-5 benchmarks share: data, planner targets, TF-MOT bits, seed, epochs, rows, out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data", default=str(MNIST), help="MNIST .npz in the keras layout")
    ap.add_argument("--targets", type=floats, default=targets, help="planner targets (mean bits)")
    ap.add_argument("--bits", type=ints, default=bits, help="TF-MOT uniform QAT bit widths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="cap every training stage (smoke runs)")
    ap.add_argument("--verify-rows", type=int, default=500, help="test images each export verifies on")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--name", default=None, help="results file stem (default: the benchmark's own)")
    return ap


def missing_data(path: str) -> bool:
    """True (and the one-line error printed) when the MNIST file is not there."""
    if Path(path).is_file():
        return False
    print(f"error: no MNIST file at {path}; pass --data mnist.npz", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = lenet_parser(__doc__, targets="2,3,4,6,8", bits="8,4,3,2")
    ap.add_argument(
        "--cmsis-ram-targets",
        type=lambda text: text if text == "auto" else floats(text),
        default="",
        help="planner targets also planned for CMSIS-NN within --cmsis-ram-budget (exported for cmsis-nn); "
        "auto: the search's (deploy.planning.targets_for_ram)",
    )
    ap.add_argument("--cmsis-ram-budget", type=int, default=26_000, help="arena bytes for those rows")
    ap.add_argument(
        "--qat-start", choices=("float", "twin"), default="float", help="edgeq rows' QAT start (edgeq run's)"
    )
    args = ap.parse_args(argv)
    if missing_data(args.data):
        return 2
    targets = args.targets
    auto_ram = args.cmsis_ram_targets == "auto"
    ram_targets = [] if auto_ram else args.cmsis_ram_targets
    bits = args.bits

    started_at = commit()  # the code that runs: later commits must not relabel it
    t_start = time.monotonic()
    log = lambda text: print(f"[{time.monotonic() - t_start:6.0f} s] {text}", flush=True)  # noqa: E731
    with trained_pipeline(args.data, args.seed, args.epochs) as (spec, base, trained, float_acc):
        log("trained the float model and its twin")
        s = trained.splits
        score = Scorer(s.x_test, s.y_test)
        rows = peer_rows(trained, spec, args.seed, bits, score, log)
        base = dataclasses.replace(base, qat_start=args.qat_start)
        mine = edgeq_rows(trained, spec, base, targets, args.verify_rows, score, log)
        if auto_ram:
            from deploy.firmware.code_size import decode_code_bytes
            from deploy.planning import targets_for_ram

            code = decode_code_bytes("cmsis-nn")
            ram_targets = targets_for_ram(
                trained, spec, args.cmsis_ram_budget, kernels="cmsis-nn", decode_code=code
            )
            log(f"targets within {args.cmsis_ram_budget:,} B of CMSIS-NN arena: {ram_targets}")
        if ram_targets:  # the search's RAM-budget planning (arena within the budget) for the CMSIS-NN board
            from deploy.target import load_target

            budget = args.cmsis_ram_budget
            fit = dataclasses.replace(base, target=load_target(kernels="cmsis-nn", ram_budget=budget))
            cmsis = [e for e in EXPORTS if e[1] == "cmsis-nn"]
            suffix = f", cmsis-nn arena <= {budget:,} B"
            mine += edgeq_rows(trained, spec, fit, ram_targets, args.verify_rows, score, log, cmsis, suffix)
    out = Path(args.out)
    name = args.name or "lenet5_front"
    res = {
        **run_header("lenet5_front.py", argv, started_at, args.seed, spec, float_acc),
        "test_samples": int(len(s.y_test)),
        "qat_start": args.qat_start,
        "rows": rows + mine,
        "verdicts": verdicts(rows, mine),
        "plot": f"{name}.png",
        "seconds": round(time.monotonic() - t_start, 1),
        "beside": beside(),
    }
    plot(out / f"{name}.png", res["rows"])
    atomic_write_text(out / f"{name}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / f"{name}.md", markdown(res))
    for v in res["verdicts"]:
        log(f"{v['peer']} [{v['kernels']}]: {'met' if v['met'] else 'NOT met'}")
    return 0 if all(v["met"] for v in res["verdicts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
