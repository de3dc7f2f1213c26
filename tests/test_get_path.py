"""The mount's ranged GETs (``S3Store.get_range``): our own HTTP/1.1 connections from a pool,
each piece received straight into a page-aligned buffer that the cache writes with O_DIRECT.

Against a scripted server for what a store or a network may do to one GET (a short body, a
reset, a stall, 412, error documents, keep-alive), and against SeaweedFS for the bytes."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import data

from caiosfs.cache import BlockCache
from caiosfs.errors import PreconditionFailed, StoreError
from caiosfs.index import Index
from caiosfs.iobuf import ALIGN, address, aligned, is_aligned
from caiosfs.metrics import Metrics
from caiosfs.store.s3 import S3Store

MiB = 1 << 20
Reply = Callable[[socket.socket, bytes], bool]  # (connection, request head) -> keep it open


class Scripted:
    """A server on loopback answering each request with the next scripted reply; counts the
    connections it accepted and keeps the requests' heads."""

    def __init__(self) -> None:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.replies: list[Reply] = []
        self.requests: list[bytes] = []
        self.accepted = 0
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        with c:
            buf = b""
            for _ in range(100):
                while b"\r\n\r\n" not in buf:
                    b = c.recv(65536)
                    if not b:
                        return
                    buf += b
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head)
                if not self.replies or not self.replies.pop(0)(c, head):
                    return

    def close(self) -> None:
        self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        self._t.join(5)


def body_of(n: int, seed: int = 1) -> bytes:
    return data(n, seed)


def ok(body: bytes, start: int = 0, total: int | None = None) -> Reply:
    """A complete 206 answer with ``body``, keeping the connection."""
    def reply(c: socket.socket, head: bytes) -> bool:
        end = start + len(body) - 1
        c.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                  b"Content-Range: bytes %d-%d/%d\r\nETag: \"e\"\r\n"
                  b"x-amz-meta-mode: 33188\r\n\r\n" % (len(body), start, end,
                                                       total or start + len(body)) + body)
        return True
    return reply


def short(announced: int, sent: bytes, reset: bool = False) -> Reply:
    """Content-Length ``announced``, then only ``sent`` and a close (``reset``: a TCP
    reset, SO_LINGER 0)."""
    def reply(c: socket.socket, head: bytes) -> bool:
        c.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                  b"Content-Range: bytes 0-%d/%d\r\n\r\n" % (announced, announced - 1,
                                                            announced) + sent)
        if reset:
            time.sleep(0.05)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    return reply


def stall(announced: int, sent: bytes, seconds: float) -> Reply:
    def reply(c: socket.socket, head: bytes) -> bool:
        c.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                  b"Content-Range: bytes 0-%d/%d\r\n\r\n" % (announced, announced - 1,
                                                            announced) + sent)
        time.sleep(seconds)
        return False
    return reply


def error(status: bytes, code: bytes) -> Reply:
    def reply(c: socket.socket, head: bytes) -> bool:
        doc = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>" + code +
               b"</Code><Message>no</Message></Error>")
        c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(doc) + doc)
        return True
    return reply


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Scripted, S3Store]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-logged")
    for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
              "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    srv = Scripted()
    st = S3Store("bk", f"http://127.0.0.1:{srv.port}", "us-east-1", True,
                 max_connections=2, read_timeout=1.0)
    try:
        yield srv, st
    finally:
        srv.close()


def collect() -> tuple[list[tuple[int, Any]], Callable[[int, bytes], None]]:
    pieces: list[tuple[int, Any]] = []
    return pieces, lambda off, b: pieces.append((off, b))


def test_pieces_are_aligned_buffers_and_connections_are_reused(
        scripted: tuple[Scripted, S3Store]) -> None:
    """Each 1 MiB piece is its own page-aligned bytearray holding the right bytes; a
    connection whose body was read to its end serves the next GET (one accept for three),
    and the request is signed, ranged and conditional (If-Match) as asked."""
    srv, st = scripted
    body = body_of(3 * MiB + 5)
    srv.replies += [ok(body), ok(body[:MiB]), ok(body[MiB:2 * MiB], MiB, len(body))]
    pieces, sink = collect()
    meta = st.get_range("dir/k", 0, len(body), '"e"', sink)
    assert meta == {"mode": "33188"}
    assert [off for off, _ in pieces] == [0, MiB, 2 * MiB, 3 * MiB]
    assert all(is_aligned(b) for _, b in pieces[:3]) and len(pieces[3][1]) == 5
    assert b"".join(b for _, b in pieces) == body
    st.get_range("dir/k", 0, MiB, None, sink)
    st.get_range("dir/k", MiB, MiB, None, sink)
    assert pieces[-1][1] == body[MiB:2 * MiB]
    assert srv.accepted == 1
    head = srv.requests[0].decode().lower()
    assert head.startswith("get /bk/dir/k http/1.1")
    assert f"range: bytes=0-{len(body) - 1}" in head and 'if-match: "e"' in head
    assert "authorization: aws4-hmac-sha256 credential=akidtest/" in head
    assert "secret-never-logged" not in head
    assert "if-match" not in srv.requests[1].decode().lower()


def test_short_body_is_retryable_and_its_connection_not_reused(
        scripted: tuple[Scripted, S3Store]) -> None:
    """A body that ends before its Content-Length: a retryable IncompleteBody, the whole
    pieces that came were delivered, and the next GET opens a new connection."""
    srv, st = scripted
    body = body_of(2 * MiB)
    srv.replies += [short(2 * MiB, body[:MiB + 100]), ok(body)]
    pieces, sink = collect()
    with pytest.raises(StoreError) as e:
        st.get_range("k", 0, 2 * MiB, None, sink)
    assert e.value.code == "IncompleteBody" and e.value.retryable
    assert pieces[0] == (0, body[:MiB])
    st.get_range("k", 0, 2 * MiB, None, sink)
    assert b"".join(b for _, b in pieces[-2:]) == body
    assert srv.accepted == 2


def test_announced_length_not_asked_for_is_incomplete(
        scripted: tuple[Scripted, S3Store]) -> None:
    srv, st = scripted
    srv.replies += [ok(body_of(100))]
    with pytest.raises(StoreError) as e:
        st.get_range("k", 0, 200, None, collect()[1])
    assert e.value.code == "IncompleteBody" and e.value.retryable


def test_reset_mid_body_is_a_retryable_connection_error(
        scripted: tuple[Scripted, S3Store]) -> None:
    srv, st = scripted
    body = body_of(4 * MiB)
    srv.replies += [short(4 * MiB, body[:MiB // 2], reset=True), ok(body[:MiB])]
    with pytest.raises(StoreError) as e:
        st.get_range("k", 0, 4 * MiB, None, collect()[1])
    assert e.value.retryable and e.value.code in ("ConnectionError", "IncompleteBody")
    pieces, sink = collect()
    st.get_range("k", 0, MiB, None, sink)  # (a fresh connection)
    assert pieces == [(0, body[:MiB])] and srv.accepted == 2


def test_a_stalled_body_times_out_within_read_timeout(
        scripted: tuple[Scripted, S3Store]) -> None:
    srv, st = scripted
    srv.replies += [stall(2 * MiB, body_of(1000), 5.0)]
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        st.get_range("k", 0, 2 * MiB, None, collect()[1])
    assert e.value.code == "Timeout" and e.value.retryable
    assert time.monotonic() - t0 < 3.0  # read_timeout is 1 s


def test_error_documents_and_if_match(scripted: tuple[Scripted, S3Store]) -> None:
    """412 is PreconditionFailed; 404/403 documents are their S3 codes (not retryable);
    503 SlowDown is retryable. The connection serves on after a whole error document."""
    srv, st = scripted
    srv.replies += [error(b"412 Precondition Failed", b"PreconditionFailed"),
                    error(b"404 Not Found", b"NoSuchKey"),
                    error(b"403 Forbidden", b"AccessDenied"),
                    error(b"503 Slow Down", b"SlowDown")]
    with pytest.raises(PreconditionFailed):
        st.get_range("k", 0, 10, '"old"', collect()[1])
    for code, status, retryable in (("NoSuchKey", 404, False), ("AccessDenied", 403, False),
                                    ("SlowDown", 503, True)):
        with pytest.raises(StoreError) as e:
            st.get_range("k", 0, 10, None, collect()[1])
        assert (e.value.code, e.value.status, e.value.retryable) == (code, status, retryable)
    assert srv.accepted == 1


def test_head_over_the_pool(scripted: tuple[Scripted, S3Store]) -> None:
    srv, st = scripted

    def head(c: socket.socket, h: bytes) -> bool:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: abc\r\n"
                  b"Last-Modified: Mon, 07 Dec 2026 10:00:00 GMT\r\n"
                  b"x-amz-meta-Mode: 33261\r\n\r\n")
        return True
    srv.replies += [head, error(b"404 Not Found", b"")]
    info = st.head("a/b")
    assert (info.size, info.etag, info.metadata) == (1234, '"abc"', {"mode": "33261"})
    assert info.mtime == 1796637600.0
    with pytest.raises(StoreError) as e:
        st.head("a/c")
    assert e.value.status == 404
    assert srv.requests[0].startswith(b"HEAD /bk/a/b HTTP/1.1") and srv.accepted == 1


def test_pool_keeps_at_most_max_connections(scripted: tuple[Scripted, S3Store]) -> None:
    """Six GETs at once open six connections; two (max_connections) are kept for the next
    ones, the rest are closed."""
    srv, st = scripted
    body = body_of(1000)
    gate = threading.Barrier(6)

    def slow_ok(c: socket.socket, h: bytes) -> bool:
        gate.wait(5)
        return ok(body)(c, h)
    srv.replies += [slow_ok] * 6 + [ok(body)] * 6
    threads = [threading.Thread(target=st.get_range, args=("k", 0, 1000, None,
                                                           collect()[1]))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert srv.accepted == 6
    assert st._http is not None and st._http.pool is not None
    assert len(st._http.pool._idle) == 2
    for _ in range(6):
        st.get_range("k", 0, 1000, None, collect()[1])
    assert srv.accepted == 6


def test_a_pooled_connection_the_server_closed_is_not_used(
        scripted: tuple[Scripted, S3Store]) -> None:
    srv, st = scripted
    body = body_of(10)

    def ok_then_close(c: socket.socket, h: bytes) -> bool:
        ok(body)(c, h)
        return False  # (the server closes the idle connection)
    srv.replies += [ok_then_close, ok(body)]
    st.get_range("k", 0, 10, None, collect()[1])
    time.sleep(0.2)
    pieces, sink = collect()
    st.get_range("k", 0, 10, None, sink)
    assert pieces == [(0, body)] and srv.accepted == 2


# -- the cache's side ---------------------------------------------------------------------

def _cache(tmp_path: Path) -> BlockCache:
    return BlockCache(tmp_path, Index(tmp_path / "index.lmdb"), Metrics(), 1 << 30, 8 * MiB)


def test_aligned_buffers() -> None:
    for n in (1, 4095, ALIGN, MiB, MiB + 7):
        b = aligned(n)
        assert isinstance(b, bytearray) and len(b) == n and not any(b[:64])
        assert is_aligned(b) == (n >= ALIGN)
        # (a buffer shorter than ALIGN is not aligned on purpose, but may land on a
        # boundary by chance: only the long ones' addresses are promised)
        assert n < ALIGN or address(b) % ALIGN == 0
        b[-1:] = b"x"  # (writable, and resizable again: no buffer export left)
        b += b"y"
    assert not is_aligned(b"x" * 8192) and not is_aligned(memoryview(bytearray(10)))


def test_get_into_the_cache_writes_chunks_with_o_direct(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: Any, bucket: str,
        seaweed: Any) -> None:
    """A GET from SeaweedFS into the cache: whole chunks written with O_DIRECT, the short
    last chunk through the page cache, every byte and checksum right; 412 on a stale
    If-Match."""
    import caiosfs.cache as cache_mod
    body = body_of(2 * MiB + 12345, 7)
    s3.put_object(Bucket=bucket, Key="obj", Body=body)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    st = S3Store(bucket, seaweed.endpoint, "us-east-1", True)
    etag = st.head("obj").etag
    cache = _cache(tmp_path)
    flags: list[int] = []
    real_open = os.open

    def spy(path: Any, fl: int, *a: Any) -> int:
        if "blocks" in str(path):
            flags.append(fl)
        return real_open(path, fl, *a)
    monkeypatch.setattr(cache_mod.os, "open", spy)
    w = cache.writer(b"id", len(body))
    st.get_range("obj", 0, len(body), etag, w)
    # One open per block and kind of write (the first finds no directory yet and is
    # made again); the writer closed its file at the GET's end.
    assert [bool(f & os.O_DIRECT) for f in flags] == [True, True, False]
    assert w._fd == -1
    monkeypatch.setattr(cache_mod.os, "open", real_open)
    cache.commit(b"id", len(body), w.done)
    assert cache.read(b"id", 0, len(body), len(body)) == body
    with pytest.raises(PreconditionFailed):
        st.get_range("obj", 0, 10, '"0000"', collect()[1])


def test_a_file_system_refusing_o_direct_gets_buffered_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import caiosfs.cache as cache_mod
    cache = _cache(tmp_path)
    real_open = os.open
    refused = []

    def no_direct(path: Any, fl: int, *a: Any) -> int:
        if fl & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, fl, *a)
    monkeypatch.setattr(cache_mod.os, "open", no_direct)
    w = cache.writer(b"id", 3 * MiB)
    for i in range(3):
        piece = aligned(MiB)
        piece[:] = body_of(MiB, i)
        w(i * MiB, piece)
    assert len(refused) == 1 and not cache.direct  # (asked once, then never again)
    cache.commit(b"id", 3 * MiB, w.done)
    assert cache.read(b"id", 0, 3 * MiB, 3 * MiB) == b"".join(body_of(MiB, i)
                                                             for i in range(3))


def test_chunks_the_cache_lets_go_of_are_received_into_again(tmp_path: Path) -> None:
    """Chunks read and pushed out of the verified LRU, or dropped from the hold, go back
    to the store's buffer pool - but not one a reader still holds (it must never change
    under it), nor a piece that is not a whole aligned buffer."""
    from caiosfs.iobuf import Pool
    cache = _cache(tmp_path)
    pool = Pool(MiB, keep=64)
    cache.recycle = pool.give
    ident, n = b"id", 40
    w = cache.writer(ident, n * MiB)
    for i in range(n):
        w(i * MiB, body_of(MiB, i))
    cache.commit(ident, n * MiB, w.done)
    bufs = [aligned(MiB) for _ in range(n)]
    for i, b in enumerate(bufs):
        b[:] = body_of(MiB, i)
        cache.hold(ident, i, b, MiB, i)
    ids = [id(b) for b in bufs]
    del b, bufs
    kept = cache.read(ident, 0, MiB, n * MiB)  # (a reader keeps chunk 0)
    for i in range(1, n):
        assert cache.read(ident, i * MiB, MiB, n * MiB) == body_of(MiB, i)
    back = [id(x) for x in pool._free]
    assert len(back) == n - 16 - 1 and ids[0] not in back  # (16 MiB stay in the LRU)
    assert set(back) <= set(ids) and kept == body_of(MiB, 0)
    taken = pool.take()
    assert id(taken) in back and pool.reused == 1
    off = aligned(MiB + 1)
    del off[:1]  # (its start moved one byte: not aligned, not taken)
    cache.recycle(off)
    cache.recycle(aligned(10))
    assert len(pool._free) == n - 16 - 2


def test_a_proxy_variable_sends_gets_through_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither urllib3 nor our connections follow proxy variables: with one set, every
    request goes through the boto3 client (which does)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    plain = S3Store("bk", "http://127.0.0.1:9", "us-east-1", True)
    assert plain._http is not None and plain._http.pool is not None
    assert plain._http.pool.size == 32  # (max_connections)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    proxied = S3Store("bk", "http://127.0.0.1:9", "us-east-1", True)
    assert proxied._http is None and proxied._lean is None
