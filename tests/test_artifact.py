"""Deployment artifacts and `python -m prune2tvm.runtime`: the manifest, inputs by name,
packaging, `verify`, and the refusals of bad inputs and of tampered, foreign and hostile
artifacts and tarballs (nothing run, nothing extracted outside)."""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prune2tvm.cli import cli
from prune2tvm.compile import compile_onnx
from prune2tvm.compile.build import SparsifyOptions
from prune2tvm.config import load_target
from prune2tvm.export import export_onnx
from prune2tvm.fsutil import sha256_file
from prune2tvm.models import build_model
from prune2tvm.onnxrt import session
from prune2tvm.prune.masks import MaskHolder, prunable_layers
from prune2tvm.runtime import load


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A pruned MLP compiled for x86 with batch 3 and packaged."""
    tmp = tmp_path_factory.mktemp("artifact")
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10).eval()
    MaskHolder(prunable_layers(model)).set_sparsity(0.8)
    check = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    onnx_model = export_onnx(model, (1, 8, 8), tmp / "mlp.onnx", 17, check)
    compiled = compile_onnx(onnx_model.path, load_target("x86"), {"input": [3, 1, 8, 8]},
                            sparsify=SparsifyOptions((1, 1), 0.5))
    compiled.save(tmp / "artifact")
    result = invoke("package", str(tmp / "artifact"), "-o", str(tmp / "mlp.tar.gz"))
    assert result.exit_code == 0, result.output
    return tmp, Path(onnx_model.path)


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def runtime(*args):
    return subprocess.run([sys.executable, "-m", "prune2tvm.runtime", *map(str, args)], capture_output=True, text=True)


def copy_artifact(built, tmp_path) -> Path:
    tmp, _ = built
    shutil.copytree(tmp / "artifact", tmp_path / "a")
    return tmp_path / "a"


def edit_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_carries_versions_target_io_decisions_and_checksums(built):
    tmp, onnx_path = built
    manifest = json.loads((tmp / "artifact" / "manifest.json").read_text())
    assert manifest["format"] == "prune2tvm-artifact" and manifest["format_version"] == 1
    assert manifest["tvm_version"] == "0.27.0.post1" and manifest["prune2tvm_version"]
    assert manifest["versions"]["onnx"] and manifest["versions"]["onnxruntime"]
    assert manifest["target"]["name"] == "x86" and manifest["tvm_target"]["kind"] == "llvm"
    assert manifest["machine"]["arch"] == "x86_64" and "avx2" in manifest["machine"]["cpu_features"]
    assert manifest["inputs"] == [{"name": "input", "shape": [3, 1, 8, 8], "dtype": "float32", "batch_axis": 0}]
    assert manifest["outputs"] == [{"name": "logits", "shape": [3, 10], "dtype": "float32", "batch_axis": 0}]
    assert [layer["kind"] for layer in manifest["layers"]] and all("block_sparsity" in layer for layer in manifest["layers"])
    assert manifest["onnx_sha256"] == sha256_file(onnx_path) and manifest["source_model"] == "mlp.onnx"
    assert manifest["files"] == {"model.so": sha256_file(tmp / "artifact" / "model.so")}
    assert manifest["verified"] and manifest["checks"]


def test_runtime_runs_a_package_and_batches_a_whole_split(built, tmp_path):
    tmp, onnx_path = built
    x = np.random.default_rng(5).standard_normal((7, 1, 8, 8)).astype(np.float32)  # 7 rows; the build takes 3
    expected = session(onnx_path).run(None, {"input": x})[0]
    np.save(tmp_path / "x.npy", x)
    result = runtime(tmp / "mlp.tar.gz", "--inputs", tmp_path / "x.npy", "--outputs", tmp_path / "out.npz")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-5)
    model = load(tmp / "artifact")
    np.testing.assert_allclose(model({"input": x})["logits"], expected, rtol=1e-4, atol=1e-5)


def test_a_leading_dimension_the_model_fixes_is_never_split_into_batches(tmp_path):
    """An ONNX input of static shape [4, 16] (4 tokens, say): 8 rows are refused, not run as
    two batches of 4."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    assert invoke("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "a")).exit_code == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["inputs"][0]["batch_axis"] is None
    np.save(tmp_path / "x.npy", np.zeros((8, 16), np.float32))
    result = runtime(tmp_path / "a", "--inputs", tmp_path / "x.npy", "--outputs", tmp_path / "y.npz")
    assert result.returncode == 2 and "input 'x' is float32[8, 16]; the build takes float32[4, 16]" in result.stderr


def test_runtime_reproduces_onnxruntime_from_npz_and_npy(built):
    tmp, onnx_path = built
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = session(onnx_path).run(None, {"input": x})[0]
    np.savez(tmp / "in.npz", input=x)
    np.save(tmp / "in.npy", x)
    for inputs, outputs in (("in.npz", "out1.npz"), ("in.npy", "out2.npz")):
        result = runtime(tmp / "artifact", "--inputs", tmp / inputs, "--outputs", tmp / outputs)
        assert result.returncode == 0, result.stderr
        with np.load(tmp / outputs) as out:
            assert out.files == ["logits"]
            np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(load(tmp / "artifact")({"input": x})["logits"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_input, message", [
    (lambda p: np.savez(p, input=np.zeros((3, 1, 8, 9), np.float32)), "the build takes float32[3, 1, 8, 8]"),
    (lambda p: np.savez(p, input=np.zeros((3, 1, 8, 8), np.float64)), "is float64[3, 1, 8, 8]"),
    (lambda p: np.savez(p, images=np.zeros((3, 1, 8, 8), np.float32)), "missing input 'input'"),
    (lambda p: np.savez(p, input=np.zeros((3, 1, 8, 8), np.float32), extra=np.zeros(2)), "unknown input 'extra'"),
    (lambda p: np.savez(p, input=np.array([{"a": 1}], dtype=object)), "not a readable numpy file"),
    (lambda p: p.write_bytes(b"garbage"), "not a readable numpy file"),
])
def test_runtime_refuses_bad_inputs_in_one_line(built, make_input, message):
    tmp, _ = built
    path = tmp / "bad.npz"
    make_input(path)
    result = runtime(tmp / "artifact", "--inputs", path, "--outputs", tmp / "never.npz")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp / "never.npz").exists()


def test_runtime_keeps_existing_outputs_without_force_and_needs_a_build(built, tmp_path):
    tmp, _ = built
    np.savez(tmp_path / "in.npz", input=np.zeros((3, 1, 8, 8), np.float32))
    (tmp_path / "out.npz").write_bytes(b"keep me")
    result = runtime(tmp / "artifact", "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz")
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert (tmp_path / "out.npz").read_bytes() == b"keep me"
    result = runtime(tmp_path, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "o.npz")
    assert result.returncode == 2 and "not a prune2tvm artifact (manifest.json is missing)" in result.stderr


def test_package_is_reproducible_and_extracts_to_the_same_files(built, tmp_path):
    tmp, _ = built
    again = invoke("package", str(tmp / "artifact"), "-o", str(tmp_path / "mlp.tar.gz"))
    assert again.exit_code == 0, again.output
    assert (tmp_path / "mlp.tar.gz").read_bytes() == (tmp / "mlp.tar.gz").read_bytes()
    result = runtime(tmp / "mlp.tar.gz", "--extract", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.so"]
    assert (tmp_path / "out" / "model.so").read_bytes() == (tmp / "artifact" / "model.so").read_bytes()


def test_package_keeps_an_existing_file_and_refuses_an_unverified_artifact(built, tmp_path):
    tmp, _ = built
    (tmp_path / "keep.tar.gz").write_bytes(b"keep me")
    result = invoke("package", str(tmp / "artifact"), "-o", str(tmp_path / "keep.tar.gz"))
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert (tmp_path / "keep.tar.gz").read_bytes() == b"keep me"
    directory = copy_artifact(built, tmp_path)
    edit_manifest(directory, lambda m: m.update(verified=False, not_verified_reason="not run here: it is built for aarch64"))
    result = invoke("package", str(directory), "-o", str(tmp_path / "a.tar.gz"))
    assert result.exit_code == 2 and "is not verified against onnxruntime (not run here" in result.output
    assert not (tmp_path / "a.tar.gz").exists()
    assert invoke("package", str(directory), "-o", str(tmp_path / "a.tar.gz"), "--force").exit_code == 0


def test_verify_reports_differences_and_records_them(built, tmp_path):
    tmp, onnx_path = built
    directory = copy_artifact(built, tmp_path)
    np.savez(tmp_path / "real.npz", input=np.random.default_rng(9).standard_normal((3, 1, 8, 8)).astype(np.float32))
    result = invoke("verify", str(directory), "--onnx", str(onnx_path), "--inputs", str(tmp_path / "real.npz"))
    assert result.exit_code == 0, result.output
    assert "random inputs, output logits: max abs diff" in result.output and "max rel diff" in result.output
    assert "real   inputs, output logits" in result.output
    # A tolerance no float build meets: reported, recorded, and packaging then refuses.
    result = invoke("verify", str(directory), "--onnx", str(onnx_path), "--rtol", "0", "--atol", "0")
    assert result.exit_code == 2 and "disagrees with onnxruntime on random inputs" in result.output
    assert json.loads((directory / "manifest.json").read_text())["verified"] is False
    result = invoke("package", str(directory), "-o", str(tmp_path / "a.tar.gz"))
    assert result.exit_code == 2 and "not verified against onnxruntime (disagrees" in result.output
    # Another model than the source is refused before anything runs.
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx_path.read_bytes() + b"\0")
    result = invoke("verify", str(tmp / "artifact"), "--onnx", str(other))
    assert result.exit_code == 2 and "is not the model" in result.output


def _feeds(tmp_path) -> Path:
    np.savez(tmp_path / "in.npz", input=np.zeros((3, 1, 8, 8), np.float32))
    return tmp_path / "in.npz"


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "model.so").write_bytes((d / "model.so").read_bytes()[:-1] + b"\x01"),
     "model.so does not match its sha256 in manifest.json"),
    (lambda d: (d / "model.so").unlink(), "model.so is missing"),
    (lambda d: (d / "evil.so").write_bytes(b"\x7fELF"), "evil.so is not listed in manifest.json"),
    (lambda d: edit_manifest(d, lambda m: m.update(tvm_version="0.19.0")), "was built with TVM 0.19.0; this runtime is TVM"),
    (lambda d: edit_manifest(d, lambda m: m["machine"].update(arch="aarch64")), "is built for aarch64 CPUs; this machine is x86_64"),
    (lambda d: edit_manifest(d, lambda m: m["machine"].update(cpu_features=["sve2"])), "needs CPU features this CPU lacks: sve2"),
    (lambda d: edit_manifest(d, lambda m: m["machine"].update(kind="cuda", cuda_arch="sm_90")), "is a CUDA build (sm_90)"),
    (lambda d: edit_manifest(d, lambda m: m.update(format_version=7)), "artifact format version 7"),
    (lambda d: edit_manifest(d, lambda m: m["files"].update({"../outside": "0" * 64})), "'../outside' is not a file name"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: unreadable"),
])
def test_runtime_refuses_tampered_or_foreign_artifacts_in_one_line(built, tmp_path, tamper, message):
    directory = copy_artifact(built, tmp_path)
    tamper(directory)
    result = runtime(directory, "--inputs", _feeds(tmp_path), "--outputs", tmp_path / "out.npz")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()


def _tar(path: Path, members) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, hard: bool = False):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info, None


HOSTILE = {
    "absolute path": ([_file("/tmp/prune2tvm-escape")], "has an absolute path or '..'"),
    "dot-dot": ([_file("pkg/manifest.json", b"{}"), _file("pkg/../../escape")], "has an absolute path or '..'"),
    "symlink out": ([_file("pkg/manifest.json", b"{}"), _link("pkg/model.so", "/etc/passwd")], "is a link"),
    "hardlink out": ([_file("pkg/manifest.json", b"{}"), _link("pkg/model.so", "../../etc/passwd", hard=True)],
                     "is a link"),
    "foreign": ([_file("data/readme.txt", b"hello")], "no data/manifest.json: not a prune2tvm package"),
    "two tops": ([_file("a/manifest.json"), _file("b/model.so")], "members under 2 top directories"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarballs_are_refused_and_nothing_is_extracted(tmp_path, case):
    members, message = HOSTILE[case]
    archive = _tar(tmp_path / "bad.tar.gz", members)
    result = runtime(archive, "--extract", tmp_path / "dest")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dest").exists() and not Path("/tmp/prune2tvm-escape").exists()
    assert not (tmp_path.parent / "escape").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar.gz"]  # no partial directory left behind


def test_truncated_and_tampered_packages_are_refused(built, tmp_path):
    tmp, _ = built
    data = (tmp / "mlp.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    result = runtime(tmp_path / "cut.tar.gz", "--extract", tmp_path / "dest")
    assert result.returncode == 2 and "not a readable .tar.gz (truncated" in result.stderr
    (tmp_path / "text.tar.gz").write_text("not gzip at all")
    result = runtime(tmp_path / "text.tar.gz", "--inputs", _feeds(tmp_path), "--outputs", tmp_path / "o.npz")
    assert result.returncode == 2 and "not a readable .tar.gz" in result.stderr
    # A package whose library was swapped after packaging: the checksum catches it.
    directory = copy_artifact(built, tmp_path)
    (directory / "model.so").write_bytes(b"\x7fELF not the library")
    with tarfile.open(tmp_path / "swapped.tar.gz", "w:gz") as tar:
        tar.add(directory, arcname="swapped")
    result = runtime(tmp_path / "swapped.tar.gz", "--extract", tmp_path / "dest")
    assert result.returncode == 2 and "model.so does not match its sha256" in result.stderr
    assert not (tmp_path / "dest").exists() and not (tmp_path / "o.npz").exists()


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="Debian's gcc-aarch64-linux-gnu is not installed (make cross installs it)")
def test_aarch64_artifact_is_an_arm64_elf_and_refused_on_x86(built, tmp_path):
    tmp, onnx_path = built
    result = invoke("compile", str(onnx_path), "--target", "aarch64", "--batch-size", "3", "--bsr", "1",
                    "--sparsity", "0.5", "-o", str(tmp_path / "arm"))
    assert result.exit_code == 0, result.output
    header = (tmp_path / "arm" / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    manifest = json.loads((tmp_path / "arm" / "manifest.json").read_text())
    assert manifest["machine"]["arch"] == "aarch64" and "asimd" in manifest["machine"]["cpu_features"]
    assert not manifest["verified"] and "aarch64" in manifest["not_verified_reason"]
    result = runtime(tmp_path / "arm", "--inputs", _feeds(tmp_path), "--outputs", tmp_path / "o.npz")
    assert result.returncode == 2 and "is built for aarch64 CPUs; this machine is x86_64" in result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed, so a CUDA artifact cannot be built")
def test_cuda_artifact_builds_here_and_asks_for_a_gpu(built, tmp_path):
    tmp, onnx_path = built
    result = invoke("compile", str(onnx_path), "--target", "cuda", "--batch-size", "3", "-o", str(tmp_path / "gpu"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["machine"] == {"kind": "cuda", "arch": "x86_64", "cuda_arch": "sm_80", "cpu_features": []}
    assert manifest["device_code"] == "generated CUDA source compiled with nvcc for sm_80"
    assert (tmp_path / "gpu" / "model.so").read_bytes()[:4] == b"\x7fELF"
    result = runtime(tmp_path / "gpu", "--inputs", _feeds(tmp_path), "--outputs", tmp_path / "o.npz")
    assert result.returncode == 2 and "is a CUDA build (sm_80) and this machine has no NVIDIA GPU" in result.stderr
