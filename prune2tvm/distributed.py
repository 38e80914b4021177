"""Training under ``torchrun``: DistributedDataParallel, gloo on CPU and nccl on GPU.

``torchrun --nproc_per_node N -m prune2tvm.cli run PIPELINE`` (or ``torchrun ... $(which
prune2tvm) run ...``) starts N processes; each trains on its share of every batch, DDP
averages the gradients, so every process holds the same weights, and the same masks follow
from them. Rank 0 alone exports, compiles, measures and writes the results.
"""

from __future__ import annotations

import os


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when not under it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model):
    """``model`` in DistributedDataParallel inside a process group, else as it is."""
    _, size = world()
    if size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def sync_buffers(model) -> None:
    """Average floating-point buffers (BatchNorm's running statistics) over the processes:
    each process updated them from its own share of the batches, so they drift apart."""
    _, size = world()
    if size == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(size)
