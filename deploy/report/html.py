"""report.html: the Report as one self-contained page (plots inline as data URIs, no network fetches)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from deploy.report import Report
from deploy.report.markdown import channel_choice_table, metric_key, pruning_title

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#555}
img{max-width:100%;margin:.5em 0}.bar{background:#4a90d9;height:.8em;display:inline-block}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _img(folder: Path, name: str, alt: str) -> str:
    path = folder / name
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _n(v) -> str:
    return "" if v is None else f"{v:,}"


def _models(b: dict) -> str:
    m, key = b["models"], metric_key(b)
    fmt = (lambda v: f"{100 * v:.2f}%") if key == "accuracy" else (lambda v: f"{v:.4f}")
    d, i8 = m["deployed"], m["int8"]
    rows = [
        ["float (Keras)", fmt(m["float"][key]), _n(m["float"]["flash_bytes"]), ""],
        ["Bayesian twin, mean weights (Keras)", fmt(m["bnn"][key]), "", ""],
        ["QAT (Keras)", fmt(m["qat_keras"][key]), "", ""],
        ["int8 PTQ (TFLM)", fmt(i8[key + "_tflm"]), _n(i8["flash_bytes"]), _n(i8["arena_bytes"])],
        ["uncompressed QAT", "", _n(d["uncompressed_flash_bytes"]), _n(d["uncompressed_arena_bytes"])],
        [
            f"deployed, {d['storage']} (TFLM)",
            fmt(d[key + "_tflm"]),
            _n(d["flash_bytes"]),
            _n(d["arena_bytes"]),
        ],
        ["packing limit (fixed width)", "", _n(d["packing_limit_bytes"]), ""],
        ["entropy limit of the stored values", "", _n(d.get("entropy_limit_bytes")), ""],
    ]
    t = b.get("target", {})
    note = (
        '<p class="note">Flash: model bytes (.tflite); the firmware\'s code is in the next section. '
        f"Arena: host TFLM; the board's kernel set's ({_e(t.get('kernels', ''))}) is there too.</p>"
    )
    return "<h2>Models: flash and RAM</h2>" + _table(["model", key, "flash B", "arena B"], rows) + note


def _firmware(b: dict) -> str:
    from deploy.report.markdown import firmware_rows

    t = b.get("target", {})
    rows = [[a.replace("**", ""), v.replace("**", "")] for a, v in firmware_rows(t)]
    if not rows:
        return ""
    head = f"<h2>Firmware on the target ({_e(t['firmware']['kernels'])} kernels, Cortex-M4 code)</h2>"
    return head + _table(["what", "bytes"], rows)


def _plan(b: dict) -> str:
    layers = b["plan"]["layers"]
    rows = [
        [r["name"], f"{r['params']:,}", f"{r['informativeness']:.4g}", r["bits"], r["quantizer"]]
        for r in layers
    ]
    rows += [
        [u["name"], "", "not in the plan", u["bits"], u["reason"]] for u in b["plan"].get("unplanned", [])
    ]
    return "<h2>Bits per layer against informativeness</h2>" + _table(
        ["layer", "params", "informativeness |mu|/sigma", "bits", "quantizer"], rows
    )


def _storage(b: dict) -> str:
    ws = b["models"]["deployed"]["weights"]
    rows = [
        [
            w["tensor"][:48],
            w["op"],
            "x".join(map(str, w["shape"])),
            w["stored"],
            w["lut_bits"] or "",
            w["distinct_values"],
            f"{w['stored_bytes_est']:,}",
        ]
        for w in ws
    ]
    head = ["tensor", "op", "shape", "stored", "LUT bits", "distinct", "bytes (est.)"]
    return "<h2>Storage per tensor</h2>" + _table(head, rows)


def _pruning(b: dict) -> str:
    pr = b.get("pruning")
    if not pr:
        return ""
    rows = [
        [r["name"], f"{r['weights']:,}", f"{r['zeros']:,}", f"{r['sparsity']:.1%}", r["bits"],
         f"{r['fixed_width_bytes']:,}", f"{r['entropy_bytes']:,}"]
        for r in pr["layers"]
    ]  # fmt: skip
    head = ["layer", "weights", "zeros", "sparsity", "bits", "fixed-width B", "entropy B"]
    title = f"<h2>Pruning ({_e(pruning_title(pr))}, deployed as {_e(pr['storage'])})</h2>"
    channels = ""
    if pr["channels"]:
        crows = [
            [c["name"], f"{c['channels_kept']} of {c['channels']}", f"{c['weights_before']:,}",
             f"{c['weights_after']:,}", f"{c['bytes_saved']:,}"]
            for c in pr["channels"]
        ]  # fmt: skip
        chead = ["layer", "channels kept", "weights before", "weights after", "bytes saved at its bits"]
        channels = f"<p>{_e(pr['channels_policy'])}.</p>" + _table(chead, crows)
    if choice := pr.get("channel_choice"):
        tried = _table(*channel_choice_table(choice))
        channels += f"<p>The choices of channels the planner validated:</p>{tried}"
    return title + channels + f"<p>{_e(pr['policy'])}.</p>" + _table(head, rows)


def _search(rep: Report) -> str:
    if rep.search is None:
        return ""
    rows = [
        [
            r.method,
            f"{r.target:g}",
            f"{r.mean_bits:.2f}",
            r.qat_epochs,
            r.storage,
            f"{r.flash_bytes:,}",
            f"{r.arena_bytes:,}",
            f"{r.score:.4f}",
            ("yes" if r.fits else "no") + (" (chosen)" if r.chosen else ""),
        ]
        for r in sorted(rep.search.rows, key=lambda r: r.flash_bytes)
    ]
    head = ["method", "target", "mean bits", "QAT epochs", "storage", "flash B", "arena B", "score", "fits"]
    return f"<h2>Pareto front: why this model</h2><p>{_e(rep.search.why)}</p>" + _table(head, rows)


def _device(rep: Report) -> str:
    if rep.device is None:
        return ""
    d = rep.device
    metric = "accuracy" if d["task"] == "classification" else "mae"
    rows = [
        [metric, d["device"][metric], d["host_tflm"][metric]],
        ["arena bytes", f"{d['arena']['device_bytes']:,}", f"{d['arena']['host_tflm_bytes']:,}"],
        ["rows bit-identical", f"{d['bit_identical_rows']}/{d['samples']}", ""],
    ]
    return "<h2>Host against device</h2>" + _table(["", "device", "host TFLM"], rows)


def render(rep: Report, folder: Path) -> str:
    """report.html, with the plots already written into folder inlined."""
    b, folder = rep.body, Path(folder)
    summary = (
        f"Seed {b['seed']}, method <b>{_e(b['plan']['method'])}</b>, mean bits "
        f"<b>{b['plan']['mean_bits']:.3f}</b>, deployed <b>{b['models']['deployed']['flash_bytes']:,} B</b> "
        f"({_e(b['models']['deployed']['storage'])}), arena {b['models']['deployed']['arena_bytes']:,} B."
    )
    board = f"<p>Board {_e(b['board']['name'])}: {_e(b['board']['message'])}</p>" if "board" in b else ""
    parts = [
        f"<h1>edgeq report: {_e(b['pipeline'])}</h1>",
        f'<p id="summary">{summary}</p>',
        *(f'<p class="warning"><b>Warning:</b> {_e(w)}</p>' for w in b.get("warnings", [])),
        board,
        _models(b),
        _img(folder, "flash_bytes.png", "flash bytes"),
        _firmware(b),
        _plan(b),
        _img(folder, "bits_per_layer.png", "bits per layer"),
        _storage(b),
        _pruning(b),
        _search(rep),
        _img(folder, "pareto.png", "Pareto front") if rep.search is not None else "",
        _device(rep),
    ]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>edgeq report: {_e(b['pipeline'])}</title><style>{_STYLE}</style></head><body>"
        + "".join(parts)
        + "</body></html>\n"
    )
