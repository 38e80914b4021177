"""Run a compiled model with the TVM runtime and numpy alone (the deployment side).

    python -m prune2tvm.runtime DIR --inputs in.npz --outputs out.npz
    python -m prune2tvm.runtime DIR --inputs x.npy --outputs out.npz   (one-input models)

Arrays are keyed by the model's input and output names (``compile.json`` lists them).
From Python: ``model = load(DIR); outputs = model({"input": x})``.

Like ``prune2tvm.compile``, this module imports tvm; unlike it, it needs nothing else of
prune2tvm's toolchain (no onnx, torch or click), so it is what runs on a device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from prune2tvm.errors import InputError, Prune2TVMError, UnsupportedError

LIBRARY_NAME = "model.so"
INFO_NAME = "compile.json"


# TVM 0.27's runtime logs "Warning: Scope Saving:" / "Scope Loaded:" (leftover debug lines)
# once per virtual-device scope whenever a VM executable is saved or loaded.
_NATIVE_NOISE = ("Warning: Scope Saving:", "Warning: Scope Loaded:")


@contextlib.contextmanager
def without_native_noise():
    """Capture what native code writes to fd 2, and pass on all but the known noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if not any(noise in line for noise in _NATIVE_NOISE):
                    print(line, file=sys.stderr)


def check_feeds(specs: list[dict], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The inputs in the model's order, each checked against its name, shape and dtype."""
    names = [s["name"] for s in specs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InputError(f"missing input {', '.join(map(repr, missing))}; the model takes: {', '.join(names)}")
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise InputError(f"unknown input {', '.join(map(repr, unknown))}; the model takes: {', '.join(names)}")
    arrays = []
    for spec in specs:
        array = np.ascontiguousarray(feeds[spec["name"]])
        if list(array.shape) != list(spec["shape"]) or str(array.dtype) != spec["dtype"]:
            raise InputError(f"input {spec['name']!r} is {array.dtype}{list(array.shape)}; "
                             f"the build takes {spec['dtype']}{list(spec['shape'])}")
        arrays.append(array)
    return arrays


def read_build_info(directory: str | os.PathLike) -> tuple[dict, Path]:
    """``compile.json`` of a build directory and its library's path, refused with one line
    when either is missing or unreadable, or when the build is for another TVM version."""
    from importlib import metadata

    directory = Path(directory)
    info_path, library = directory / INFO_NAME, directory / LIBRARY_NAME
    for path in (info_path, library):
        if not path.is_file():
            raise InputError(f"{directory}: not a compiled model directory ({path.name} is missing)")
    try:
        info = json.loads(info_path.read_text())
    except (ValueError, OSError) as exc:
        raise InputError(f"{info_path}: unreadable ({type(exc).__name__}: {exc})") from None
    here = metadata.version("apache-tvm")
    if not isinstance(info, dict) or info.get("tvm_version") != here:
        raise UnsupportedError(f"{directory} was built with TVM {info.get('tvm_version') if isinstance(info, dict) else '?'}; "
                               f"this runtime is TVM {here}")
    return info, library


class Model:
    """A loaded build: call it with a dict of numpy arrays, get a dict of numpy arrays."""

    def __init__(self, directory: str | os.PathLike):
        import tvm
        from tvm import relax

        self.info, library = read_build_info(directory)
        try:
            self.inputs: list[dict] = self.info["inputs"]
            self.outputs: list[str] = self.info["outputs"]
            kind = self.info["tvm_target"]["kind"]
        except (KeyError, TypeError) as exc:
            raise InputError(f"{directory}/{INFO_NAME}: unreadable ({type(exc).__name__}: {exc})") from None
        self._device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        if kind == "cuda" and not self._device.exist:
            raise UnsupportedError(f"{directory} is a CUDA build and this machine has no NVIDIA GPU")
        try:
            with without_native_noise():
                module = tvm.runtime.load_module(str(library))
        except Exception as exc:  # a library for another machine fails to load in C++
            raise UnsupportedError(f"{library} cannot be loaded here: {str(exc).strip().splitlines()[-1]}") from None
        self._vm = relax.VirtualMachine(module, self._device)
        self._tvm = tvm

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [self._tvm.runtime.tensor(a, self._device) for a in check_feeds(self.inputs, feeds)]
        out = self._vm["main"](*tensors)
        flat = [out] if isinstance(out, self._tvm.runtime.Tensor) else list(out)
        return {name: t.numpy() for name, t in zip(self.outputs, flat)}


def load(directory: str | os.PathLike) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return Model(directory)


def read_inputs(path: str | os.PathLike, specs: list[dict]) -> dict[str, np.ndarray]:
    """``.npz`` keyed by input name, or ``.npy`` for a model with one input (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected .npz keyed by input name, or .npy)")
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise InputError(f"{path}: a .npy file fits a model with one input; this one takes "
                                 f"{', '.join(s['name'] for s in specs)}: give an .npz keyed by name")
            return {specs[0]["name"]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable numpy file ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prune2tvm.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a directory written by 'prune2tvm compile'")
    parser.add_argument("--inputs", required=True, help=".npz keyed by input name, or .npy for one input")
    parser.add_argument("--outputs", required=True, help=".npz to write, keyed by output name")
    parser.add_argument("--force", action="store_true", help="replace an existing outputs file")
    args = parser.parse_args(argv)
    try:
        if Path(args.outputs).exists() and not args.force:
            raise InputError(f"{args.outputs} already exists; pass --force to replace it")
        model = Model(args.directory)
        outputs = model(read_inputs(args.inputs, model.inputs))
        from prune2tvm.fsutil import atomic_path

        with atomic_path(args.outputs) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outputs)
    except Prune2TVMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.outputs}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
