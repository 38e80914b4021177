"""Loading a user's state dict safely: ``weights_only=True``, and every mismatch named."""

from __future__ import annotations

import os
import warnings

from prune2tvm.errors import InputError


def load_state_dict(model, path: str | os.PathLike) -> None:
    import pickle

    import torch

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: not a safe state-dict checkpoint (refused by weights_only loading: {first})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise InputError(f"{path}: not a readable checkpoint (truncated or corrupt: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise InputError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"shape {', '.join(wrong)}"] if wrong else [])
    if problems:
        raise InputError(f"{path}: checkpoint does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)
