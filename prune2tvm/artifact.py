"""Deployment artifacts on the toolchain side: verify one against onnxruntime, record what a
run measured on it, and package it as a ``.tar.gz`` (the device side is ``runtime.py``).

An artifact is the directory ``prune2tvm compile -o DIR`` writes: ``model.so``, optionally
``tuning/`` (the records it was built with), and ``manifest.json`` (format, versions, target
and the machine it needs, inputs and outputs, per-layer decisions, the verification and
measurements, the source model's sha256 and the sha256 of every other file). The manifest is
the one file not in its own checksum list, so recording a verification or a measurement
rewrites it (atomically) and leaves the checked files as they are.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prune2tvm.errors import InputError, NumericalMismatchError, OutputExistsError
from prune2tvm.fsutil import atomic_path, sha256_file, write_json
from prune2tvm.runtime import ARCHIVE_SUFFIXES, MANIFEST_NAME, Model, check_files, is_archive, read_manifest


@dataclass
class OutputCheck:
    inputs: str  # "random" or "real"
    output: str
    max_abs_diff: float
    max_rel_diff: float  # max |a - e| / max |e|
    tolerance: float
    ok: bool


def verify_artifact(artifact: str | os.PathLike, onnx_path: str | os.PathLike,
                    real_feeds: dict[str, np.ndarray] | None = None, seed: int = 0,
                    rtol: float = 1e-4, atol: float = 1e-5, record: bool = True) -> list[OutputCheck]:
    """Run the artifact (through the device-side runtime, checksums and all) and onnxruntime on
    the same random inputs, and on ``real_feeds`` when given. With ``record``, a directory's
    manifest gets the checks and whether they held."""
    from prune2tvm.onnxrt import compare, random_feeds, session

    if not Path(onnx_path).is_file():
        raise InputError(f"{onnx_path}: no such ONNX model")
    model = Model(artifact)
    try:
        manifest = model.manifest
        digest = sha256_file(onnx_path)
        if digest != manifest.get("onnx_sha256"):
            raise InputError(f"{onnx_path} is not the model {artifact} was compiled from (sha256 {digest[:12]}..., "
                             f"the manifest says {str(manifest.get('onnx_sha256'))[:12]}...)")
        rng = np.random.default_rng(seed)
        cases = [("random", random_feeds(model.inputs, rng))]
        if real_feeds is not None:
            cases.append(("real", real_feeds))
        reference = session(onnx_path)
        checks = []
        for kind, feeds in cases:
            actual = model(feeds)
            expected = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
            for name in model.outputs:
                diff, tolerance, ok = compare(actual[name], expected[name], rtol, atol)
                scale = float(np.max(np.abs(expected[name]))) if expected[name].size else 0.0
                checks.append(OutputCheck(kind, name, diff, diff / scale if scale else diff, tolerance, ok))
    finally:
        model.close()
    if record and not is_archive(artifact):
        manifest = read_manifest(artifact)
        manifest["checks"] = [{"inputs": c.inputs, "max_abs_diff": c.max_abs_diff, "tolerance": c.tolerance}
                              for c in checks]
        manifest["verified"] = all(c.ok for c in checks)
        manifest["not_verified_reason"] = "" if manifest["verified"] else "disagrees with onnxruntime"
        write_json(Path(artifact) / MANIFEST_NAME, manifest)
    return checks


def record_measurements(directory: str | os.PathLike, measured: dict) -> None:
    """Put what a run measured on this build (accuracy, latency) into its manifest."""
    manifest = read_manifest(directory)
    check_files(directory, manifest)
    manifest["measured"] = measured
    write_json(Path(directory) / MANIFEST_NAME, manifest)


def package(directory: str | os.PathLike, output: str | os.PathLike, force: bool = False) -> Path:
    """``NAME.tar.gz`` holding the artifact under the top directory ``NAME``.

    Refused when a file does not match the manifest, and (unless ``force``) when the build
    was not verified against onnxruntime. Written under a temporary name and renamed; an
    existing file is replaced only with ``force``. Members are sorted, owned by root and
    dated at the manifest's creation, so the same artifact gives the same bytes."""
    import datetime
    import gzip

    directory, output = Path(directory), Path(output)
    suffix = next((x for x in ARCHIVE_SUFFIXES if output.name.endswith(x)), None)
    if suffix is None:
        raise InputError(f"{output}: the package name must end in .tar.gz")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it")
    manifest = read_manifest(directory)
    check_files(directory, manifest)
    if not manifest.get("verified") and not force:
        why = manifest.get("not_verified_reason") or "no check recorded"
        raise NumericalMismatchError(f"{directory} is not verified against onnxruntime ({why}); run 'prune2tvm "
                                     f"verify {directory} --onnx MODEL.onnx' where it runs, or pass --force")
    top = output.name[: -len(suffix)]
    try:
        mtime = datetime.datetime.fromisoformat(manifest.get("created", "")).timestamp()
    except ValueError:
        mtime = 0
    names = sorted(manifest["files"]) + [MANIFEST_NAME]
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=int(mtime)) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            dirs = sorted({p.as_posix() for name in names for p in Path(name).parents if p != Path(".")})
            for name in [""] + dirs:
                info = tarfile.TarInfo(f"{top}/{name}".rstrip("/"))
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
                tar.addfile(info)
            for name in names:
                data = (directory / name).read_bytes()
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(mtime)
                tar.addfile(info, io.BytesIO(data))
    return output
