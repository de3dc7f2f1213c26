"""Signed S3 requests straight over urllib3, for the hot, simple calls.

A PUT of a small file, a DELETE, a listing page and a small object's GET are one request
each (the mount's ranged GETs and HEADs go over :mod:`.http1` connections instead, see
:class:`~caiosfs.store.s3.S3Store`), but going
through a boto3 client costs ~2.4 ms of CPU per request on our machines (parameter
validation, serialisation, a dozen events, response parsing) — on two cores, shared with
the FUSE loop, that is what made small-file workloads slow. Here botocore still does the
SigV4 signing (``S3SigV4Auth``, the same rules as the client: payload hashed over plain
http, not over https) and urllib3 sends the request: ~1 ms per request.

Everything else (listings, multipart, copies) stays on the boto3 client. Error responses
become the same :class:`StoreError` codes that :func:`caiosfs.store.s3.translate` gives.

``caiosfs cp`` has its own, leaner still (:mod:`.copystore`).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from ..errors import StoreError, certificate_error
from .s3xml import error_of
from .sigv4 import EMPTY_SHA256, UNSIGNED, Keys, SigV4, canonical_query, host_header

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
        # Requests without a body are signed by SigV4 (~1/10 of S3SigV4Auth's CPU: it builds
        # an AWSRequest, header maps and the signing key on every call, ~0.2-0.4 ms, a tenth
        # of the daemon's CPU for a 100 KB file's GET); the Host header sent is the one signed.
        self.host = host_header(u.scheme, u.netloc if path_style else f"{bucket}.{u.netloc}")
        self.path_prefix = urlsplit(self.base).path
        # A request on the bucket itself (a listing): /bucket path-style, / virtual-hosted.
        self.bucket_path = self.path_prefix.rstrip("/") or "/"
        # What botocore puts in x-amz-content-sha256 for a request without a body: the
        # hash of nothing, unless payload signing is switched off.
        s3 = getattr(config, "s3", None) or {}
        self.empty_payload = (UNSIGNED if s3.get("payload_signing_enabled") is False
                              else EMPTY_SHA256)
        self.signer = SigV4(region, self.keys)

    def keys(self) -> Keys | None:
        if self.credentials is None:
            return None
        f = self.credentials.get_frozen_credentials()  # (refreshed when it expires)
        return f.access_key, f.secret_key, f.token

    def url(self, key: str, query: str = "") -> str:
        """The URL of ``key`` (of the bucket itself for ""), with a canonical query."""
        q = f"?{query}" if query else ""
        if not key:
            return self.base[:-len(self.path_prefix)] + self.bucket_path + q
        return self.base + quote(key, safe="/~") + q

    def signed_headers(self, method: str, key: str, headers: dict[str, str],
                       query: str = "", now: float | None = None) -> dict[str, str]:
        """The headers to send for a request without a body (lower-case names)."""
        h = {k.lower(): v for k, v in headers.items()}
        h["host"] = self.host
        path = self.path_prefix + quote(key, safe="/~") if key else self.bucket_path
        self.signer.sign(method, path, query, h, self.empty_payload, now)
        return h

    def request(self, method: str, key: str, headers: dict[str, str], body: Any = None,
                stream: bool = False, params: dict[str, str] | None = None
                ) -> urllib3.BaseHTTPResponse:
        """One signed request (``key`` "": on the bucket, with query ``params``); a
        response that is not 2xx raises StoreError."""
        import urllib3
        if self.credentials is None:
            raise StoreError("NoCredentials", "no credentials found (set AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY or credentials_file=)")
        query = canonical_query(params) if params else ""
        url = self.url(key, query)
        if body is None:
            send = self.signed_headers(method, key, headers, query)
        else:
            req = self._request(method, url, data=body, headers=headers)
            req.context["client_config"] = self.config
            self._auth(self.credentials.get_frozen_credentials(), "s3",
                       self.region).add_auth(req)
            if hasattr(body, "seek"):
                body.seek(0)  # the payload hash read it
            send = dict(req.headers.items())
        try:
            r = self.pool.urlopen(method, url, body=body, headers=send,
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
