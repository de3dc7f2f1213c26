"""Signed S3 requests straight over urllib3, for the hot, simple calls.

A GET of a range, a PUT of a small file, a HEAD and a DELETE are one request each, but going
through a boto3 client costs ~2.4 ms of CPU per request on our machines (parameter
validation, serialisation, a dozen events, response parsing) — on two cores, shared with
the FUSE loop, that is what made small-file workloads slow. Here botocore still does the
SigV4 signing (``S3SigV4Auth``, the same rules as the client: payload hashed over plain
http, not over https) and urllib3 sends the request: ~1 ms per request.

Everything else (listings, multipart, copies) stays on the boto3 client. Error responses
become the same :class:`StoreError` codes that :func:`caiosfs.store.s3.translate` gives.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3
from botocore.auth import EMPTY_SHA256_HASH, UNSIGNED_PAYLOAD, S3SigV4Auth, _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.httpsession import get_cert_path

from ..errors import PreconditionFailed, StoreError, is_retryable


def proxies_configured(environ: dict[str, str]) -> bool:
    """urllib3 alone does not follow proxy variables (botocore does): with one set, every
    request goes through the boto3 client."""
    return any(environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                         "http_proxy", "https_proxy", "all_proxy"))


class LeanS3:
    def __init__(self, endpoint: str, bucket: str, region: str, path_style: bool,
                 credentials: Credentials | None, config: Config, max_connections: int,
                 read_timeout: float, ca_bundle: str | None) -> None:
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
        self.host = _host_from_url(self.base)
        self.path_prefix = urlsplit(self.base).path
        # A request on the bucket itself (a listing): /bucket path-style, / virtual-hosted.
        self.bucket_path = self.path_prefix.rstrip("/") or "/"
        # What botocore's S3SigV4Auth puts in X-Amz-Content-SHA256 for a request without
        # a body: the hash of nothing, unless payload signing is switched off.
        s3 = getattr(config, "s3", None) or {}
        self.empty_payload = (UNSIGNED_PAYLOAD if s3.get("payload_signing_enabled") is False
                              else EMPTY_SHA256_HASH)
        self._signing_key: tuple[str, str, bytes] = ("", "", b"")  # (secret, day, key)

    def url(self, key: str, query: str = "") -> str:
        """The URL of ``key`` (of the bucket itself for ""), with a canonical query."""
        if not key:
            return (self.base[:-len(self.path_prefix)] + self.bucket_path
                    + (f"?{query}" if query else ""))
        return self.base + quote(key, safe="/~") + (f"?{query}" if query else "")

    @staticmethod
    def canonical_query(params: dict[str, str]) -> str:
        """Query parameters URI-encoded and sorted as SigV4 wants them (and sent so)."""
        return "&".join(sorted(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                               for k, v in params.items()))

    def sign_bodiless(self, method: str, key: str, headers: dict[str, str],
                      creds: Any, amz_date: str | None = None, query: str = ""
                      ) -> dict[str, str]:
        """The headers to send for a request without a body, signed as botocore's
        S3SigV4Auth signs it (tests/test_units.py compares the two), at ~1/10 of its CPU:
        botocore builds an AWSRequest, header maps and the signing key on every call
        (~0.2-0.4 ms), which for a 100 KB file's GET was a tenth of the daemon's CPU."""
        if amz_date is None:
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = amz_date[:8]
        out = dict(headers)
        out["X-Amz-Date"] = amz_date
        if creds.token:
            out["X-Amz-Security-Token"] = creds.token
        out["X-Amz-Content-SHA256"] = self.empty_payload
        canon = {k.lower(): " ".join(v.split()) for k, v in out.items()}
        canon["host"] = self.host
        names = sorted(canon)
        signed = ";".join(names)
        path = self.path_prefix + quote(key, safe="/~") if key else self.bucket_path
        creq = "\n".join((method, path, query,
                          "".join(f"{n}:{canon[n]}\n" for n in names), signed,
                          self.empty_payload))
        scope = f"{day}/{self.region}/s3/aws4_request"
        sts = "\n".join(("AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(creq.encode()).hexdigest()))
        secret, kday, kkey = self._signing_key
        if secret != creds.secret_key or kday != day:
            kkey = f"AWS4{creds.secret_key}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                kkey = hmac.new(kkey, part.encode(), hashlib.sha256).digest()
            self._signing_key = (creds.secret_key, day, kkey)
        sig = hmac.new(kkey, sts.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={sig}")
        return out

    def request(self, method: str, key: str, headers: dict[str, str], body: Any = None,
                stream: bool = False, params: dict[str, str] | None = None
                ) -> urllib3.BaseHTTPResponse:
        """One signed request (``key`` "": on the bucket, with query ``params``); a
        response that is not 2xx raises StoreError."""
        if self.credentials is None:
            raise StoreError("NoCredentials", "no credentials found (set AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY or credentials_file=)")
        query = self.canonical_query(params) if params else ""
        url = self.url(key, query)
        creds = self.credentials.get_frozen_credentials()
        if body is None:
            send = self.sign_bodiless(method, key, headers, creds, query=query)
        else:
            req = AWSRequest(method, url, data=body, headers=headers)
            req.context["client_config"] = self.config
            S3SigV4Auth(creds, "s3", self.region).add_auth(req)
            if hasattr(body, "seek"):
                body.seek(0)  # the payload hash read it
            send = dict(req.headers.items())
        try:
            r = self.pool.urlopen(method, url, body=body, headers=send,
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
