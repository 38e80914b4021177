"""Sweep reports: every variant's accuracy against its measured latency, the Pareto front,
the chosen variant's per-layer view, and several runs (targets) side by side."""

from __future__ import annotations

import os
from pathlib import Path

from prune2tvm.fsutil import write_text
from prune2tvm.report.model import Report, Variant
from prune2tvm.report.write import _ms, _pct, finish_plot

COMPARE_MD = "comparison.md"
COMPARE_PNG = "comparison.png"


def _latency(v: Variant, backend: str) -> str:
    return _ms(v.latency_ms.get(backend))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fidelity(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _quality(report: Report, v: Variant) -> str:
    return f"fidelity {_fidelity(v.fidelity)}" if report.by_fidelity else f"{_pct(v.accuracy.get('tvm'))} %"


def _block(v: Variant) -> str:
    return "x".join(map(str, v.block)) if v.block else "-"


def of_ideal(v: Variant) -> float | None:
    tvm = v.latency_ms.get("tvm", {}).get("median")
    return v.ideal_ms / tvm if v.ideal_ms and tvm else None


def render_sweep(report: Report) -> str:
    front = {v.name for v in report.pareto()}
    chosen = report.chosen()
    dense = next((v for v in report.variants if v.method == "dense" and v.ok), None)
    top5 = any(v.top5 for v in report.variants)
    target = report.target
    lines = [
        f"# prune2tvm sweep: {report.pipeline} on {target.get('name')}",
        "",
        f"- target: **{target.get('name')}** `{target.get('tvm')}`, {target.get('threads')} threads",
        f"- accuracy: {report.quality}, measured with TVM on the compiled artifact",
        f"- latency: median / p90 in ms at batch {report.batch_size}; TVM sparse, TVM dense and onnxruntime dense "
        "measured in alternating rounds in one process, per variant",
        f"- versions: prune2tvm {report.prune2tvm_version}, TVM {report.tvm_version}, torch {report.torch_version}, "
        f"onnxruntime {report.onnxruntime_version}",
        f"- created: {report.created}" + (f" from `{report.pipeline_file}`" if report.pipeline_file else ""),
        "",
        "- fidelity: mean cosine similarity of TVM's logits to the dense model's on the same inputs (1 = the same "
        "outputs up to scale)" + ("; the Pareto front ranks variants by it (synthetic inputs)" if report.by_fidelity else ""),
        "",
        "| variant | block | sparsity % | top-1 % | " + ("top-5 % | " if top5 else "") + "fidelity | "
        + "TVM sparse ms | TVM dense ms | ORT dense ms | vs TVM dense | vs ORT | ideal ms | of ideal % "
        "| nonzero params | MACs effective | artifact KB | Pareto |",
        "|---|---|---:|---:|" + ("---:|" if top5 else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for v in report.variants:
        if v.error:
            continue
        mark = "**yes** (chosen)" if chosen is not None and v.name == chosen.name else ("yes" if v.name in front else "")
        lines.append(
            f"| {v.name} | {_block(v)} | {_pct(v.sparsity, 1)} | {_pct(v.accuracy.get('tvm'))} | "
            + (f"{_pct(v.top5.get('tvm'))} | " if top5 else "")
            + f"{_fidelity(v.fidelity)} | {_latency(v, 'tvm')} | {_latency(v, 'tvm_dense')} | {_latency(v, 'onnxruntime')} | {_ratio(v.over_dense())} "
            f"| {_ratio(v.speedup())} | {f'{v.ideal_ms:.3f}' if v.ideal_ms else '-'} | {_pct(of_ideal(v), 0)} "
            f"| {_count(v.params.get('nonzero'))} of {_count(v.params.get('total'))} "
            f"| {_count(v.macs.get('effective'))} of {_count(v.macs.get('dense'))} "
            f"| {v.size_bytes.get('artifact', 0) / 1024:.0f} | {mark} |")
    failed = [v for v in report.variants if v.error]
    if failed:
        lines += ["", "Variants that could not be made (the sweep went on):", ""]
        lines += [f"- {v.name}: {v.error}" for v in failed]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    axis = "fidelity" if report.by_fidelity else "TVM accuracy"
    lines += ["", "## Pareto front", "",
              f"Variants no other variant beats on both {axis} and TVM latency, fastest first: "
              + (", ".join(f"{v.name} ({v.latency_ms['tvm']['median']:.3f} ms, {_quality(report, v)})"
                           for v in report.pareto()) or "none")]
    if chosen is not None:
        rule = (f"the fastest variant on the Pareto front whose accuracy is within {100 * report.max_accuracy_drop:g} "
                "points of the dense model's")
        if report.latency_only:
            rule = "the fastest variant (synthetic inputs: a latency study, accuracy is not measured)"
        lines += ["", f"## Where the time goes: {chosen.name}", "", f"Chosen as {rule}.", "",
                  render_layer_times(chosen, dense)]
    return "\n".join(lines) + "\n"


def render_layer_times(v: Variant, dense: Variant | None) -> str:
    """Each weight layer: shape, block sparsity, kernel, its time and share, beside the dense build's."""
    if not v.profile:
        return "(no per-layer profile was recorded)"
    dense_rows = (dense.profile or {}).get("layers", []) if dense is not None else []
    aligned = len(dense_rows) == len(v.profile["layers"])
    ort = (dense.reference_profile or {}).get("layers", {}) if dense is not None else {}
    dense_names = [r["name"] for r in dense_rows] if aligned else [None] * len(v.profile["layers"])

    def ms_(x):
        return "-" if x is None else f"{x:.4f}"

    def timed(row):  # a layer fused into the kernel of the layer before it has no time of its own
        return "in the row above" if row["ms"] is None and row.get("kernels") else ms_(row["ms"])

    lines = ["| layer | op | weight | block sparsity % | kernel | TVM ms | share % | TVM dense build ms "
             "| ORT dense ms | vs ORT |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(v.profile["layers"]):
        d = dense_rows[i]["ms"] if aligned else None
        o = ort.get(dense_names[i]) if dense_names[i] else None
        ms = row["ms"]
        lines.append(f"| {row['name']} | {row['op']} | {'x'.join(map(str, row['weight_shape']))} "
                     f"| {_pct(row['block_sparsity'], 1)} | {row['kind'].upper()} | {timed(row)} "
                     f"| {_pct(row['share'], 1)} | {ms_(d)} | {ms_(o)} | {_ratio(o / ms) if o and ms else '-'} |")
    total = v.profile["total_ms"]
    other = v.profile["other_ms"]
    top = ", ".join(f"{k} {ms:.4f}" for k, ms in list(v.profile["other"].items())[:5])
    lines += ["", f"Kernel time per call {total:.4f} ms (instrumented, {v.profile['runs']} calls); not in a weight "
                  f"layer: {other:.4f} ms ({_pct(other / total if total else None, 1)} %): {top or '-'}."]
    return "\n".join(lines)


def write_sweep_plot(reports: list[Report], path: Path) -> None:
    """Accuracy against TVM latency: each run's variants, its Pareto front as a line, and the
    dense baselines as reference lines (one run: TVM dense and onnxruntime dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = "osD^vP*X"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    latencies = []
    fidelity = all(r.by_fidelity for r in reports)  # one y axis: fidelity only if every run has it
    scale = 1.0 if fidelity else 100.0
    for r, report in enumerate(reports):
        def quality(v, report=report):
            return report.quality_of(v, fidelity)

        color = colors[r % len(colors)]
        label = report.target.get("name") if len(reports) > 1 else None
        blocks = sorted({_block(v) for v in report.variants if v.ok})
        for b, block in enumerate(blocks):
            vs = [v for v in report.variants if v.ok and _block(v) == block and quality(v) is not None]
            xs = [v.latency_ms["tvm"]["median"] for v in vs]
            ys = [scale * quality(v) for v in vs]
            latencies += xs
            name = f"{block} blocks" if block != "-" else ("dense" if all(v.method == "dense" for v in vs) else "variants")
            ax.scatter(xs, ys, marker=markers[b % len(markers)], s=45, zorder=3,
                       color=color if len(reports) > 1 else colors[b % len(colors)],
                       label=f"{label}: {name}" if label else f"TVM, {name}")
            for v, x, y in zip(vs, xs, ys):
                ax.annotate(v.name if len(reports) == 1 else f"{v.name}", (x, y), textcoords="offset points",
                            xytext=(5, 3), fontsize=7)
        front = report.pareto(fidelity)
        if front:
            ax.step([v.latency_ms["tvm"]["median"] for v in front], [scale * quality(v) for v in front],
                    where="post", color=color if len(reports) > 1 else "black", linewidth=1, alpha=0.7,
                    label=f"{label}: Pareto front" if label else "Pareto front")
        dense = next((v for v in report.variants if v.method == "dense" and v.ok), None)
        if dense is not None:
            for backend, style, what in (("tvm_dense", "--", "TVM dense"), ("onnxruntime", ":", "onnxruntime dense")):
                if backend in dense.latency_ms:
                    x = dense.latency_ms[backend]["median"]
                    latencies.append(x)
                    ax.axvline(x, linestyle=style, color=color if len(reports) > 1 else "grey", linewidth=1,
                               label=f"{label + ': ' if label else ''}{what} ({x:.3f} ms)")
    first = reports[0]
    where = ", ".join(r.target.get("name", "?") for r in reports)
    if fidelity:
        ylabel = "fidelity: cosine similarity of the logits to the dense model's"
    else:
        ylabel = f"{'agreement with dense' if 'agreement' in first.quality else 'test top-1 accuracy'} (%)"
    finish_plot(fig, ax, path, latencies, f"TVM latency, median (ms, batch {first.batch_size})", ylabel,
                f"{first.pipeline} on {where}: accuracy vs measured latency", 7, margins={"x": 0.2, "y": 0.1})


def write_comparison(reports: list[Report], sources: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """Several runs side by side (e.g. one sweep per target): a table of each variant on each
    run, and one plot with every run's variants and Pareto front."""
    out_dir = Path(out_dir)
    names = [f"{r.target.get('name')} ({src})" for r, src in zip(reports, sources)]
    variants: list[str] = []
    for r in reports:
        variants += [v.name for v in r.variants if v.name not in variants]
    head = "| variant | " + " | ".join(f"{n}: top-1 % / TVM ms / vs ORT" for n in names) + " |"
    lines = [f"# prune2tvm comparison: {', '.join(sorted({r.pipeline for r in reports}))}", "",
             "Each column is one run directory; its latencies were measured on its own target. "
             "Pareto variants are marked with *.", "", head, "|---|" + "---:|" * len(reports)]
    for name in variants:
        cells = []
        for r in reports:
            v = next((x for x in r.variants if x.name == name), None)
            front = {x.name for x in r.pareto()}
            if v is None or not v.ok:
                cells.append("-" if v is None else "failed")
                continue
            star = "*" if name in front else ""
            cells.append(f"{_pct(v.accuracy.get('tvm'))} / {v.latency_ms['tvm']['median']:.3f} / "
                         f"{_ratio(v.speedup())}{star}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_text(out_dir / COMPARE_MD, "\n".join(lines) + "\n")
    write_sweep_plot(reports, out_dir / COMPARE_PNG)
    return [out_dir / COMPARE_MD, out_dir / COMPARE_PNG]
