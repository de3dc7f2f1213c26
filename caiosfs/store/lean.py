"""Signed S3 requests straight over urllib3, for the hot, simple calls.

A GET of a range, a PUT of a small file, a HEAD and a DELETE are one request each, but going
through a boto3 client costs ~2.4 ms of CPU per request on our machines (parameter
validation, serialisation, a dozen events, response parsing) — on two cores, shared with
the FUSE loop, that is what made small-file workloads slow. Here botocore still does the
SigV4 signing (``S3SigV4Auth``, the same rules as the client: payload hashed over plain
http, not over https) and urllib3 sends the request: ~1 ms per request.

Everything else (listings, multipart, copies) stays on the boto3 client. Error responses
become the same :class:`StoreError` codes that :func:`caiosfs.store.s3.translate` gives.

``caiosfs cp`` goes one step further (:class:`CopyStore`): a one-shot command pays for
every import and for building a client, and for the CPU of every request on 2 cores shared
with the store. Its GETs, PUTs, HEADs, listings and aborts are signed here (SigV4 with
hmac: the same canonical request botocore builds) and sent over one ``http.client``
connection per copy thread (no pool, no lock between threads): 0.3-0.4 ms of CPU per
small GET instead of ~1 ms through :class:`LeanS3`, and neither boto3 nor botocore's client
is imported unless a multipart upload needs it. The mount does not use it.
"""

from __future__ import annotations

import builtins  # CopyStore's own list() method hides the type name in its signatures
import configparser
import hashlib
import hmac
import http.client
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_plus, urlsplit

from ..errors import (
    PreconditionFailed,
    StoreError,
    UserError,
    certificate_error,
    is_retryable,
)
from . import ListPage, MultipartUpload, ObjectInfo

if TYPE_CHECKING:
    import urllib3
    from botocore.config import Config
    from botocore.credentials import Credentials


def proxies_configured(environ: dict[str, str]) -> bool:
    """urllib3 alone does not follow proxy variables (botocore does): with one set, every
    request goes through the boto3 client."""
    return any(environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                         "http_proxy", "https_proxy", "all_proxy"))


class LeanS3:
    def __init__(self, endpoint: str, bucket: str, region: str, path_style: bool,
                 credentials: Credentials | None, config: Config, max_connections: int,
                 read_timeout: float, ca_bundle: str | None) -> None:
        # (imported here: ``caiosfs cp`` imports this module without needing these)
        import urllib3
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.httpsession import get_cert_path
        self._auth, self._request = S3SigV4Auth, AWSRequest
        u = urlsplit(endpoint)
        self.base = (f"{u.scheme}://{u.netloc}/{bucket}/" if path_style
                     else f"{u.scheme}://{bucket}.{u.netloc}/")
        self.region = region
        self.credentials = credentials
        self.config = config  # its s3.payload_signing_enabled decides the payload hash
        kw: dict[str, Any] = {}
        if u.scheme == "https":
            kw["ca_certs"] = ca_bundle or get_cert_path(True)
        self.pool = urllib3.PoolManager(
            num_pools=4, maxsize=max_connections, retries=False,
            timeout=urllib3.Timeout(connect=5, read=read_timeout),
            socket_options=urllib3.connection.HTTPConnection.default_socket_options
            + [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)], **kw)

    def url(self, key: str) -> str:
        return self.base + quote(key, safe="/~")

    def request(self, method: str, key: str, headers: dict[str, str], body: Any = None,
                stream: bool = False) -> urllib3.BaseHTTPResponse:
        """One signed request; a response that is not 2xx raises StoreError."""
        import urllib3
        if self.credentials is None:
            raise StoreError("NoCredentials", "no credentials found (set AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY or credentials_file=)")
        url = self.url(key)
        req = self._request(method, url, data=body, headers=headers)
        req.context["client_config"] = self.config
        self._auth(self.credentials.get_frozen_credentials(), "s3",
                    self.region).add_auth(req)
        if body is not None and hasattr(body, "seek"):
            body.seek(0)  # the payload hash read it
        try:
            r = self.pool.urlopen(method, url, body=body, headers=dict(req.headers.items()),
                                  redirect=False, preload_content=not stream)
        except urllib3.exceptions.TimeoutError as exc:
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise (certificate_error(exc) or StoreError(
                "ConnectionError", type(exc).__name__, retryable=True)) from exc
        if r.status >= 300:
            try:
                raw = r.read() if method != "HEAD" else b""
            except (urllib3.exceptions.HTTPError, OSError):
                raw = b""
            finally:
                r.release_conn()
            raise error_of(r.status, raw)
        return r


def error_of(status: int, body: bytes) -> StoreError:
    """An S3 error response as StoreError (its XML Code and Message, else the status)."""
    code, message = str(status), ""
    if body:
        try:
            root = ET.fromstring(body)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or ""
        except ET.ParseError:
            pass
    if status == 412 or code == "PreconditionFailed":
        return PreconditionFailed(message)
    return StoreError(code, message[:200], status, retryable=is_retryable(code, status))


# caiosfs cp ------------------------------------------------------------------------------
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
PIECE = 1 << 20  # what one read of a response body asks for
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

# (access key, secret key, session token or None)
Keys = tuple[str, str, "str | None"]


def read_credentials_file(path: str, section: str) -> Keys:
    """(access key, secret key, session token) from an AWS shared-credentials INI file."""
    parser = configparser.ConfigParser()
    try:
        with open(path) as fh:
            parser.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise UserError(f"cannot read credentials_file {path}: {exc.__class__.__name__}") from None
    if section not in parser:
        raise UserError(f"credentials_file {path} has no [{section}] section")
    sec = parser[section]
    key, secret = sec.get("aws_access_key_id"), sec.get("aws_secret_access_key")
    if not key or not secret:
        raise UserError(f"credentials_file {path} [{section}] lacks aws_access_key_id or "
                        "aws_secret_access_key")
    return key.strip(), secret.strip(), (sec.get("aws_session_token") or None)


class FileKeys:
    """Keys from a credentials file, re-read whenever it changes (a rotated Kubernetes
    secret), as S3Store's own file provider does."""

    def __init__(self, path: str, section: str) -> None:
        self._path, self._section = path, section
        self._lock = threading.Lock()
        self._keys = read_credentials_file(path, section)
        self._sig = self._signature()

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def __call__(self) -> Keys:
        sig = self._signature()
        if sig is not None and sig != self._sig:
            with self._lock:
                try:
                    self._keys = read_credentials_file(self._path, self._section)
                    self._sig = sig
                except UserError:
                    pass  # half-written during rotation: keep the old keys, retry next request
        return self._keys


def copy_keys(credentials_file: str | None, aws_profile: str | None) -> Callable[[], Keys | None]:
    """Where cp's keys come from, in S3Store's order: the credentials file (section
    ``aws_profile``, ``$AWS_PROFILE`` or default), else the environment's keys (unless a
    profile is named), else botocore's whole chain (profiles, SSO, instance metadata...),
    imported only then."""
    if credentials_file:
        section = aws_profile or os.environ.get("AWS_PROFILE") or "default"
        return FileKeys(credentials_file, section)
    env = os.environ
    if not aws_profile and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None)
        return lambda: keys
    import botocore.exceptions
    import botocore.session
    try:
        creds = botocore.session.Session(profile=aws_profile).get_credentials()
    except botocore.exceptions.ProfileNotFound:
        raise UserError(f"AWS profile {aws_profile!r} not found") from None

    def chain() -> Keys | None:
        if creds is None:
            return None
        f = creds.get_frozen_credentials()  # (refreshed when it expires)
        return f.access_key, f.secret_key, f.token
    return chain


class SigV4:
    """AWS Signature Version 4 for S3 (what botocore's S3SigV4Auth computes): every header
    sent is signed, the path as sent (S3 does not normalise it), the payload's SHA-256 or
    UNSIGNED-PAYLOAD."""

    def __init__(self, region: str, keys: Callable[[], Keys | None]) -> None:
        self.region, self.keys = region, keys
        self._day_key: tuple[str, str, bytes] = ("", "", b"")  # (day, secret, signing key)

    def _signing_key(self, day: str, secret: str) -> bytes:
        d, s, k = self._day_key
        if d != day or s != secret:
            k = hmac.new(("AWS4" + secret).encode(), day.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._day_key = (day, secret, k)
        return k

    def sign(self, method: str, path: str, query: str, headers: dict[str, str],
             payload: str, now: float | None = None) -> None:
        """Add x-amz-date, x-amz-content-sha256 (and the session token) and Authorization
        to ``headers`` (lower-case names); ``query`` is already canonical (sorted, encoded)."""
        keys = self.keys()
        if keys is None:
            raise StoreError("NoCredentials", "no credentials found (set AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY or credentials_file=)")
        access, secret, token = keys
        amz = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        headers["x-amz-date"] = amz
        headers["x-amz-content-sha256"] = payload
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        canonical = "\n".join((
            method, path, query,
            "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names),
            ";".join(names), payload))
        scope = f"{amz[:8]}/{self.region}/s3/aws4_request"
        to_sign = (f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n"
                   + hashlib.sha256(canonical.encode()).hexdigest())
        sig = hmac.new(self._signing_key(amz[:8], secret), to_sign.encode(),
                       hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={sig}")


def canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                    for k, v in sorted(params.items()))


class _Limited:
    """The first ``n`` bytes of a file, as http.client reads a body (a file that grew
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
    """Signed requests over one keep-alive ``http.client`` connection per thread."""

    def __init__(self, endpoint: str, bucket: str, region: str, path_style: bool,
                 keys: Callable[[], Keys | None], payload_signing: bool,
                 read_timeout: float, ca_bundle: str | None) -> None:
        u = urlsplit(endpoint)
        self.https = u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        if path_style:
            self.hostname, self.netloc, self.base = u.hostname or "", u.netloc, f"/{bucket}/"
        else:
            self.hostname = f"{bucket}.{u.hostname}"
            self.netloc, self.base = f"{bucket}.{u.netloc}", "/"
        self.signer = SigV4(region, keys)
        self.payload_signing = payload_signing  # (plain http: hash the body, as botocore)
        self.read_timeout = read_timeout
        self._ca_bundle = ca_bundle
        self._ssl: Any = None
        self._local = threading.local()

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.https:
            if self._ssl is None:
                import ssl
                self._ssl = ssl.create_default_context(cafile=self._ca_bundle or ca_file())
            conn = http.client.HTTPSConnection(self.hostname, self.port, timeout=5,
                                               context=self._ssl, blocksize=PIECE)
        else:
            conn = http.client.HTTPConnection(self.hostname, self.port, timeout=5,
                                              blocksize=PIECE)
        conn.connect()  # (5 s to connect, then read_timeout for each answer)
        assert conn.sock is not None
        conn.timeout = self.read_timeout
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return conn

    def drop(self) -> None:
        """Close this thread's connection (after an error: its state is unknown)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def request(self, method: str, key: str, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: Any = None,
                payload: str | None = None) -> http.client.HTTPResponse:
        """One signed request on this thread's connection; a response that is not 2xx
        raises StoreError (its connection reusable again). ``payload``: the body's SHA-256
        (hex) when the payload is signed; a 2xx response must be read to its end, or the
        connection dropped."""
        path = self.base + quote(key, safe="/~")
        query = canonical_query(params) if params else ""
        h = {"host": self.netloc, **(headers or {})}
        if payload is None:
            payload = EMPTY_SHA256 if body is None or not self.payload_signing else UNSIGNED
        elif not self.payload_signing:
            payload = UNSIGNED
        self.signer.sign(method, path, query, h, payload)
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = self._connect()
            conn.request(method, path + "?" + query if query else path, body=body, headers=h)
            r = conn.getresponse()
        except TimeoutError as exc:
            self.drop()
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except (http.client.HTTPException, OSError) as exc:
            self.drop()
            raise (certificate_error(exc) or StoreError(
                "ConnectionError", type(exc).__name__, retryable=True)) from exc
        if r.status >= 300:
            try:
                raw = r.read()
            except (http.client.HTTPException, OSError):
                raw = b""
                self.drop()
            if r.will_close:
                self.drop()
            raise error_of(r.status, raw)
        return r

    def call(self, method: str, key: str, params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None, body: Any = None,
             payload: str | None = None) -> tuple[http.client.HTTPResponse, bytes]:
        """:meth:`request` with its whole (small) answer read."""
        r = self.request(method, key, params, headers, body, payload)
        try:
            raw = r.read()  # (a HEAD's too: that closes the response, freeing the connection)
        except TimeoutError as exc:
            self.drop()
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except (http.client.HTTPException, OSError) as exc:
            self.drop()
            raise StoreError("ConnectionError", type(exc).__name__, retryable=True) from exc
        if r.will_close:
            self.drop()
        return r, raw


def _etag(value: str | None) -> str:
    return '"' + value.strip('"') + '"' if value else ""


def _meta(r: http.client.HTTPResponse) -> dict[str, str]:
    return {k[11:].lower(): v for k, v in r.getheaders() if k[:11].lower() == "x-amz-meta-"}


def _iso_time(text: str | None) -> float:
    if not text:
        return 0.0
    import datetime
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        from email.utils import parsedate_to_datetime
        return parsedate_to_datetime(text).timestamp()


def _http_time(text: str | None) -> float:
    if not text:
        return 0.0
    from email.utils import parsedate_to_datetime
    return parsedate_to_datetime(text).timestamp()


def _xml(raw: bytes) -> ET.Element:
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise StoreError("MalformedResponse", "the store's answer is not XML",
                         retryable=True) from exc
    if root.tag.startswith(NS):  # (drop the namespace: findtext("Key") then works)
        for el in root.iter():
            el.tag = el.tag[len(NS):]
    if root.tag == "Error":  # (an error in a 200 answer)
        raise error_of(500, raw)
    return root


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
        upload_id = _xml(raw).findtext("UploadId")
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
                fh.seek(part.offset)
                left = part.length
                while left:
                    b = fh.read(min(left, 8 << 20))
                    if not b:
                        raise OSError(f"local file shrank while uploading ({part.length - left}"
                                      f" of {part.length} bytes of part {part.number})")
                    h.update(b)
                    left -= len(b)
                payload = h.hexdigest()
            fh.seek(part.offset)
            r, _ = self.http.call("PUT", key, params, headers, _Limited(fh, part.length),
                                  payload)
        return _etag(r.getheader("ETag"))

    def complete_multipart(self, key: str, upload_id: str, etags: builtins.list[str]) -> str:
        from xml.sax.saxutils import escape
        body = ("<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{i + 1}</PartNumber><ETag>{escape(e)}</ETag></Part>"
            for i, e in enumerate(etags)) + "</CompleteMultipartUpload>").encode()
        _, raw = self.http.call("POST", key, {"uploadId": upload_id},
                                {"content-length": str(len(body))}, body,
                                hashlib.sha256(body).hexdigest())
        return _etag(_xml(raw).findtext("ETag"))

    # (here)
    def check_bucket(self) -> None:
        self.list("", None, None, 1)

    def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
             max_keys: int = 1000) -> ListPage:
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys),
                  "encoding-type": "url"}
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        _, raw = self.http.call("GET", "", params)
        root = _xml(raw)
        dec = unquote_plus if root.findtext("EncodingType") == "url" else str
        objects = [ObjectInfo(dec(c.findtext("Key") or ""), int(c.findtext("Size") or 0),
                              _etag(c.findtext("ETag")), _iso_time(c.findtext("LastModified")))
                   for c in root.iterfind("Contents")]
        prefixes = [dec(c.findtext("Prefix") or "") for c in root.iterfind("CommonPrefixes")]
        more = root.findtext("IsTruncated") == "true"
        return ListPage(objects, prefixes, root.findtext("NextContinuationToken") if more
                        else None)

    def head(self, key: str) -> ObjectInfo:
        r, _ = self.http.call("HEAD", key)
        return ObjectInfo(key, int(r.getheader("Content-Length") or 0),
                          _etag(r.getheader("ETag")), _http_time(r.getheader("Last-Modified")),
                          _meta(r))

    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Callable[[int, bytes], None]) -> dict[str, str]:
        """Stream the range into ``sink``; returns the object's x-amz-meta-* (lower-case)."""
        headers = {"range": f"bytes={start}-{start + length - 1}"}
        if etag:
            headers["if-match"] = etag
        r = self.http.request("GET", key, None, headers)
        got = 0
        try:
            # A server that ignored the range, or announces another length, would hand us
            # the wrong bytes: check both before reading.
            cr = r.getheader("Content-Range") or ""
            if r.status == 206:
                if not cr.startswith(f"bytes {start}-"):
                    raise StoreError("InvalidRange", f"asked for {start}, got {cr!r}",
                                     r.status, retryable=True)
            elif start != 0:
                raise StoreError("InvalidRange", "the server ignored the Range header",
                                 r.status)
            if r.length is not None and r.length != length:
                raise StoreError("IncompleteBody", f"{r.length} bytes announced, {length} "
                                 "asked for", r.status, retryable=True)
            while got < length:
                try:
                    piece = r.read(min(PIECE, length - got))
                except TimeoutError as exc:
                    raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
                except (http.client.HTTPException, OSError) as exc:
                    raise StoreError("ConnectionError", type(exc).__name__,
                                     retryable=True) from exc
                if not piece:
                    break
                sink(start + got, piece)
                got += len(piece)
        finally:
            if not (got == length and r.isclosed() and not r.will_close):
                self.http.drop()  # (not read to its end: the connection cannot be reused)
        if got != length:
            raise StoreError("IncompleteBody", f"got {got} of {length} bytes", retryable=True)
        return _meta(r)

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
            return _etag(r.getheader("ETag"))
        assert isinstance(path, str)
        md5, h256 = hashlib.md5(), hashlib.sha256()
        with open(path, "rb") as fh:  # (one pass for both hashes)
            left = size
            while left:
                b = fh.read(min(left, 8 << 20))
                if not b:
                    raise OSError(f"local file shrank while uploading ({size - left} of "
                                  f"{size} bytes)")
                md5.update(b)
                if sha:
                    h256.update(b)
                left -= len(b)
            headers["content-md5"] = base64.b64encode(md5.digest()).decode()
            fh.seek(0)
            r, _ = self.http.call("PUT", key, None, headers, _Limited(fh, size),
                                  h256.hexdigest() if sha else None)
        return _etag(r.getheader("ETag"))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.http.call("DELETE", key, {"uploadId": upload_id})

    def list_multipart(self, prefix: str) -> builtins.list[MultipartUpload]:
        out: builtins.list[MultipartUpload] = []
        params = {"uploads": "", "prefix": prefix}
        while True:
            _, raw = self.http.call("GET", "", params)
            root = _xml(raw)
            out += [MultipartUpload(u.findtext("Key") or "", u.findtext("UploadId") or "",
                                    _iso_time(u.findtext("Initiated")))
                    for u in root.iterfind("Upload")]
            if root.findtext("IsTruncated") != "true":
                return out
            params["key-marker"] = root.findtext("NextKeyMarker") or ""
            params["upload-id-marker"] = root.findtext("NextUploadIdMarker") or ""
