"""The report's plots: bits per layer against informativeness, flash bytes side by side, the Pareto front."""

from __future__ import annotations

from pathlib import Path

from deploy.report import Report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    tmp.replace(path)


def bits_per_layer(folder: Path, rep: Report) -> None:
    """bits_per_layer.png: the plan's bars and each layer's mean informativeness."""
    plt, b = _pyplot(), rep.body
    layers = b["plan"]["layers"]
    names = [r["name"] for r in layers]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [r["bits"] for r in layers], color="tab:blue")
    ax.set_ylabel("bits")
    ax2 = ax.twinx()
    ax2.plot(names, [r["informativeness"] for r in layers], "o-", color="tab:orange")
    ax2.set_ylabel("informativeness |mu|/sigma (mean)")
    ax.set_title(f"{b['pipeline']}: bits per layer ({b['plan']['method']})")
    fig.tight_layout()
    _save(fig, folder / "bits_per_layer.png")


def flash_bytes(folder: Path, rep: Report) -> None:
    """flash_bytes.png: float, int8, uncompressed, deployed and the packing limit."""
    plt, m = _pyplot(), rep.body["models"]
    d = m["deployed"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["float", "int8", "uncompressed", "deployed", "packing limit", "entropy limit"]
    vals = [
        m["float"]["flash_bytes"],
        m["int8"]["flash_bytes"],
        d["uncompressed_flash_bytes"],
        d["flash_bytes"],
        d["packing_limit_bytes"],
        d.get("entropy_limit_bytes", 0),
    ]
    ax.bar(labels, vals, color=["silver", "gray", "tab:purple", "tab:green", "tab:red", "tab:orange"])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("bytes (model)")
    ax.set_title("flash bytes")
    fig.tight_layout()
    _save(fig, folder / "flash_bytes.png")


def pareto(folder: Path, rep: Report) -> None:
    """pareto.png: TFLM score against flash for every searched candidate, the budget line, the winner."""
    from edgeq.allocators import ALLOCATORS

    plt, rows = _pyplot(), rep.search.rows
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in dict.fromkeys(r.method for r in rows):
        a = ALLOCATORS.get(name)
        pts = [r for r in rows if r.method == name]
        ax.scatter(
            [r.flash_bytes for r in pts],
            [r.score for r in pts],
            marker=a.marker if a else "o",
            label=a.label if a else name,
            alpha=[1.0 if r.qat_epochs else 0.5 for r in pts],
        )
    best = next(r for r in rows if r.chosen)
    ax.scatter([best.flash_bytes], [best.score], s=200, facecolors="none", edgecolors="red", label="chosen")
    budget = rep.body["target"]["flash_budget_bytes"]
    if budget is not None:
        ax.axvline(budget, color="red", linestyle="--", label="flash budget")
    ax.set_xlabel("flash bytes (model.tflite)")
    ax.set_ylabel("TFLM accuracy" if best.score >= 0 else "-MAE (TFLM)")
    ax.set_title(f"{rep.pipeline}: candidates (faded: calibrated only, solid: after QAT)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, folder / "pareto.png")


def write_all(folder: Path, rep: Report) -> None:
    """Every plot the report shows."""
    bits_per_layer(folder, rep)
    flash_bytes(folder, rep)
    if rep.search is not None:
        pareto(folder, rep)
