"""Remote devices through TVM's RPC tracker: build here, measure on the devices registered
under a key (a board, a GPU machine, or servers on this host).

The tracker is checked with a plain socket first, so an unreachable one is a clear error
within seconds rather than TVM's minute of retries; a key with no free device is waited for
with a visible message, up to a timeout.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from prune2tvm.errors import InputError, UnsupportedError
from prune2tvm.progress import say

CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class RpcDevice:
    """Where to measure: ``host:port`` of a TVM RPC tracker and the key of the devices."""

    host: str
    port: int
    key: str
    wait_s: float = 60.0  # how long to wait for a free device under the key
    session_timeout_s: int = 60  # one measurement session, as the RPC servers enforce it

    @classmethod
    def parse(cls, tracker: str, key: str | None, wait_s: float = 60.0) -> "RpcDevice":
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--rpc-tracker {tracker!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
        if not key:
            raise InputError("--rpc-tracker needs --rpc-key, the key the devices registered with "
                             "(python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY)")
        if wait_s <= 0:
            raise InputError(f"--rpc-wait {wait_s} must be positive (seconds)")
        return cls(host, int(port), key, wait_s)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def summary(self) -> dict:
        """The tracker's summary; an unreachable tracker is an error within seconds."""
        from tvm import rpc

        try:
            with socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S):
                pass
        except OSError as err:
            raise UnsupportedError(f"cannot reach the RPC tracker at {self.address} ({err.strerror or err}); start "
                                   f"it with python -m tvm.exec.rpc_tracker --host {self.host} --port {self.port}, "
                                   "or give the right --rpc-tracker") from None
        try:
            tracker = rpc.connect_tracker(self.host, self.port)
            try:
                return tracker.summary()
            finally:
                tracker.close()
        except (OSError, RuntimeError) as err:
            raise UnsupportedError(f"{self.address} does not answer as a TVM RPC tracker ({err})") from None

    def devices(self, summary: dict | None = None) -> tuple[int, int]:
        """(registered, free) devices under the key."""
        summary = self.summary() if summary is None else summary
        registered = sum(1 for item in summary.get("server_info", [])
                         if str(item.get("key", "")).split(":", 1)[-1] == self.key)
        free = int(summary.get("queue_info", {}).get(self.key, {}).get("free", 0))
        return registered, free

    def wait_for_devices(self) -> int:
        """Wait (saying so) until a device under the key is free; the number registered."""
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            summary = self.summary()
            registered, free = self.devices(summary)
            if free > 0:
                if said:
                    say(f"  a device under key {self.key!r} is free")
                return registered
            if time.monotonic() >= deadline:
                keys = sorted(summary.get("queue_info", {}))
                known = f"; keys at this tracker: {', '.join(keys)}" if keys else "; no device is registered there"
                raise UnsupportedError(f"no free device under key {self.key!r} at {self.address} after "
                                       f"{self.wait_s:.0f} s ({registered} registered){known}")
            if not said:
                say(f"  waiting up to {self.wait_s:.0f} s for a free device under key {self.key!r} at "
                    f"{self.address} ({registered} registered, 0 free)...")
                said = True
            time.sleep(1.0)

    def ms_config(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.RPCConfig(tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
                                   session_priority=1, session_timeout_sec=self.session_timeout_s)

    def session(self):
        """An RPC session on one device under the key."""
        from tvm import rpc

        tracker = rpc.connect_tracker(self.host, self.port)
        try:
            return tracker.request(self.key, priority=1, session_timeout=self.session_timeout_s)
        finally:
            tracker.close()
