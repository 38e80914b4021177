"""Ctrl-C that stops the process promptly, even while the main thread is inside TVM's C++ code.

A Python signal handler runs only when the main thread next executes Python code; a long
``tvm.compile`` or meta_schedule's search can keep it in C++ for many seconds. The C-level
handler still writes the signal number to ``signal.set_wakeup_fd``, and a watcher thread
reading that pipe can act at once (TVM releases the GIL in its calls).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from prune2tvm import fsutil

_STOPPING = threading.Lock()


def stop_now(message: str) -> None:
    """End the process as a kill would, but tidily: its child processes (builders, runners,
    data-loader workers), every temporary file or directory being written (so nothing
    half-written is left), the message on stderr, exit status 130. Only the first caller acts."""
    if not _STOPPING.acquire(blocking=False):
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    fsutil.discard_in_progress()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(130)


@contextlib.contextmanager
def on_sigint(action: Callable[[], None]) -> Iterator[None]:
    """Call ``action`` in a watcher thread as soon as SIGINT arrives, whatever the main thread
    is doing. Needs a Python-level SIGINT handler installed (any), and the main thread."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch():
        with contextlib.suppress(OSError):
            while data := os.read(read_end, 64):  # b"" once the write end is closed
                if signal.SIGINT in data:
                    action()

    watcher = threading.Thread(target=watch, name="prune2tvm-ctrl-c", daemon=True)
    watcher.start()
    old_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(write_end)
        watcher.join()
        os.close(read_end)
