"""The object-store layer: one protocol, a boto3 implementation and an in-memory one.

Implementations are synchronous and thread-safe; :class:`caiosfs.store.client.StoreClient`
runs them in worker threads with capacity limits, retries and metrics. Everything above this
package talks to the store only through ``StoreClient``.

Keys here are full object keys (the mount prefix already applied).
"""

from __future__ import annotations

import builtins  # the class's own list() method hides the type name in its signatures
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Receives successive pieces of a ranged GET: (offset within the object, bytes).
Sink = Callable[[int, bytes], None]


@dataclass
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime: float  # Last-Modified, seconds since the epoch
    metadata: dict[str, str] | None = None  # x-amz-meta-* (lower-case names), None = unknown
    data: bytes | None = None  # the body, for get_small only


@dataclass
class ListPage:
    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    next_token: str | None = None


@dataclass
class MultipartUpload:
    key: str
    upload_id: str
    initiated: float


@dataclass
class PartSource:
    """Where a part's bytes come from: a local file range, or a range of an existing object."""

    number: int
    path: str | None = None  # local file to read
    offset: int = 0
    length: int = 0
    copy_key: str | None = None  # server-side copy (UploadPartCopy) from this key
    copy_etag: str | None = None
    data: bytes | None = None  # the part's bytes themselves (a small file kept in the journal)


# What a PUT sends: the first ``size`` bytes of the local file at this path, the bytes
# themselves (a small file kept in the journal), or None (an empty object).
Body = str | bytes | None


class ObjectStore(Protocol):
    bucket: str

    def check_bucket(self) -> None: ...
    def head(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
             max_keys: int = 1000) -> ListPage: ...
    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Sink) -> dict[str, str] | None: ...  # x-amz-meta-* if known
    def get_small(self, key: str, limit: int) -> ObjectInfo | None: ...
    # (the whole object, in ``ObjectInfo.data``; None if there is none or it is larger than
    # ``limit``: an absent small object is an answer, not an error)
    def put_file(self, key: str, path: Body, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str: ...
    def create_multipart(self, key: str, metadata: dict[str, str]) -> str: ...
    def upload_part(self, key: str, upload_id: str, part: PartSource) -> str: ...
    def complete_multipart(self, key: str, upload_id: str, etags: builtins.list[str],
                           if_match: str | None = None, if_none_match: bool = False) -> str: ...
    def abort_multipart(self, key: str, upload_id: str) -> None: ...
    def list_multipart(self, prefix: str) -> builtins.list[MultipartUpload]: ...
    def copy(self, src: str, dst: str, metadata: dict[str, str] | None,
             size: int) -> str: ...
    def delete(self, key: str) -> None: ...


def file_md5(path: Body, size: int) -> bytes:
    """MD5 of the first ``size`` bytes of a body (see :data:`Body`): a PUT's Content-MD5, and
    the ETag a store gives a single-part object. OSError if a file is shorter."""
    h = hashlib.md5()
    if path is None or not size:
        return h.digest()
    if isinstance(path, bytes):
        h.update(path[:size])
        return h.digest()
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            piece = os.pread(fd, min(size - off, 8 << 20), off)
            if not piece:
                raise OSError(f"local file shrank while uploading ({off} of {size} bytes)")
            h.update(piece)
            off += len(piece)
    finally:
        os.close(fd)
    return h.digest()
