"""The store ``caiosfs cp`` calls from its threads.

A one-shot command pays for every import and for building a client, and for the CPU of every
request on cores shared with the store. Its GETs, PUTs, HEADs, listings and multipart uploads
are signed by :mod:`.sigv4` and sent over one keep-alive :mod:`.http1` connection per copy
thread (no pool, no lock between threads): ~0.12 ms of CPU per small GET, where
``http.client`` took ~0.24 ms and :class:`~caiosfs.store.lean.LeanS3` ~1 ms; neither boto3
nor botocore's client is imported unless something else is needed (parts copied from an object or given as bytes: not cp's).
The mount does not use it.
"""

from __future__ import annotations

import builtins  # CopyStore's own list() method hides the type name in its signatures
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from .. import iobuf
from ..errors import StoreError, certificate_error
from . import ListPage, MultipartUpload, ObjectInfo
from .http1 import Connection, Pool, Response
from .s3xml import (
    check_range,
    error_of,
    etag,
    http_time,
    iso_time,
    list_page,
    list_params,
    meta_of,
    parse_xml,
    pump_into,
)
from .sigv4 import EMPTY_SHA256, UNSIGNED, Keys, SigV4, canonical_query, host_header

PIECE = 1 << 20  # what one read of a response body asks for
IDLE_BUFFERS = 32  # pieces of the mount's GETs waiting to be used again (iobuf.Pool)


def _hash_range(fh: Any, offset: int, length: int, *hashes: Any) -> None:
    """Feed ``length`` bytes of ``fh`` from ``offset`` to every hash (8 MiB at a time)."""
    fh.seek(offset)
    left = length
    while left:
        b = fh.read(min(left, 8 << 20))
        if not b:
            raise OSError(f"local file shrank while uploading ({length - left} of {length} "
                          f"bytes from offset {offset})")
        for h in hashes:
            h.update(b)
        left -= len(b)


class _Limited:
    """The first ``n`` bytes of a file, as a request's body is read (a file that grew
    since it was measured sends no more than announced)."""

    def __init__(self, fh: Any, n: int) -> None:
        self.fh, self.left = fh, n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        b = self.fh.read(n) if n else b""
        self.left -= len(b)
        return b


def ca_file() -> str:
    """The CA bundle botocore verifies with (``get_cert_path``): certifi's when installed,
    else the one botocore ships; found without importing botocore."""
    try:
        import certifi  # type: ignore[import-not-found,unused-ignore]
        return str(certifi.where())
    except ImportError:
        import importlib.util
        spec = importlib.util.find_spec("botocore")
        assert spec is not None and spec.origin is not None
        return os.path.join(os.path.dirname(spec.origin), "cacert.pem")


class CopyS3:
    """Signed requests over one keep-alive :class:`~.http1.Connection` per thread."""

    def __init__(self, endpoint: str, bucket: str, region: str, path_style: bool,
                 keys: Callable[[], Keys | None], payload_signing: bool,
                 read_timeout: float, ca_bundle: str | None, pool_size: int = 0) -> None:
        u = urlsplit(endpoint)
        self.https = u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        if path_style:
            self.hostname, self.netloc, self.base = u.hostname or "", u.netloc, f"/{bucket}/"
        else:
            self.hostname = f"{bucket}.{u.hostname}"
            self.netloc, self.base = f"{bucket}.{u.netloc}", "/"
        self.host = host_header(u.scheme, self.netloc)
        self.signer = SigV4(region, keys)
        self.payload_signing = payload_signing  # (plain http: hash the body, as botocore)
        self.read_timeout = read_timeout
        self._ca_bundle = ca_bundle
        self._ssl: Any = None
        self._local = threading.local()
        # With a pool (the mount's store), a connection serves one request at a time for
        # any thread and goes back to the pool once its answer was read to its end;
        # without one (cp), each thread keeps its own.
        self.pool = Pool(self._connect, pool_size) if pool_size else None
        # ... and the whole pieces of its GETs are buffers used again (iobuf.Pool).
        self.buffers = iobuf.Pool(PIECE, IDLE_BUFFERS) if pool_size else None

    def _connect(self) -> Connection:
        if self.https and self._ssl is None:
            import ssl
            self._ssl = ssl.create_default_context(cafile=self._ca_bundle or ca_file())
        # (5 s to connect, then read_timeout for each answer)
        return Connection.open(self.hostname, self.port, 5, self.read_timeout,
                               self._ssl if self.https else None)

    def drop(self) -> None:
        """Close this thread's connection (after an error: its state is unknown)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def done(self, r: Response) -> None:
        """The answer ``r`` was read as far as its caller wanted: its connection serves
        the next request if the body is complete and the server keeps it open (back to
        the pool, with one), else it is closed."""
        if not r.isclosed() or r.will_close:
            self.drop()
        elif self.pool is not None:
            conn = getattr(self._local, "conn", None)
            self._local.conn = None
            if conn is not None:
                self.pool.give(conn)

    def request(self, method: str, key: str, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: Any = None,
                payload: str | None = None) -> Response:
        """One signed request on this thread's connection; a response that is not 2xx
        raises StoreError (its connection reusable again). ``payload``: the body's SHA-256
        (hex) when the payload is signed; a 2xx response must be read to its end, or the
        connection dropped."""
        path = self.base + quote(key, safe="/~")
        query = canonical_query(params) if params else ""
        h = {"host": self.host, **(headers or {})}
        if payload is None:
            payload = EMPTY_SHA256 if body is None or not self.payload_signing else UNSIGNED
        elif not self.payload_signing:
            payload = UNSIGNED
        self.signer.sign(method, path, query, h, payload)
        conn = getattr(self._local, "conn", None)
        if conn is not None and self.pool is not None:
            self.drop()  # (a pooled connection whose answer was left unread: not reusable)
            conn = None
        try:
            if conn is None:
                conn = self._local.conn = (self.pool.take() if self.pool is not None
                                           else self._connect())
            conn.send(method, path + "?" + query if query else path, h, body)
            r = conn.response(method)
        except TimeoutError as exc:
            self.drop()
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except OSError as exc:
            self.drop()
            raise (certificate_error(exc) or StoreError(
                "ConnectionError", type(exc).__name__, retryable=True)) from exc
        if r.status >= 300:
            try:
                raw = r.read()
            except OSError:
                raw = b""
            self.done(r)
            raise error_of(r.status, raw)
        return r

    def call(self, method: str, key: str, params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None, body: Any = None,
             payload: str | None = None) -> tuple[Response, bytes]:
        """:meth:`request` with its whole (small) answer read."""
        r = self.request(method, key, params, headers, body, payload)
        try:
            raw = r.read()  # (a HEAD's too: that closes the response, freeing the connection)
        except TimeoutError as exc:
            self.drop()
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except OSError as exc:
            self.drop()
            raise StoreError("ConnectionError", type(exc).__name__, retryable=True) from exc
        self.done(r)
        return r, raw

    def _buffer(self, n: int) -> bytearray:
        """Where a GET's next piece of ``n`` bytes is received."""
        if n == PIECE and self.buffers is not None:
            return self.buffers.take()
        return iobuf.aligned(n)

    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Callable[[int, bytes], None]) -> dict[str, str]:
        """Stream the range into ``sink``, each piece received straight into a buffer of
        its own (:func:`.s3xml.pump_into`); returns the object's x-amz-meta-* (lower-case
        names). A body that ends early is a retryable IncompleteBody."""
        headers = {"range": f"bytes={start}-{start + length - 1}"}
        if etag:
            headers["if-match"] = etag
        r = self.request("GET", key, None, headers)
        got = 0
        try:
            check_range(r.status, r.getheader("Content-Range") or "", start)
            if r.length is not None and r.length != length:
                raise StoreError("IncompleteBody", f"{r.length} bytes announced, {length} "
                                 "asked for", r.status, retryable=True)
            got = pump_into(r.read_into, sink, start, length, PIECE, (TimeoutError,),
                            (OSError,), self._buffer)
        finally:
            self.done(r)  # (not read to its end: the connection is closed, not reused)
        if got != length:
            raise StoreError("IncompleteBody", f"got {got} of {length} bytes", retryable=True)
        return meta_of(r.getheaders())


def head_of(http: CopyS3, key: str) -> ObjectInfo:
    """A HEAD of ``key`` as ObjectInfo (metadata: its x-amz-meta-*)."""
    r, _ = http.call("HEAD", key)
    return ObjectInfo(key, int(r.getheader("Content-Length") or 0),
                      etag(r.getheader("ETag")), http_time(r.getheader("Last-Modified")),
                      meta_of(r.getheaders()))


class CopyStore:
    """The store ``caiosfs cp`` calls from its threads: listings, HEAD, ranged GETs, PUTs and
    multipart uploads over :class:`CopyS3`; anything else (parts copied from an object or
    given as bytes: not cp's) through an :class:`~caiosfs.store.s3.S3Store` made on first
    use."""

    def __init__(self, bucket: str, http: CopyS3, make_full: Callable[[], Any]) -> None:
        self.bucket, self.http = bucket, http
        self._make_full = make_full
        self._full: Any = None
        self._full_lock = threading.Lock()

    # (boto3, for the rest)
    def full(self) -> Any:
        with self._full_lock:
            if self._full is None:
                self._full = self._make_full()
            return self._full

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        headers = {"x-amz-meta-" + k: v for k, v in metadata.items()}
        _, raw = self.http.call("POST", key, {"uploads": ""}, headers)
        upload_id = parse_xml(raw).findtext("UploadId")
        if not upload_id:
            raise StoreError("MalformedResponse", "no UploadId in the answer", retryable=True)
        return upload_id

    def upload_part(self, key: str, upload_id: str, part: Any) -> str:
        """A part from a local file's range: read once to hash it (plain http signs the
        payload, as botocore does), then sent in 1 MiB blocks. Other kinds of parts go
        through boto3."""
        if part.path is None or part.copy_key is not None or part.data is not None:
            return str(self.full().upload_part(key, upload_id, part))
        params = {"partNumber": str(part.number), "uploadId": upload_id}
        headers = {"content-length": str(part.length)}
        with open(part.path, "rb") as fh:
            payload = None
            if self.http.payload_signing:
                h = hashlib.sha256()
                _hash_range(fh, part.offset, part.length, h)
                payload = h.hexdigest()
            fh.seek(part.offset)
            r, _ = self.http.call("PUT", key, params, headers, _Limited(fh, part.length),
                                  payload)
        return etag(r.getheader("ETag"))

    def complete_multipart(self, key: str, upload_id: str, etags: builtins.list[str]) -> str:
        from xml.sax.saxutils import escape
        body = ("<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{i + 1}</PartNumber><ETag>{escape(e)}</ETag></Part>"
            for i, e in enumerate(etags)) + "</CompleteMultipartUpload>").encode()
        _, raw = self.http.call("POST", key, {"uploadId": upload_id},
                                {"content-length": str(len(body))}, body,
                                hashlib.sha256(body).hexdigest())
        return etag(parse_xml(raw).findtext("ETag"))

    # (here)
    def check_bucket(self) -> None:
        self.list("", None, None, 1)

    def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
             max_keys: int = 1000) -> ListPage:
        _, raw = self.http.call("GET", "", list_params(prefix, delimiter, token, max_keys))
        return list_page(raw)

    def head(self, key: str) -> ObjectInfo:
        return head_of(self.http, key)

    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Callable[[int, bytes], None]) -> dict[str, str]:
        """Stream the range into ``sink``; returns the object's x-amz-meta-* (lower-case)."""
        return self.http.get_range(key, start, length, etag, sink)

    def put_file(self, key: str, path: str | bytes | None, size: int,
                 metadata: dict[str, str]) -> str:
        """A PUT of the first ``size`` bytes of the file (or of the bytes) with Content-MD5
        (the store checks it received the whole body)."""
        import base64
        headers = {"content-length": str(size if path is not None else 0)}
        headers.update({"x-amz-meta-" + k: v for k, v in metadata.items()})
        sha = self.http.payload_signing
        if path is None or size == 0:
            body: Any = b""
        elif isinstance(path, bytes) or size <= PIECE:
            if isinstance(path, bytes):
                body = path[:size]
            else:
                with open(path, "rb") as fh:
                    body = fh.read(size)
            if len(body) != size:
                raise OSError(f"local file shrank while uploading ({len(body)} of {size} "
                              "bytes)")
        else:
            body = None  # streamed from the file below
        if body is not None:
            headers["content-md5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
            r, _ = self.http.call("PUT", key, None, headers, body,
                                  hashlib.sha256(body).hexdigest() if sha else None)
            return etag(r.getheader("ETag"))
        assert isinstance(path, str)
        md5, h256 = hashlib.md5(), hashlib.sha256()
        with open(path, "rb") as fh:  # (one pass for both hashes)
            _hash_range(fh, 0, size, md5, *((h256,) if sha else ()))
            headers["content-md5"] = base64.b64encode(md5.digest()).decode()
            fh.seek(0)
            r, _ = self.http.call("PUT", key, None, headers, _Limited(fh, size),
                                  h256.hexdigest() if sha else None)
        return etag(r.getheader("ETag"))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.http.call("DELETE", key, {"uploadId": upload_id})

    def list_multipart(self, prefix: str) -> builtins.list[MultipartUpload]:
        out: builtins.list[MultipartUpload] = []
        params = {"uploads": "", "prefix": prefix}
        while True:
            _, raw = self.http.call("GET", "", params)
            root = parse_xml(raw)
            out += [MultipartUpload(u.findtext("Key") or "", u.findtext("UploadId") or "",
                                    iso_time(u.findtext("Initiated")))
                    for u in root.iterfind("Upload")]
            if root.findtext("IsTruncated") != "true":
                return out
            params["key-marker"] = root.findtext("NextKeyMarker") or ""
            params["upload-id-marker"] = root.findtext("NextUploadIdMarker") or ""
