"""An in-memory ObjectStore for unit tests, with a fault-injection seam.

``inject(op, error, times)`` makes the next ``times`` calls of ``op`` raise ``error``;
``calls`` counts every call by operation so tests can assert "no GET happened".
"""

from __future__ import annotations

import builtins  # the class's own list() method hides the type name in its signatures
import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import PreconditionFailed, StoreError
from . import Body, ListPage, MultipartUpload, ObjectInfo, PartSource, Sink


@dataclass
class _Obj:
    data: bytes
    metadata: dict[str, str]
    etag: str
    mtime: float


@dataclass
class _Upload:
    key: str
    metadata: dict[str, str]
    parts: dict[int, bytes] = field(default_factory=dict)
    initiated: float = field(default_factory=time.time)


class MemoryStore:
    def __init__(self, bucket: str = "test") -> None:
        self.bucket = bucket
        self.objects: dict[str, _Obj] = {}
        self.uploads: dict[str, _Upload] = {}
        self.calls: Counter[str] = Counter()
        self._faults: list[list[Any]] = []  # [op, error, remaining, key_substring]
        self._lock = threading.Lock()

    # -- test helpers ------------------------------------------------------------------
    def inject(self, op: str, error: StoreError, times: int = 1, key: str = "") -> None:
        with self._lock:
            self._faults.append([op, error, times, key])

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        with self._lock:
            return self._store(key, data, metadata or {})

    def _check(self, op: str, key: str = "") -> None:
        with self._lock:
            self.calls[op] += 1
            for f in self._faults:
                if f[0] == op and f[2] > 0 and f[3] in key:
                    f[2] -= 1
                    raise f[1]

    def _store(self, key: str, data: bytes, metadata: dict[str, str]) -> str:
        etag = '"' + hashlib.md5(data + uuid.uuid4().bytes).hexdigest() + '"'
        self.objects[key] = _Obj(bytes(data), dict(metadata), etag, time.time())
        return etag

    def _get(self, key: str) -> _Obj:
        obj = self.objects.get(key)
        if obj is None:
            raise StoreError("NoSuchKey", key, 404)
        return obj

    def _cond(self, key: str, if_match: str | None, if_none_match: bool) -> None:
        cur = self.objects.get(key)
        if if_none_match and cur is not None:
            raise PreconditionFailed(key)
        if if_match and (cur is None or cur.etag != if_match):
            raise PreconditionFailed(key)

    # -- ObjectStore ---------------------------------------------------------------------
    def check_bucket(self) -> None:
        self._check("check_bucket")

    def head(self, key: str) -> ObjectInfo:
        self._check("head", key)
        o = self._get(key)
        return ObjectInfo(key, len(o.data), o.etag, o.mtime, dict(o.metadata))

    def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
             max_keys: int = 1000) -> ListPage:
        self._check("list", prefix)
        with self._lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
        entries: list[tuple[str, ObjectInfo | None]] = []
        seen: set[str] = set()
        for k in keys:
            rest = k[len(prefix):]
            if delimiter and delimiter in rest:
                cp = prefix + rest.split(delimiter, 1)[0] + delimiter
                if cp not in seen:
                    seen.add(cp)
                    entries.append((cp, None))
            else:
                o = self.objects[k]
                entries.append((k, ObjectInfo(k, len(o.data), o.etag, o.mtime)))
        start = int(token or 0)
        chunk = entries[start:start + max_keys]
        page = ListPage(next_token=str(start + max_keys) if start + max_keys < len(entries)
                        else None)
        for name, info in chunk:
            if info is None:
                page.prefixes.append(name)
            else:
                page.objects.append(info)
        return page

    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Sink) -> None:
        self._check("get", key)
        o = self._get(key)
        if etag and o.etag != etag:
            raise PreconditionFailed(key)
        data = o.data[start:start + length]
        for off in range(0, len(data), 1 << 20):
            sink(start + off, data[off:off + (1 << 20)])
        if len(data) != length:
            raise StoreError("InvalidRange", key, 416)

    def get_small(self, key: str, limit: int) -> ObjectInfo | None:
        self._check("get_small", key)
        o = self.objects.get(key)
        if o is None or len(o.data) > limit:
            return None
        return ObjectInfo(key, len(o.data), o.etag, o.mtime, dict(o.metadata), o.data)

    def put_file(self, key: str, path: Body, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        self._check("put", key)
        data = b""
        if isinstance(path, bytes):
            data = path[:size]
        elif path is not None and size:
            with open(path, "rb") as fh:
                data = fh.read(size)
        with self._lock:
            self._cond(key, if_match, if_none_match)
            return self._store(key, data, metadata)

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        self._check("create_multipart", key)
        uid = uuid.uuid4().hex
        with self._lock:
            self.uploads[uid] = _Upload(key, dict(metadata))
        return uid

    def upload_part(self, key: str, upload_id: str, part: PartSource) -> str:
        self._check("upload_part", key)
        if part.copy_key is not None:
            src = self._get(part.copy_key)
            if part.copy_etag and src.etag != part.copy_etag:
                raise PreconditionFailed(part.copy_key)
            data = src.data[part.offset:part.offset + part.length]
        elif part.data is not None:
            data = part.data[part.offset:part.offset + part.length]
        else:
            assert part.path is not None
            fd = os.open(part.path, os.O_RDONLY)
            try:
                data = os.pread(fd, part.length, part.offset)
            finally:
                os.close(fd)
        with self._lock:
            up = self.uploads.get(upload_id)
            if up is None:
                raise StoreError("NoSuchUpload", upload_id, 404)
            up.parts[part.number] = data
        return '"' + hashlib.md5(data).hexdigest() + '"'

    def complete_multipart(self, key: str, upload_id: str, etags: builtins.list[str],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        self._check("complete_multipart", key)
        with self._lock:
            up = self.uploads.get(upload_id)
            if up is None:
                raise StoreError("NoSuchUpload", upload_id, 404)
            self._cond(key, if_match, if_none_match)
            data = b"".join(up.parts[i + 1] for i in range(len(etags)))
            del self.uploads[upload_id]
            return self._store(key, data, up.metadata)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._check("abort_multipart", key)
        with self._lock:
            if self.uploads.pop(upload_id, None) is None:
                raise StoreError("NoSuchUpload", upload_id, 404)

    def list_multipart(self, prefix: str) -> builtins.list[MultipartUpload]:
        self._check("list_multipart", prefix)
        with self._lock:
            return [MultipartUpload(u.key, uid, u.initiated) for uid, u in self.uploads.items()
                    if u.key.startswith(prefix)]

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None, size: int) -> str:
        self._check("copy", src)
        with self._lock:
            o = self._get(src)
            return self._store(dst, o.data, o.metadata if metadata is None else metadata)

    def delete_many(self, keys: builtins.list[str]) -> builtins.list[str]:
        self._check("delete_many", keys[0] if keys else "")
        with self._lock:
            for k in keys:
                self.objects.pop(k, None)
        return []

    def delete(self, key: str) -> None:
        self._check("delete", key)
        with self._lock:
            self.objects.pop(key, None)
