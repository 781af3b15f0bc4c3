"""The `edgeq` command: run a pipeline, inspect a .tflite, evaluate on a device, flash a board."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.errors import EdgeqError


class Progress:
    """Shows which stage is running (rich on a terminal, plain lines otherwise): the app's on_stage."""

    def __init__(self, quiet: bool, stream=None, stages: tuple[str, ...] | None = None):
        self.quiet = quiet
        self.stream = stream
        self.stages = stages  # the stages this run goes through (default: deploy.app.stages_for())

    def __call__(self, name: str, text: str) -> None:
        if self.quiet:
            return
        from rich.console import Console

        from deploy.app import stages_for

        stages = self.stages or stages_for(None)
        console = Console(file=self.stream) if self.stream is not None else Console(stderr=True)
        console.print(f"[bold cyan][{stages.index(name) + 1}/{len(stages)}][/] {text}", highlight=False)


def _finite(value: float | None, flag: str, low: float | None = None) -> float | None:
    if value is not None and (not math.isfinite(value) or (low is not None and value < low)):
        bound = f" and >= {low:g}" if low is not None else ""
        raise EdgeqError(f"{flag} {value} must be a finite number{bound}")
    return value


def _accuracy_drop(text: str | None) -> tuple[float | None, float | None]:
    """(floor for a budget search, max drop for a smallest-within search) from --max-accuracy-drop."""
    from deploy.search import DEFAULT_FLOOR

    if text is None:
        return DEFAULT_FLOOR, None
    if str(text).strip().lower() == "none":
        return None, None
    try:
        value = float(text)
    except ValueError as e:
        raise EdgeqError(f"--max-accuracy-drop {text!r} is not a number of points (e.g. 1) or none") from e
    return None, _finite(value, "--max-accuracy-drop", 0.0)


def _options(args: argparse.Namespace):
    """RunOptions and the search's settings from the flags, every one checked before any work."""
    from deploy.app import RunOptions, check_target_bits
    from deploy.target import load_target

    if args.target_bits is not None:
        check_target_bits(args.target_bits)
    if args.epochs is not None and args.epochs < 1:
        raise EdgeqError(f"--epochs {args.epochs} must be at least 1")
    args.accuracy_floor, args.max_accuracy_drop = _accuracy_drop(args.max_accuracy_drop)
    if args.workers < 1:
        raise EdgeqError(f"--workers {args.workers} must be at least 1")
    if not args.out.strip():  # Path("") is ".": the current folder, which nobody means by an empty name
        raise EdgeqError("--out needs a folder name (e.g. --out out/); an empty one would mean this folder")
    from deploy.search.executors import make_executor
    from edgeq.distribute import check_distribute

    # Built here, before any training: a missing Ray or a dead address is refused now, and probed once.
    executor = make_executor(args.executor, workers=args.workers, address=args.ray_address)
    check_distribute(args.distribute)
    target = load_target(
        args.board, args.flash_budget, args.ram_budget, args.decode_budget, args.decompress_to, args.kernels
    )
    opts = RunOptions(
        out=Path(args.out),
        target_bits=args.target_bits,
        seed=args.seed,
        method=args.method,
        storage=args.storage,
        data=args.data,
        epochs=args.epochs,
        keep_dense=not args.dense_as_conv,
        qat_start=args.qat_start,
        distribute=args.distribute,
        target=target,
        prune=_prune(args.prune),
        prune_channels=_prune(args.prune_channels, "--prune-channels"),
        force=args.force,
    )
    return opts, _sweep_targets(args.sweep_targets), _sweep_methods(args.sweep_methods), executor


def _prune(text: str, flag: str = "--prune") -> float | str | None:
    """--prune, --prune-channels: none, a fraction of each layer's weights (channels) in [0, 1), or auto:
    the planner's choice per layer."""
    from deploy.app import PRUNE_AUTO, check_prune

    if text is None:  # --prune-channels not given: the pipeline's
        return None
    word = str(text).strip().lower()
    if word == PRUNE_AUTO:
        return PRUNE_AUTO
    try:
        value = 0.0 if word in ("none", "") else float(text)
    except ValueError as e:
        raise EdgeqError(f"{flag} {text!r} is not a fraction; pass e.g. 0.5, auto or none") from e
    fraction = check_prune(value, flag)
    # channels 0 is "none, whatever the pipeline says"; None would mean "the pipeline's"
    return 0.0 if fraction is None and flag == "--prune-channels" else fraction


def _sweep_targets(text: str) -> tuple[float, ...]:
    from deploy.app import check_target_bits

    try:
        targets = tuple(float(t) for t in text.split(","))
    except ValueError as e:
        raise EdgeqError(f"--sweep-targets {text!r} is not a list of numbers like 2,3,4") from e
    return tuple(check_target_bits(t) for t in targets)


def _sweep_methods(text: str) -> tuple[str, ...]:
    from edgeq.allocators import check_method

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise EdgeqError(f"--sweep-methods {text!r} names no method")
    return tuple(check_method(m).name for m in methods)


def _spec(args: argparse.Namespace):
    """The pipeline: a script, or a model file and an .npz (--model, --data)."""
    from edgeq.pipeline import load_pipeline

    if (args.pipeline is None) == (args.model is None):
        raise EdgeqError(
            "give a pipeline script (edgeq run pipelines/digits.py) or --model MODEL --data DATA.npz"
        )
    if args.pipeline is not None:
        if args.task or args.no_train:
            raise EdgeqError("--task and --no-train go with --model; a pipeline script sets its own")
        return load_pipeline(args.pipeline)
    if args.data is None:
        raise EdgeqError("--model needs --data DATA.npz with x_train, y_train, x_test, y_test")
    from edgeq.byo import pipeline_from_files

    return pipeline_from_files(args.model, args.data, task=args.task, train=not args.no_train)


def _run(args: argparse.Namespace) -> int:
    from deploy.app import run
    from edgeq.distribute import strategy_for

    opts, targets, methods, executor = _options(args)
    strategy_for(args.distribute)  # collective ops must be set up before TensorFlow runs any op
    spec = _spec(args)
    from deploy.app import channels_of, stages_for

    progress = Progress(args.quiet, args.stderr, stages_for(opts.target, bool(channels_of(spec, opts))))
    if opts.target.searching or args.max_accuracy_drop is not None:
        from deploy.search import sweep

        rep = sweep(
            spec,
            opts,
            targets=targets,
            methods=methods,
            max_accuracy_drop=args.max_accuracy_drop,
            workers=args.workers,
            executor=executor,
            on_stage=progress,
            floor=args.accuracy_floor,
        )
        if args.accuracy_floor is None and args.max_accuracy_drop is None:
            print(drop_line(rep.body))
    else:
        rep = run(spec, opts, progress)
    for warning in rep.body.get("warnings", []):
        print(f"edgeq: warning: {warning}", file=args.stderr or sys.stderr)
    print(summary_line(rep.body, args.out))
    if "board" in rep.body:
        print(rep.body["board"]["message"])
    return 0


def drop_line(body: dict) -> str:
    """The accuracy the deployed model gave up, for `--max-accuracy-drop none` (said before anything else)."""
    m = body["models"]
    if "accuracy" not in m["float"]:
        return f"MAE {m['deployed']['mae_tflm']:.4f} in TFLM against {m['float']['mae']:.4f} float"
    drop = 100 * (m["float"]["accuracy"] - m["deployed"]["accuracy_tflm"])
    tflm, flt = m["deployed"]["accuracy_tflm"], m["float"]["accuracy"]
    return f"accuracy drop {drop:.2f} points: TFLM {tflm:.4f}, float {flt:.4f}"


def summary_line(body: dict, out: str) -> str:
    """The one line a run prints when it is done."""
    d, key = body["models"]["deployed"], "accuracy" if "accuracy" in body["models"]["float"] else "mae"
    t = body.get("target", {})
    where = f"on {t['board']}" if t.get("arena_on_device") else f"{t.get('kernels', 'reference')} kernels"
    arena = f"arena {t.get('arena_bytes', d['arena_bytes']):,} B ({where})"
    return (
        f"{' '.join(str(body['pipeline']).split())}: mean bits {body['plan']['mean_bits']:.3f}, "
        f"deployed {d['flash_bytes']:,} B flash "
        f"({d['storage']}, int8 {body['models']['int8']['flash_bytes']:,} B), {arena}, "
        f"TFLM {key} {d[key + '_tflm']:.4f} (float {body['models']['float'][key]:.4f}) -> {out}"
    )


def _inspect(args: argparse.Namespace) -> int:
    from deploy.inspect import inspect_model, to_text

    info = inspect_model(Path(args.model))
    print(json.dumps(info, indent=2) if args.json else to_text(info))
    return 0


def _model_args(r: argparse.ArgumentParser) -> None:
    """What to run: the pipeline or model, data, output, training budget."""
    r.add_argument(
        "pipeline",
        nargs="?",
        default=None,
        help="a pipeline script, e.g. pipelines/digits.py (or use --model)",
    )
    r.add_argument(
        "--model",
        default=None,
        help="bring your own model: a .keras (Keras 3 or tf_keras) or .h5 file, with --data DATA.npz "
        "holding x_train, y_train, x_test, y_test (optionally x_val, y_val); no pipeline script needed",
    )
    r.add_argument(
        "--task",
        choices=("classification", "regression"),
        default=None,
        help="with --model (default: detected)",
    )
    r.add_argument(
        "--no-train",
        action="store_true",
        help="with --model: it comes trained, the float stage only evaluates it",
    )
    r.add_argument("--out", default="out", help="output folder (default: out)")
    r.add_argument(
        "--force",
        action="store_true",
        help="replace files in --out that edgeq did not write (its edgeq-manifest.json does not list them); "
        "without it such a folder is refused before any work",
    )
    r.add_argument(
        "--target-bits",
        type=float,
        default=None,
        help="largest allowed mean weight bit width, in [1, 8] (default: the pipeline's, 4)",
    )
    r.add_argument(
        "--seed", type=int, default=0, help="seed for the split, training and allocation (default 0)"
    )
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines")


def _plan_args(r: argparse.ArgumentParser) -> None:
    """How to plan, store and deploy the weights (choices from the tables)."""
    import deploy.planning  # noqa: F401  (its "planner" method joins the table)
    from deploy.boards import KERNEL_SETS
    from deploy.storage import AUTO, STORAGES
    from deploy.storage import choices as storage_choices
    from edgeq.allocators import ALLOCATORS

    r.add_argument(
        "--method",
        choices=tuple(ALLOCATORS),
        default=None,
        help="bit allocation (default: the pipeline's, else planner): "
        + "; ".join(f"{a.name} = {a.label}" for a in ALLOCATORS.values()),
    )
    r.add_argument(
        "--storage",
        default=AUTO,
        choices=storage_choices(),
        help="weight storage: "
        + "; ".join(f"{k.name} = {k.description}" for k in STORAGES.values() if not k.planned)
        + "; auto = the smallest verified one (for a planner plan that mixes them per layer, also "
        + "int4+lut: LUT on its layers, packed INT4/INT8 on the rest)",
    )
    r.add_argument(
        "--prune",
        default="none",
        help="zero this fraction of each planned layer's weights before QAT, the least informative "
        "(|mu|/sigma) first, kept at zero through QAT; --storage auto then also tries prune and huffman; "
        "auto: the planner chooses each layer's share (0, 0.5, 0.75 or 0.9) with its bits, pricing the "
        "zeros' uncertainty against their HUFFMAN-coded bytes (default: none)",
    )
    r.add_argument(
        "--prune-channels",
        default=None,
        help="structured pruning: remove this fraction of each hidden layer's output channels after the "
        "twin trains, the least informative (mean |mu|/sigma) first, with the inputs that fed on them; the "
        "smaller model is fine-tuned and gets its own twin (default: the pipeline's, none for a --model "
        "file; pipelines/digits.py removes 0.5; none turns it off); auto: the planner chooses each layer's "
        "share (0, 0.25, 0.5 or 0.75) with its bits within the unpruned model's flash at the target: each "
        "choice planned, fine-tuned briefly and scored on the validation split, the best kept (one run, "
        "the planner)",
    )
    r.add_argument(
        "--kernels",
        choices=KERNEL_SETS,
        default=None,
        help="the TFLM kernel set the firmware links (default: the board's; reference without a board)",
    )
    r.add_argument(
        "--data", default=None, help="a local .npz (x_train, y_train, x_test, y_test) for the pipeline"
    )
    r.add_argument(
        "--epochs", type=int, default=None, help="cap every training stage at N epochs (smoke runs)"
    )
    r.add_argument(
        "--decompress-to",
        choices=("arena", "alt"),
        default="arena",
        help="where DECODE writes LUT weights: the tensor arena, or a separate alternate memory region",
    )
    r.add_argument(
        "--qat-start",
        choices=("float", "twin"),
        default="float",
        help="QAT starts from the float model's weights (default) or the Bayesian twin's means; the twin "
        "sets the plan and the grids' ranges either way",
    )
    r.add_argument(
        "--dense-as-conv",
        action="store_true",
        help="deploy Dense layers as 1x1 CONV_2D instead of FULLY_CONNECTED: TFLM then agrees with LiteRT "
        "bit for bit (<= 1 LSB otherwise), at 8 B of arena per output unit, ~30 B of flash per operator "
        "and, on a Cortex-M4, about 12x the instructions of the digits model's first dense layer",
    )
    r.add_argument(
        "--decode-budget",
        default=None,
        help="split weight tensors larger than this when decompressed (default: 16KiB, with --board a "
        "quarter of its free RAM up to 16KiB; with neither --board nor --flash-budget, never more than the "
        "int8 model's arena, so that decoding a slice at most doubles the RAM the model needs; 'none': "
        "never)",
    )


def _search_args(r: argparse.ArgumentParser) -> None:
    """The budget search: board, budgets, targets, methods, workers, and where the work runs."""
    from deploy.search.executors import EXECUTORS

    r.add_argument(
        "--executor",
        choices=tuple(EXECUTORS),
        default="local",
        help="where a search's candidates are screened: local (--workers processes) or ray (Ray tasks; "
        "needs pip install 'edgeq[ray]')",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster for --executor ray: auto, host:port or ray://host:port; unset: RAY_ADDRESS, "
        "else a local Ray with --workers CPUs",
    )
    r.add_argument(
        "--distribute",
        choices=("multi-worker",),
        default=None,
        help="train the Bayesian twin on the workers named by TF_CONFIG "
        "(tf.distribute.MultiWorkerMirroredStrategy)",
    )
    r.add_argument(
        "--board",
        default=None,
        help="search for the most accurate model that fits this board (e.g. nrf52840), allowances included",
    )
    r.add_argument(
        "--flash-budget", default=None, help="search within this flash for model.tflite (256KB, 1MiB)"
    )
    r.add_argument("--ram-budget", default=None, help="search within this TFLM arena size (64KB, 90000B)")
    r.add_argument(
        "--max-accuracy-drop",
        default=None,
        help="search for the smallest model within P accuracy points of the float model; with a budget and "
        "no P, the most accurate fitting model is handed over only within 2 points of float ('none': any "
        "drop, printed first)",
    )
    r.add_argument(
        "--sweep-targets",
        default="2,2.5,3,3.5,4,5,6,8",
        help="comma-separated mean-bit targets a search tries (default 2,2.5,3,3.5,4,5,6,8)",
    )
    r.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes that export and measure a search's candidates in parallel (default 2; 1: none)",
    )
    r.add_argument(
        "--sweep-methods",
        default="planner,qiu,rb",
        help="comma-separated allocation methods a search tries (planner,qiu,rb; the planner is screened "
        "at the targets whose flash budgets sit just under the search's)",
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per job."""
    p = argparse.ArgumentParser(
        prog="edgeq",
        description="Uncertainty-driven mixed-precision quantization of Keras models for TFLite Micro.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="train, allocate bits, quantize, export and measure one pipeline",
        description="Run a pipeline script end to end and write every artifact into --out.",
    )
    for add in (_model_args, _plan_args, _search_args):
        add(r)
    r.set_defaults(func=_run)
    i = sub.add_parser("inspect", help="operators, tensors, arena and flash of any .tflite")
    i.add_argument("model", help="a .tflite file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_inspect)
    for name, text in (
        ("device-eval", "run the test split on a board over serial and compare with the host's TFLM"),
        ("virtual-board", "a pseudo-terminal board that answers the protocol by running the model in TFLM"),
        ("flash", "flash a rendered firmware with the tool the board profile names"),
    ):
        sub.add_parser(name, help=f"{text} (see edgeq {name} --help)", add_help=False)
    return p


@contextmanager
def native_logs_to_file(enabled: bool):
    """Send what TensorFlow's C++ side writes to stderr into a log file; yield the real stderr.

    TensorFlow, the converter and absl print dozens of lines on file descriptor 2 that Python
    cannot silence; the user should see edgeq's progress and errors, and the log when something breaks.
    """
    if not enabled:
        yield sys.stderr, None
        return
    log = tempfile.NamedTemporaryFile(prefix="edgeq-", suffix=".log", delete=False)
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield real, log.name
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        real.close()
        log.close()


DELEGATED = {
    "device-eval": ("deploy.device.evaluate", "main_device_eval"),
    "virtual-board": ("deploy.device.virtual_board", "main_virtual_board"),
    "flash": ("deploy.device.flash", "main_flash"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line on stderr and exit status 2 for every edgeq error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:  # these commands own their options (argparse REMAINDER drops --flags)
        import importlib

        module, func = DELEGATED[argv[0]]
        if argv[0] == "virtual-board" and "--qemu" in argv:  # the firmware itself, on an emulated Cortex-M4
            module, func = "deploy.device.qemu", "main_qemu"
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    args = parser().parse_args(argv)
    with native_logs_to_file(args.command == "run" and not getattr(args, "verbose", False)) as (err, log):
        args.stderr = err
        try:
            code = int(args.func(args) or 0)
        except EdgeqError as e:
            print(f"edgeq: error: {e}", file=err)
            code = 2
        except BrokenPipeError:  # `edgeq inspect m.tflite | head`: the reader left, nothing is wrong
            code = 0
        except KeyboardInterrupt:
            print("edgeq: interrupted; nothing half-written was left in the output folder", file=err)
            code = 130
        except Exception as e:  # noqa: BLE001  (a bug: keep the traceback in the log, say where it is)
            from deploy.artifacts import disk_refusal

            if why := disk_refusal(e):  # a full temp disk under TensorFlow's converter, say: not a bug
                print(f"edgeq: error: a write failed ({why}); free some space and run again", file=err)
                code = 2
            else:
                traceback.print_exc()
                where = f" (traceback in {log})" if log else ""
                print(f"edgeq: internal error: {type(e).__name__}: {e}{where}", file=err)
                code = 1
    if log and code != 1:  # keep the log only for internal errors, where it holds the traceback
        Path(log).unlink(missing_ok=True)
    return code


def run_script(path: str) -> int:
    """`python pipelines/NAME.py [options]` is `edgeq run pipelines/NAME.py [options]`."""
    return main(["run", path, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
