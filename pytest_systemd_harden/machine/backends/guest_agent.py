"""A client for qemu-guest-agent (QGA), reached over the VM's virtio-serial port socket on the host.

The QEMU backend needs it for what D-Bus cannot carry across a byte stream: file descriptors. A command's stdout
and stderr go to files inside the VM, and this reads them back (``guest-file-*``); it is also the first sign of
life of a booting guest (``guest-sync-delimited``).

The protocol is one JSON object a line each way. A reply to an earlier request that timed out may still be in the
stream, so every conversation starts with ``guest-sync-delimited``: its reply, preceded by a 0xFF byte, marks
where the fresh replies begin.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
import time
from typing import Any

from ...errors import MachineError

READ_CHUNK = 1 << 20


class GuestAgent:
    """A blocking, thread-safe QGA client on the unix socket at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self._ids = itertools.count(int(time.time()) % 100000 * 1000)

    def connect(self, timeout: float) -> None:
        """Connect and sync; keep trying until ``timeout`` (the guest may still be booting)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.path)
                sock.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
                self._sock, self._buffer = sock, b""
                self._sync()
                self._sock.settimeout(30)
                return
            except (OSError, MachineError) as exc:
                last = str(exc)
                self.close()
                time.sleep(0.2)
        raise MachineError(f"the guest agent did not answer within {timeout:.0f}s ({last})")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        assert self._sock is not None
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")

    def _line(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise MachineError("the guest agent did not reply in time") from None
            if not chunk:
                raise MachineError("the guest agent closed its channel")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _sync(self) -> None:
        token = next(self._ids)
        self._send("guest-sync-delimited", {"id": token})
        while True:  # skip stale replies up to ours
            line = self._line()
            if line.startswith(b"\xff"):
                line = line[1:]
            try:
                if json.loads(line).get("return") == token:
                    return
            except (ValueError, AttributeError):
                continue

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QGA command and return its ``return`` value; a QGA error becomes a MachineError."""
        with self._lock:
            if self._sock is None:
                raise MachineError("the guest agent is not connected")
            self._send(command, arguments)
            reply = json.loads(self._line())
        if "error" in reply:
            raise MachineError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    # -- files --------------------------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        handle = self.call("guest-file-open", {"path": path, "mode": "r"})
        try:
            data = b""
            while True:
                chunk = self.call("guest-file-read", {"handle": handle, "count": READ_CHUNK})
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    return data
        finally:
            self.call("guest-file-close", {"handle": handle})
