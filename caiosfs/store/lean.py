"""Signed S3 requests straight over urllib3, for the hot, simple calls.

A GET of a range, a PUT of a small file, a HEAD and a DELETE are one request each, but going
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

from ..errors import StoreError
from .s3xml import error_of

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
            raise StoreError("ConnectionError", type(exc).__name__, retryable=True) from exc
        if r.status >= 300:
            try:
                raw = r.read() if method != "HEAD" else b""
            except (urllib3.exceptions.HTTPError, OSError):
                raw = b""
            finally:
                r.release_conn()
            raise error_of(r.status, raw)
        return r
