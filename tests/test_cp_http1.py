"""caiosfs.store.http1, the HTTP/1.1 connection ``caiosfs cp`` sends its requests over: the
answers a store may give (Content-Length, chunked, delimited by close, HEAD, 100 Continue,
Connection: close, a cut or malformed answer), against a scripted server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from caiosfs.store.http1 import Connection, ProtocolError


@pytest.fixture
def server() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """A server answering each request (read up to its blank line, plus a body of the
    request's Content-Length) with the next scripted answer; (port, answers, requests)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    answers: list[bytes] = []
    requests: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            with c:
                buf = b""
                while answers:
                    while b"\r\n\r\n" not in buf:
                        b = c.recv(65536)
                        if not b:
                            break
                        buf += b
                    if b"\r\n\r\n" not in buf:
                        break
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    n = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            n = int(v)
                    while len(buf) < n:
                        buf += c.recv(65536)
                    requests.append(head + b"\r\n\r\n" + buf[:n])
                    buf = buf[n:]
                    a = answers.pop(0)
                    if a == b"CLOSE":
                        break
                    c.sendall(a)
                    if b"connection: close" in a.lower() or b"content-length" not in \
                            a.lower() and b"chunked" not in a.lower() and \
                            not a.startswith(b"HTTP/1.1 204"):
                        break
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield lsock.getsockname()[1], answers, requests
    lsock.shutdown(socket.SHUT_RDWR)  # (wakes the accept)
    lsock.close()
    t.join(5)


def _conn(port: int) -> Connection:
    return Connection.open("127.0.0.1", port, 5, 5)


def test_keep_alive_content_length_and_pieces(server: tuple[int, list[bytes], list[bytes]],
                                              ) -> None:
    port, answers, requests = server
    body = bytes(range(256)) * 1000
    answers += [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: \"e1\"\r\n"
                b"x-amz-meta-mode: 33188\r\n\r\n" % len(body) + body,
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"]
    c = _conn(port)
    c.send("GET", "/b/k?x=1", {"host": "h", "range": "bytes=0-9"}, None)
    r = c.response("GET")
    assert r.status == 200 and r.getheader("etag") == '"e1"' and r.length == len(body)
    assert ("x-amz-meta-mode", "33188") in r.getheaders()
    got = b""
    while piece := r.read(100_000):
        got += piece
    assert got == body and r.isclosed() and not r.will_close
    c.send("PUT", "/b/k2", {"host": "h", "content-length": "5"}, b"hello")
    r = c.response("PUT")
    assert r.read() == b"abc" and r.isclosed()
    assert requests[0].startswith(b"GET /b/k?x=1 HTTP/1.1\r\nhost: h\r\nrange: bytes=0-9\r\n")
    assert requests[1].endswith(b"\r\n\r\nhello")
    c.close()


def test_file_body_head_and_empty_post(server: tuple[int, list[bytes], list[bytes]],
                                       tmp_path: object) -> None:
    import io
    port, answers, requests = server
    answers += [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n",  # (HEAD: no body)
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    c = _conn(port)
    data = b"x" * (3 << 20)
    c.send("PUT", "/b/big", {"host": "h", "content-length": str(len(data))}, io.BytesIO(data))
    assert c.response("PUT").read() == b""
    c.send("HEAD", "/b/big", {"host": "h"}, None)
    r = c.response("HEAD")
    assert r.getheader("Content-Length") == "12345" and r.isclosed() and r.read() == b""
    c.send("POST", "/b/big?uploads", {"host": "h"}, None)
    assert c.response("POST").read() == b"ok"
    assert requests[0].endswith(data)
    assert b"content-length: 0" in requests[2]


def test_chunked_continue_and_close(server: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, _requests = server
    answers += [(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\n<Err>\r\n6\r\n</Err>\r\n"
                b"0\r\nTrailer: x\r\n\r\n"),
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"]
    c = _conn(port)
    c.send("GET", "/b/none", {"host": "h"}, None)
    r = c.response("GET")
    assert r.status == 404 and r.read() == b"<Err></Err>" and r.isclosed()
    c.send("GET", "/b/k", {"host": "h"}, None)
    r = c.response("GET")
    assert r.will_close and r.length is None
    assert r.read() == b"until the end" and r.isclosed()


def test_cut_and_malformed_answers(server: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, _ = server
    answers += [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabc"]
    c = _conn(port)
    c.send("GET", "/b/k", {"host": "h"}, None)
    r = c.response("GET")
    with pytest.raises(ProtocolError, match="ended after 0 of 10|ended after 3 of 10"):
        r.read()
    answers += [b"CLOSE"]
    c = _conn(port)
    c.send("GET", "/b/k", {"host": "h"}, None)
    with pytest.raises(ProtocolError, match="without answering"):
        c.response("GET")
    answers += [b"SMTP ready\r\n\r\n"]
    c = _conn(port)
    c.send("GET", "/b/k", {"host": "h"}, None)
    with pytest.raises(ProtocolError, match="not an HTTP"):
        c.response("GET")
    with pytest.raises(ValueError, match="line break"):
        c.send("GET", "/b/k", {"host": "h", "x-amz-meta-a": "1\r\nevil: 2"}, None)
    assert issubclass(ProtocolError, OSError)  # (CopyS3 retries OSErrors)


def test_timeout_is_timeout_error(server: tuple[int, list[bytes], list[bytes]]) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)  # (accepts, never answers)
    try:
        c = Connection.open("127.0.0.1", lsock.getsockname()[1], 5, 0.3)
        c.send("GET", "/b/k", {"host": "h"}, None)
        with pytest.raises(TimeoutError):
            c.response("GET")
        c.close()
    finally:
        lsock.close()


def test_a_body_that_stalls_is_a_timeout_error_within_the_timeout() -> None:
    """Plain sockets are bounded by the kernel (SO_RCVTIMEO), not by Python's polling
    timeout: a body that stops coming is still a TimeoutError, after about the timeout,
    and so is a send that cannot make progress."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    try:
        c = Connection.open("127.0.0.1", lsock.getsockname()[1], 5, 0.3)
        peer, _ = lsock.accept()
        with peer:
            c.send("GET", "/b/k", {"host": "h"}, None)
            peer.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10)
            r = c.response("GET")
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                r.read_into(memoryview(bytearray(1000)))  # (10 bytes come, then nothing)
            assert 0.2 < time.monotonic() - t0 < 3
            # The peer reads nothing: the send buffers fill, then the send times out.
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                c.send("PUT", "/b/k", {"host": "h"}, b"y" * (64 << 20))
            assert time.monotonic() - t0 < 10
        c.close()
    finally:
        lsock.close()
