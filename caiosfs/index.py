"""The LMDB index of the cache directory — every sub-database and value layout, in one place.

Two environments per cache directory (the directory is held by one mount at a time, see
:mod:`caiosfs.cache` ``lock_cache_dir``):

- ``<cache_dir>/journal.lmdb`` holds what must never be lost — ``journal``, ``ops``, ``state``.
  Adding or changing an entry commits before it returns (the commit reaches the OS: a killed
  daemon loses nothing). ``ops`` entries are flushed to disk (fdatasync) before they return,
  but for ``mkdir``; those and ``journal`` entries (and ``inline`` contents) are flushed in the
  background within ~20 ms, one flush for a burst of creates (``sync_journal``), and before
  ``fsync=local`` returns — what a power cut
  may lose is what it would lose anyway: data nobody fsynced. Removing an entry is not flushed
  (a removal lost in a power cut only makes the next mount look at a finished file again,
  which it recognises). Ids are reserved in batches of 1,000, one flush per batch.
- ``<cache_dir>/index.lmdb`` holds what can be rebuilt — ``blocks``, ``meta`` — and commits
  without fsync (every commit still reaches the OS, so a killed daemon loses nothing; a
  power loss can lose recent entries, whose blocks are then fetched again). If it cannot be
  opened after a crash, it is recreated empty and the block files are discarded.

Sub-databases
-------------
``blocks``  key   = ident ``\\0`` block number (8 bytes, big-endian), where ident is
                    ``bucket\\0key\\0etag`` (UTF-8): cached data is keyed by ETag, so a new
                    version of an object can never be served from an old version's blocks.
            value = ``BLOCK`` struct: last access (float, epoch s), bytes present (u64),
                    present-chunk bitmap (u64, bit i = chunk i of the block is on disk),
                    then one xxh3_64 (u64) per chunk of the block (0 where absent).
            The bytes live in ``blocks/<aa>/<hash(ident)>.<blockno>`` (a sparse file).
``journal`` key   = dirty-file id (u64, big-endian).
            value = JSON (:class:`caiosfs.records.JournalEntry`): {"path", "key",
                    "base_etag", "mode", "uid", "gid", "mtime", "mtime_ns", "ctime_ns",
                    "upload_id", "deleted", "inline"} — a file with local changes whose data
                    is ``dirty/<id>`` — or, with "inline": true, the ``inline`` value of the
                    same id; deleted when the upload has completed. ``path`` is relative to
                    the mount root; ``upload_id`` names a multipart upload in progress;
                    ``deleted``: unlinked or replaced, dropped at replay.
``inline``  key   = dirty-file id.  value = the whole content of a small dirty file (at most
                    ``writeback.INLINE_MAX`` bytes; absent: empty). Kept here instead of a
                    data file of its own: a new inode can cost a millisecond of kernel time,
                    a commit tens of microseconds. Values no journal entry names are leftovers
                    of a crash and are dropped at replay.
``ops``     key   = operation id (u64, big-endian).
            value = JSON (:mod:`caiosfs.records`), one of:
                    {"op": "rename_dir", "src", "dst"} — a directory rename in progress
                    (key prefixes), resumed at mount;
                    {"op": "mkdir", "key", "meta", "mtime"} — a directory marker not PUT yet;
                    {"op": "delete", "key", "etag"} — a delete deferred to the last close.
``meta``    key   = ident.  value = JSON of the object's x-amz-meta-* (so remounts need no
                    HEAD for attributes already seen).
``state``   key   = name.  value = bytes: ``next_id`` (u64 counter for journal/ops ids) and
                    ``format`` (u32, :data:`caiosfs.records.FORMAT`; absent: written before
                    it was recorded, which is format 1). A cache directory of another format
                    is refused at open.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import xxhash

from .errors import UserError
from .records import FORMAT, JournalEntry, Op, decode_op, encode_op

log = logging.getLogger(__name__)

# The two LMDB environments of a cache directory (their layout: above).
INDEX_ENV = "index.lmdb"
JOURNAL_ENV = "journal.lmdb"

_HDR = struct.Struct(">dQQ")
ID_BATCH = 1000
BLOCK_KEY_SUFFIX = struct.Struct(">Q")


# LMDB keys are at most 511 bytes; block keys add 9 to an ident.
MAX_IDENT = 400


def ident_of(bucket: str, key: str, etag: str) -> bytes:
    """The identity of one object version, as index keys use it: readable when short, its
    xxh3-128 when the key is long (S3 keys reach 1,024 bytes)."""
    raw = f"{bucket}\0{key}\0{etag}".encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_IDENT:
        return raw
    return b"#xxh3-128:" + xxhash.xxh3_128_hexdigest(raw).encode()


def block_key(ident: bytes, blockno: int) -> bytes:
    return ident + b"\0" + BLOCK_KEY_SUFFIX.pack(blockno)


def split_block_key(k: bytes) -> tuple[bytes, int]:
    return k[:-9], BLOCK_KEY_SUFFIX.unpack(k[-8:])[0]


@dataclass
class BlockEntry:
    atime: float
    nbytes: int
    present: int  # bitmap
    sums: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        return _HDR.pack(self.atime, self.nbytes, self.present) + struct.pack(
            f">{len(self.sums)}Q", *self.sums)

    @classmethod
    def unpack(cls, raw: bytes) -> BlockEntry:
        atime, nbytes, present = _HDR.unpack_from(raw)
        n = (len(raw) - _HDR.size) // 8
        return cls(atime, nbytes, present, list(struct.unpack_from(f">{n}Q", raw, _HDR.size)))


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """LMDB failures as OSError with the real errno (a full disk must read ENOSPC)."""
    try:
        yield
    except lmdb.Error as exc:
        text = str(exc)
        err = errno.ENOSPC if ("No space" in text or "MDB_MAP_FULL" in text) else errno.EIO
        raise OSError(err, f"journal: {text}") from exc


class Index:
    def __init__(self, path: Path, map_size: int = 64 << 30) -> None:
        path = Path(path)
        self.env = self._open_cache_env(path, map_size)
        self.jenv = lmdb.open(str(path.parent / JOURNAL_ENV), map_size=4 << 30, max_dbs=8,
                              subdir=True, sync=False, metasync=False, lock=True)
        self.blocks = self.env.open_db(b"blocks")
        self.meta = self.env.open_db(b"meta")
        self.journal = self.jenv.open_db(b"journal")
        self.ops = self.jenv.open_db(b"ops")
        self.state = self.jenv.open_db(b"state")
        self.inline = self.jenv.open_db(b"inline")
        self._ids: Iterator[int] = iter(())  # ids reserved but not yet handed out
        try:
            self._check_format(path.parent)
        except BaseException:
            self.env.close()
            self.jenv.close()
            raise

    def _check_format(self, cache_dir: Path) -> None:
        """Refuse a cache directory whose records this version cannot read; record the
        format in one that has none yet (written before it was recorded: format 1)."""
        with self.jenv.begin(db=self.state) as txn:
            raw = txn.get(b"format")
        if raw is None:
            with _os_errors(), self.jenv.begin(db=self.state, write=True) as txn:
                txn.put(b"format", struct.pack(">I", FORMAT))
            with _os_errors():
                self.jenv.sync(True)
            return
        found = struct.unpack(">I", bytes(raw))[0] if len(raw) == 4 else -1
        if found != FORMAT:
            raise UserError(f"cache directory {cache_dir} holds format {found}, this caiosfs "
                            f"reads format {FORMAT}: mount it with the version that wrote it, "
                            "or use another cache_dir")

    @staticmethod
    def _open_cache_env(path: Path, map_size: int) -> lmdb.Environment:
        def open_env() -> lmdb.Environment:
            return lmdb.open(str(path), map_size=map_size, max_dbs=4, subdir=True,
                             sync=False, metasync=False, lock=True, max_readers=256)
        try:
            return open_env()
        except lmdb.Error as exc:
            log.error("cache index %s unreadable (%s): starting with an empty cache", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.parent / "blocks", ignore_errors=True)
            return open_env()

    def close(self) -> None:
        with contextlib.suppress(lmdb.Error, OSError):
            self.jenv.sync(True)
            self.env.sync(True)
        self.env.close()
        self.jenv.close()

    # blocks ----------------------------------------------------------------------------
    def get_block(self, ident: bytes, blockno: int) -> BlockEntry | None:
        with self.env.begin(db=self.blocks) as txn:
            raw = txn.get(block_key(ident, blockno))
        return BlockEntry.unpack(raw) if raw else None

    def put_block(self, ident: bytes, blockno: int, entry: BlockEntry) -> None:
        with self.env.begin(db=self.blocks, write=True) as txn:
            txn.put(block_key(ident, blockno), entry.pack())

    def update_blocks(self, updates: dict[tuple[bytes, int], BlockEntry | None]) -> None:
        with self.env.begin(write=True) as txn:
            for (ident, blockno), entry in updates.items():
                k = block_key(ident, blockno)
                if entry is None:
                    txn.delete(k, db=self.blocks)
                else:
                    txn.put(k, entry.pack(), db=self.blocks)

    def merge_blocks(self, keys: list[tuple[bytes, int]],
                     merge: Callable[[tuple[bytes, int], BlockEntry | None], BlockEntry]
                     ) -> None:
        """Read, change and write back the entries of ``keys`` in one write transaction:
        ``merge(key, entry or None)`` returns the entry to store."""
        with self.env.begin(db=self.blocks, write=True) as txn:
            for ident, blockno in keys:
                k = block_key(ident, blockno)
                raw = txn.get(k)
                txn.put(k, merge((ident, blockno),
                                 BlockEntry.unpack(raw) if raw else None).pack())

    def iter_blocks(self) -> Iterator[tuple[bytes, int, BlockEntry]]:
        with self.env.begin(db=self.blocks) as txn:
            for k, v in txn.cursor():
                ident, blockno = split_block_key(bytes(k))
                yield ident, blockno, BlockEntry.unpack(bytes(v))

    def blocks_of(self, ident: bytes) -> list[int]:
        out = []
        prefix = ident + b"\0"
        with self.env.begin(db=self.blocks) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k in cur.iternext(values=False):
                    k = bytes(k)
                    if not k.startswith(prefix) or len(k) != len(prefix) + 8:
                        break
                    out.append(split_block_key(k)[1])
        return out

    # ids ---------------------------------------------------------------------------------
    def next_id(self) -> int:
        """A new journal/ops id; never reused, even across crashes (reserved 1,000 at a
        time, one flush per batch)."""
        n = next(self._ids, None)
        if n is None:
            with _os_errors(), self.jenv.begin(db=self.state, write=True) as txn:
                raw = txn.get(b"next_id")
                start = struct.unpack(">Q", raw)[0] + 1 if raw else 1
                txn.put(b"next_id", struct.pack(">Q", start + ID_BATCH - 1))
            with _os_errors():
                self.jenv.sync(True)
            self._ids = iter(range(start + 1, start + ID_BATCH))
            n = start
        return n

    # journal / ops -----------------------------------------------------------------------
    def _put(self, db: Any, ident: int, value: bytes, sync: bool = True) -> None:
        with _os_errors():
            with self.jenv.begin(db=db, write=True) as txn:
                txn.put(struct.pack(">Q", ident), value)
            if sync:
                self.jenv.sync(True)

    def sync_journal(self) -> None:
        """Flush committed journal entries to disk (fdatasync; call it off the loop)."""
        with _os_errors():
            self.jenv.sync(True)

    def _all(self, db: Any) -> dict[int, bytes]:
        with self.jenv.begin(db=db) as txn:
            return {struct.unpack(">Q", k)[0]: bytes(v) for k, v in txn.cursor()}

    def _del(self, db: Any, ident: int) -> None:
        with _os_errors(), self.jenv.begin(db=db, write=True) as txn:
            txn.delete(struct.pack(">Q", ident))

    def put_journal(self, fid: int, entry: JournalEntry, sync: bool = True) -> None:
        """Commit a journal entry; ``sync=False`` leaves the flush to ``sync_journal``."""
        self._put(self.journal, fid, entry.encode(), sync)

    def del_journal(self, fid: int) -> None:
        self._del(self.journal, fid)

    def all_journal(self) -> dict[int, JournalEntry]:
        return {fid: JournalEntry.decode(v) for fid, v in self._all(self.journal).items()}

    # inline file contents (see the module docstring) ---------------------------------------
    def get_inline(self, fid: int) -> bytes:
        with self.jenv.begin(db=self.inline) as txn:
            raw = txn.get(struct.pack(">Q", fid))
        return bytes(raw) if raw else b""

    def put_inline(self, fid: int, data: bytes) -> None:
        """Commit (not flush: ``sync_journal`` does that) the content of an inline file."""
        with _os_errors(), self.jenv.begin(db=self.inline, write=True) as txn:
            if data:
                txn.put(struct.pack(">Q", fid), data)
            else:
                txn.delete(struct.pack(">Q", fid))

    def del_inline(self, fid: int) -> None:
        self._del(self.inline, fid)

    def end_inline(self, fid: int, entry: JournalEntry) -> None:
        """One commit: the journal entry (its data now in ``dirty/<fid>``) replaces the
        inline content, so a crash sees one or the other, never neither."""
        k = struct.pack(">Q", fid)
        with _os_errors(), self.jenv.begin(write=True) as txn:
            txn.put(k, entry.encode(), db=self.journal)
            txn.delete(k, db=self.inline)

    def inline_ids(self) -> list[int]:
        with self.jenv.begin(db=self.inline) as txn:
            return [struct.unpack(">Q", k)[0] for k in txn.cursor().iternext(values=False)]

    def put_op(self, oid: int, op: Op, sync: bool = True) -> None:
        """Commit an ``ops`` entry; ``sync=False`` leaves the flush to ``sync_journal``."""
        self._put(self.ops, oid, encode_op(op), sync)

    def del_op(self, oid: int) -> None:
        self._del(self.ops, oid)

    def all_ops(self) -> dict[int, Op]:
        """Every ops entry this version knows the kind of (others are left alone)."""
        out = {}
        for oid, raw in self._all(self.ops).items():
            op = decode_op(raw)
            if op is not None:
                out[oid] = op
        return out

    # meta --------------------------------------------------------------------------------
    def get_metas(self, idents: list[bytes]) -> list[dict[str, str] | None]:
        """The metadata remembered for each object version (None: not known), in one read
        transaction (a listing's files)."""
        with self.env.begin(db=self.meta) as txn:
            raws = [txn.get(i) for i in idents]
        return [json.loads(bytes(r)) if r else None for r in raws]

    def put_meta(self, ident: bytes, meta: dict[str, str]) -> None:
        self.put_metas([(ident, meta)])

    def put_metas(self, items: list[tuple[bytes, dict[str, str]]]) -> None:
        """Remember each object version's metadata, in one write transaction (a listing's
        files)."""
        if not items:
            return
        with self.env.begin(db=self.meta, write=True) as txn:
            for ident, meta in items:
                txn.put(ident, json.dumps(meta).encode())

    def sync(self) -> None:
        """Force the cache index to disk (the journal is always synchronous)."""
        self.env.sync(True)


def now() -> float:
    return time.time()


# ---- the cache directory's index files ------------------------------------------------

def open_index(cache_dir: Path, reserve_for: int | None = None) -> Index:
    """Open the cache directory's index (and journal).

    ``reserve_for``: the cache_size of a process that will write dirty data into this cache
    (the mount). Its LMDB files are then made private and given room ahead, so that commits
    still work once dirty data has filled the disk (see :func:`reserve_index_space`).
    """
    index = Index(cache_dir / INDEX_ENV)
    if reserve_for is not None:
        for env in (INDEX_ENV, JOURNAL_ENV):
            private_index(cache_dir / env)
        reserve_index_space(cache_dir / INDEX_ENV / "data.mdb", reserve_for)
        reserve_index_space(cache_dir / JOURNAL_ENV / "data.mdb", 0)
    return index


def private_index(index_dir: Path) -> None:
    """Caches made before the daemon set its umask may hold a 0755 index: fix it."""
    if not index_dir.exists():
        return
    try:
        os.chmod(index_dir, 0o700)
        for p in index_dir.iterdir():
            os.chmod(p, 0o600)
    except OSError as exc:
        log.warning("cannot make the cache index private: %s", exc.strerror)


def reserve_index_space(data_file: Path, cache_size: int) -> None:
    """Preallocate room for an LMDB environment, so it stays writable on a full disk.

    LMDB copies pages on write: every commit — even one that deletes a journal entry or
    records that a block was evicted — needs free pages, and grows the file when it has
    none. When dirty data has filled the disk, a commit that grows the file fails, and the
    one that fails may be in a background task. Space allocated here keeps the index's
    commits inside the file (LMDB reuses freed pages, so a cache index rarely outgrows it).
    """
    want = max(8 << 20, min(64 << 20, cache_size // 1024))
    try:
        fd = os.open(data_file, os.O_RDWR)
    except OSError as exc:
        log.warning("cannot reserve space for the cache index: %s", exc.strerror)
        return
    try:
        if os.fstat(fd).st_size < want:
            os.posix_fallocate(fd, 0, want)
    except OSError as exc:
        log.warning("cannot reserve %d MiB for the cache index: %s", want >> 20,
                    exc.strerror)
    finally:
        os.close(fd)
