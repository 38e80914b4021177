"""Per-layer sparsity summary, as Distiller prints it: shape, nonzeros, element / block /
filter / channel sparsity, and MACs dense and effective (dense MACs x the fraction of
nonzero weights: what a kernel that skips zeros would do)."""

from __future__ import annotations

import torch
from torch import nn

from prune2tvm.prune.masks import prunable_layers


@torch.no_grad()
def sparsity_summary(model: nn.Module, input_shape: tuple[int, ...], block: tuple[int, int] = (4, 1)) -> list[dict]:
    macs: dict[str, int] = {}
    hooks = []
    for name, layer in prunable_layers(model).items():
        def hook(module, inputs, output, name=name):
            w = module.weight
            per_output = w[0].numel()  # in / groups * kh * kw for a conv, in for a linear
            macs[name] = int(output.numel() // output.shape[0]) * per_output if isinstance(module, nn.Conv2d) \
                else int(output.numel() // output.shape[0]) * w.shape[1]
        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows = []
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        nnz, numel = int(torch.count_nonzero(w)), w.numel()
        matrix = w.reshape(w.shape[0], -1)
        r, c = block
        blocks = None
        if matrix.shape[0] % r == 0 and matrix.shape[1] % c == 0:
            grid = matrix.reshape(matrix.shape[0] // r, r, matrix.shape[1] // c, c).abs().sum((1, 3))
            blocks = float((grid == 0).float().mean())
        filters = float((matrix.abs().sum(1) == 0).float().mean())
        channels = float((w.transpose(0, 1).reshape(w.shape[1], -1).abs().sum(1) == 0).float().mean())
        dense_macs = macs.get(name, 0)
        rows.append({"name": name, "shape": list(w.shape), "nnz_dense": numel, "nnz": nnz,
                     "element_sparsity": 1 - nnz / numel, "block": [r, c], "block_sparsity": blocks,
                     "filter_sparsity": filters, "channel_sparsity": channels,
                     "macs_dense": dense_macs, "macs_effective": int(round(dense_macs * nnz / numel))})
    return rows


def render_summary(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    block = "x".join(str(d) for d in rows[0]["block"]) if rows else "4x1"
    lines = [f"| layer | shape | NNZ dense | NNZ sparse | element % | block {block} % | filter % | channel % "
             "| MACs dense | MACs effective |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['nnz_dense']} | {r['nnz']} "
                     f"| {pct(r['element_sparsity'])} | {pct(r['block_sparsity'])} | {pct(r['filter_sparsity'])} "
                     f"| {pct(r['channel_sparsity'])} | {r['macs_dense']} | {r['macs_effective']} |")
    dense = sum(r["nnz_dense"] for r in rows)
    nnz = sum(r["nnz"] for r in rows)
    macs, effective = sum(r["macs_dense"] for r in rows), sum(r["macs_effective"] for r in rows)
    lines.append(f"| total | | {dense} | {nnz} | {pct(1 - nnz / dense if dense else 0)} | | | | {macs} | {effective} |")
    return "\n".join(lines)
