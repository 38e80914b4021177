"""Training under torchrun: two CPU processes (gloo) end with the same weights and masks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

PIPELINE = """\
version: 1
name: ddp
seed: 5
model: {{name: cnn}}
train: {{epochs: 3, batch_size: 64, lr: 0.003}}
prune: {{method: {method}, block: [4, 1], sparsities: [0.75], start_epoch: 0, end_epoch: 2, frequency: 1,
        fine_tune_epochs: 3}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["1xN", "gsm"])
def test_two_processes_end_with_identical_weights_and_masks(tmp_path, method):
    pipeline = tmp_path / "ddp.yaml"
    pipeline.write_text(PIPELINE.format(method=method))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNE2TVM_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "ddp_worker.py"), str(pipeline), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert meta[0]["size"] == meta[1]["size"] == 2
    assert set(states[0]) == {"dense", f"{method}-75"}
    for name in states[0]:
        for key, value in states[0][name].items():
            assert torch.equal(value, states[1][name][key]), (name, key)
    assert meta[0]["plans"] == meta[1]["plans"]  # the same masks (and filter orders)
    pruned = states[0][f"{method}-75"]
    zeros = sum(int((pruned[f"{n}.weight"] == 0).sum()) for n in ("0", "3", "8"))
    total = sum(pruned[f"{n}.weight"].numel() for n in ("0", "3", "8"))
    assert zeros / total == pytest.approx(0.75, abs=0.02)  # and they did prune
    # the dense model trained: not its initialisation (rank 0 broadcast a trained model, not a fresh one)
    from prune2tvm.models import build_model

    torch.manual_seed(5)
    fresh = build_model("cnn", (1, 8, 8), 10).state_dict()
    assert not torch.equal(fresh["3.weight"], states[0]["dense"]["3.weight"])
