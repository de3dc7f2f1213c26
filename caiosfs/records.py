"""The records the journal environment holds, typed: one dataclass per kind, one encoder and
one decoder each. :mod:`caiosfs.index` documents where each lives; this module is the only
place that knows their JSON shape.

The JSON written is exactly what format 1 has always written (same names, same order), so a
cache directory written before these types existed reads back unchanged. Fields added after
the first release (``path``, ``mtime_ns``, ``ctime_ns``, ``inline``) may be absent in old
entries and decode to their defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

# The on-disk format of a cache directory, kept in the ``state`` sub-database. Bump it when a
# record changes in a way an older caiosfs would misread; a directory without the key was
# written before it existed and is format 1.
FORMAT = 1


@dataclass
class JournalEntry:
    """A file with local changes not yet in the store (``journal`` sub-database)."""

    path: str | None  # relative to the mount root (None: written before it was recorded)
    key: str  # the full object key
    base_etag: str | None  # the store version the content started from (None: new)
    mode: int
    uid: int
    gid: int
    mtime: float
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    upload_id: str | None = None  # a multipart upload in progress (aborted at replay)
    deleted: bool = False  # unlinked or replaced: drop at replay, upload never
    inline: bool = False  # the content is the ``inline`` value of the same id

    def encode(self) -> bytes:
        # vars(), not asdict(): every field is a plain value, and asdict's deep copy made
        # this 4x slower (38 against 9 us; a file written through the mount commits its
        # entry three or four times).
        return json.dumps(vars(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> JournalEntry:
        d = json.loads(raw)
        return cls(
            path=d.get("path"), key=d["key"], base_etag=d["base_etag"], mode=d["mode"],
            uid=d["uid"], gid=d["gid"], mtime=d["mtime"], mtime_ns=d.get("mtime_ns"),
            ctime_ns=d.get("ctime_ns"), upload_id=d.get("upload_id"),
            deleted=bool(d.get("deleted")), inline=bool(d.get("inline")))


@dataclass
class RenameDirOp:
    """A directory rename in progress: every object under ``src`` moves to ``dst``."""

    src: str  # key prefix, ending in '/'
    dst: str


@dataclass
class MkdirOp:
    """A directory made here whose marker object is not in the store yet."""

    key: str  # the marker's key, ending in '/'
    meta: dict[str, str]
    mtime: float | None  # (None: an entry older than the field; the replay takes now)


@dataclass
class DeleteOp:
    """A delete of ``key`` if it still is version ``etag`` (deferred, or batched)."""

    key: str
    etag: str


Op = RenameDirOp | MkdirOp | DeleteOp

# The "op" tag each kind is stored under.
OP_KINDS: dict[str, type[Op]] = {
    "rename_dir": RenameDirOp, "mkdir": MkdirOp, "delete": DeleteOp}
_TAG = {cls: tag for tag, cls in OP_KINDS.items()}


def encode_op(op: Op) -> bytes:
    return json.dumps({"op": _TAG[type(op)], **asdict(op)}).encode()


def decode_op(raw: bytes) -> Op | None:
    """The op stored in ``raw``; None for a kind this version does not know (left alone)."""
    d: dict[str, Any] = json.loads(raw)
    cls = OP_KINDS.get(d.pop("op", None) or "")
    if cls is None:
        return None
    if cls is MkdirOp:
        d.setdefault("mtime", None)
    return cls(**{f.name: d[f.name] for f in fields(cls)})
