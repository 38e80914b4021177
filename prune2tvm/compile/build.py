"""Build an ONNX model for a target and check it against onnxruntime.

The phases, in order (each logged with its duration):
  import    ONNX -> Relax IRModule, input shapes made static (frontend.py)
  sparsify  with SparsifyOptions: block-sparse layers -> BSR kernels (passes/), per-layer
            decisions kept in the build's info; without, every layer stays dense
  build     tvm.compile for the target (untuned default schedules; tuning is issue #5)
  verify    run the build and onnxruntime on the same inputs; a miss raises, nothing is kept
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import relax

import prune2tvm
from prune2tvm.compile.frontend import import_onnx
from prune2tvm.compile.target import (build_untuned, device, export_compiler, resolved_target_dict, tvm_target,
                                      vector_lanes)
from prune2tvm.config import TargetConfig
from prune2tvm.errors import BuildError, InputError, NumericalMismatchError, UnsupportedError
from prune2tvm.fsutil import atomic_path, sha256_file, write_json
from prune2tvm.onnxrt import compare, random_feeds, session
from prune2tvm.progress import phase, say

from prune2tvm.runtime import (ARTIFACT_FORMAT, ARTIFACT_VERSION, CPU_FEATURES, LIBRARY_NAME, MANIFEST_NAME,
                               check_files, check_tvm_version, configure_threads, read_manifest,
                               without_native_noise)

configure_threads()  # before any kernel runs in this process, and inherited by tuning workers
TUNING_DIR = "tuning"  # the tuning records a build used, when packed into its artifact


@dataclass
class InputSpec:
    name: str
    shape: list[int]
    dtype: str = "float32"
    batch_axis: int | None = None  # 0 when the ONNX model leaves dimension 0 free (a batch)
    index_bound: int | None = None  # the rows of the table a Gather indexes with this input: larger indices are refused


@dataclass
class Check:
    inputs: str  # "random" or "real"
    max_abs_diff: float
    tolerance: float


DENSE_KERNELS = ("packed", "tvm")


@dataclass(frozen=True)
class SparsifyOptions:
    """``--bsr R --bsc C --sparsity S``: a layer whose fraction of all-zero R x C blocks is at
    least ``threshold`` becomes a BSR kernel; the others stay dense. ``--dense-kernel``: on
    CPUs, what computes a constant-weight layer that stays dense: ``packed`` (prune2tvm's BSR
    kernel with every block stored, within about 1.3x of onnxruntime untuned) or ``tvm``
    (TVM's own op, as fast as ``prune2tvm tune`` makes it). ``bsr=False``: a dense build
    (no layer becomes BSR) that still packs."""

    block: tuple[int, int] = (4, 1)
    threshold: float = 0.5
    auto: bool = False  # measure each layer on the target instead (threshold then ignored)
    dense_kernel: str = "packed"
    bsr: bool = True

    def __post_init__(self) -> None:
        if self.dense_kernel not in DENSE_KERNELS:
            raise InputError(f"dense kernel {self.dense_kernel!r} is not valid; valid: {', '.join(DENSE_KERNELS)}")
        if not self.bsr and self.auto:
            raise InputError("--sparsity auto needs --bsr (the block rows); e.g. --bsr 4 --sparsity auto")
        if self.auto:
            from prune2tvm.compile.auto_select import AUTO_MIN_BLOCK_SPARSITY

            object.__setattr__(self, "threshold", AUTO_MIN_BLOCK_SPARSITY)
        rows, cols = self.block
        if not (isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1):
            raise InputError(f"block {rows}x{cols} is not valid; valid: positive integers, e.g. --bsr 4 --bsc 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"sparsity threshold {self.threshold} is out of range; valid: 0 <= S <= 1")


def dense_options(dense_kernel: str, target: TargetConfig) -> SparsifyOptions | None:
    """A dense build's options (no ``--bsr``): the packed dense kernel on CPUs, or None, TVM's
    ops only (``dense_kernel`` "tvm", or a GPU target, where nothing is packed)."""
    options = SparsifyOptions(bsr=False, dense_kernel=dense_kernel)  # checks the name
    return options if dense_kernel == "packed" and target.kind != "cuda" else None


@dataclass
class CompileInfo:
    """A build's ``manifest.json``: what the runtime checks before it runs the build, and the
    claims the artifact carries (decisions, verification, measurements, checksums)."""

    target: dict  # the TargetConfig as loaded
    tvm_target: dict  # what went to tvm.target.Target, auto values resolved
    inputs: list[InputSpec]
    outputs: list[InputSpec]
    onnx_sha256: str
    machine: dict = field(default_factory=dict)  # kind, arch, cpu_features, cuda_arch: checked by the runtime
    source_model: str = ""  # the ONNX file's name
    tvm_version: str = tvm.__version__
    prune2tvm_version: str = prune2tvm.__version__
    versions: dict = field(default_factory=dict)  # onnx, onnxruntime (the reference it was checked against)
    checks: list[Check] = field(default_factory=list)
    verified: bool = False
    not_verified_reason: str = ""
    device_code: str = ""  # how the device code was checked (cuda: nvcc on the generated source)
    sparsify: dict | None = None  # SparsifyOptions used, or None for a dense build
    tuning_database: str | None = None  # the meta_schedule database applied, if any
    fast_math: bool = False  # erf/exp/tanh/softmax replaced by TVM's fast approximations
    layers: list[dict] = field(default_factory=list)  # one LayerDecision per weight layer
    measured: dict = field(default_factory=dict)  # accuracy and latency of this build, when a run measured them
    library: str = LIBRARY_NAME
    files: dict = field(default_factory=dict)  # every file of the artifact but the manifest -> sha256
    created: str = ""
    format: str = ARTIFACT_FORMAT
    format_version: int = ARTIFACT_VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        for spec in data["inputs"] + data["outputs"]:  # only inputs that index a table have one
            if spec["index_bound"] is None:
                del spec["index_bound"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "CompileInfo":
        data = dict(data)
        data["inputs"] = [InputSpec(**i) for i in data["inputs"]]
        data["outputs"] = [InputSpec(**o) for o in data["outputs"]]
        data["checks"] = [Check(**c) for c in data.get("checks", [])]
        return cls(**data)


def machine_requirements(target: TargetConfig) -> dict:
    """What a machine needs to run this target's code: the runtime refuses it otherwise.
    CPU features are those the target's mcpu / mattr enable, as /proc/cpuinfo names them."""
    if target.kind == "cuda":
        from prune2tvm.runtime import host_arch

        triple = str((target.host or {}).get("mtriple", ""))
        return {"kind": "cuda", "arch": triple.split("-")[0] if triple else host_arch(),
                "cuda_arch": str(target.tvm.get("arch", "")), "cpu_features": []}
    from tvm.target import codegen

    t = tvm_target(target)
    features = sorted(flag for llvm, flag in CPU_FEATURES.items() if codegen.llvm_cpu_has_features(llvm, t))
    return {"kind": target.kind, "arch": target.arch, "cpu_features": features}


def reference_versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def output_specs(mod, names: list[str], inputs: list[InputSpec]) -> list[InputSpec]:
    """Each output's name, static shape and dtype, from the built function's return type."""
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs = []
    for name, ty in zip(names, fields):
        shape = [int(d) for d in ty.shape.values] if getattr(ty, "shape", None) is not None else []
        specs.append(InputSpec(name, shape, str(ty.dtype)))
    batches = {s.shape[0] if s.batch_axis == 0 else None for s in inputs}
    if len(batches) == 1 and None not in batches:  # every input is batched: so is an output of that batch
        batch = batches.pop()
        for spec in specs:
            spec.batch_axis = 0 if spec.shape[:1] == [batch] else None
    return specs


class CompiledModel:
    """A built module plus what is needed to feed it: call it with numpy arrays by name."""

    def __init__(self, module, target: TargetConfig, info: CompileInfo):
        self._module = module
        self.target = target
        self.info = info
        self._vm = None

    @property
    def inputs(self) -> list[InputSpec]:
        return self.info.inputs

    def _machine(self):
        if self._vm is None:
            ok, why = self.target.runs_here()
            if not ok:
                raise UnsupportedError(f"cannot run a {self.target.name} build here: {why}")
            configure_threads(self.target.threads)
            self._vm = relax.VirtualMachine(self._module, device(self.target))
        return self._vm

    def _tensors(self, feeds: dict[str, np.ndarray]) -> list:
        from prune2tvm.runtime import check_feeds

        dev = device(self.target)
        return [tvm.runtime.tensor(a, dev) for a in check_feeds([asdict(s) for s in self.inputs], feeds)]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self._machine()["main"](*self._tensors(feeds))
        return [t.numpy() for t in _flatten(out)]

    def bind(self, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        """A no-argument call of the model on ``feeds``, converted once (for timing). A GPU
        call returns before its kernels finish, so it ends with a device sync; a CPU call
        has finished when it returns, and its sync, a no-op that took 0.18 us per call
        through the FFI, is left out (2 % of a one-row 3072->768 BSR layer)."""
        fn = self._machine()["main"]
        tensors = self._tensors(feeds)
        if self.target.kind != "cuda":
            return lambda: fn(*tensors)
        sync = device(self.target).sync

        def call() -> None:
            fn(*tensors)
            sync()

        return call

    def save(self, directory: str | os.PathLike, include_tuning: bool = False) -> Path:
        """Write the artifact: the library, with ``include_tuning`` the tuning records it was
        built with (under ``tuning/``), then ``manifest.json`` with every file's sha256, last."""
        import datetime

        directory = Path(directory)
        with atomic_path(directory / LIBRARY_NAME) as tmp:
            library = tmp.with_suffix(".so")
            fcompile = export_compiler(self.target)
            with without_native_noise():
                self._module.export_library(str(library), **({"fcompile": fcompile} if fcompile else {}))
            os.replace(library, tmp)
        if include_tuning and self.info.tuning_database:
            for record in sorted(Path(self.info.tuning_database).glob("*.json")):
                (directory / TUNING_DIR).mkdir(exist_ok=True)
                shutil.copyfile(record, directory / TUNING_DIR / record.name)
        self.info.files = {p.relative_to(directory).as_posix(): sha256_file(p)
                           for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
        self.info.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(directory / MANIFEST_NAME, self.info.to_json())
        return directory


def _flatten(out) -> list:
    if isinstance(out, tvm.runtime.Tensor):
        return [out]
    return [t for item in out for t in _flatten(item)]


@dataclass
class PreparedModel:
    """What ``compile_onnx`` builds: the imported module (static shapes, BSR-rewritten),
    its inputs and outputs, and the per-layer decisions. ``tune`` tunes it, then builds it."""

    mod: "tvm.IRModule"
    inputs: list[InputSpec]
    outputs: list[str]
    layers: list[dict]
    bsr_kernels: list = field(default_factory=list)  # BsrKernelSpec per tunable BSR kernel
    dense_probes: list = field(default_factory=list)  # --sparsity auto: each measured layer's dense module


def prepare_module(onnx_path: str | os.PathLike, target: TargetConfig, input_shapes: dict[str, list[int]],
                   sparsify: SparsifyOptions | None = None, database=None, fast_math: bool = False) -> PreparedModel:
    """Import and rewrite; BSR kernels take their tuned parameters from ``database``. With
    ``fast_math``, erf, exp, tanh and softmax become TVM's fast approximations (vectorisable
    polynomials instead of libm calls; the build is still checked against onnxruntime)."""
    import onnx

    from prune2tvm.onnx_input import graph_io, input_types

    model = onnx.load(str(onnx_path), load_external_data=False)
    onnx_inputs, outputs = graph_io(model)
    types = input_types(model)
    del model
    names = [name for name, _ in onnx_inputs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise InputError(f"{onnx_path}: no input named {', '.join(unknown)}; its inputs: {', '.join(names)}")
    inputs = []
    for name, dims in onnx_inputs:
        shape = input_shapes.get(name, dims)
        if shape is None or any(d is None or d <= 0 for d in shape):
            raise InputError(f"{onnx_path}: input {name!r} has dynamic shape {dims}; give a static shape for it")
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise InputError(f"{onnx_path}: input {name!r} has shape {dims} in the model; cannot build it for "
                             f"{list(shape)} (only dynamic dimensions can be set)")
        dtype, bound = types[name]
        inputs.append(InputSpec(name, [int(d) for d in shape], dtype, 0 if dims and dims[0] is None else None, bound))

    with phase("import", f"{Path(onnx_path).name} with {', '.join(f'{s.name}{s.shape}' for s in inputs)}"):
        mod = import_onnx(onnx_path, {s.name: s.shape for s in inputs})
    layers, specs, probes = [], {}, []
    if sparsify is not None:
        rule = "auto (measured per layer)" if sparsify.auto else f"threshold {sparsify.threshold:g}"
        what = f"{sparsify.block[0]}x{sparsify.block[1]} blocks, {rule}" if sparsify.bsr else "no BSR"
        with phase("sparsify", f"{what}, dense layers: {sparsify.dense_kernel} kernel"):
            from prune2tvm.compile.bsr_tune import BsrRecords

            records = BsrRecords.open(database.path) if database is not None else None
            mod, decisions = sparsify_module(mod, onnx_path, target, sparsify, records, specs, database, probes)
            layers = [d.to_json() for d in decisions]
            from prune2tvm.compile.passes.activation_matmul import PRODUCT
            from prune2tvm.compile.passes.decisions import PACKED

            bsr, packed = sum(d.kind == "bsr" for d in decisions), sum(PACKED in d.reason for d in decisions)
            products = sum(d.reason.startswith(PRODUCT) for d in decisions)
            say(f"  of {len(decisions) - products} weight layers, {bsr} rewritten to BSR, {packed} packed dense"
                + (f"; {products} products of two activations" if products else ""))
    if fast_math:
        mod = relax.transform.FastMathTransform()(mod)
    elif target.kind != "cuda" and (count := libm_ops(mod)):
        say(f"  {count} softmax/exp/erf/tanh ops call libm per element; --fast-math vectorises them "
            f"(TVM's approximations, a few units in the last place; still checked against onnxruntime)")
    return PreparedModel(mod, inputs, outputs, layers, list(specs.values()), probes)


FAST_MATH_OPS = ("relax.nn.softmax", "relax.exp", "relax.erf", "relax.tanh")  # what FastMathTransform replaces


def libm_ops(mod: tvm.IRModule) -> int:
    """How many of ``mod``'s Relax calls ``--fast-math`` would replace. Untuned BERT-base at 90 %
    4x1 (its GELU's erf, its softmax): 24.1 ms without, 14.1 ms with (``benchmarks/bsr_models.py``)."""
    calls = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) and
                                            isinstance(e.op, tvm.ir.Op) and e.op.name in FAST_MATH_OPS else None)
    return len(calls)


def compile_onnx(onnx_path: str | os.PathLike, target: TargetConfig, input_shapes: dict[str, list[int]],
                 real_feeds: dict[str, np.ndarray] | None = None, seed: int = 0,
                 rtol: float = 1e-4, atol: float = 1e-5, sparsify: SparsifyOptions | None = None,
                 database=None, prepared: PreparedModel | None = None, fast_math: bool = False) -> CompiledModel:
    """Import, rewrite, build (with a tuning database's schedules when given) and, where the
    target runs here, verify against onnxruntime. ``prepared`` skips the import and rewrite
    (``prepare_module``'s result for the same arguments)."""
    if prepared is None:
        prepared = prepare_module(onnx_path, target, input_shapes, sparsify, database, fast_math)
    mod, specs, outputs, layers = prepared.mod, prepared.inputs, prepared.outputs, prepared.layers
    target_dict = resolved_target_dict(target)
    tuned = f", tuned schedules from {database.path}" if database is not None else ""
    with phase("build", f"target {target.name}: {json.dumps(target_dict)}{tuned}"):
        try:
            if database is not None:
                from prune2tvm.compile.tune import build_with_database

                executable = build_with_database(mod, target, database)
            else:
                executable = build_untuned(mod, target)
        except Exception as exc:  # TVM raises its own error types from C++
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise BuildError(f"TVM cannot build {Path(onnx_path).name} for {target.name}: {last}") from None
    info = CompileInfo(target=target.to_dict(), tvm_target=target_dict, inputs=specs,
                       outputs=output_specs(mod, outputs, specs), onnx_sha256=sha256_file(onnx_path),
                       machine=machine_requirements(target), source_model=Path(onnx_path).name,
                       versions=reference_versions(), layers=layers,
                       sparsify=None if sparsify is None else asdict(sparsify),
                       tuning_database=None if database is None else str(database.path), fast_math=fast_math)
    if target.kind == "cuda":
        info.device_code = check_cuda_source(executable, target)
    compiled = CompiledModel(executable, target, info)
    verify_against_onnxruntime(compiled, onnx_path, real_feeds, seed, rtol, atol)
    return compiled


def sparsify_module(mod, onnx_path, target: TargetConfig, options: SparsifyOptions, records=None,
                    specs: dict | None = None, database=None, probes: list | None = None):
    """Run the BSR rewrite passes (conv2d, then dense) with the kernels for the target;
    with ``options.auto``, each eligible layer is measured and kept dense unless BSR wins
    (dense with the schedules of ``database`` where it has them; each measured layer's dense
    module is added to ``probes``)."""
    import onnx

    from prune2tvm.compile.frontend import WeightNames

    names = WeightNames(onnx.load(str(onnx_path)))
    select = None
    pack = options.dense_kernel == "packed"
    if options.auto:
        from prune2tvm.compile.auto_select import LayerTimer

        def probe_as(threshold: float):  # a measured layer's module as the build makes it, searched parameters too
            return lambda m: run_sparsify_passes(m, target, options.block, threshold, records=records, pack=True)[0]

        select = LayerTimer(target, probe_as(0.0), database, to_dense=probe_as(math.inf) if pack else None)
    threshold = options.threshold if options.bsr else math.inf
    mod, decisions = run_sparsify_passes(mod, target, options.block, threshold, names.lookup, select,
                                         records, specs, pack)
    if select is not None and probes is not None:
        probes.extend(select.probes)
    return mod, decisions


TUNING_KEY = "prune2tvm.tuning_key"  # PrimFunc attribute: the BSR tuner's key of the kernel


def run_sparsify_passes(mod, target: TargetConfig, block: tuple[int, int], threshold: float, names=None, select=None,
                        records=None, specs: dict | None = None, pack: bool = False):
    """The BSR rewrite passes with the target's kernels. CPU kernels take their
    parameters from ``records`` (``BsrRecords`` of the tuning database) where it has them, and
    each is entered in ``specs`` (key -> ``BsrKernelSpec``) for the BSR tuner. ``pack``: on
    CPUs, layers that stay dense run the packed dense kernel."""
    from prune2tvm.compile.bsr_tune import BsrKernelSpec, kernel_key
    from prune2tvm.compile.kernels.bsr_conv2d import bsr_conv2d_cpu, conv_search_space, wrap_min_rows
    from prune2tvm.compile.kernels.depthwise_conv2d import depthwise_conv2d_cpu
    from prune2tvm.compile.kernels.bsr_matmul import (NO_EPILOGUE, BsrMatmulShape, bsr_matmul_cpu, bsr_matmul_cuda,
                                                      search_space)
    from prune2tvm.compile.kernels.windowed_gemv import cpu_layout
    from prune2tvm.compile.passes.activation_matmul import rewrite_activation_matmuls
    from prune2tvm.compile.passes.decisions import in_graph_order
    from prune2tvm.compile.passes.fuse_epilogue import fuse_epilogues
    from prune2tvm.compile.passes.fuse_expand_depthwise import fuse_expand_depthwise
    from prune2tvm.compile.passes.sparsify_conv2d import sparsify_conv2d
    from prune2tvm.compile.passes.sparsify_dense import sparsify_dense

    conv_decisions, kernels = [], {}
    if target.kind == "cuda":
        def kernel(rows, bsr, epilogue):
            return bsr_matmul_cuda(BsrMatmulShape(rows, bsr.shape[1], bsr.shape[0], bsr.block, bsr.nnzb),
                                   epilogue=epilogue)
        # No GPU conv kernel yet: convs stay dense there (dlight schedules them).
    else:
        lanes = simd_lanes(target)
        target_spec = resolved_target_dict(target)
        cores = int(target_spec.get("num-cores") or 0) or None  # how many tasks the many-rows kernels make

        def tunable(func, key: str):
            return func.with_attr(TUNING_KEY, key)

        def tuned_params(key: str, spec) -> dict:
            """The recorded parameters for kernel ``key`` ({} = defaults); enters ``spec()`` in ``specs``."""
            if specs is not None and key not in specs:
                specs[key] = spec()
            return (records.params(key) if records is not None else None) or {}

        layouts = {}  # (rows, id(matrix)) -> (matrix, its kernel's shape and arrays); the matrix held keeps its id

        def layout(rows, bsr):
            """The layer's kernel shape and weight arrays (the windowed layout for few rows and
            narrow blocks), made once per layer: every epilogue variant and the call share them."""
            if (rows, id(bsr)) not in layouts:
                layouts[(rows, id(bsr))] = (bsr, cpu_layout(rows, bsr, lanes))
            return layouts[(rows, id(bsr))][1]

        def kernel(rows, bsr, epilogue):
            shape, arrays = layout(rows, bsr)
            key = kernel_key("matmul-windowed" if shape.slots else "matmul", shape, lanes, [bsr.indptr, bsr.indices])
            params = tuned_params(key, lambda: BsrKernelSpec(
                key, f"matmul {rows}x{shape.inputs}->{shape.outputs} {shape.block[0]}x{shape.block[1]} "
                f"({bsr.nnzb} blocks{f', {shape.slots} windowed slots' if shape.slots else ''})",
                lambda p: bsr_matmul_cpu(shape, lanes, epilogue=NO_EPILOGUE, cores=cores, **p),
                search_space(shape, lanes), arrays, [rows, shape.inputs], [rows, shape.outputs], shape.outputs))
            return tunable(bsr_matmul_cpu(shape, lanes=lanes, epilogue=epilogue, cores=cores, **params), key)

        def conv_kernel(shape, epilogue, data, indptr, offsets):
            key = kernel_key("conv2d", shape, lanes, [indptr, offsets])
            params = tuned_params(key, lambda: BsrKernelSpec(
                key, f"conv2d {shape.in_channels}->{shape.out_channels} {shape.kernel[0]}x{shape.kernel[1]} "
                f"{shape.out[0]}x{shape.out[1]} {shape.block[0]}x{shape.block[1]} ({shape.nnzb} blocks)",
                lambda p: bsr_conv2d_cpu(shape, lanes, NO_EPILOGUE, **p), conv_search_space(shape, lanes),
                [data, offsets, indptr], [shape.batch, shape.image_size],
                [shape.batch, shape.out_channels, *shape.out], shape.out_channels, residual_slot=True))
            return tunable(bsr_conv2d_cpu(shape, lanes, epilogue, **params), key)

        def depthwise_kernel(shape, epilogue):
            return depthwise_conv2d_cpu(shape, lanes, epilogue)

        mod, conv_decisions = sparsify_conv2d(mod, block, threshold, conv_kernel, names, select, kernels,
                                              depthwise_kernel, pack, lanes,
                                              wrap_min_rows(str(target_spec.get("mcpu", ""))))
    mod, dense_decisions = sparsify_dense(mod, block, threshold, kernel, names, select, kernels,
                                          pack and target.kind != "cuda",
                                          None if target.kind == "cuda" else (lambda rows, bsr: layout(rows, bsr)[1]))
    mod = fuse_epilogues(mod, kernels)
    if target.kind != "cuda":
        mod = fuse_expand_depthwise(mod, kernels, lanes)
        if pack:
            mod = rewrite_activation_matmuls(mod, lanes)
    if specs:  # a kernel fused into another (a 1x1 conv into its depthwise conv) no longer runs: not worth tuning
        running = {str(f.attrs[TUNING_KEY]) for f in mod.functions.values()
                   if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and TUNING_KEY in f.attrs}
        for key in [key for key in specs if key not in running]:
            del specs[key]
    return mod, in_graph_order(conv_decisions + dense_decisions)


def simd_lanes(target: TargetConfig) -> int:
    """float32 lanes of the target CPU's widest vectors (AVX-512: 16, AVX2: 8, NEON/SSE: 4)."""
    return vector_lanes(tvm_target(target))


def check_cuda_source(executable, target: TargetConfig) -> str:
    """Compile the generated CUDA source with nvcc for the target's arch.

    TVM 0.27 embeds CUDA *source* in the library, compiled when it is loaded on the GPU; this
    proves here, before anything ships, that every kernel compiles for that GPU.
    """
    import shutil

    from tvm.support import nvcc

    arch = str(target.tvm.get("arch", ""))
    if shutil.which("nvcc") is None:
        return f"not checked: nvcc is not installed (kernels compile for {arch} when loaded on the GPU)"
    sources = cuda_sources(executable)
    if not sources:
        return "no CUDA kernels"
    with phase("nvcc", f"compile {len(sources)} CUDA module(s) for {arch}"):
        for source in sources:
            try:
                with tvm_target(target):
                    nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc")
            except Exception as exc:  # nvcc's errors come back as RuntimeError with its log
                lines = [line for line in str(exc).splitlines() if "error" in line.lower()] or [str(exc)]
                raise BuildError(f"nvcc cannot compile the generated CUDA code for {arch}: {lines[0].strip()}") from None
    return f"generated CUDA source compiled with nvcc for {arch}"


def cuda_sources(executable) -> list[str]:
    """The CUDA C source of every CUDA module in a build."""
    def walk(module):
        yield module
        for sub in module.imports:
            yield from walk(sub)

    return [m.inspect_source("") for m in walk(executable.mod) if m.kind == "cuda"]


def verify_against_onnxruntime(compiled: CompiledModel, onnx_path: str | os.PathLike,
                               real_feeds: dict[str, np.ndarray] | None, seed: int,
                               rtol: float, atol: float) -> None:
    info = compiled.info
    ok, why = compiled.target.runs_here()
    if not ok:
        info.verified, info.not_verified_reason = False, f"not run here: {why}"
        return
    rng = np.random.default_rng(seed)
    cases = [("random", random_feeds(info.inputs, rng))]
    if real_feeds is not None:
        cases.append(("real", real_feeds))
    reference = session(onnx_path)
    with phase("verify", "against onnxruntime on " + " and ".join(kind for kind, _ in cases) + " inputs"):
        for kind, feeds in cases:
            expected = reference.run(None, feeds)
            actual = compiled.run(feeds)
            for name, a, e in zip([o.name for o in info.outputs], actual, expected):
                diff, tolerance, good = compare(a, e, rtol, atol)
                info.checks.append(Check(kind, diff, tolerance))
                if not good:
                    raise NumericalMismatchError(
                        f"TVM build disagrees with onnxruntime on {kind} inputs, output {name!r}: "
                        f"max abs diff {diff:.3g} > tolerance {tolerance:.3g}")
    info.verified = True


def load_compiled(directory: str | os.PathLike, target: TargetConfig | None = None) -> CompiledModel:
    """A saved artifact, its files checked against the manifest, loaded to run here."""
    from prune2tvm.config import TargetConfig as _Target, from_dict

    data = read_manifest(directory)
    check_files(directory, data)
    try:
        info = CompileInfo.from_json(data)
    except (TypeError, KeyError) as exc:
        raise InputError(f"{directory}/{MANIFEST_NAME}: unreadable ({type(exc).__name__}: {exc})") from None
    check_tvm_version(data, str(directory))
    if target is None:
        saved = {k: v for k, v in info.target.items() if k != "path"}
        target = from_dict(_Target, saved, f"{directory}/{MANIFEST_NAME}: target.")
    ok, why = target.runs_here()
    if not ok:
        raise UnsupportedError(f"cannot run {directory} here: {why}")
    library = Path(directory) / info.library
    with without_native_noise():
        module = tvm.runtime.load_module(str(library))
    return CompiledModel(module, target, info)
