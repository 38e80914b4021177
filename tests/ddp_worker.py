"""Run under torchrun by test_distributed.py: train and prune a pipeline, then save this
rank's weights and plans for the test to compare."""

import json
import sys

import torch

from prune2tvm.config import load_pipeline
from prune2tvm.distributed import init_from_env, world
from prune2tvm.pipeline import train_and_prune

if __name__ == "__main__":
    assert init_from_env(), "not under torchrun"
    rank, size = world()
    _, variants = train_and_prune(load_pipeline(sys.argv[1]))
    out = sys.argv[2]
    torch.save({v.name: v.model.state_dict() for v in variants}, f"{out}/rank{rank}.pt")
    plans = {v.name: v.plan.to_json() for v in variants if v.plan is not None}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"size": size, "plans": plans}, f)
