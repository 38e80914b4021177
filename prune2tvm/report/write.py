from __future__ import annotations

import os
from pathlib import Path

from prune2tvm.fsutil import atomic_path, write_json, write_text
from prune2tvm.report.model import REPORT_JSON, Report

REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_latency.png"


def write_report(report: Report, run_dir: str | os.PathLike) -> list[Path]:
    run_dir = Path(run_dir)
    write_json(run_dir / REPORT_JSON, report.to_json())
    if report.kind == "sweep":
        from prune2tvm.report.sweep import render_sweep, write_sweep_plot

        write_text(run_dir / REPORT_MD, render_sweep(report))
        write_sweep_plot([report], run_dir / PLOT_PNG)
    else:
        write_text(run_dir / REPORT_MD, render_markdown(report))
        write_plot(report, run_dir / PLOT_PNG)
    return [run_dir / REPORT_JSON, run_dir / REPORT_MD, run_dir / PLOT_PNG]


def _ms(stats: dict | None) -> str:
    return f"{stats['median']:.3f} / {stats['p90']:.3f}" if stats else "-"


def _pct(value: float | None, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}" if value is not None else "-"


def render_markdown(report: Report) -> str:
    target = report.target
    lines = [
        f"# prune2tvm report: {report.pipeline}",
        "",
        f"- target: **{target.get('name')}** `{target.get('tvm')}`",
        f"- batch size: {report.batch_size}; latency is median / p90 in ms over repeated calls, "
        "TVM and onnxruntime measured in alternating rounds in one process",
        f"- versions: prune2tvm {report.prune2tvm_version}, TVM {report.tvm_version}, torch {report.torch_version}, "
        f"onnxruntime {report.onnxruntime_version}",
        f"- created: {report.created}" + (f" from `{report.pipeline_file}`" if report.pipeline_file else ""),
        "",
        "| variant | sparsity | acc torch % | acc ORT % | acc TVM % | agree ORT / TVM % | TVM ms (median / p90) "
        "| ORT ms (median / p90) | ORT / TVM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report.variants:
        speedup = v.speedup()
        lines.append(
            f"| {v.name} | {_pct(v.sparsity)} % | {_pct(v.accuracy.get('torch'))} | {_pct(v.accuracy.get('onnxruntime'))} "
            f"| {_pct(v.accuracy.get('tvm'))} | {_pct(v.agreement.get('onnxruntime'))} / {_pct(v.agreement.get('tvm'))} "
            f"| {_ms(v.latency_ms.get('tvm'))} | {_ms(v.latency_ms.get('onnxruntime'))} "
            f"| {f'{speedup:.2f}x' if speedup else '-'} |")
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    for v in report.variants:
        if v.compiled_layers:
            lines += ["", f"## {v.name}: TVM kernels per layer", "", render_layer_table(v.compiled_layers)]
        if v.summary:
            from prune2tvm.prune.summary import render_summary

            lines += ["", f"## {v.name}: per-layer sparsity", "", render_summary(v.summary)]
            continue
        if not v.layers:
            continue
        lines += ["", f"## {v.name}: per-layer sparsity", "", "| layer | shape | zeros / weights | sparsity % |",
                  "|---|---|---:|---:|"]
        for layer in v.layers:
            shape = "x".join(str(d) for d in layer["shape"])
            lines.append(f"| {layer['name']} | {shape} | {layer['zeros']} / {layer['numel']} | {_pct(layer['sparsity'])} |")
    return "\n".join(lines) + "\n"


def render_layer_table(layers: list[dict]) -> str:
    """The per-layer compile decisions: layer, weight shape, block sparsity, dense or BSR, why."""
    lines = ["| layer | op | weight | block | block sparsity % | kernel | why |", "|---|---|---|---|---:|---|---|"]
    for layer in layers:
        shape = "x".join(str(d) for d in layer["weight_shape"])
        block = "x".join(str(d) for d in layer["block"])
        sparsity = "-" if layer["block_sparsity"] is None else f"{100 * layer['block_sparsity']:.1f}"
        lines.append(f"| {layer['name']} | {layer['op']} | {shape} | {block} | {sparsity} | {layer['kind'].upper()} "
                     f"| {layer['reason']} |")
    return "\n".join(lines)


def write_plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = {"tvm": ("o", "TVM"), "onnxruntime": ("s", "onnxruntime")}
    for backend, (marker, label) in markers.items():
        xs = [v.latency_ms[backend]["median"] for v in report.variants if backend in v.latency_ms]
        ys = [100 * v.accuracy[backend] for v in report.variants if backend in v.latency_ms]
        ax.scatter(xs, ys, marker=marker, s=50, label=label, zorder=3)
        if backend == "tvm":
            for v, x, y in zip(report.variants, xs, ys):
                ax.annotate(f"{v.name} ({100 * v.sparsity:.0f}% zeros)", (x, y), textcoords="offset points",
                            xytext=(6, 4), fontsize=8)
    dense = next((v for v in report.variants if v.method == "dense"), None)
    if dense is not None:
        for backend, style in (("tvm", "--"), ("onnxruntime", ":")):
            if backend in dense.latency_ms:
                ax.axvline(dense.latency_ms[backend]["median"], linestyle=style, color="grey", linewidth=1,
                           label=f"dense {markers[backend][1]} latency")
    latencies = [s["median"] for v in report.variants for s in v.latency_ms.values()]
    finish_plot(fig, ax, path, latencies, f"latency, median (ms, batch {report.batch_size})", "test accuracy (%)",
                f"{report.pipeline} on {report.target.get('name')}: accuracy vs measured latency", 8, margins={"x": 0.25})


def finish_plot(fig, ax, path: Path, latencies: list[float], xlabel: str, ylabel: str, title: str, legend_size: int,
                margins: dict) -> None:
    """Axes, labels, grid and legend of an accuracy-vs-latency plot, written atomically as PNG;
    latencies an order of magnitude apart go on a log scale, so they stay readable."""
    import matplotlib.pyplot as plt

    if latencies and min(latencies) > 0 and max(latencies) / min(latencies) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(**margins)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
