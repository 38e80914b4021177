"""Typed pipeline and target files: YAML in, validated dataclasses out, and back.

Every problem is a ``ConfigError`` naming the file, the key path and what would be valid,
e.g. ``pipelines/x.yaml: prune.sparsities[1]: 1.5 is out of range; valid: 0 <= value < 1``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from prune2tvm.errors import ConfigError
from prune2tvm.runtime import host_arch
from prune2tvm.runtime import host_cpu_flags as host_cpu_features

PIPELINE_FORMAT_VERSION = 1
TARGET_FORMAT_VERSION = 1

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = Path(os.environ.get("PRUNE2TVM_TARGETS_DIR", REPO_ROOT / "targets"))
PIPELINES_DIR = Path(os.environ.get("PRUNE2TVM_PIPELINES_DIR", REPO_ROOT / "pipelines"))
DEFAULT_TARGET = "x86"


# --------------------------------------------------------------------------- schema helper


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
            type(None): "null"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} is not valid; expected {_describe(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not valid; valid choices: {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {_type_name(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_type_name(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {_type_name(value)} {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in a dataclass below


def from_dict(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip(': ')}: expected a mapping, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = where if where.endswith((": ", ".")) else f"{where}."
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: missing required key ({_describe(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _in_range(where: str, value: float, lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lo_s = f"{lo} <" if lo_open else f"{lo} <="
        hi_s = f"< {hi}" if hi_open else f"<= {hi}"
        raise ConfigError(f"{where}: {value} is out of range; valid: {lo_s} value {hi_s}")


def _positive(where: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: {value} is out of range; valid: a positive number")


def load_yaml(path: str | os.PathLike) -> Any:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ConfigError(f"{path}:{line} YAML syntax error: {problem}") from None


def _check_version(data: Any, path: Path, expected: int) -> None:
    if isinstance(data, dict) and "version" in data and data["version"] != expected:
        raise ConfigError(f"{path}: version: {data['version']!r} is not supported; valid: {expected}")


# --------------------------------------------------------------------------- pipeline files


@dataclass
class DataConfig:
    dataset: str = "digits"
    split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    path: Optional[str] = None  # cifar10, mnist, imagefolder: the directory of the user's files
    image_size: Optional[list[int]] = None  # imagefolder: [H, W] every image is resized to (224x224)
    shape: Optional[list[int]] = None  # synthetic: one sample's shape, e.g. [3, 224, 224] or [128, 768]
    num_classes: Optional[int] = None  # synthetic: the model's number of outputs
    samples: int = 100  # synthetic: how many random samples, over the three splits

    @property
    def synthetic(self) -> bool:
        return self.dataset == "synthetic"

    def check(self, where: str) -> None:
        from prune2tvm.data import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(f"{where}dataset: {self.dataset!r} is not a known dataset; valid choices: {', '.join(DATASETS)}")
        if self.synthetic:
            if not self.shape or any(not isinstance(d, int) or d < 1 for d in self.shape):
                raise ConfigError(f"{where}shape: {self.shape} is not valid for synthetic data; "
                                  "valid: one sample's shape, positive integers, e.g. [3, 224, 224]")
            if self.num_classes is None or self.num_classes < 2:
                raise ConfigError(f"{where}num_classes: {self.num_classes} is not valid for synthetic data; valid: >= 2")
            if self.samples < 3:
                raise ConfigError(f"{where}samples: {self.samples} is too few; valid: >= 3 (one per split)")
        elif self.shape is not None or self.num_classes is not None:
            raise ConfigError(f"{where}shape/num_classes: only synthetic data takes them ({self.dataset} has its own); "
                              "remove the keys")
        if self.image_size is not None and (len(self.image_size) != 2 or any(d < 1 for d in self.image_size)):
            raise ConfigError(f"{where}image_size: {self.image_size} is not valid; valid: [H, W], two positive integers")
        if len(self.split) != 3 or any(s <= 0 for s in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(f"{where}split: {self.split} is not valid; valid: three positive fractions (train, val, test) summing to 1")


@dataclass
class ModelConfig:
    name: str = "cnn"
    checkpoint: Optional[str] = None  # a state dict to start from (weights_only loading), e.g. torchvision's

    def check(self, where: str) -> None:
        from prune2tvm.models import MODELS

        if self.name not in MODELS:
            raise ConfigError(f"{where}name: {self.name!r} is not a known model; valid choices: {', '.join(MODELS)}")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    def check(self, where: str) -> None:
        if self.epochs < 0:
            raise ConfigError(f"{where}epochs: {self.epochs} is out of range; valid: >= 0 (0: use model.checkpoint as it is)")
        _positive(f"{where}batch_size", self.batch_size)
        _positive(f"{where}lr", self.lr)
        _in_range(f"{where}momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _in_range(f"{where}weight_decay", self.weight_decay, 0.0, 1.0)


@dataclass
class SensitivityConfig:
    """Per-layer targets from a sensitivity CSV (``prune2tvm sensitivity``): one variant per
    tolerated accuracy drop, each layer pruned to the highest level it tolerates."""

    file: str
    tolerances: list[float] = field(default_factory=lambda: [0.01])
    mode: Literal["target", "threshold"] = "target"  # threshold: Distiller's sensitivity x std

    def check(self, where: str) -> None:
        if not self.tolerances:
            raise ConfigError(f"{where}tolerances: empty; give at least one accuracy drop in [0, 1]")
        for i, t in enumerate(self.tolerances):
            _in_range(f"{where}tolerances[{i}]", t, 0.0, 1.0)


@dataclass
class PruneConfig:
    """Automated Gradual Pruning (Zhu & Gupta), one fine-tuned variant per final sparsity.

    The schedule counts epochs of fine-tuning: masks are recomputed at the start of epochs
    ``start_epoch, start_epoch + frequency, ..., end_epoch``, where the final sparsity is
    reached; the remaining epochs fine-tune with the mask held. With ``unit: step`` the three
    count optimizer steps instead (Zhu & Gupta prune every few hundred steps).

    ``granularity`` is what one decision removes (element, block of ``block`` = [R, C],
    filter, channel), ranked per layer or over all layers (``scope``). Method ``1xN`` is AGP
    on [N, 1] blocks (Lin et al.) with filter rearrangement on by default. Method ``gsm``
    (Global Sparse Momentum, element or block granularity, always global) trains with GSM
    until ``end_epoch``, then holds the mask for the remaining fine-tuning epochs. Method
    ``filter`` removes that fraction of filters at once (ranked by ``criterion``), thins the
    model (BatchNorms, next layers, residual and concat partners) and fine-tunes it. Method
    ``oneshot`` prunes to the final sparsity at once by magnitude, with no fine-tuning (a
    latency study of a model whose training data is not at hand).
    """

    method: Literal["agp", "1xN", "gsm", "filter", "oneshot"] = "agp"
    granularity: Literal["element", "block", "filter", "channel"] = "element"
    block: list[int] = field(default_factory=lambda: [4, 1])
    scope: Literal["layer", "global"] = "layer"
    indivisible: Literal["skip", "pad"] = "skip"  # blocks: a layer that does not divide is left dense, or padded
    rearrange: Optional[bool] = None  # filter rearrangement; default: on for 1xN, off otherwise
    criterion: Literal["l1", "l2", "bn_scale", "fpgm"] = "l1"  # method filter: how filters are ranked
    sensitivity: Optional[SensitivityConfig] = None  # per-layer targets from a sensitivity analysis
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8])
    initial_sparsity: float = 0.0
    unit: Literal["epoch", "step"] = "epoch"  # what start_epoch, end_epoch and frequency count
    start_epoch: int = 0
    end_epoch: int = 6
    frequency: int = 1
    fine_tune_epochs: int = 15
    lr: Optional[float] = None
    layers: Optional[list[str]] = None

    @property
    def does_rearrange(self) -> bool:
        return self.method == "1xN" if self.rearrange is None else self.rearrange

    def granularity_spec(self):
        from prune2tvm.prune.granularity import Granularity

        pad = self.indivisible == "pad"
        if self.method == "1xN":
            return Granularity("block", (self.block[0], 1), pad)
        if self.granularity == "block":
            return Granularity("block", tuple(self.block), pad)
        return Granularity(self.granularity)

    def check(self, where: str) -> None:
        if len(self.block) != 2 or any(b < 1 for b in self.block):
            raise ConfigError(f"{where}block: {self.block} is not valid; valid: [R, C], two positive integers")
        if self.method == "1xN":
            if self.granularity not in ("element", "block"):  # element: the default, i.e. not given
                raise ConfigError(f"{where}granularity: {self.granularity!r} does not go with method 1xN; "
                                  "valid: block (or omit it)")
            if self.block[1] != 1 or self.block[0] not in (2, 4, 8, 16, 32):
                raise ConfigError(f"{where}block: {self.block} is not a 1xN block; valid: [N, 1] with N in 2, 4, 8, 16, 32")
        if self.method == "gsm" and self.granularity not in ("element", "block"):
            raise ConfigError(f"{where}granularity: GSM prunes elements or blocks, not {self.granularity!r}; "
                              "valid: element, block")
        if self.rearrange and self.method != "1xN" and self.granularity != "block":
            raise ConfigError(f"{where}rearrange: filter rearrangement needs block granularity "
                              f"(got {self.granularity!r}); valid: granularity block, or rearrange false")
        if self.sensitivity is not None:
            if self.method != "agp":
                raise ConfigError(f"{where}sensitivity: per-layer targets go with method agp, not {self.method!r}")
            if self.sensitivity.mode == "threshold" and self.granularity != "element":
                raise ConfigError(f"{where}sensitivity.mode: threshold prunes elements (|w| < s * std(w)); "
                                  f"valid with granularity element, or mode target")
        elif not self.sparsities:
            raise ConfigError(f"{where}sparsities: empty; give at least one final sparsity in [0, 1), "
                              "or per-layer targets with sensitivity")
        for i, s in enumerate(self.sparsities):
            _in_range(f"{where}sparsities[{i}]", s, 0.0, 1.0, hi_open=True)
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ConfigError(f"{where}sparsities: {self.sparsities} repeats a value; give each final sparsity once")
        _in_range(f"{where}initial_sparsity", self.initial_sparsity, 0.0, 1.0, hi_open=True)
        if self.sparsities and self.initial_sparsity > min(self.sparsities):
            raise ConfigError(f"{where}initial_sparsity: {self.initial_sparsity} exceeds a final sparsity; valid: <= {min(self.sparsities)}")
        if self.start_epoch < 0:
            raise ConfigError(f"{where}start_epoch: {self.start_epoch} is out of range; valid: >= 0")
        _positive(f"{where}frequency", self.frequency)
        if self.end_epoch <= self.start_epoch:
            raise ConfigError(f"{where}end_epoch: {self.end_epoch} must be greater than start_epoch ({self.start_epoch})")
        if (self.end_epoch - self.start_epoch) % self.frequency:
            raise ConfigError(
                f"{where}frequency: {self.frequency} does not divide end_epoch - start_epoch "
                f"({self.end_epoch - self.start_epoch}); valid: a divisor of it")
        if self.method != "oneshot" and self.unit == "epoch" and self.fine_tune_epochs <= self.end_epoch:
            raise ConfigError(f"{where}fine_tune_epochs: {self.fine_tune_epochs} must exceed end_epoch ({self.end_epoch})")
        if self.lr is not None:
            _positive(f"{where}lr", self.lr)
        if self.layers is not None and not self.layers:
            raise ConfigError(f"{where}layers: empty; omit it to prune every conv and linear layer")


@dataclass
class ExportConfig:
    opset: int = 17

    def check(self, where: str) -> None:
        _in_range(f"{where}opset", self.opset, 13, 21)


@dataclass
class BsrConfig:
    """Rewrite layers whose fraction of all-zero R x C blocks is at least ``threshold``
    into BSR kernels (``prune2tvm compile --bsr R --bsc C --sparsity S``)."""

    block: list[int] = field(default_factory=lambda: [4, 1])
    threshold: Union[float, Literal["auto"]] = 0.5  # auto: measure each layer on the target

    def check(self, where: str) -> None:
        if len(self.block) != 2 or any(b < 1 for b in self.block):
            raise ConfigError(f"{where}block: {self.block} is not valid; valid: [R, C], two positive integers")
        if self.threshold != "auto":
            _in_range(f"{where}threshold", self.threshold, 0.0, 1.0)


@dataclass
class CompileConfig:
    target: str = DEFAULT_TARGET
    bsr: Optional[BsrConfig] = None  # null: every layer stays dense
    # what computes the constant-weight layers that stay dense on CPU targets (compile --dense-kernel)
    dense_kernel: Literal["packed", "tvm"] = "packed"
    fast_math: bool = False  # TVM's fast erf/exp/tanh/softmax (prune2tvm compile --fast-math)


@dataclass
class MeasureConfig:
    batch_size: int = 1
    warmup: int = 20
    repeat: int = 200
    rounds: int = 4

    def check(self, where: str) -> None:
        _in_range(f"{where}batch_size", self.batch_size, 1, 4096)
        if self.warmup < 0:
            raise ConfigError(f"{where}warmup: {self.warmup} is out of range; valid: >= 0")
        _positive(f"{where}repeat", self.repeat)
        _positive(f"{where}rounds", self.rounds)
        if self.rounds > self.repeat:
            raise ConfigError(f"{where}rounds: {self.rounds} exceeds repeat ({self.repeat}); valid: 1 <= rounds <= repeat")


@dataclass
class PipelineConfig:
    name: str
    version: int = PIPELINE_FORMAT_VERSION
    description: str = ""
    seed: int = 0
    output: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def check(self, where: str) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ConfigError(f"{where}name: {self.name!r} is not valid; valid: a plain name such as 'digits'")

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name

    def to_dict(self) -> dict:
        return to_dict(self)


def resolve_named_file(name_or_path: str, directory: Path, kind: str) -> Path:
    """A path to a YAML file, or the name of one shipped in ``directory``."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists() or os.sep in name_or_path:
        return candidate
    shipped = directory / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = available(directory)
    raise ConfigError(f"unknown {kind} {name_or_path!r}; valid {kind}s: {', '.join(names) or '(none found in ' + str(directory) + ')'}"
                      f", or a path to a .yaml file")


def available(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def load_pipeline(name_or_path: str | os.PathLike) -> PipelineConfig:
    path = resolve_named_file(str(name_or_path), PIPELINES_DIR, "pipeline")
    data = load_yaml(path)
    _check_version(data, path, PIPELINE_FORMAT_VERSION)
    return from_dict(PipelineConfig, data, f"{path}: ")


# --------------------------------------------------------------------------- target files

TVM_TARGET_KINDS = ("llvm", "cuda")


@dataclass
class TargetConfig:
    """One hardware target. ``tvm`` goes to ``tvm.target.Target`` as a dict, after
    ``mcpu: auto`` is replaced by the host CPU's name."""

    name: str
    tvm: dict
    version: int = TARGET_FORMAT_VERSION
    description: str = ""
    host: Optional[dict] = None
    requires: list[str] = field(default_factory=list)
    cross_compiler: Optional[str] = None
    threads: Optional[int] = None
    path: str = ""

    def check(self, where: str) -> None:
        kind = self.tvm.get("kind")
        if kind not in TVM_TARGET_KINDS:
            raise ConfigError(f"{where}tvm.kind: {kind!r} is not supported; valid choices: {', '.join(TVM_TARGET_KINDS)}")
        if kind == "cuda" and self.host is None:
            raise ConfigError(f"{where}host: a cuda target needs a host target, e.g. {{kind: llvm}}")
        if self.host is not None and self.host.get("kind") != "llvm":
            raise ConfigError(f"{where}host.kind: {self.host.get('kind')!r} is not supported; valid choices: llvm")
        if self.threads is not None:
            _in_range(f"{where}threads", self.threads, 1, 1024)

    @property
    def kind(self) -> str:
        return self.tvm["kind"]

    @property
    def arch(self) -> str:
        """The machine architecture code for this target runs on, as ``uname -m`` says it."""
        if self.kind == "cuda":
            return "cuda"
        triple = str(self.tvm.get("mtriple", ""))
        return triple.split("-")[0] if triple else host_arch()

    def runs_here(self) -> tuple[bool, str]:
        """Whether code built for this target can run on this machine, and if not, why."""
        if self.kind == "cuda":
            return False, "no NVIDIA GPU here"
        if self.arch != host_arch():
            return False, f"it is built for {self.arch} and this machine is {host_arch()}"
        missing = [feat for feat in self.requires if feat not in host_cpu_features()]
        if missing:
            return False, f"this CPU lacks {', '.join(missing)}"
        return True, ""

    def to_dict(self) -> dict:
        return to_dict(self)


def load_target(name_or_path: str | os.PathLike) -> TargetConfig:
    path = resolve_named_file(str(name_or_path), TARGETS_DIR, "target")
    data = load_yaml(path)
    _check_version(data, path, TARGET_FORMAT_VERSION)
    if isinstance(data, dict) and "path" in data:
        raise ConfigError(f"{path}: path: unknown key; it is set by prune2tvm")
    target = from_dict(TargetConfig, data, f"{path}: ")
    target.path = str(path)
    return target
