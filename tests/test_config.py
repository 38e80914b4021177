"""Pipeline and target files: validation names the file, the key and what is valid."""

import pytest

from prune2tvm.config import (PipelineConfig, from_dict, load_pipeline, load_target, PIPELINES_DIR,
                              TARGETS_DIR, available)
from prune2tvm.errors import ConfigError
from conftest import write_yaml


def test_default_pipeline_loads_with_its_values():
    cfg = load_pipeline("digits")
    assert cfg.name == "digits"
    assert cfg.model.name == "cnn"
    assert cfg.prune.sparsities == [0.5, 0.8]
    assert cfg.compile.target == "x86"
    assert cfg.output_dir.as_posix() == "runs/digits"


def test_every_shipped_pipeline_and_target_loads():
    assert "digits" in available(PIPELINES_DIR)
    assert {"x86", "x86-avx512", "aarch64", "cuda"} <= set(available(TARGETS_DIR))
    for name in available(PIPELINES_DIR):
        load_pipeline(name)
    for name in available(TARGETS_DIR):
        assert load_target(name).name == name


def test_pipeline_round_trips_through_a_dict():
    cfg = load_pipeline("digits")
    again = from_dict(PipelineConfig, cfg.to_dict(), "again: ")
    assert again == cfg


@pytest.mark.parametrize("body, expected", [
    ("name: x\ntrian: {epochs: 3}\n", ["trian: unknown key", "valid keys:", "train"]),
    ("name: x\ndata: {dataset: synthetic, num_classes: 10}\n", ["data.shape: None is not valid for synthetic data"]),
    ("name: x\ndata: {dataset: synthetic, shape: [3, 0], num_classes: 10}\n", ["data.shape: [3, 0] is not valid"]),
    ("name: x\ndata: {dataset: synthetic, shape: [8], num_classes: 1}\n", ["data.num_classes: 1 is not valid"]),
    ("name: x\ndata: {shape: [1, 8, 8]}\n", ["only synthetic data takes them", "remove the keys"]),
    ("name: x\nprune: {sparsities: [0.5, 1.5]}\n", ["prune.sparsities[1]", "1.5 is out of range", "value < 1"]),
    ("name: x\nprune: {sparsities: [-0.1]}\n", ["prune.sparsities[0]", "out of range"]),
    ("name: x\ntrain: {epochs: three}\n", ["train.epochs", "expected an integer"]),
    ("name: x\ntrain: {optimizer: rmsprop}\n", ["train.optimizer", "valid choices: adam, sgd"]),
    ("name: x\nmodel: {name: resnet9000}\n", ["model.name", "not a known model", "cnn", "mlp"]),
    ("name: x\ndata: {dataset: imagenet}\n", ["data.dataset", "valid choices: digits"]),
    ("name: x\ndata: {split: [0.5, 0.5, 0.5]}\n", ["data.split", "summing to 1"]),
    ("name: x\nprune: {end_epoch: 5, frequency: 2}\n", ["prune.frequency", "does not divide"]),
    ("name: x\nprune: {end_epoch: 20, fine_tune_epochs: 10}\n", ["prune.fine_tune_epochs", "must exceed end_epoch"]),
    ("name: x\nmeasure: {batch_size: 0}\n", ["measure.batch_size", "out of range"]),
    ("name: x\nprune: {granularity: row}\n", ["prune.granularity", "valid choices: element, block, filter, channel"]),
    ("name: x\nprune: {method: 1xN, block: [3, 1]}\n", ["prune.block", "not a 1xN block", "N in 2, 4, 8, 16, 32"]),
    ("name: x\nprune: {method: 1xN, granularity: filter}\n", ["prune.granularity", "does not go with method 1xN"]),
    ("name: x\nprune: {granularity: filter, rearrange: true}\n", ["prune.rearrange", "needs block granularity"]),
    ("name: x\nprune: {method: gsm, granularity: channel}\n", ["prune.granularity", "GSM prunes elements or blocks"]),
    ("name: x\nprune: {method: filter, criterion: taylor}\n", ["prune.criterion", "l1, l2, bn_scale, fpgm"]),
    ("name: x\nprune: {scope: model}\n", ["prune.scope", "valid choices: layer, global"]),
    ("name: x\nprune: {indivisible: crop}\n", ["prune.indivisible", "valid choices: skip, pad"]),
    ("name: x\nprune: {granularity: block, block: [0, 4]}\n", ["prune.block", "two positive integers"]),
    ("version: 7\nname: x\n", ["version: 7 is not supported", "valid: 1"]),
    ("prune: {}\n", ["name: missing required key"]),
    ("- just\n- a list\n", ["expected a mapping"]),
    ("name: x\ntrain: [1, 2\n", ["YAML syntax error", "line 3"]),
])
def test_bad_pipeline_files_name_file_key_and_valid_values(tmp_path, body, expected):
    path = write_yaml(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message
    assert "\n" not in message


def test_missing_pipeline_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_pipeline("does/not/exist.yaml")


def test_unknown_pipeline_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="valid pipelines: .*digits"):
        load_pipeline("nope")


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_target("tpu")
    assert "unknown target 'tpu'" in str(info.value)
    assert "x86, x86-avx512" in str(info.value)


@pytest.mark.parametrize("body, expected", [
    ("name: t\ntvm: {kind: opencl}\n", "tvm.kind: 'opencl' is not supported; valid choices: llvm, cuda"),
    ("name: t\ntvm: {kind: cuda, arch: sm_80}\n", "a cuda target needs a host target"),
    ("name: t\ntvm: {kind: llvm}\nthreads: 0\n", "threads: 0 is out of range"),
    ("name: t\ntvm: {kind: llvm}\nspeed: fast\n", "speed: unknown key"),
])
def test_bad_target_files(tmp_path, body, expected):
    path = write_yaml(tmp_path, body, "t.yaml")
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_target(path)


def test_which_targets_run_here():
    assert load_target("x86").runs_here() == (True, "")
    ok, why = load_target("aarch64").runs_here()
    assert not ok and "aarch64" in why
    ok, why = load_target("cuda").runs_here()
    assert not ok and "GPU" in why
