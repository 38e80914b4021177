"""Run a deployment artifact with the TVM runtime and numpy alone (the device side).

    python -m prune2tvm.runtime ARTIFACT --inputs in.npz --outputs out.npz
    python -m prune2tvm.runtime ARTIFACT --inputs x.npy --outputs out.npz   (one-input models)
    python -m prune2tvm.runtime NAME.tar.gz --extract DIR                   (unpack and check)

ARTIFACT is a directory written by ``prune2tvm compile`` or a ``.tar.gz`` from ``prune2tvm
package``. Arrays are keyed by the model's input and output names (``manifest.json`` lists
them). An input with more rows than the build's batch is run in batches of it (the last one
padded), so a whole test split saved as one ``.npy`` runs as it is.
From Python: ``model = load(ARTIFACT); outputs = model({"input": x})``.

Before anything runs, the artifact is checked: every file against its sha256 in the
manifest, no file the manifest does not list, and that it fits this machine (TVM version,
CPU architecture and features, GPU). A tarball is extracted only after every member has been
checked (regular files and directories under one top directory; no absolute paths, ``..``,
links or devices) and only inside the destination.

Like ``prune2tvm.compile``, this module imports tvm; unlike it, it needs nothing else of
prune2tvm's toolchain (no onnx, torch or click), so it is what runs on a device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from prune2tvm.errors import InputError, Prune2TVMError, UnsupportedError
from prune2tvm.fsutil import atomic_path, fresh_path, sha256_file

LIBRARY_NAME = "model.so"
MANIFEST_NAME = "manifest.json"
ARTIFACT_FORMAT = "prune2tvm-artifact"
ARTIFACT_VERSION = 1
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
MAX_ARCHIVE_BYTES = 8 << 30  # unpacked; refuses decompression bombs


def physical_cores() -> int:
    """Cores, not hardware threads, that this process may run on (psutil is not needed)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    siblings = set()
    for cpu in allowed:
        try:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            siblings.add(str(cpu))
    return max(1, len(siblings))


def configure_threads(threads: int | None = None) -> int:
    """Give TVM's thread pool one thread per physical core before it starts.

    Left alone, TVM 0.27 starts ``hardware_concurrency() / 2`` threads on x86 (it assumes
    hyper-threading), i.e. one thread on a 2-core machine without SMT: every parallel kernel
    then runs at half speed. It also pins its workers to cores, which on a 2-core VM was
    measured to run the pinned worker beside the main thread about one run in three (1.5x
    slower). An explicit ``threads`` (a target's ``threads:``) wins over both defaults; the
    user's own ``TVM_NUM_THREADS`` / ``TVM_BIND_THREADS`` win over the defaults. It must run
    before the first parallel kernel of the process: the pool reads them once."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    return int(os.environ["TVM_NUM_THREADS"])


# TVM 0.27's runtime logs "Warning: Scope Saving:" / "Scope Loaded:" (leftover debug lines)
# once per virtual-device scope whenever a VM executable is saved or loaded.
_NATIVE_NOISE = ("Warning: Scope Saving:", "Warning: Scope Loaded:",
                 "Warning: BlockBuilder destroyed with remaining blocks!")  # after an import that failed


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
    """The inputs in the model's order, each checked against its name, shape and dtype, and
    indices into a table (``index_bound``) against the table's size."""
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
        bound = spec.get("index_bound")
        if bound and array.size:
            low, high = int(array.min()), int(array.max())
            if low < -bound or high >= bound:
                bad = high if high >= bound else low
                raise InputError(f"input {spec['name']!r} holds index {bad}, outside the {bound} rows of the table "
                                 f"it indexes; valid: {-bound} to {bound - 1}")
        arrays.append(array)
    return arrays


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def read_manifest(directory: str | os.PathLike) -> dict:
    """``manifest.json`` of an artifact directory, refused with one line when it is missing,
    unreadable or of another format."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise InputError(f"{directory}: no such artifact directory")
    if not path.is_file():
        raise InputError(f"{directory}: not a prune2tvm artifact ({MANIFEST_NAME} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise InputError(f"{path}: not a prune2tvm artifact manifest (format is not {ARTIFACT_FORMAT!r})")
    if manifest.get("format_version") != ARTIFACT_VERSION:
        raise UnsupportedError(f"{path}: artifact format version {manifest.get('format_version')!r}; this runtime "
                               f"reads version {ARTIFACT_VERSION}")
    for key, kind in (("files", dict), ("inputs", list), ("outputs", list), ("machine", dict)):
        if not isinstance(manifest.get(key), kind):
            raise InputError(f"{path}: {key}: missing or not a {kind.__name__}")
    return manifest


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


def check_files(directory: str | os.PathLike, manifest: dict, label: str | None = None) -> None:
    """Every file the manifest lists is there with its sha256, and nothing else is."""
    directory = Path(directory)
    where = label or str(directory)
    listed = manifest["files"]
    for name, digest in sorted(listed.items()):
        path = directory / name
        if not isinstance(name, str) or not _safe_relative(name) or name == MANIFEST_NAME:
            raise InputError(f"{where}/{MANIFEST_NAME}: files: {name!r} is not a file name inside the artifact")
        if path.is_symlink() or not path.is_file():
            raise InputError(f"{where}: {name} is missing (listed in {MANIFEST_NAME})")
        if sha256_file(path) != digest:
            raise InputError(f"{where}: {name} does not match its sha256 in {MANIFEST_NAME} "
                             f"(modified or corrupted); refusing to load it")
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise InputError(f"{where}: {name} is a link; an artifact holds only regular files")
        if path.is_file() and name != MANIFEST_NAME and name not in listed:
            raise InputError(f"{where}: {name} is not listed in {MANIFEST_NAME}; refusing an artifact with "
                             f"unaccounted files")


# LLVM feature -> the /proc/cpuinfo flag that says the CPU has it (x86 and aarch64).
CPU_FEATURES = {
    "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile", "neon": "asimd", "dotprod": "asimddp",
    "fullfp16": "asimdhp", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
}


def host_arch() -> str:
    import platform

    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def check_tvm_version(manifest: dict, where: str = "the artifact") -> None:
    here = tvm_version()
    if manifest.get("tvm_version") != here:
        raise UnsupportedError(f"{where} was built with TVM {manifest.get('tvm_version')}; this runtime is TVM {here}")


def check_fits_here(manifest: dict, where: str = "the artifact") -> None:
    """Refuse, with the reason, an artifact for another TVM version, CPU or GPU."""
    check_tvm_version(manifest, where)
    machine = manifest["machine"]
    if machine.get("kind") == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise UnsupportedError(f"{where} is a CUDA build ({machine.get('cuda_arch')}) and this machine has no "
                                   f"NVIDIA GPU")
        have = "sm_" + str(tvm.cuda(0).compute_version).replace(".", "")
        need = str(machine.get("cuda_arch", ""))
        if need.startswith("sm_") and have.startswith("sm_") and int(need[3:]) > int(have[3:]):
            raise UnsupportedError(f"{where} is built for {need}; this GPU is {have}")
    arch = machine.get("arch")
    if arch != host_arch():
        raise UnsupportedError(f"{where} is built for {arch} CPUs; this machine is {host_arch()}")
    flags = host_cpu_flags()
    missing = [f for f in machine.get("cpu_features", []) if flags and f not in flags]
    if missing:
        raise UnsupportedError(f"{where} needs CPU features this CPU lacks: {', '.join(missing)} "
                               f"(rebuild it for this CPU, e.g. --target x86)")


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).endswith(ARCHIVE_SUFFIXES)


def unpack(archive: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Extract a packaged artifact into the new directory ``destination`` and check it.

    Every member is checked before anything is written: regular files and directories only,
    all under one top directory, no absolute path, no ``..``, nothing that unpacks to more
    than ``MAX_ARCHIVE_BYTES``. Extraction goes to a temporary directory beside
    ``destination``, renamed into place only once the files match the manifest."""
    archive, destination = Path(archive), Path(destination)
    if not archive.is_file():
        raise InputError(f"{archive}: no such file (expected a .tar.gz written by 'prune2tvm package')")
    if destination.exists():
        raise InputError(f"{destination} already exists; give a new directory to extract into")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated one fails here
            top = _checked_members(archive, members)
            destination.parent.mkdir(parents=True, exist_ok=True)
            stage = fresh_path(destination.parent, f".{destination.name}.partial-", directory=True)
            try:
                for member in members:
                    relative = Path(member.name).relative_to(top) if member.name != top else Path(".")
                    target = stage / relative
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
                check_files(stage, read_manifest(stage), label=str(archive))
                os.replace(stage, destination)
            finally:
                if stage.exists():
                    shutil.rmtree(stage, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{archive}: not a readable .tar.gz (truncated or not a prune2tvm package: "
                         f"{type(exc).__name__}: {exc})") from None
    return destination


def _checked_members(archive: Path, members: list) -> str:
    """The one top directory of a package's members; refuses anything unsafe or foreign."""
    if not members:
        raise InputError(f"{archive}: empty archive; not a prune2tvm package")
    tops, total = set(), 0
    for member in members:
        name = member.name
        if not _safe_relative(name):
            raise InputError(f"{archive}: member {name!r} has an absolute path or '..'; refusing to extract anything")
        if member.issym() or member.islnk():
            raise InputError(f"{archive}: member {name!r} is a link ({member.linkname!r}); refusing to extract anything")
        if not (member.isfile() or member.isdir()):
            raise InputError(f"{archive}: member {name!r} is not a regular file or directory; refusing to extract anything")
        total += member.size
        tops.add(Path(name).parts[0])
    if len(tops) != 1:
        raise InputError(f"{archive}: members under {len(tops)} top directories; a prune2tvm package has one")
    if total > MAX_ARCHIVE_BYTES:
        raise InputError(f"{archive}: unpacks to {total} bytes, over the {MAX_ARCHIVE_BYTES} limit")
    top = tops.pop()
    if not any(m.name == f"{top}/{MANIFEST_NAME}" and m.isfile() for m in members):
        raise InputError(f"{archive}: no {top}/{MANIFEST_NAME}: not a prune2tvm package")
    return top


def batch_size(manifest: dict) -> int | None:
    """The build's batch B, when its inputs can be fed N rows at a time in batches of B: the
    ONNX model left dimension 0 of every input free (``batch_axis`` 0) and every input and
    output has B as its leading dimension. A leading dimension that is not a batch (tokens of
    one sequence, say) is never split."""
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    if not inputs or any(s.get("batch_axis") != 0 for s in inputs):
        return None
    leads = {tuple(s["shape"][:1]) for s in inputs + outputs}
    return leads.pop()[0] if len(leads) == 1 and leads != {()} else None


class Model:
    """A checked, loaded artifact: call it with a dict of numpy arrays, get a dict of arrays."""

    def __init__(self, artifact: str | os.PathLike):
        configure_threads()
        import tvm
        from tvm import relax

        self._unpacked = None
        directory = Path(artifact)
        if is_archive(directory):
            self._unpacked = tempfile.TemporaryDirectory(prefix="prune2tvm-artifact-")
            directory = unpack(directory, Path(self._unpacked.name) / "artifact")
        self.directory = directory
        self.manifest = read_manifest(directory)
        check_files(directory, self.manifest)
        check_fits_here(self.manifest, str(artifact))
        try:
            self.inputs: list[dict] = [dict(s) for s in self.manifest["inputs"]]
            self.output_specs: list[dict] = [dict(s) for s in self.manifest["outputs"]]
            self.outputs: list[str] = [s["name"] for s in self.output_specs]
            library = directory / self.manifest["library"]
        except (KeyError, TypeError) as exc:
            raise InputError(f"{directory}/{MANIFEST_NAME}: unreadable ({type(exc).__name__}: {exc})") from None
        cuda = self.manifest["machine"].get("kind") == "cuda"
        self._device = tvm.cuda(0) if cuda else tvm.cpu(0)
        try:
            with without_native_noise():
                module = tvm.runtime.load_module(str(library))
        except Exception as exc:  # a library for another machine fails to load in C++
            raise UnsupportedError(f"{library} cannot be loaded here: {str(exc).strip().splitlines()[-1]}") from None
        self._vm = relax.VirtualMachine(module, self._device)
        self._tvm = tvm
        self.batch = batch_size(self.manifest)

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [self._tvm.runtime.tensor(a, self._device) for a in arrays]
        out = self._vm["main"](*tensors)
        flat = [out] if isinstance(out, self._tvm.runtime.Tensor) else list(out)
        return [t.numpy() for t in flat]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = self._rows(feeds)
        if rows is None:
            return dict(zip(self.outputs, self._run(check_feeds(self.inputs, feeds))))
        pieces = []
        for start in range(0, rows, self.batch):
            chunk = {}
            for name, array in feeds.items():
                part = array[start:start + self.batch]
                if len(part) < self.batch:  # pad the last batch by repeating its last row
                    part = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), axis=0)])
                chunk[name] = part
            pieces.append(self._run(check_feeds(self.inputs, chunk)))
        return {name: np.concatenate([p[i] for p in pieces])[:rows] for i, name in enumerate(self.outputs)}

    def _rows(self, feeds: dict[str, np.ndarray]) -> int | None:
        """N when every input is N rows of the build's batch shape (N != batch), else None."""
        if self.batch is None:
            return None
        rows = set()
        for spec in self.inputs:
            array = feeds.get(spec["name"])
            if not isinstance(array, np.ndarray) or array.ndim != len(spec["shape"]) or \
                    list(array.shape[1:]) != list(spec["shape"][1:]) or str(array.dtype) != spec["dtype"]:
                return None
            rows.add(array.shape[0])
        if len(rows) != 1 or set(feeds) != {s["name"] for s in self.inputs}:
            return None
        n = rows.pop()
        return n if n not in (0, self.batch) else None

    def close(self) -> None:
        if self._unpacked is not None:
            self._unpacked.cleanup()
            self._unpacked = None


def load(artifact: str | os.PathLike) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return Model(artifact)


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
            with open(path, "rb") as f:
                return {specs[0]["name"]: np.load(f, allow_pickle=False)}
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                raise InputError(f"{path}: holds one array, not arrays keyed by input name; give an .npz "
                                 f"(np.savez(path, {specs[0]['name']}=...)) or name the file .npy")
            with loaded as archive:
                return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable numpy file ({exc})") from None


def check_finite(feeds: dict[str, np.ndarray], where: str) -> None:
    """The command line's policy: NaN or Inf in an input is refused (a corrupt input file far
    more often than a meaningful value); ``--allow-nonfinite`` passes them through."""
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise InputError(f"{where}: input {name!r} holds {bad} NaN/Inf value(s); pass --allow-nonfinite "
                                 "to run them anyway")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as the ``prune2tvm`` command prints them."""

    def error(self, message: str):
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="python -m prune2tvm.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="a directory written by 'prune2tvm compile', or a .tar.gz from 'package'")
    parser.add_argument("--inputs", help=".npz keyed by input name, or .npy for one input")
    parser.add_argument("--outputs", help=".npz to write, keyed by output name")
    parser.add_argument("--extract", metavar="DIR", help="only unpack a .tar.gz into the new directory DIR, checked")
    parser.add_argument("--force", action="store_true", help="replace an existing outputs file")
    parser.add_argument("--allow-nonfinite", action="store_true", help="run inputs holding NaN or Inf (refused otherwise)")
    args = parser.parse_args(argv)
    try:
        if args.extract:
            if not is_archive(args.artifact):
                raise InputError(f"{args.artifact}: --extract takes a .tar.gz written by 'prune2tvm package'")
            directory = unpack(args.artifact, args.extract)
            print(f"extracted {args.artifact} to {directory}: every file matches manifest.json")
            return 0
        if not args.inputs or not args.outputs:
            raise InputError("give --inputs FILE and --outputs FILE (or --extract DIR for a .tar.gz)")
        if Path(args.outputs).exists() and not args.force:
            raise InputError(f"{args.outputs} already exists; pass --force to replace it")
        model = Model(args.artifact)
        try:
            feeds = read_inputs(args.inputs, model.inputs)
            if not args.allow_nonfinite:
                check_finite(feeds, args.inputs)
            outputs = model(feeds)
        finally:
            model.close()
        with atomic_path(args.outputs) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outputs)
    except Prune2TVMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless PRUNE2TVM_DEBUG is set
        if os.environ.get("PRUNE2TVM_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set PRUNE2TVM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    print(f"wrote {args.outputs}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
