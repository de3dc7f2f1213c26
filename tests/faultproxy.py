"""A fault-injecting HTTP/1.1 proxy for tests: caiosfs -> proxy -> SeaweedFS, on loopback.

It understands just enough HTTP to find where each request and response ends (Content-Length,
chunked, HEAD/204/304), so it can break a *chosen* exchange in a chosen way while keep-alive
connections carry on. Everything runs in daemon threads; it stops by itself after
``lifetime`` seconds, and every socket operation has a timeout, so nothing can hang a test.

Faults (``configure(rate=, kinds=)`` picks one per request with probability ``rate``):

    "500"          answer 500 InternalError (S3 XML) without forwarding the request
    "503"          answer 503 SlowDown (S3 XML) without forwarding the request
    "reset"        forward, then send half of the response (nothing if it has no body) and
                   reset the connection (RST): for a PUT the store *did* store the object
    "stall"        forward, then hold the response for ``stall`` seconds before sending it
    "stall_body"   forward, send the headers and half the body, then hold ``stall`` seconds
    "truncate"     forward, send headers and half the body, then close cleanly (FIN)
    "long_length"  forward, announce more bytes than the body has, send it, close
    "short_length" forward, announce fewer bytes than the body has, send that many, close

``down(mode)``: "reset" (every connection reset at once), "refuse" (listener closed:
connection refused) or "blackhole" (accepted, never answered, until healed or ``stall``
seconds). ``heal()`` ends faults and outages and releases held responses.

``rewrite`` (a function of the request and a whole response body) edits 200 answers to
GETs on the fly, e.g. to add keys to listings that the store itself would refuse.

``stats()`` counts requests seen, forwarded, faulted (by kind) and connections refused while
down.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

KINDS = ("500", "503", "reset", "stall", "stall_body", "truncate", "long_length",
         "short_length")
IO_TIMEOUT = 90.0  # longest any single socket operation may block
MAX_HEADER = 64 << 10
PIECE = 64 << 10

_ERROR_XML = {
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def is_object_get(self) -> bool:
        """A GET of object data (not a listing or a bucket-level query)."""
        return self.method == "GET" and self.header("range") is not None


class _Closed(Exception):
    """The peer went away (or we decided to drop the connection)."""


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Reader:
    """Buffered reads from a socket: header blocks and bodies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        try:
            data = self.sock.recv(PIECE)
        except (TimeoutError, OSError) as exc:
            raise _Closed(str(exc)) from None
        if not data:
            raise _Closed("eof")
        self.buf += data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEADER:
                raise _Closed("header too long")
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEADER:
                raise _Closed("line too long")
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> Iterator[bytes]:
        while n > 0:
            if not self.buf:
                self._fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece

    def until_eof(self) -> Iterator[bytes]:
        while True:
            if self.buf:
                piece, self.buf = self.buf, b""
                yield piece
            try:
                self._fill()
            except _Closed:
                return

    def chunked(self) -> Iterator[bytes]:
        """Raw bytes of a chunked body, framing included (relayed as is)."""
        while True:
            line = self.line()
            yield line + b"\r\n"
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = self.line()
                    yield t + b"\r\n"
                    if not t:
                        return
            yield from self.exactly(size)
            yield from self.exactly(2)


def _parse_headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers.append((k.strip(), v.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _render(first: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first] + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n").encode(
        "latin-1")


class FaultProxy:
    def __init__(self, upstream: str, *, lifetime: float = 900.0, seed: int = 0,
                 stall: float = 10.0) -> None:
        u = urlsplit(upstream)
        assert u.hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.upstream = (u.hostname, u.port or 80)
        self.lifetime = lifetime
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.rate = 0.0
        self.kinds: dict[str, float] = {}
        self.match: Callable[[Request], bool] | None = None
        self.limit: int | None = None
        # rewrite(request, body) -> body, for whole (Content-Length) 200 answers to GETs:
        # lets a test show caiosfs what a store could hold but SeaweedFS refuses to store.
        self.rewrite: Callable[[Request, bytes], bytes] | None = None
        self.stall = stall
        self.down_mode: str | None = None
        self._release = threading.Event()
        self._stopped = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.counts: Counter[str] = Counter()
        self.listener: socket.socket | None = None
        self.port = 0
        self._deadline = 0.0

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> Self:
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self._deadline = time.monotonic() + self.lifetime
        self._spawn(self._accept_loop)
        self._spawn(self._watchdog)
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        s.settimeout(0.2)
        return s

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name="faultproxy")
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _watchdog(self) -> None:
        while not self._stopped.wait(0.5):
            if time.monotonic() > self._deadline:
                self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._release.set()
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _rst(c)
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # control -----------------------------------------------------------------------------
    def configure(self, rate: float = 0.0, kinds: dict[str, float] | tuple[str, ...] | None
                  = None, match: Callable[[Request], bool] | None = None,
                  stall: float | None = None, limit: int | None = None) -> None:
        """Fault each matching request with probability ``rate``, choosing among ``kinds``
        (weights, or equal weights for a tuple); at most ``limit`` faults, if given."""
        kinds = kinds if kinds is not None else KINDS
        if not isinstance(kinds, dict):
            kinds = {k: 1.0 for k in kinds}
        unknown = set(kinds) - set(KINDS)
        assert not unknown, f"unknown fault kinds {unknown}"
        with self.lock:
            self.rate, self.kinds, self.match = rate, dict(kinds), match
            self.limit = limit
            if stall is not None:
                self.stall = stall
            self._release.clear()

    def down(self, mode: str = "reset") -> None:
        """The store becomes unreachable: 'reset', 'refuse' or 'blackhole'."""
        assert mode in ("reset", "refuse", "blackhole")
        with self.lock:
            self.down_mode = mode
            self._release.clear()
            conns, self._conns = list(self._conns), set()
        for c in conns:  # live keep-alive connections die too
            _rst(c)
        if mode == "refuse" and self.listener is not None:
            self.listener.close()
            self.listener = None

    def heal(self) -> None:
        """No more faults; the store is reachable again; held responses are released."""
        with self.lock:
            self.rate, self.kinds, self.match, self.limit = 0.0, {}, None, None
            was, self.down_mode = self.down_mode, None
            self._release.set()
        if was == "refuse" and self.listener is None and not self._stopped.is_set():
            for _ in range(100):  # the port may linger briefly
                try:
                    self.listener = self._listen(self.port)
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise RuntimeError(f"cannot listen on port {self.port} again")

    def stats(self) -> dict[str, Any]:
        with self.lock:
            c = dict(self.counts)
        faults = {k: c.get("fault_" + k, 0) for k in KINDS if c.get("fault_" + k)}
        return {"requests": c.get("requests", 0), "forwarded": c.get("forwarded", 0),
                "faulted": sum(faults.values()), "faults": faults,
                "refused_while_down": c.get("down", 0)}

    def _count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def _decide(self, req: Request) -> str | None:
        with self.lock:
            if self.rate <= 0 or not self.kinds:
                return None
            if self.match is not None and not self.match(req):
                return None
            if self.rng.random() >= self.rate:
                return None
            if self.limit is not None:
                if self.limit <= 0:
                    return None
                self.limit -= 1
            names = list(self.kinds)
            return self.rng.choices(names, weights=[self.kinds[n] for n in names])[0]

    # serving -----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            lst = self.listener
            if lst is None:
                time.sleep(0.05)
                continue
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.listener is lst and not self._stopped.is_set():
                    time.sleep(0.05)
                continue
            conn.settimeout(IO_TIMEOUT)
            mode = self.down_mode
            if mode == "reset" or self._stopped.is_set():
                self._count("down")
                _rst(conn)
                continue
            with self.lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _hold(self, seconds: float) -> None:
        self._release.wait(min(seconds, max(0.0, self._deadline - time.monotonic())))

    def _serve(self, client: socket.socket) -> None:
        up: socket.socket | None = None
        up_reader: _Reader | None = None
        creader = _Reader(client)
        try:
            while not self._stopped.is_set():
                if self.down_mode == "blackhole":
                    self._count("down")
                    self._hold(self.stall)
                    raise _Closed("blackholed")
                head = creader.head()
                first, headers = _parse_headers(head)
                method, target, _ = first.split(" ", 2)
                req = Request(method, target, headers)
                self._count("requests")
                if self.down_mode is not None:
                    self._count("down")
                    if self.down_mode == "blackhole":
                        self._hold(self.stall)
                    _rst(client)
                    raise _Closed("down")
                kind = self._decide(req)
                # Take the request body (answering Expect: 100-continue ourselves).
                expect = (_get(headers, "expect") or "").lower() == "100-continue"
                fwd_headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                if expect:
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = self._body_of(creader, headers, request=True)
                if kind in ("500", "503"):
                    for _ in body:
                        pass
                    self._count("fault_" + kind)
                    self._send_error(client, kind, req)
                    continue
                if up is None:
                    up = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
                    up_reader = _Reader(up)
                assert up_reader is not None
                up.sendall(_render(first, fwd_headers))
                for piece in body:
                    up.sendall(piece)
                self._count("forwarded")
                if kind:
                    self._count("fault_" + kind)
                keep = self._relay(client, up_reader, req, kind)
                if not keep:
                    break
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self.lock:
                self._conns.discard(client)
            try:
                client.close()
            except OSError:
                pass
            if up is not None:
                try:
                    up.close()
                except OSError:
                    pass

    def _body_of(self, reader: _Reader, headers: list[tuple[str, str]], request: bool,
                 status: int = 200, method: str = "GET") -> Iterator[bytes]:
        if not request and (method == "HEAD" or status in (204, 304) or status < 200):
            return iter(())
        if (_get(headers, "transfer-encoding") or "").lower() == "chunked":
            return reader.chunked()
        cl = _get(headers, "content-length")
        if cl is not None:
            return reader.exactly(int(cl))
        return iter(()) if request else reader.until_eof()

    def _send_error(self, client: socket.socket, kind: str, req: Request) -> None:
        status, reason, code, msg = _ERROR_XML[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{msg}</Message><Resource>{req.path}</Resource>"
                f"<RequestId>faultproxy</RequestId></Error>").encode()
        hdrs = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                ("x-amz-request-id", "faultproxy")]
        if req.method == "HEAD":
            body = b""
        client.sendall(_render(f"HTTP/1.1 {status} {reason}", hdrs) + body)

    def _relay(self, client: socket.socket, up: _Reader, req: Request, kind: str | None
               ) -> bool:
        """Copy one response from upstream to the client, breaking it as ``kind`` says.
        Returns whether the connection can carry another request."""
        method = req.method
        while True:
            first, headers = _parse_headers(up.head())
            status = int(first.split(" ", 2)[1])
            if status != 100:
                break
        body = self._body_of(up, headers, request=False, status=status, method=method)
        cl_text = _get(headers, "content-length")
        has_len = cl_text is not None and method != "HEAD" and status not in (204, 304)
        length = int(cl_text) if has_len else None
        closing = (_get(headers, "connection") or "").lower() == "close" or (
            length is None and (_get(headers, "transfer-encoding") or "").lower() != "chunked"
            and method != "HEAD" and status not in (204, 304))
        rewrite = self.rewrite
        if kind is None and rewrite is not None and length is not None and status == 200 \
                and method == "GET" and length <= 16 << 20:
            new = rewrite(req, b"".join(body))
            hdrs = [(k, str(len(new)) if k.lower() == "content-length" else v)
                    for k, v in headers]
            client.sendall(_render(first, hdrs) + new)
            return not closing
        if kind is None:
            client.sendall(_render(first, headers))
            for piece in body:
                client.sendall(piece)
            return not closing
        if kind == "stall":
            self._hold(self.stall)
            client.sendall(_render(first, headers))
            for piece in body:
                client.sendall(piece)
            return not closing
        if kind in ("long_length", "short_length") and length is not None:
            delta = max(1, length // 2) if length else 1
            fake = length + delta if kind == "long_length" else max(0, length - delta)
            hdrs = [(k, str(fake) if k.lower() == "content-length" else v) for k, v in headers]
            client.sendall(_render(first, hdrs))
            sent = 0
            for piece in body:
                if kind == "short_length":
                    piece = piece[: max(0, fake - sent)]
                if piece:
                    client.sendall(piece)
                sent += len(piece)
            raise _Closed(kind)
        if kind in ("long_length", "short_length"):  # no length to lie about: truncate
            kind = "truncate"
        # reset / truncate / stall_body: half the body, then the fault.
        half = (length // 2) if length else 0
        if kind == "reset" and not length:
            for _ in body:  # drain upstream; the client gets nothing at all
                pass
            _rst(client)
            raise _Closed("reset")
        client.sendall(_render(first, headers))
        sent = 0
        rest = b""
        for piece in body:
            if length is None:  # chunked: the first piece stands for "half"
                client.sendall(piece)
                break
            take = piece[: max(0, half - sent)]
            rest = piece[len(take):]
            if take:
                client.sendall(take)
            sent += len(take)
            if sent >= half:
                break
        if kind == "stall_body":
            self._hold(self.stall)
            if rest:
                client.sendall(rest)
            for piece in body:  # the rest, late
                client.sendall(piece)
            return not closing
        if kind == "reset":
            _rst(client)
        raise _Closed(kind)
