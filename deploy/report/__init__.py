"""The Report: one value per run, built once from the stages' values, rendered as JSON, Markdown and HTML.

report.json is the Report's serialised form (the only dict in the house, at the edge); report.md and
report.html are rendered from the same value, so `device-eval` and the search add their sections as
fields and re-render, never by editing text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.io import atomic_write_text

SCHEMA = 2  # report.json layout version (2: target, search and device as fields)


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


@dataclass(frozen=True)
class SearchRow:
    """One measured candidate of a search (a point of the Pareto plot)."""

    method: str
    target: float
    mean_bits: float
    bits: Mapping[str, int]
    storage: str
    flash_bytes: int
    arena_bytes: int
    score: float  # TFLM accuracy, or -MAE for regression, so that higher is better
    fits: bool
    qat_epochs: int
    test_samples: int = 0  # how many test samples the score was measured on
    chosen: bool = False


@dataclass(frozen=True)
class SearchSummary:
    """What a search tried and why it kept the deployed model."""

    budget: str
    why: str
    rows: tuple[SearchRow, ...]


@dataclass(frozen=True)
class RunFacts:
    """The stages' values a report is built from (see deploy.app)."""

    pipeline: str
    seed: int
    source: tuple[str, str] | None  # (model file, sha256) for a model brought as a file
    candidate: Any  # deploy.app.Candidate
    trained: Any  # edgeq.training.Trained
    measured: Any  # deploy.app.Measured
    target: Any  # deploy.target.Target
    carrays: Any  # deploy.export.carrays.CArrays
    device: Any = None  # deploy.device.simulate.DeviceRun, when the board is a virtual one the run measured


@dataclass(frozen=True)
class Report:
    """Everything a run measured; `body` is report.json without the search and device sections."""

    body: Mapping[str, Any]
    search: SearchSummary | None = None
    device: Mapping[str, Any] | None = None  # device_report.json, after `edgeq device-eval`

    @property
    def pipeline(self) -> str:
        """The pipeline's name."""
        return self.body["pipeline"]

    def to_json(self) -> dict:
        """report.json."""
        out = dict(self.body)
        if self.search is not None:
            out["search"] = dataclasses.asdict(self.search)
        return out

    def with_device(self, device: Mapping[str, Any]) -> Report:
        """The same report with the on-device evaluation added."""
        return dataclasses.replace(self, device=dict(device))


def _plan_section(f: RunFacts) -> dict:
    from edgeq.informativeness import layer_informativeness

    plan, sizes = f.candidate.plan, f.trained.sizes
    info = layer_informativeness(list(f.trained.posteriors))
    layers = [
        {
            "name": n,
            "bits": plan.layers[n].bits,
            "params": int(sizes[n]),
            "informativeness": _r(info.get(n, float("nan")), 6),
            "quantizer": plan.layers[n].quantizer,
        }
        for n in plan.layers
    ]
    from edgeq.layers import unplanned_layers

    unplanned = unplanned_layers(f.trained.float_model, set(plan.layers))
    return {
        "method": f.candidate.method,
        "mean_bits": _r(plan.mean_bits(sizes)),
        "layers": layers,
        "unplanned": [{"name": n, "bits": 8, "reason": why} for n, why in unplanned.items()],
        "uniform": len(set(plan.bits.values())) == 1,  # every planned layer at the same bits
        "allocation_seconds": _r(f.candidate.allocate_s, 4),
        **({"meta": _jsonable(plan.meta)} if plan.meta else {}),
    }


def _pruning_section(f: RunFacts) -> dict:
    """--prune: per planned layer, its zeros in the converted model and what fixed width and an ideal
    entropy coder would store it in (the deployed file's total is in models.deployed)."""
    from deploy.export.slicing import layer_name
    from deploy.flatbuffer import entropy_bytes, read, tensor_values, weight_inputs
    from edgeq.prune import channel_totals

    plan = f.candidate.plan
    layers = []
    for t, _ in weight_inputs(read(f.candidate.exported.uncompressed)):
        name = layer_name(str(t.name))
        if name not in plan.layers:
            continue
        vals = tensor_values(t).reshape(-1)
        bits = plan.layers[name].bits
        layers.append(
            {
                "name": name,
                "weights": int(vals.size),
                "zeros": int(np.sum(vals == 0)),
                "sparsity": _r(float(np.mean(vals == 0)), 4),
                "bits": bits,
                "fixed_width_bytes": int(np.ceil(vals.size * bits / 8)),
                "entropy_bytes": int(np.ceil(entropy_bytes(vals))),
            }
        )
    t = f.trained
    channels = []
    # every layer the pruning shrank: the pruned ones, and those that only lost the inputs that fed on
    # removed channels (a residual block's second conv, the output layer), all channels kept
    for name, before in t.unpruned_sizes.items():
        before, after = int(before), int(t.sizes.get(name, before))
        if name not in plan.layers or (name not in t.channels and before == after):
            continue
        if name in t.channels:
            kept, of = t.channels[name]
        else:  # only its inputs went
            kept = of = int(t.float_model.get_layer(name).get_weights()[0].shape[-1])
        channels.append(
            {
                "name": name,
                "channels_kept": kept,
                "channels": of,
                "weights_before": before,
                "weights_after": after,
                # the bytes the removed weights would have taken at the layer's planned bits
                "bytes_saved": int(np.ceil((before - after) * plan.layers[name].bits / 8)),
            }
        )
    removed, total = channel_totals(dict(t.channels))
    if f.candidate.prune == "auto":  # --prune auto: the planner's share per layer, beside what was measured
        planned = plan.meta.get("zeros") or {}
        for row in layers:
            row["zeros_planned"] = float(planned.get(row["name"], 0.0))
        policy = (
            "unstructured, the planner's choice: per layer 0, 0.5, 0.75 or 0.9 of its least informative "
            "weights (|mu|/sigma) zeroed, priced with its bits by uncertainty cost and HUFFMAN-coded bytes"
        )
    elif f.candidate.prune:
        policy = "unstructured: the least informative weights (|mu|/sigma) of each planned layer"
    else:
        policy = "no unstructured pruning"
    return {
        "fraction": f.candidate.prune,
        "channels_removed": removed,
        "channels_total": total,
        "policy": policy,
        "channels_policy": _channels_policy(plan),
        "channel_choice": plan.meta.get("channel_choice"),  # --prune-channels auto: every choice tried
        "storage": f.candidate.exported.deployed.kind,
        "layers": layers,
        "channels": channels,
    }


def _channels_policy(plan) -> str:
    """How the run chose the channels it removed (a fixed share, or --prune-channels auto's walk)."""
    what = (
        "output channels (mean |mu|/sigma) removed with the inputs that fed on them, the smaller model "
        "fine-tuned, its own twin"
    )
    choice = plan.meta.get("channel_choice")
    if not choice:
        return f"structured: each hidden layer's least informative {what}"
    steps = ", ".join(f"{f:g}" for f in choice["steps"])
    return (
        f"structured, the planner's choice: per layer a share ({steps}) of its least informative {what}; "
        f"{len(choice['trials'])} choices each planned within the unpruned model's "
        f"{choice['flash_budget']:,} B, fine-tuned briefly and kept by validation loss"
    )


def _jsonable(v):
    return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _tflm_figures(m, metric_suffix: str = "_tflm") -> dict:
    out = {f"{k}{metric_suffix}": v for k, v in m.scores.items()}
    out.update(flash_bytes=m.flash_bytes, arena_bytes=m.arena_bytes, latency_tflm_us=_r(m.latency_us, 2))
    if m.alt_decompression_bytes:
        out["alt_decompression_bytes"] = m.alt_decompression_bytes  # counted in arena_bytes too
    return out


def _weights_rows(storage) -> list[dict]:
    rows = []
    for t in storage.tensors:
        bits = t.lut_bits if t.lut_bits else (4 if t.stored_type == "INT4" else 8)
        rows.append(
            {
                "tensor": t.name or f"{t.op.lower()} #{t.index}",
                "op": t.op,
                "shape": list(t.shape),
                "stored": t.stored_type,
                "lut_bits": t.lut_bits,
                "distinct_values": t.distinct,
                "stored_bytes_est": int(np.ceil(np.prod(t.shape) * bits / 8)),
            }
        )
    return rows


def _litert_section(ms) -> dict:
    out = {}
    for m in ms.litert:
        agree = m.vs(ms.uncompressed)
        out[m.runtime.split(":", 1)[1]] = {
            **{k: _r(v) for k, v in m.scores.items()},
            "bit_exact_vs_tflm": agree.bit_exact,
            "rows_identical": _r(agree.rows_identical),
            "max_abs_diff": agree.max_abs_diff,
            "latency_us": _r(m.latency_us, 2),
        }
    return out


def _deployed_section(f: RunFacts) -> dict:
    from deploy.export.limits import packing_limit
    from deploy.flatbuffer import entropy_limit

    ms, ex = f.measured, f.candidate.exported
    limit = packing_limit(f.trained.float_model, f.candidate.plan.bits)
    litert = _litert_section(ms)
    return {
        "tflite": "model.tflite",
        "storage": ex.deployed.kind,
        **_tflm_figures(ms.deployed),
        "packing_limit_bytes": int(limit),
        "entropy_limit_bytes": entropy_limit(ex.uncompressed),
        # The headline: LiteRT's reference kernels, the ones TFLM's kernels are ported from.
        "bit_exact_tflm_vs_litert": litert["BUILTIN_REF"]["bit_exact_vs_tflm"],
        "litert": litert,
        "bit_exact_compressed_vs_uncompressed": ms.deployed.vs(ms.uncompressed).bit_exact,
        "uncompressed_tflite": "model_uncompressed.tflite",
        "uncompressed_flash_bytes": ms.uncompressed.flash_bytes,
        "uncompressed_arena_bytes": ms.uncompressed.arena_bytes,
        "variants": {v.kind: len(v.model) for v in ex.variants},
        "weights": _weights_rows(ex.deployed),
        "outputs_sha256": ms.deployed.digest,
        "ratio_to_int8": _r(ms.deployed.flash_bytes / ms.int8.flash_bytes),
        "ratio_to_packing_limit": _r(ms.deployed.flash_bytes / limit),
    }


def _models_section(f: RunFacts) -> dict:
    ms = f.measured
    q = ms.bnn_quality
    mc = {"mc_accuracy": _r(q.accuracy), "mc_ece": _r(q.ece), "mc_samples": q.samples} if q else {}
    return {
        "float": {**{k: _r(v) for k, v in ms.float_scores.items()}, "flash_bytes": ms.float_flash},
        "bnn": {**{k: _r(v) for k, v in ms.det_scores.items()}, **mc},
        "qat_keras": {k: _r(v) for k, v in ms.qat_scores.items()},
        "int8": {
            "tflite": "model_int8.tflite",
            **_tflm_figures(ms.int8),
            "latency_litert_us": _r(ms.int8_litert_latency_us, 2),
            "outputs_sha256": ms.int8.digest,
        },
        "deployed": _deployed_section(f),
    }


def _target_section(f: RunFacts) -> dict:
    t = f.target
    host = "host TFLM (pip tflite_micro), reference kernels, 64-bit host"
    if t.kernels == "cmsis-nn":  # deploy.measure.tflm.kernel_set_arena
        host += ", on the model with INT4 widened to INT8 (CMSIS-NN reads INT4 packed: no unpack scratch)"
    dev = f.device
    return {
        "board": t.board.name if t.board else None,
        "kernels": t.kernels,
        # The arena the board's kernel set needs: the device's when the run measured one, else the host's
        # (a 64-bit host overstates a Cortex-M4's by 1-1.6 KB, more with CMSIS-NN's INT4: DESIGN.md).
        "arena_bytes": dev.arena_bytes if dev else f.measured.board_arena,
        "arena_on_device": dev is not None,
        "arena_measured_with": (
            f"the firmware on {t.board.name} ({t.kernels} kernels, 32-bit): "
            "MicroInterpreter::arena_used_bytes"
            if dev
            else host
        ),
        "firmware": _firmware_section(f),
        "flash_budget_bytes": t.model_flash,
        "ram_budget_bytes": t.model_ram,
        "decode_budget_bytes": t.decode_budget,
        # set when neither --decode-budget, --board nor --flash-budget was given: the budget is at most
        # this, in whole KiB (Target.settle_decode)
        "decode_budget_int8_arena_bytes": t.int8_arena,
        "decompress_to": t.decompress_to,
    }


def _firmware_section(f: RunFacts) -> dict:
    """The firmware's flash: the ELF's when the run built one, else the model plus its measured code."""
    model = f.candidate.exported.deployed.model
    code = f.target.code(model)
    out = {
        "kernels": code.kernels,
        "model_bytes": len(model),
        "runtime_code_bytes": code.runtime,
        "operator_code_bytes": dict(code.per_op),
        "shared_code_bytes": code.shared,  # helpers two or more of the operators link (counted once)
        "code_bytes": code.total,
        "flash_bytes": len(model) + code.total,
        "flash_from": "model + code measured per operator on a Cortex-M4 (deploy/firmware/code_size.json)",
    }
    if code.unknown:
        out["unmeasured_operators"] = list(code.unknown)  # charged as the largest measured operator
    dev = f.device
    if dev is not None:
        b = dev.build
        out.update(
            flash_bytes=b.flash_bytes,
            flash_from=f"the ELF cross-compiled for {f.target.board.name} (.text + .rodata + .data)",
            code_bytes=b.flash_bytes - len(model),
            estimated_flash_bytes=len(model) + code.total,
            ram_bytes=b.ram_bytes,
            elf=f"qemu/{b.kernels}/{b.elf.name}",  # inside the output folder
            instructions_per_inference=dev.instructions_median,
        )
    return out


ACCURACY_TOLERANCE = 0.02  # TFLM may differ from the fake-quant Keras model by rounding, not by this much
MAE_TOLERANCE = 0.10  # relative


def divergence_warnings(models: Mapping[str, Any]) -> list[str]:
    """A line when the deployed model in TFLM scores far from the QAT model in Keras (e.g. an int8 LSTM)."""
    qat, dep = models["qat_keras"], models["deployed"]
    if "accuracy" in qat:
        gap = qat["accuracy"] - dep["accuracy_tflm"]
        if gap <= ACCURACY_TOLERANCE:
            return []
        return [
            f"TFLM accuracy {dep['accuracy_tflm']:.4f} is {100 * gap:.1f} points below the QAT model's "
            f"{qat['accuracy']:.4f} in Keras (tolerance {100 * ACCURACY_TOLERANCE:g}): the converter or a "
            "kernel changes what the model computes; check the layers not in the plan, or --storage int8"
        ]
    if dep["mae_tflm"] <= qat["mae"] * (1 + MAE_TOLERANCE):
        return []
    return [
        f"TFLM MAE {dep['mae_tflm']:.4f} is more than {100 * MAE_TOLERANCE:g}% above the QAT model's "
        f"{qat['mae']:.4f} in Keras: the converter or a kernel changes what the model computes"
    ]


def build(
    facts: RunFacts, *, stage_seconds: Mapping[str, float], search: SearchSummary | None = None
) -> Report:
    """The Report of one deployed candidate (paths relative to the output folder)."""
    f = facts
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "pipeline": f.pipeline,
        "seed": f.seed,
        "target_bits": float(f.candidate.target_bits),
        "plan": _plan_section(f),
        "models": _models_section(f),
        "target": _target_section(f),
        "artifacts": {
            "c_source": Path(f.carrays.source).name,
            "c_header": Path(f.carrays.header).name,
            "firmware": "firmware",
            "test_data": "test_data.npz",
            "plan": "bitplan.json",
            "float_model": "model_float.keras",
        },
        "stage_seconds": dict(stage_seconds),
    }
    if f.source is not None:
        body["source"] = {"model": f.source[0], "sha256": f.source[1]}
    if f.candidate.prune or f.trained.channels or f.candidate.plan.meta.get("channel_choice"):
        body["pruning"] = _pruning_section(f)
    sliced = f.candidate.exported.sliced
    if sliced is not None:
        body["slicing"] = {
            "decode_budget_bytes": sliced.budget,
            "layers": [dataclasses.asdict(r) for r in sliced.rows],
        }
    body["warnings"] = divergence_warnings(body["models"]) + _device_warnings(f.device)
    dep, tgt = body["models"]["deployed"], body["target"]
    fw = tgt["firmware"]
    fit = f.target.fit(dep["flash_bytes"], tgt["arena_bytes"], fw["code_bytes"])
    if fit is not None:
        body["board"] = {
            "name": f.target.board.name,
            "fits": fit.fits,
            "flash_margin_bytes": fit.flash_margin,
            "ram_margin_bytes": fit.ram_margin,
            "message": fit.message,
        }
    device = dict(f.device.evaluation) if f.device is not None else None
    return Report(body, search, device)


def _device_warnings(dev) -> list[str]:
    """A line when the firmware on the virtual board disagrees with host TFLM on any test row."""
    if dev is None or dev.evaluation["bit_identical_rows"] == dev.evaluation["samples"]:
        return []
    ev = dev.evaluation
    return [
        f"the firmware on the device agreed with host TFLM on only {ev['bit_identical_rows']} of "
        f"{ev['samples']} test rows (max |diff| {ev['max_abs_diff']}); see device_report.json"
    ]


def write(folder: Path, rep: Report) -> None:
    """report.json, report.md, report.html and the plots, each written whole."""
    from deploy.report import html, markdown, plots

    folder = Path(folder)
    atomic_write_text(folder / "report.json", json.dumps(rep.to_json(), indent=2))
    if rep.search is not None:
        candidates = [dataclasses.asdict(r) for r in rep.search.rows]
        pareto = {"budget": rep.search.budget, "why": rep.search.why, "candidates": candidates}
        atomic_write_text(folder / "pareto.json", json.dumps(pareto, indent=2))
    plots.write_all(folder, rep)
    atomic_write_text(folder / "report.md", markdown.render(rep))
    atomic_write_text(folder / "report.html", html.render(rep, folder))


def rerender(folder: Path, rep: Report) -> None:
    """Rewrite report.md and report.html of a finished run (after device-eval), from the value."""
    from deploy.report import html, markdown

    atomic_write_text(folder / "report.md", markdown.render(rep))
    atomic_write_text(folder / "report.html", html.render(rep, folder))


def load(folder: Path) -> Report:
    """The Report of a finished run, from its report.json (and device_report.json when present)."""
    data = json.loads((Path(folder) / "report.json").read_text())
    search = data.pop("search", None)
    summary = None
    if search is not None:
        rows = tuple(SearchRow(**r) for r in search["rows"])
        summary = SearchSummary(search["budget"], search["why"], rows)
    dev_path = Path(folder) / "device_report.json"
    device = json.loads(dev_path.read_text()) if dev_path.is_file() else None
    return Report(data, summary, device)


__all__ = ["Report", "RunFacts", "SearchRow", "SearchSummary", "build", "load", "rerender", "write"]
