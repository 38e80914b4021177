"""Hostile and broken input across the verbs, table-driven: each case must exit with status
2, print exactly one line naming the problem (no traceback), and write nothing at all.

A case is (id, argv, setup, message): ``setup(case_dir)`` writes the bad input into the
case's own directory and returns the placeholders of ``argv``; ``{model}`` and ``{art}``
are a good ONNX model and its compiled artifact, shared by all cases and checked to be
left untouched too. argv[0] ``runtime`` is ``python -m prune2tvm.runtime``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper, save

from conftest import REPO, TINY_PIPELINE

ROWS, K, N = 2, 16, 8


def onnx_model(path: Path, opset: int = 17, dims=("batch", K), extra_nodes=(), domains=(), external=None,
               broken=False) -> Path:
    """MatMul by a constant, Add, Relu: a good model unless the arguments make it bad."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")
    if external is not None:  # the weight's bytes in another file
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", str(K * N * 4))):
            w.external_data.add(key=key, value=value)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "undefined" if broken else "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"]), *extra_nodes]
    out = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "faults", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [dims[0], N])], [w, b])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    save(helper.make_model(graph, ir_version=8, opset_imports=opsets), str(path))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A good model, and its artifact compiled for ROWS rows."""
    from prune2tvm.cli import cli

    root = tmp_path_factory.mktemp("good")
    model = onnx_model(root / "model.onnx")
    result = CliRunner().invoke(cli, ["compile", str(model), "-b", str(ROWS), "-o", str(root / "art")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


# --------------------------------------------------------------------------- bad inputs, made


def write(name: str, content: bytes | str):
    def setup(d: Path):
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return {"f": p}
    return setup


def model_file(**kwargs):
    def setup(d: Path):
        return {"f": onnx_model(d / "m.onnx", **kwargs)}
    return setup


def truncated_model(d: Path):
    whole = onnx_model(d / "whole.onnx").read_bytes()
    (d / "whole.onnx").unlink()
    (d / "m.onnx").write_bytes(whole[: len(whole) // 2])
    return {"f": d / "m.onnx"}


def custom_ops(d: Path):
    nodes = [helper.make_node("Foo", ["y"], ["z"], domain="com.example"),
             helper.make_node("Bar", ["z"], ["t"], domain="com.example")]
    return {"f": onnx_model(d / "m.onnx", extra_nodes=nodes, domains=["com.example"])}


def directory(d: Path):
    (d / "m.onnx").mkdir()
    return {"f": d / "m.onnx"}


def existing_output(d: Path):
    (d / "out").mkdir()
    (d / "out" / "old.txt").write_text("a finished result")
    return {}


def foreign_database(d: Path):
    (d / "db").mkdir()
    (d / "db" / "meta.json").write_text(json.dumps({"format_version": 1, "tvm_version": "0.20.0"}))
    return {}


def arrays(**named):
    def setup(d: Path):
        np.savez(d / "in.npz", **named)
        return {"f": d / "in.npz"}
    return setup


def good_x(dtype=np.float32, rows=ROWS, fill=None):
    x = np.ones((rows, K), dtype=dtype)
    if fill is not None:
        x.flat[:3] = fill
    return x


def pickled_npz(d: Path):
    np.savez(d / "in.npz", x=np.array([{"evil": 1}], dtype=object))
    return {"f": d / "in.npz"}


def npy_named_npz(d: Path):
    with open(d / "in.npz", "wb") as f:
        np.save(f, good_x())
    return {"f": d / "in.npz"}


def outputs_exist(d: Path):
    np.savez(d / "in.npz", x=good_x())
    (d / "out.npz").write_bytes(b"earlier outputs")
    return {"f": d / "in.npz"}


def tar_with(member: str, link: str | None = None):
    def setup(d: Path):
        with tarfile.open(d / "p.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo(member)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = 4
                tar.addfile(info, io.BytesIO(b"evil"))
        return {"f": d / "p.tar.gz"}
    return setup


def copied_artifact(change):
    def setup(d: Path):
        shared_root = Path(os.environ["FAULTS_SHARED"])
        shutil.copytree(shared_root / "art", d / "art")
        change(d / "art")
        return {"a": d / "art"}
    return setup


def unverified(art: Path):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["verified"] = False
    (art / "manifest.json").write_text(json.dumps(manifest))


def tampered(art: Path):
    with open(art / "model.so", "ab") as f:
        f.write(b"\0")


def no_manifest(art: Path):
    (art / "manifest.json").unlink()


def checkpoint(obj):
    def setup(d: Path):
        import torch

        torch.save(obj() if callable(obj) else obj, d / "c.pt")
        return {"f": d / "c.pt"}
    return setup


def unsafe_pickle(d: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    (d / "c.pt").write_bytes(pickle.dumps(Evil()))
    return {"f": d / "c.pt"}


def truncated_checkpoint(d: Path):
    import torch

    from prune2tvm.models import build_model

    torch.save(build_model("mlp", (1, 8, 8), 10).state_dict(), d / "whole.pt")
    data = (d / "whole.pt").read_bytes()
    (d / "whole.pt").unlink()
    (d / "c.pt").write_bytes(data[: len(data) // 2])
    return {"f": d / "c.pt"}


def mlp_state(change):
    def make():
        from prune2tvm.models import build_model

        state = build_model("mlp", (1, 8, 8), 10).state_dict()
        return change(state)
    return make


def drop_first(state):
    state.pop(next(iter(state)))
    return state


def widen_first(state):
    import torch

    key = next(iter(state))
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    return state


def pipeline(text: str):
    return write("p.yaml", text)


def tiny_with(old: str, new: str):
    assert old in TINY_PIPELINE
    return pipeline(TINY_PIPELINE.replace(old, new))


def blocked_output(d: Path):
    (d / "blocker").write_text("a file where a directory would go")
    return tiny_with("seed: 3", "seed: 3")(d)


def target_file(text: str):
    return write("t.yaml", text)


NOTHING = lambda d: {}  # noqa: E731

CASES = [
    # ONNX models (compile and tune)
    ("onnx-missing", ["compile", "{d}/none.onnx", "-o", "{d}/out"], NOTHING, "no such file (expected ONNX model)"),
    ("onnx-empty", ["compile", "{f}", "-o", "{d}/out"], write("m.onnx", b""), "empty file (expected ONNX model)"),
    ("onnx-directory", ["compile", "{f}", "-o", "{d}/out"], directory, "is a directory"),
    ("onnx-not-onnx", ["compile", "{f}", "-o", "{d}/out"], write("m.onnx", b"\x00\xffnot protobuf\xff" * 20),
     "not a readable ONNX model"),
    ("onnx-text", ["compile", "{f}", "-o", "{d}/out"], write("m.onnx", "hello, I am a text file\n"),
     "ONNX model"),
    ("onnx-truncated", ["compile", "{f}", "-o", "{d}/out"], truncated_model, "not a readable ONNX model"),
    ("onnx-checker", ["compile", "{f}", "-o", "{d}/out"], model_file(broken=True), "fails onnx.checker"),
    ("onnx-opset-too-old", ["compile", "{f}", "-o", "{d}/out"], model_file(opset=7), "opset 7 is too old"),
    ("onnx-opset-too-new", ["compile", "{f}", "-o", "{d}/out"], model_file(opset=99), "opset 99 is newer"),
    ("onnx-dynamic-shape", ["compile", "{f}", "-o", "{d}/out"], model_file(dims=("batch", "features")),
     "input 'x' [?, ?] has no size for dimension 1 (counting from 0); give a static shape, e.g. --input-shape x=1,128"),
    ("onnx-unsupported-ops", ["compile", "{f}", "-o", "{d}/out"], custom_ops,
     "does not support these ops: Bar, Foo"),
    ("onnx-external-outside", ["compile", "{f}", "-o", "{d}/out"], model_file(external="../../etc/passwd"),
     "points outside the model's directory"),
    ("onnx-external-missing", ["compile", "{f}", "-o", "{d}/out"], model_file(external="w.bin"),
     "needs external data 'w.bin'"),
    ("tune-onnx-unsupported", ["tune", "{f}", "--db", "{d}/db", "-o", "{d}/out"], custom_ops,
     "does not support these ops"),
    # compile options
    ("input-shape-unknown-name", ["compile", "{model}", "--input-shape", "y=1,16", "-o", "{d}/out"], NOTHING,
     "has no input 'y'"),
    ("input-shape-no-name", ["compile", "{model}", "--input-shape", "1,16", "-o", "{d}/out"], NOTHING,
     "is not NAME=D0,D1"),
    ("input-shape-misfit", ["compile", "{model}", "--input-shape", "x=1,17", "-o", "{d}/out"], NOTHING,
     "does not fit"),
    ("input-shape-zero", ["compile", "{model}", "--input-shape", "x=0,16", "-o", "{d}/out"], NOTHING,
     "is not a shape"),
    ("bsr-zero", ["compile", "{model}", "--bsr", "0", "-o", "{d}/out"], NOTHING, "--bsr 0 is not a valid block size"),
    ("bsr-not-integer", ["compile", "{model}", "--bsr", "four", "-o", "{d}/out"], NOTHING,
     "'four' is not a valid integer"),
    ("bsc-without-bsr", ["compile", "{model}", "--bsc", "2", "-o", "{d}/out"], NOTHING, "--bsc needs --bsr"),
    ("sparsity-over-one", ["compile", "{model}", "--bsr", "4", "--sparsity", "1.5", "-o", "{d}/out"], NOTHING,
     "--sparsity 1.5 is not valid"),
    ("sparsity-without-bsr", ["compile", "{model}", "--sparsity", "0.8", "-o", "{d}/out"], NOTHING,
     "--sparsity 0.8 needs --bsr"),
    ("sparsity-word", ["compile", "{model}", "--bsr", "4", "--sparsity", "most", "-o", "{d}/out"], NOTHING,
     "valid: a number in [0, 1] or auto"),
    ("batch-size-zero", ["compile", "{model}", "-b", "0", "-o", "{d}/out"], NOTHING, "--batch-size"),
    ("target-unknown", ["compile", "{model}", "-t", "tpu", "-o", "{d}/out"], NOTHING, "unknown target 'tpu'"),
    ("target-string-with-options", ["compile", "{model}", "-t", "llvm -mcpu=skylake", "-o", "{d}/out"], NOTHING,
     "unknown target"),
    ("target-file-bad-kind", ["compile", "{model}", "-t", "{f}", "-o", "{d}/out"],
     target_file("version: 1\nname: mine\ntvm: {kind: opencl}\n"), "is not supported"),
    ("target-file-syntax", ["targets", "show", "{f}"], target_file("version: 1\nname: [mine\n"),
     "line 3, column 1: YAML syntax error"),
    ("output-exists", ["compile", "{model}", "-o", "{d}/out"], existing_output, "pass --force"),
    ("db-missing", ["compile", "{model}", "--db", "{d}/nodb", "-o", "{d}/out"], NOTHING, "no tuning database there"),
    ("db-foreign", ["compile", "{model}", "--db", "{d}/db", "-o", "{d}/out"], foreign_database,
     "use another --db directory"),
    # tune options
    ("tune-trials-zero", ["tune", "{model}", "--trials", "0", "--db", "{d}/db", "-o", "{d}/out"], NOTHING, "--trials"),
    ("tune-time-limit-negative", ["tune", "{model}", "--time-limit", "-1", "--db", "{d}/db", "-o", "{d}/out"],
     NOTHING, "--time-limit -1.0 must be positive"),
    ("tune-rpc-key-alone", ["tune", "{model}", "--rpc-key", "k", "--db", "{d}/db", "-o", "{d}/out"], NOTHING,
     "--rpc-key needs --rpc-tracker"),
    ("tune-rpc-tracker-malformed", ["tune", "{model}", "--rpc-tracker", "localhost", "--rpc-key", "k", "--db",
                                    "{d}/db", "-o", "{d}/out"], NOTHING, "is not HOST:PORT"),
    ("tune-rpc-tracker-unreachable", ["tune", "{model}", "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k", "--db",
                                      "{d}/db", "-o", "{d}/out"], NOTHING, "cannot reach the RPC tracker"),
    ("tune-cuda-without-gpu", ["tune", "{model}", "-t", "cuda", "--db", "{d}/db", "-o", "{d}/out"], NOTHING,
     "--rpc-tracker"),
    ("tune-db-foreign", ["tune", "{model}", "--db", "{d}/db", "-o", "{d}/out"], foreign_database,
     "use another --db directory"),
    # bench, verify, package and the runtime, on the shared artifact
    ("bench-no-artifact", ["bench", "{d}/none", "--onnx", "{model}"], NOTHING, "no such artifact directory"),
    ("bench-other-model", ["bench", "{art}", "--onnx", "{f}"], model_file(opset=16), "is not the model"),
    ("bench-json-exists", ["bench", "{art}", "--onnx", "{model}", "--json", "{f}"], write("b.json", "{}"),
     "b.json already exists; pass --force to replace it"),
    ("bench-rounds-over-repeat", ["bench", "{art}", "--onnx", "{model}", "--repeat", "2", "--rounds", "5"], NOTHING,
     "--rounds 5 exceeds --repeat 2"),
    ("verify-nan-inputs", ["verify", "{art}", "--onnx", "{model}", "--inputs", "{f}"],
     arrays(x=good_x(fill=np.nan)), "holds 3 NaN/Inf value(s)"),
    ("verify-garbage-inputs", ["verify", "{art}", "--onnx", "{model}", "--inputs", "{f}"],
     write("in.npz", b"PK\x03\x04 not really a zip"), "not a readable numpy file"),
    ("package-unverified", ["package", "{a}", "-o", "{d}/p.tar.gz"], copied_artifact(unverified),
     "is not verified against onnxruntime"),
    ("package-tampered", ["package", "{a}", "-o", "{d}/p.tar.gz"], copied_artifact(tampered),
     "model.so does not match its sha256"),
    ("package-bad-name", ["package", "{art}", "-o", "{d}/p.zip"], NOTHING, "must end in .tar.gz"),
    ("runtime-shape", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"],
     arrays(x=np.ones((ROWS, K + 1), np.float32)), "the build takes float32[2, 16]"),
    ("runtime-dtype", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"],
     arrays(x=good_x(np.float64)), "is float64[2, 16]"),
    ("runtime-missing-input", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"],
     arrays(z=good_x()), "missing input 'x'"),
    ("runtime-npy-named-npz", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"],
     npy_named_npz, "holds one array, not arrays keyed by input name"),
    ("runtime-unknown-input", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"],
     arrays(x=good_x(), z=good_x()), "unknown input 'z'"),
    ("runtime-inf", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"],
     arrays(x=good_x(fill=np.inf)), "NaN/Inf"),
    ("runtime-pickled-inputs", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"], pickled_npz,
     "not a readable numpy file"),
    ("runtime-outputs-exist", ["runtime", "{art}", "--inputs", "{f}", "--outputs", "{d}/out.npz"], outputs_exist,
     "pass --force"),
    ("runtime-no-manifest", ["runtime", "{a}", "--inputs", "{d}/in.npz", "--outputs", "{d}/out.npz"],
     copied_artifact(no_manifest), "manifest.json is missing"),
    ("runtime-tar-traversal", ["runtime", "{f}", "--extract", "{d}/x"], tar_with("../evil"), "refusing to extract"),
    ("runtime-tar-link", ["runtime", "{f}", "--extract", "{d}/x"], tar_with("p/link", "/etc/passwd"),
     "is a link"),
    ("runtime-unknown-option", ["runtime", "{art}", "--speed", "max"], NOTHING, "unrecognized arguments"),
    # checkpoints (export and prune)
    ("checkpoint-unsafe-pickle", ["export", "{f}", "-m", "mlp", "-o", "{d}/m.onnx"], unsafe_pickle,
     "not a safe state-dict checkpoint"),
    ("checkpoint-not-a-state-dict", ["export", "{f}", "-m", "mlp", "-o", "{d}/m.onnx"],
     checkpoint(lambda: [1, 2, 3]), "not a state dict"),
    ("checkpoint-missing-key", ["export", "{f}", "-m", "mlp", "-o", "{d}/m.onnx"],
     checkpoint(mlp_state(drop_first)), "checkpoint does not fit the model: missing"),
    ("checkpoint-wrong-shape", ["export", "{f}", "-m", "mlp", "-o", "{d}/m.onnx"],
     checkpoint(mlp_state(widen_first)), "checkpoint does not fit the model: shape"),
    ("checkpoint-truncated", ["export", "{f}", "-m", "mlp", "-o", "{d}/m.onnx"], truncated_checkpoint,
     "not a readable checkpoint (truncated or corrupt"),
    ("checkpoint-missing", ["prune", "{d}/none.pt", "-m", "mlp", "--plan", "{d}/plan.json", "-o", "{d}/p.pt"],
     NOTHING, "no such checkpoint file"),
    ("export-unknown-model", ["export", "{f}", "-m", "alexnet9000", "-o", "{d}/m.onnx"],
     checkpoint(lambda: {}), "alexnet9000"),
    ("export-opset-out-of-range", ["export", "{f}", "-m", "mlp", "--opset", "5", "-o", "{d}/m.onnx"],
     checkpoint(lambda: {}), "--opset"),
    ("export-bad-shape", ["export", "{f}", "-m", "mlp", "--input-shape", "1,0,8", "-o", "{d}/m.onnx"],
     checkpoint(lambda: {}), "is not a shape"),
    # pipeline files (run, sweep, sensitivity)
    ("pipeline-missing", ["run", "{d}/none.yaml", "-o", "{d}/out"], NOTHING, "none.yaml: no such file"),
    ("pipeline-unknown-name", ["run", "nonesuch", "-o", "{d}/out"], NOTHING, "unknown pipeline 'nonesuch'"),
    ("pipeline-syntax", ["run", "{f}", "-o", "{d}/out"], pipeline("version: 1\nname: x\ntrain: {epochs: 3\n"),
     "line 4"),
    ("pipeline-not-a-mapping", ["run", "{f}", "-o", "{d}/out"], pipeline("- just\n- a list\n"),
     "expected a mapping"),
    ("pipeline-empty", ["run", "{f}", "-o", "{d}/out"], pipeline(""), "p.yaml"),
    ("pipeline-unknown-key", ["run", "{f}", "-o", "{d}/out"], tiny_with("seed: 3", "seed: 3\nsed: 4"),
     "sed: unknown key"),
    ("pipeline-wrong-type", ["run", "{f}", "-o", "{d}/out"], tiny_with("epochs: 6", "epochs: six"),
     "train.epochs: expected an integer"),
    ("pipeline-out-of-range", ["run", "{f}", "-o", "{d}/out"], tiny_with("[0.5, 0.8]", "[0.5, 1.5]"),
     "prune.sparsities[1]: 1.5 is out of range"),
    ("pipeline-unknown-model", ["run", "{f}", "-o", "{d}/out"], tiny_with("name: mlp", "name: mlp9"),
     "'mlp9' is not a known model"),
    ("pipeline-file-dataset-without-files", ["run", "{f}", "--data-path", "{d}/nodata", "-o", "{d}/out"],
     tiny_with("model: {name: mlp}", "model: {name: mlp}\ndata: {dataset: cifar10}"), "nodata"),
    ("pipeline-checkpoint-missing", ["run", "{f}", "--checkpoint", "{d}/none.pt", "-o", "{d}/out"],
     tiny_with("seed: 3", "seed: 3"), "none.pt"),
    ("run-target-unknown", ["run", "{f}", "--target", "tpu9", "-o", "{d}/out"], tiny_with("seed: 3", "seed: 3"),
     "unknown target 'tpu9'; valid targets: aarch64, cuda, x86, x86-avx512"),
    ("run-target-not-here", ["run", "{f}", "--target", "aarch64", "-o", "{d}/out"], tiny_with("seed: 3", "seed: 3"),
     "target aarch64 cannot be evaluated on this machine"),
    ("run-output-under-a-file", ["run", "{f}", "-o", "{d}/blocker/out"], blocked_output,
     "cannot write to directory"),
    ("sweep-sparsity-one", ["sweep", "{f}", "--sparsity", "1", "-o", "{d}/out"], tiny_with("seed: 3", "seed: 3"),
     "--sparsity: 1.0 is out of range"),
    ("sensitivity-levels", ["sensitivity", "{f}", "--levels", "0.5,2", "-o", "{d}/out"],
     tiny_with("seed: 3", "seed: 3"), "each level must be in (0, 1)"),
    # reports and the command line itself
    ("report-not-a-run", ["report", "{d}"], NOTHING, "no report.json here"),
    ("report-corrupt", ["report", "{d}"], write("report.json", "{not json"), "not a valid prune2tvm report"),
    ("unknown-verb", ["compress", "{model}"], NOTHING, "No such command 'compress'"),
    ("missing-argument", ["compile"], NOTHING, "Missing argument 'MODEL'"),
]


def tree(*roots: Path) -> dict[str, tuple]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for root in roots if root.exists() for p in [root, *root.rglob("*")]}


def run_case(argv: list[str]) -> tuple[int, str]:
    if argv[0] == "runtime":
        from prune2tvm import runtime

        err, out = io.StringIO(), io.StringIO()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            code = runtime.main(argv[1:])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        finally:
            sys.stdout, sys.stderr = old
        return code, out.getvalue() + err.getvalue()
    from prune2tvm.cli import cli

    with warnings.catch_warnings(record=True) as caught:  # a warning is a line the user sees too
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    return result.exit_code, result.output + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)


def test_the_table_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name, argv, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(shared, tmp_path, monkeypatch, name, argv, setup, message):
    case = tmp_path / "case"
    case.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNE2TVM_CACHE", str(cache))
    monkeypatch.setenv("FAULTS_SHARED", str(shared))
    monkeypatch.chdir(case)  # anything written to a default location would land here
    values = {"d": case, "model": shared / "model.onnx", "art": shared / "art"} | setup(case)
    before = tree(case, cache, shared)
    code, output = run_case([part.format(**values) for part in argv])
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert message in lines[0], lines[0]
    assert "Traceback" not in output and "internal error" not in output
    assert tree(case, cache, shared) == before
    assert not (case / "pwned").exists()


def test_a_real_process_prints_one_line_and_no_traceback(shared, tmp_path):
    """The same promise outside click's test runner: what a user's terminal shows."""
    bad = onnx_model(tmp_path / "m.onnx", opset=7)
    for argv in (["-m", "prune2tvm", "compile", str(bad), "-o", str(tmp_path / "out")],
                 ["-m", "prune2tvm.runtime", str(tmp_path / "none"), "--inputs", "x.npz", "--outputs", "y.npz"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO,
                              env=os.environ | {"PRUNE2TVM_NO_PROGRESS": "1"})
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_debug_shows_the_traceback_for_the_same_input(tmp_path):
    from prune2tvm.cli import cli
    from prune2tvm.errors import InputError

    bad = onnx_model(tmp_path / "m.onnx", opset=7)
    with pytest.raises(InputError, match="opset 7 is too old"):
        CliRunner().invoke(cli, ["--debug", "compile", str(bad), "-o", str(tmp_path / "out")],
                           catch_exceptions=False)


def test_allow_nonfinite_runs_what_the_default_refuses(shared, tmp_path):
    from prune2tvm import runtime

    np.savez(tmp_path / "in.npz", x=good_x(fill=np.nan))
    code = runtime.main([str(shared / "art"), "--inputs", str(tmp_path / "in.npz"), "--outputs",
                         str(tmp_path / "out.npz"), "--allow-nonfinite"])
    assert code == 0
    with np.load(tmp_path / "out.npz") as out:
        y = next(iter(out.values()))
    assert y.shape == (ROWS, N) and np.isfinite(y[1]).all()


def test_written_files_and_directories_get_the_umask_permissions(tmp_path):
    """Artifacts and results are renamed into place from temporary names; they must not keep
    tempfile's private modes (a 0700 artifact directory copied to a device is unreadable to
    the service that runs it)."""
    from prune2tvm import fsutil

    old = os.umask(0o022)
    try:
        with fsutil.staged_dir(tmp_path / "art", force=False) as stage:
            (stage / "manifest.json").write_text("{}")
        fsutil.write_json(tmp_path / "bench.json", {})
        os.umask(0o077)
        fsutil.write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"art": 0o755, "bench.json": 0o644, "private.json": 0o600}
