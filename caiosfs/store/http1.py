"""A minimal HTTP/1.1 client connection for :class:`~caiosfs.store.copystore.CopyS3`.

``http.client`` costs ~240 us of CPU per small GET on the 2-core development VM (request
lines built header by header, the answer's headers parsed by the ``email`` package, a
buffered file wrapped around the socket for every response); this does the same exchange
in ~115 us (signing included; measured with 1,000 GETs of 1,000 bytes on loopback against
SeaweedFS), and importing it does not import ``http.client`` and ``email`` (~40 ms of a
copy's start-up). A bulk copy of small files spends most of its own CPU there.

What it speaks: one request at a time on a keep-alive connection (plain or TLS), bodies
given as bytes or as a file-like object with ``read(n)``; answers with a Content-Length,
chunked, or delimited by the connection closing; HEAD and 1xx/204/304 answers without a
body. Errors are ``OSError`` (:class:`ProtocolError` for a malformed or cut answer;
``TimeoutError`` when the socket's timeout expires), as the caller already expects of
``http.client``'s connections.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

MAX_HEAD = 64 << 10  # an answer's status line and headers, at most
SEND_PIECE = 1 << 20  # what one read of a file-like body asks for


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x as expected, or ended too early."""


def _kernel_timeout(sock: socket.socket, timeout: float) -> None:
    """Bound each send and receive of a plain socket by ``timeout`` in the kernel
    (SO_SNDTIMEO, SO_RCVTIMEO on a blocking socket) instead of Python's socket timeout,
    which polls before every send and receive: one system call, and one release and
    retake of the GIL, fewer each time. A GET of a 100 KB file receives 2-3 times, in one
    of 16 threads contending with the loop for the GIL; 16 threads of such GETs took
    0.42-0.51 ms of CPU per GET instead of 0.53-0.59 (docs/ARCHITECTURE.md, "What a
    small file costs"). An expired one fails with EAGAIN, raised as ``TimeoutError``
    (``_timed_out``) as Python's would be. Not for TLS: whether ``ssl`` turns a blocking
    socket's EAGAIN into an error or retries it (reading CPython's ``_ssl.c``, it
    retries: a stalled server would never time out) was not checked on a live
    connection, so a TLS socket keeps Python's timeout."""
    sock.settimeout(None)
    sec = int(timeout)
    tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _timed_out(exc: BlockingIOError) -> TimeoutError:
    """A kernel timeout (EAGAIN on a blocking socket) is the ``TimeoutError`` callers
    expect of an expired socket timeout. (Caught inline where it can happen: a context
    manager per receive cost a generator on the GET threads' hottest call.)"""
    return TimeoutError(exc.errno, "timed out")


class Connection:
    """One socket and the bytes received but not yet consumed."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = bytearray()

    @classmethod
    def open(cls, host: str, port: int, connect_timeout: float, timeout: float,
             ssl_context: Any = None) -> Connection:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
                sock.settimeout(timeout)
            elif timeout >= 0.001:
                _kernel_timeout(sock, timeout)
            else:  # (0 would be no timeout at all for the kernel)
                sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def dropped(self) -> bool:
        """Whether an idle connection is unusable: the server closed it (or sent something
        nobody asked for) while it waited in a pool."""
        if self._buf:
            return True
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def send(self, method: str, target: str, headers: dict[str, str], body: Any) -> None:
        """The request line, the headers (a PUT or POST without a body gets a
        Content-Length of 0) and the body."""
        lines = [f"{method} {target} HTTP/1.1"]
        for k, v in headers.items():
            if "\n" in v or "\r" in v:
                raise ValueError(f"header {k} holds a line break")
            lines.append(f"{k}: {v}")
        if body is None and method in ("PUT", "POST") and "content-length" not in headers:
            lines.append("content-length: 0")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self._send(head, body)
        except BlockingIOError as exc:
            raise _timed_out(exc) from exc

    def _send(self, head: bytes, body: Any) -> None:
        if body is None:
            self.sock.sendall(head)
        elif isinstance(body, (bytes, bytearray, memoryview)):
            if len(body) <= 64 << 10:
                self.sock.sendall(head + bytes(body))  # (one segment for a small PUT)
            else:
                self.sock.sendall(head)
                self.sock.sendall(body)
        else:
            self.sock.sendall(head)
            while True:
                b = body.read(SEND_PIECE)
                if not b:
                    break
                self.sock.sendall(b)

    def response(self, method: str) -> Response:
        """Read the answer's status line and headers (1xx answers skipped)."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            while end < 0:
                if len(self._buf) > MAX_HEAD:
                    raise ProtocolError("the answer's headers are too long")
                if not self._fill(65536):
                    raise ProtocolError("the server closed the connection without "
                                        "answering" if not self._buf else
                                        "the answer's headers were cut")
                end = self._buf.find(b"\r\n\r\n")
            lines = self._buf[:end].decode("latin-1").split("\r\n")
            del self._buf[:end + 4]
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise ProtocolError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
            status = int(code)
            if 100 <= status < 200:
                continue  # (100 Continue: the final answer follows)
            headers = []
            for line in lines[1:]:
                k, sep, v = line.partition(":")
                if not sep:
                    raise ProtocolError(f"a malformed header line: {line[:80]!r}")
                headers.append((k.strip(), v.strip()))
            return Response(self, method, status, version, headers)

    def _fill(self, n: int) -> int:
        """Receive up to ``n`` more bytes into the buffer; 0 at the end of the stream."""
        try:
            b = self.sock.recv(n)
        except BlockingIOError as exc:
            raise _timed_out(exc) from exc
        self._buf += b
        return len(b)

    def read_into(self, view: memoryview) -> int:
        """Bytes into ``view``: what is buffered first, else one receive; 0 at the end."""
        if self._buf:
            n = min(len(view), len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        try:
            return int(self.sock.recv_into(view))
        except BlockingIOError as exc:
            raise _timed_out(exc) from exc


class Response:
    """What ``http.client.HTTPResponse`` gave CopyS3: ``status``, ``getheader``,
    ``getheaders``, ``read``, ``length`` (body bytes not read yet; None: until the
    connection closes), ``isclosed`` (the body read to its end) and ``will_close``."""

    def __init__(self, conn: Connection, method: str, status: int, version: str,
                 headers: list[tuple[str, str]]) -> None:
        self._conn, self.status, self._headers = conn, status, headers
        self._lower = {k.lower(): v for k, v in headers}
        conn_hdr = self._lower.get("connection", "").lower()
        self.will_close = "close" in conn_hdr or (version == "HTTP/1.0"
                                                  and "keep-alive" not in conn_hdr)
        self._chunked: bytes | None = None
        self.cut = False
        self.length: int | None
        if method == "HEAD" or status in (204, 304):
            self.length = 0
        elif "chunked" in self._lower.get("transfer-encoding", "").lower():
            self._chunked = self._read_chunked()
            self.length = len(self._chunked)
        elif "content-length" in self._lower:
            try:
                self.length = int(self._lower["content-length"])
            except ValueError:
                raise ProtocolError("a malformed Content-Length") from None
            if self.length < 0:
                raise ProtocolError("a negative Content-Length")
        else:
            self.length = None  # (until the server closes the connection)
            self.will_close = True

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self._lower.get(name.lower(), default)

    def getheaders(self) -> list[tuple[str, str]]:
        return self._headers

    def isclosed(self) -> bool:
        return self.length == 0

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the body (all that is left if ``n`` < 0): fewer only at
        its end. A body cut short raises ProtocolError."""
        if self._chunked is not None:
            size = len(self._chunked) if n < 0 else min(n, len(self._chunked))
            out, self._chunked = self._chunked[:size], self._chunked[size:]
            self.length = len(self._chunked)
            return out
        if self.length == 0:
            return b""
        if self.length is None:
            return self._read_to_close(n)
        want = self.length if n < 0 else min(n, self.length)
        buf = bytearray(want)
        view = memoryview(buf)
        got = 0
        while got < want:
            k = self._conn.read_into(view[got:])
            if not k:
                raise ProtocolError(f"the body ended after {got} of {want} bytes")
            got += k
        self.length -= want
        return bytes(buf)

    def read_into(self, view: memoryview) -> int:
        """Fill ``view`` with the next bytes of the body (each received straight into it:
        no copy after the socket's); fewer only at its end, or where the connection closed
        before a Content-Length body was complete (``cut`` is then set)."""
        if self._chunked is not None or self.length is None:
            b = self.read(len(view))
            view[:len(b)] = b
            return len(b)
        want = min(len(view), self.length)
        got = 0
        while got < want:
            k = self._conn.read_into(view[got:want])
            if not k:
                self.cut = True  # (the connection closed: length stays, never reused)
                break
            got += k
        self.length -= got
        return got

    def _read_to_close(self, n: int) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            chunk = bytearray(SEND_PIECE if n < 0 else n - len(out))
            k = self._conn.read_into(memoryview(chunk))
            if not k:
                self.length = 0
                break
            out += chunk[:k]
        return bytes(out)

    def _line(self) -> bytes:
        c = self._conn
        while (i := c._buf.find(b"\r\n")) < 0:
            if len(c._buf) > MAX_HEAD or not c._fill(65536):
                raise ProtocolError("a chunked body was cut")
        line = bytes(c._buf[:i])
        del c._buf[:i + 2]
        return line

    def _read_chunked(self) -> bytes:
        """The whole chunked body (S3 sends chunks for listings and error documents:
        small), trailers dropped."""
        c = self._conn
        out = bytearray()
        while True:
            try:
                size = int(self._line().split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("a malformed chunk size") from None
            if size == 0:
                while self._line():
                    pass  # (trailers, up to the empty line)
                return bytes(out)
            while len(c._buf) < size + 2:
                if not c._fill(max(65536, size + 2 - len(c._buf))):
                    raise ProtocolError("a chunked body was cut")
            out += c._buf[:size]
            del c._buf[:size + 2]


class Pool:
    """Idle keep-alive connections to one server, shared by threads: a request takes one
    (or opens a new one), and gives it back only after its answer was read to its end; at
    most ``size`` wait, more are closed. One that the server closed while it waited is
    dropped when taken."""

    def __init__(self, connect: Callable[[], Connection], size: int) -> None:
        self._connect = connect
        self.size = size
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def take(self) -> Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if not conn.dropped():
                return conn
            conn.close()

    def give(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
