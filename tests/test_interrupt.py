"""Ctrl-C stops the process promptly even while the main thread is inside TVM's compiled or
C++ code, where no Python signal handler runs: within seconds, exit status 130, the worker
processes ended quietly, nothing half-written left behind."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO

SPIN = """
import subprocess, sys
from pathlib import Path
import numpy as np
import tvm
from tvm.script import tirx as T
from prune2tvm import cli, fsutil
from prune2tvm.compile.tune import _ctrl_c_stops_at_once

@T.prim_func
def spin(n: T.int64, out: T.Buffer((1,), "float64")):
    out[0] = T.float64(0)
    for i in range(n):
        out[0] = out[0] * T.float64(0.999999) + T.float64(1)

f = tvm.compile(spin, target="llvm")
out = tvm.runtime.tensor(np.zeros(1))
mode, work = sys.argv[1], Path(sys.argv[2])
work.mkdir()
with cli._watch_ctrl_c(), fsutil.staged_dir(work / "artifact", force=False) as stage:
    (stage / "half-written").write_text("x")
    with _ctrl_c_stops_at_once(work / "db", str(work / "scratch")) if mode == "tune" else open(__file__):
        if mode == "tune":
            (work / "scratch").mkdir()  # meta_schedule's work directory
        # tuning: a worker as meta_schedule starts them (a terminal's Ctrl-C reaches it too);
        # other verbs start none, and a child that ignores Ctrl-C must still be ended
        quiet = "" if mode == "tune" else "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        worker = subprocess.Popen([sys.executable, "-c", quiet + "import time; time.sleep(600)"])
        print(worker.pid, flush=True)
        f(10**12, out)  # compiled code, minutes long, that never checks for signals
print("not interrupted", flush=True)
"""


@pytest.mark.parametrize("mode, grace_s, message", [
    ("tune", 0, "interrupted: the records measured so far are kept in"),
    ("verb", 3, "interrupted; finished results were kept, nothing half-written"),
])
def test_ctrl_c_stops_a_process_stuck_in_tvm_code(tmp_path, mode, grace_s, message):
    """Tuning stops at once; any other verb gets a few seconds to unwind, then is ended."""
    work = tmp_path / "work"
    script = tmp_path / "spin.py"  # TVMScript reads its source from a file
    script.write_text(SPIN)
    proc = subprocess.Popen([sys.executable, str(script), mode, str(work)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        time.sleep(1.0)  # well inside the compiled loop
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to every process of the group
        out, err = proc.communicate(timeout=grace_s + 8)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}{err}"
    assert "not interrupted" not in out
    assert message in err, err
    assert "Traceback" not in err, err
    assert sorted(p.name for p in work.iterdir()) == (["db"] if (work / "db").exists() else []), \
        "the half-written artifact or the scratch directory was left behind"
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


SLOW_IMPORT = """
import sys, time
from prune2tvm import cli
sys.path.insert(0, sys.argv[1])
with cli._watch_ctrl_c():
    try:
        import slow_module  # Ctrl-C arrives while it is being imported
        print("imported", slow_module.COMPLETE, flush=True)
        time.sleep(60)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted after the import", flush=True)
"""

SLOW_MODULE = """
import time
print("importing", flush=True)
for _ in range(40):
    time.sleep(0.025)  # Python code runs here: a handler that raised would raise in the import
COMPLETE = True
"""


def test_ctrl_c_during_an_import_waits_for_the_import_to_finish(tmp_path):
    """A KeyboardInterrupt raised inside an import can abort the process (a C extension whose
    initialisation calls Python code terminates: onnx's does); Ctrl-C there takes effect just
    after the import instead, still raised where the verb can unwind (no 3 s grace kill)."""
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    script = tmp_path / "slow_import.py"
    script.write_text(SLOW_IMPORT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "importing\n"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert out == "imported True\ninterrupted after the import\n", out + err
    assert proc.returncode == 0 and "Traceback" not in err, f"exit {proc.returncode}\n{err}"
