"""Tuning on remote devices through TVM's RPC tracker: a tracker and two servers on 127.0.0.1
stand in for a fleet of boards. Every process started here is ended, children included."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper, save

from prune2tvm.cli import cli

KEY = "prune2tvm-test"


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log):
    """A TVM RPC process in its own process group (its forked and popen children join it)."""
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def end_all(procs):
    """SIGTERM, then SIGKILL, each process group and each of its processes (one that left the
    group too), waiting until every one has ended; returns every pid that was part of them."""
    members = []
    for p in procs:
        try:
            leader = psutil.Process(p.pid)
            members += [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    left = members
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        for m in left:
            try:
                m.send_signal(sig)
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(left, timeout=5)  # a SIGKILLed process is gone only once it has exited
        if not left:
            break
    for p in procs:
        p.wait(timeout=5)
    return {m.pid for m in members}


def alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpc")
    port = free_port()
    logs = [open(tmp / name, "w") for name in ("tracker.log", "server1.log", "server2.log")]
    procs = [start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end",
                    str(port + 1)], logs[0])]
    try:
        from tvm import rpc

        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert procs[0].poll() is None, (tmp / "tracker.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the RPC tracker did not start"
                time.sleep(0.2)
        for log in logs[1:]:
            base = free_port()
            procs.append(start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                                "--host", "127.0.0.1", "--port", str(base), "--port-end", str(base + 50)], log))
        while True:
            tracker = rpc.connect_tracker("127.0.0.1", port)
            registered = sum(1 for item in tracker.summary()["server_info"] if item["key"].endswith(KEY))
            tracker.close()
            if registered == 2:
                break
            assert time.monotonic() < deadline, "the RPC servers did not register with the tracker"
            time.sleep(0.3)
        yield tmp, port, procs
    finally:
        pids = end_all(procs)
        for log in logs:
            log.close()
        assert not alive(pids), f"processes left behind: {alive(pids)}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpc-model")
    w = np.random.default_rng(1).standard_normal((48, 24)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["mm"]),
                               helper.make_node("Relu", ["mm"], ["output"])], "one_layer",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 48])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4, 24])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp / "one.onnx"
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_tuning_measures_on_both_rpc_devices(fleet, model, tmp_path):
    tmp, port, procs = fleet
    result = run_cli("tune", model, "--dense-kernel", "tvm", "--trials", 8, "--db", tmp_path / "db", "--rpc-tracker",
                     f"127.0.0.1:{port}",
                     "--rpc-key", KEY, "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    assert f"on 2 device(s) under key '{KEY}'" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| fused_matmul"))
    assert int(row.split("|")[4]) >= 1
    # each server loaded modules to measure (the tracker hands sessions out in turn); on a
    # loaded machine some candidates may fail to build in time, so only "each ran some" holds
    loads = [(tmp / name).read_text().count("load_module") for name in ("server1.log", "server2.log")]
    assert all(n >= 1 for n in loads), loads
    assert (tmp_path / "tuned" / "manifest.json").exists()
    # the records are usable: a second run does no new trials
    result = run_cli("tune", model, "--dense-kernel", "tvm", "--trials", 8, "--db", tmp_path / "db", "--rpc-tracker",
                     f"127.0.0.1:{port}",
                     "--rpc-key", KEY, "-o", tmp_path / "tuned", "--force")
    assert result.exit_code == 0 and "0 new trials" in result.output, result.output


def test_an_unreachable_tracker_fails_fast(model, tmp_path):
    start = time.monotonic()
    result = run_cli("tune", model, "--rpc-tracker", f"127.0.0.1:{free_port()}", "--rpc-key", KEY,
                     "-o", tmp_path / "out")
    assert result.exit_code == 2 and "cannot reach the RPC tracker at 127.0.0.1:" in result.output
    assert time.monotonic() - start < 15
    assert not (tmp_path / "out").exists()


def test_a_key_without_devices_waits_then_says_so(fleet, model, tmp_path):
    _, port, _ = fleet
    result = run_cli("tune", model, "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "no-such-board",
                     "--rpc-wait", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "waiting up to 2 s for a free device under key 'no-such-board'" in result.output
    assert "no free device under key 'no-such-board'" in result.output and KEY in result.output


@pytest.mark.parametrize("args, message", [
    (["--rpc-tracker", "localhost"], "is not HOST:PORT"),
    (["--rpc-tracker", "127.0.0.1:9190"], "needs --rpc-key"),
    (["--rpc-key", KEY], "--rpc-key needs --rpc-tracker"),
    (["--time-limit", "0"], "--time-limit 0.0 must be positive"),
])
def test_bad_rpc_options_are_one_line_errors(model, tmp_path, args, message):
    result = run_cli("tune", model, *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output, result.output


def test_bsr_parameter_search_measures_on_an_rpc_device(fleet, tmp_path):
    """With --bsr, the BSR kernels' own parameter search is timed on a device under the key
    too (built here, linked and run there), and its records land in the database."""
    tmp, port, _ = fleet
    rng = np.random.default_rng(4)
    keep = rng.random((24 // 4, 48)) >= 0.8
    w = (rng.standard_normal((24, 48)) * np.repeat(keep, 4, 0)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["output"])], "sparse_layer",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 48])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 24])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    path = tmp_path / "sparse.onnx"
    save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    before = sum((tmp / name).read_text().count("load_module") for name in ("server1.log", "server2.log"))
    result = run_cli("tune", path, "--trials", 2, "--bsr", 4, "--db", tmp_path / "db", "--rpc-tracker",
                     f"127.0.0.1:{port}", "--rpc-key", KEY, "-o", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    assert f"candidates on a device under key '{KEY}'" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| matmul 1x48->24"))
    assert row.split("|")[2].strip() == "tuned" and int(row.split("|")[3]) == 4  # accumulators 4, 1, 2, 8
    records = json.loads((tmp_path / "db" / "bsr.json").read_text())
    assert len(records) == 1 and all(t > 0 for t in next(iter(records.values()))["candidates"].values())
    after = sum((tmp / name).read_text().count("load_module") for name in ("server1.log", "server2.log"))
    assert after - before >= 4  # every candidate was loaded on a server
