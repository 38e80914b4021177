from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prune2tvm.errors import NumericalMismatchError
from prune2tvm.fsutil import atomic_path, sha256_file
from prune2tvm.onnxrt import compare, session

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class OnnxModel:
    path: str
    input_name: str
    output_name: str
    sample_shape: list[int]  # one sample, without the (dynamic) batch dimension
    opset: int
    sha256: str
    max_abs_diff: float  # against torch on the check inputs

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "OnnxModel":
        return cls(**data)


def export_onnx(model: nn.Module, sample_shape: tuple[int, ...], path: str | os.PathLike, opset: int,
                check_inputs: np.ndarray) -> OnnxModel:
    """Export with a dynamic batch dimension, then check onnxruntime against torch on
    ``check_inputs`` (real samples); a mismatch raises and leaves no file behind."""
    path = Path(path)
    model = model.eval()
    dummy = torch.zeros((1, *sample_shape), dtype=torch.float32)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
            torch.onnx.export(model, dummy, str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        with torch.no_grad():
            expected = model(torch.from_numpy(check_inputs)).numpy()
        actual = session(tmp).run(None, {INPUT_NAME: check_inputs})[0]
        diff, tolerance, ok = compare(actual, expected)
        if not ok:
            raise NumericalMismatchError(
                f"ONNX export of {path.name} disagrees with torch: max abs diff {diff:.3g} > tolerance {tolerance:.3g}")
    return OnnxModel(str(path), INPUT_NAME, OUTPUT_NAME, list(sample_shape), opset, sha256_file(path), diff)
