"""One request, one reply: JSON lines over a unix socket, with file descriptors (SCM_RIGHTS).

The plugin and the mounter (mounterd.py) talk this way. A request is one JSON object on one
line; descriptors travel with its first bytes. The reply is one JSON object on one line:
`{"ok": true, ...}` or `{"error": "one line"}`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

MAX_LINE = 1 << 20  # a request or reply is a few hundred bytes; anything bigger is garbage
MAX_FDS = 4


class ProtocolError(Exception):
    """The peer sent something that is not one JSON line, or hung up early."""


def send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send `msg` as one line, with `fds` attached to it."""
    data = json.dumps(msg).encode() + b"\n"
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read one line (and the descriptors that came with it). Closes stray descriptors on
    error, so a bad peer cannot leak them into us."""
    buf = b""
    fds: list[int] = []
    try:
        while b"\n" not in buf:
            data, got, _flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)
            fds.extend(got)
            if not data:
                raise ProtocolError("connection closed before a complete message")
            buf += data
            if len(buf) > MAX_LINE:
                raise ProtocolError("message too long")
        msg = json.loads(buf.split(b"\n", 1)[0])
        if not isinstance(msg, dict):
            raise ProtocolError("message is not a JSON object")
        return msg, fds
    except (ValueError, ProtocolError):
        for fd in fds:
            os.close(fd)
        if isinstance(buf, bytes) and b"\n" in buf:
            raise ProtocolError("message is not JSON") from None
        raise


def call(path: str, msg: dict[str, Any], fds: Sequence[int] = (),
         timeout: float | None = 30.0) -> dict[str, Any]:
    """Connect to `path`, send `msg` (+ `fds`), return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        send(s, msg, fds)
        reply, stray = receive(s)
        for fd in stray:
            os.close(fd)
        return reply
