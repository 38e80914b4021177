"""Writing files so that a crash leaves either the old complete file or the new one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from prune2tvm.errors import InputError, OutputExistsError

_IN_PROGRESS: set[Path] = set()  # temporary files and directories being written now


@contextlib.contextmanager
def removed_if_interrupted(path: Path) -> Iterator[Path]:
    """While inside, ``path`` (a temporary file or directory) is removed by
    ``discard_in_progress`` should the process be ended at once (Ctrl-C inside TVM's code)."""
    _IN_PROGRESS.add(path)
    try:
        yield path
    finally:
        _IN_PROGRESS.discard(path)


def discard_in_progress() -> None:
    """Remove every temporary file or directory being written (before an immediate exit on
    Ctrl-C): what was complete is already in place, what was not leaves nothing behind."""
    for path in list(_IN_PROGRESS):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def fresh_path(parent: str | os.PathLike, prefix: str, suffix: str = "", directory: bool = False) -> Path:
    """Create a new empty file (or directory) with a random name in ``parent``, with the
    permissions the umask gives. tempfile's are private (0600 files, 0700 directories), so a
    results file or an artifact renamed into place from one would be unreadable to anyone
    else: a deployment directory copied to a device, a JSON on a shared disk."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {parent}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_path = fresh_path(path.parent, f".{path.name}.", ".tmp")
    try:
        with removed_if_interrupted(tmp_path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise one clear line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"cannot write to directory {path}: {reason}") from None
    return path


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, force: bool, what: str = "results") -> Iterator[Path]:
    """Build a whole output directory under a temporary name, then swap it into place.

    An existing ``final`` is refused unless ``force``; with ``force`` it is replaced only
    after the new one is complete, so an interrupted run never loses the old results.
    """
    final = Path(final)
    if final.exists() and not force:
        raise OutputExistsError(f"{final} already exists ({what}); pass --force to replace it")
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a directory")
    parent = ensure_writable_dir(final.parent)
    stage = fresh_path(parent, f".{final.name}.partial-", directory=True)
    try:
        with removed_if_interrupted(stage):
            yield stage
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
                os.replace(final, old / final.name)
                os.replace(stage, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
