"""The boto3 implementation of :class:`ObjectStore`.

Retries are *not* done here (botocore's own retries are off): :mod:`.client` owns the retry
policy, because reads and dirty-data uploads need different patience.
"""

from __future__ import annotations

import base64
import builtins  # the class's own list() method hides the type name in its signatures
import io
import os
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.exceptions as bexc
import urllib3
from botocore.config import Config
from botocore.credentials import CredentialProvider, Credentials, ReadOnlyCredentials

from .. import iobuf
from ..errors import (
    PreconditionFailed,
    StoreError,
    UserError,
    certificate_error,
    is_retryable,
)
from . import Body, ListPage, MultipartUpload, ObjectInfo, PartSource, Sink, file_md5
from .copystore import CopyS3, head_of
from .lean import LeanS3, proxies_configured
from .s3xml import list_page, list_params
from .sigv4 import Keys, keys_from

READ_PIECE = 1 << 20
MAX_COPY = 5 << 30  # CopyObject limit; larger objects are copied part by part


class FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset+length) of a local file.

    Lets botocore hash and send a multipart part straight from the cache file, so a 64 MiB
    part never sits in memory whole.
    """

    def __init__(self, path: str, offset: int, length: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._start, self._len, self._pos = offset, length, 0

    def __len__(self) -> int:
        return self._len

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = self._len - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._start + self._pos)
        if len(data) != n:
            raise OSError(f"local file shrank while uploading ({len(data)} of {n} bytes)")
        self._pos += n
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _KeysCredentials(Credentials):
    """botocore credentials read from a :data:`sigv4.Keys` source at every signature, so
    the boto3 client signs with the same keys as our own signer (a rotated credentials
    file, refreshed chain credentials)."""

    def __init__(self, keys: Callable[[], Keys | None], first: Keys) -> None:
        self._keys = keys
        super().__init__(*first, method="caiosfs")

    def get_frozen_credentials(self) -> Any:
        return ReadOnlyCredentials(*(self._keys() or (None, None, None)))


class _KeysProvider(CredentialProvider):
    METHOD = CANONICAL_NAME = "caiosfs"

    def __init__(self, keys: Callable[[], Keys | None]) -> None:
        self._keys = keys

    def load(self) -> Credentials | None:
        first = self._keys()
        return _KeysCredentials(self._keys, first) if first else None


def _etag(value: str) -> str:
    """ETags compared as given by listings: quoted (some servers omit the quotes in copy
    results)."""
    return '"' + value.strip('"') + '"' if value else ""


def _mtime(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, str):
        return parsedate_to_datetime(value).timestamp()
    return value.timestamp()


def translate(exc: BaseException) -> StoreError:
    """botocore/urllib3 exception -> StoreError (message free of secrets)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "412") or status == 412:
            return PreconditionFailed(str(err.get("Message", "")))
        return StoreError(code, str(err.get("Message", "")), status,
                          retryable=is_retryable(code, status))
    cert = certificate_error(exc)
    if cert is not None:
        return cert
    if isinstance(exc, (bexc.ConnectTimeoutError, bexc.ReadTimeoutError)):
        return StoreError("Timeout", type(exc).__name__, retryable=True)
    if isinstance(exc, bexc.NoCredentialsError):
        return StoreError("NoCredentials", "no credentials found (set AWS_ACCESS_KEY_ID/"
                          "AWS_SECRET_ACCESS_KEY or credentials_file=)", retryable=False)
    if isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectionError,
                        bexc.HTTPClientError, bexc.ResponseStreamingError, ConnectionError,
                        TimeoutError)):
        return StoreError("ConnectionError", type(exc).__name__, retryable=True)
    if isinstance(exc, bexc.BotoCoreError):
        return StoreError("ClientError", type(exc).__name__, retryable=False)
    return StoreError("ConnectionError", type(exc).__name__, retryable=True)


SMALL_BODY = 2 << 20


def _no_expect_for_small_bodies(params: dict[str, Any], **_: Any) -> None:
    headers = params.get("headers", {})
    if "Expect" in headers and int(headers.get("Content-Length", SMALL_BODY)) < SMALL_BODY:
        del headers["Expect"]


class S3Store:
    """ObjectStore over boto3: one client per mount, shared by the worker threads."""

    def __init__(self, bucket: str, endpoint: str, region: str, path_style: bool,
                 credentials_file: str | None = None, aws_profile: str | None = None,
                 max_connections: int = 32, read_timeout: float = 30.0) -> None:
        self.bucket = bucket
        # Which keys sign, decided in one place for the mount and cp (sigv4.keys_from); the
        # client asks that source first, before botocore's own chain.
        keys = keys_from(credentials_file, aws_profile)
        bsession = boto3.session.Session(
            profile_name=aws_profile if aws_profile and not credentials_file else None)
        bsession._session.get_component("credential_provider").providers.insert(
            0, _KeysProvider(keys))
        cfg = Config(
            region_name=region,
            signature_version="s3v4",
            # Over https TLS already guards the body: no SHA-256 pass over every upload
            # (~0.7 s of CPU per GiB). Plain http keeps the signed payload hash.
            s3={"addressing_style": "path" if path_style else "virtual",
                "payload_signing_enabled": not endpoint.startswith("https://")},
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=read_timeout,
            max_pool_connections=max_connections,
            tcp_keepalive=True,
            user_agent_extra="caiosfs/0.1",
            # S3-compatible stores often reject the newer default CRC trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self._c = bsession.client("s3", endpoint_url=endpoint, config=cfg)
        except bexc.ProfileNotFound:
            raise UserError(f"AWS profile {aws_profile!r} not found") from None
        # botocore asks for "100 Continue" before every PUT body: one more round trip per
        # request, which is most of the cost of a small file. Small bodies go at once.
        self._c.meta.events.register_last("before-call.s3", _no_expect_for_small_bodies)
        # GET/PUT/HEAD/DELETE of one object skip the client machinery (see lean.py).
        self._lean: LeanS3 | None = None
        # Ranged GETs (and HEADs) go over our own HTTP/1.1 connections (store/http1.py, a
        # pool of max_connections kept alive): each piece is received straight into the
        # buffer that becomes its cache chunk, which the cache writes with O_DIRECT.
        self._http: CopyS3 | None = None
        # (A dotted bucket name cannot be a TLS host name: botocore switches such a bucket to
        # path-style requests on its own, so it keeps those.)
        if not proxies_configured(dict(os.environ)) and (path_style or "." not in bucket):
            ca_bundle = os.environ.get("AWS_CA_BUNDLE")
            self._lean = LeanS3(endpoint, bucket, region, path_style, bsession.get_credentials(),
                                cfg, max_connections, read_timeout, ca_bundle)
            self._http = CopyS3(endpoint, bucket, region, path_style, self._lean.keys,
                                not endpoint.startswith("https://"), read_timeout, ca_bundle,
                                pool_size=max_connections)

    def recycle(self, buf: bytearray) -> None:
        """A piece's buffer nobody holds any more: the GETs receive into it again."""
        if self._http is not None and self._http.buffers is not None:
            self._http.buffers.give(buf)

    def take_buffer(self) -> bytearray:
        """A piece's buffer from the pool the GETs receive into (cache loads read into
        them too: caiosfs.diskahead); a new one if the pool is empty or there is none."""
        if self._http is not None and self._http.buffers is not None:
            return self._http.buffers.take()
        return iobuf.aligned(READ_PIECE)

    def _call(self, fn: Any, **kw: Any) -> Any:
        try:
            return fn(**kw)
        except Exception as exc:  # translated; the original stays as __cause__
            raise translate(exc) from exc

    def check_bucket(self) -> None:
        self._call(self._c.head_bucket, Bucket=self.bucket)

    def head(self, key: str) -> ObjectInfo:
        if self._http is not None:
            return head_of(self._http, key)
        r = self._call(self._c.head_object, Bucket=self.bucket, Key=key)
        return ObjectInfo(key, r["ContentLength"], _etag(r["ETag"]), _mtime(r.get("LastModified")),
                          {k.lower(): v for k, v in r.get("Metadata", {}).items()})

    def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
             max_keys: int = 1000) -> ListPage:
        if self._lean is not None:
            return self._list_lean(prefix, delimiter, token, max_keys)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kw["Delimiter"] = delimiter
        if token:
            kw["ContinuationToken"] = token
        r = self._call(self._c.list_objects_v2, **kw)
        page = ListPage(
            [ObjectInfo(o["Key"], o["Size"], _etag(o.get("ETag", "")), _mtime(o.get("LastModified")))
             for o in r.get("Contents", [])],
            [p["Prefix"] for p in r.get("CommonPrefixes", [])],
            r.get("NextContinuationToken") if r.get("IsTruncated") else None,
        )
        return page

    def _list_lean(self, prefix: str, delimiter: str | None, token: str | None,
                   max_keys: int) -> ListPage:
        """ListObjectsV2 as one signed GET, parsed by :func:`.s3xml.list_page`: botocore's
        parser and its dateutil timestamps cost ~110 us of CPU per listed object, most of a
        data loader's listing."""
        assert self._lean is not None
        r = self._lean.request("GET", "", {},
                               params=list_params(prefix, delimiter, token, max_keys))
        return list_page(r.data)

    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Sink) -> dict[str, str]:
        """Stream the range into ``sink``; returns the object's x-amz-meta-* (lower-case
        names), which the response carries anyway (``caiosfs cp`` applies mode and mtime)."""
        if self._http is not None:
            return self._http.get_range(key, start, length, etag, sink)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                              "Range": f"bytes={start}-{start + length - 1}"}
        if etag:
            kw["IfMatch"] = etag
        r = self._call(self._c.get_object, **kw)
        body = r["Body"]
        got = 0
        try:
            while got < length:
                try:
                    piece = body.read(min(READ_PIECE, length - got))
                except Exception as exc:
                    raise translate(exc) from exc
                if not piece:
                    break
                # The sink's own errors (the cache disk full, ...) are local trouble, not
                # the store's: they pass through untranslated and are not retried.
                sink(start + got, piece)
                got += len(piece)
        finally:
            body.close()
        if got != length:
            raise StoreError("IncompleteBody", f"got {got} of {length} bytes", retryable=True)
        return {k.lower(): v for k, v in r.get("Metadata", {}).items()}

    def get_small(self, key: str, limit: int) -> ObjectInfo | None:
        """A small object whole (a directory's attribute record); None if there is none
        (404 is the usual answer: not an error) or it is larger than ``limit``."""
        try:
            if self._lean is not None:
                r = self._lean.request("GET", key, {}, stream=True)
                size = int(r.headers.get("Content-Length", 0))
                data = b""
                try:
                    data = r.read(limit + 1) if size <= limit else b""
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise StoreError("ConnectionError", type(exc).__name__,
                                     retryable=True) from exc
                finally:
                    if size <= limit and len(data) == size:
                        r.release_conn()  # read to the end: the connection is reusable
                    else:
                        r.close()
                h = r.headers
                info = ObjectInfo(key, size, _etag(h.get("ETag", "")),
                                  _mtime(h.get("Last-Modified")), {}, data)
            else:
                o = self._call(self._c.get_object, Bucket=self.bucket, Key=key)
                size = int(o["ContentLength"])
                try:
                    data = o["Body"].read(limit + 1) if size <= limit else b""
                except Exception as exc:
                    raise translate(exc) from exc
                finally:
                    o["Body"].close()
                info = ObjectInfo(key, size, _etag(o["ETag"]), _mtime(o.get("LastModified")),
                                  {}, data)
        except StoreError as exc:
            if exc.code in ("NoSuchKey", "NotFound") or exc.status == 404:
                return None
            raise
        if info.size > limit:
            return None
        if len(data) != info.size:
            raise StoreError("IncompleteBody", f"got {len(data)} of {info.size} bytes",
                             retryable=True)
        return info

    def put_file(self, key: str, path: Body, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        # Content-MD5 makes the store check that it received the whole body: without it,
        # SeaweedFS stores an *empty* object when the connection dies before the first body
        # byte (our daemon killed mid-PUT), which the next mount would take for somebody
        # else's version. It costs one more pass over bodies that are at most part_size.
        md5 = base64.b64encode(file_md5(path, size)).decode()
        if self._lean is not None:
            headers = {"Content-Length": str(size if path is not None else 0),
                       "Content-MD5": md5}
            headers.update({"x-amz-meta-" + k: v for k, v in metadata.items()})
            if if_match:
                headers["If-Match"] = if_match
            if if_none_match:
                headers["If-None-Match"] = "*"
            if path is None or size == 0:
                headers["Content-Length"] = "0"
                return _etag(self._lean.request("PUT", key, headers, b"").headers["ETag"])
            if isinstance(path, bytes):
                return _etag(self._lean.request("PUT", key, headers, path[:size])
                             .headers["ETag"])
            with FileSlice(path, 0, size) as body:
                return _etag(self._lean.request("PUT", key, headers, body).headers["ETag"])
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Metadata": metadata,
                              "ContentLength": size, "ContentMD5": md5}
        if if_match:
            kw["IfMatch"] = if_match
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if path is None or size == 0:
            kw["Body"] = b""
            return _etag(self._call(self._c.put_object, **kw)["ETag"])
        if isinstance(path, bytes):
            kw["Body"] = path[:size]
            return _etag(self._call(self._c.put_object, **kw)["ETag"])
        with FileSlice(path, 0, size) as body:
            kw["Body"] = body
            return _etag(self._call(self._c.put_object, **kw)["ETag"])

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        return self._call(self._c.create_multipart_upload, Bucket=self.bucket, Key=key,
                          Metadata=metadata)["UploadId"]

    def upload_part(self, key: str, upload_id: str, part: PartSource) -> str:
        if part.copy_key is not None:
            src: dict[str, Any] = {"Bucket": self.bucket, "Key": part.copy_key}
            kw: dict[str, Any] = {}
            if part.copy_etag:
                kw["CopySourceIfMatch"] = part.copy_etag
            r = self._call(self._c.upload_part_copy, Bucket=self.bucket, Key=key,
                           UploadId=upload_id, PartNumber=part.number, CopySource=src,
                           CopySourceRange=f"bytes={part.offset}-{part.offset + part.length - 1}",
                           **kw)
            return r["CopyPartResult"]["ETag"]
        if part.data is not None:
            return self._call(self._c.upload_part, Bucket=self.bucket, Key=key,
                              UploadId=upload_id, PartNumber=part.number,
                              Body=part.data[part.offset:part.offset + part.length],
                              ContentLength=part.length)["ETag"]
        assert part.path is not None
        with FileSlice(part.path, part.offset, part.length) as body:
            return self._call(self._c.upload_part, Bucket=self.bucket, Key=key,
                              UploadId=upload_id, PartNumber=part.number, Body=body,
                              ContentLength=part.length)["ETag"]

    def complete_multipart(self, key: str, upload_id: str, etags: builtins.list[str],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        kw: dict[str, Any] = {}
        if if_match:
            kw["IfMatch"] = if_match
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
        r = self._call(self._c.complete_multipart_upload, Bucket=self.bucket, Key=key,
                       UploadId=upload_id, MultipartUpload={"Parts": parts}, **kw)
        return _etag(r["ETag"])

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._call(self._c.abort_multipart_upload, Bucket=self.bucket, Key=key,
                   UploadId=upload_id)

    def list_multipart(self, prefix: str) -> builtins.list[MultipartUpload]:
        out: list[MultipartUpload] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            r = self._call(self._c.list_multipart_uploads, **kw)
            out += [MultipartUpload(u["Key"], u["UploadId"], _mtime(u.get("Initiated")))
                    for u in r.get("Uploads", [])]
            if not r.get("IsTruncated"):
                return out
            kw["KeyMarker"] = r.get("NextKeyMarker")
            kw["UploadIdMarker"] = r.get("NextUploadIdMarker")

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None, size: int) -> str:
        source = {"Bucket": self.bucket, "Key": src}
        if size <= MAX_COPY:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Key": dst, "CopySource": source}
            if metadata is not None:
                kw.update(Metadata=metadata, MetadataDirective="REPLACE")
            return _etag(self._call(self._c.copy_object, **kw)["CopyObjectResult"]["ETag"])
        if metadata is None:
            metadata = self.head(src).metadata or {}
        part = 1 << 30
        upload_id = self.create_multipart(dst, metadata)
        try:
            etags = [self.upload_part(dst, upload_id, PartSource(
                i + 1, offset=off, length=min(part, size - off), copy_key=src))
                for i, off in enumerate(range(0, size, part))]
            return self.complete_multipart(dst, upload_id, etags)
        except BaseException:
            try:
                self.abort_multipart(dst, upload_id)
            except StoreError:
                pass
            raise

    def delete_many(self, keys: builtins.list[str]) -> builtins.list[str]:
        """DeleteObjects of up to 1,000 keys in one request; returns the keys it could not
        delete (a missing key counts as deleted)."""
        r = self._call(self._c.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        return [e["Key"] for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]

    def delete(self, key: str) -> None:
        if self._lean is not None:
            self._lean.request("DELETE", key, {})
            return
        self._call(self._c.delete_object, Bucket=self.bucket, Key=key)
