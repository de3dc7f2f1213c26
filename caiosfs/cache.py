"""The NVMe block cache: block files on local disk, indexed in LMDB, checked with xxh3.

An object version (bucket, key, ETag) is split into blocks of ``block_size``; each block is
one sparse file. Inside a block, data is fetched and checksummed per *chunk* (1 MiB), so a
random 4 KiB read fetches one chunk, and verifying a read costs one chunk's hash.

Threading: :class:`ChunkWriter` runs in a worker thread (it writes what a GET streams in), and
so does ``BlockCache.load`` (it reads cached chunks ahead of a streaming reader; what it
needs of the index is looked up on the loop first, by ``loadable``); everything else runs on
the trio loop (short preads and short LMDB transactions).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import logging
import os
import shutil
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import xxhash

from .errors import UserError
from .index import BlockEntry, Index, now
from .iobuf import ALIGN, is_aligned
from .metrics import Metrics

log = logging.getLogger(__name__)
MIN_FREE_MAX = 2 << 30
FREE_RECHECK = 0.25  # seconds a look at the disk's free space is trusted (over_limit)...
FREE_MARGIN = 256 << 20  # ... while it found at least this much above the floor
# Random reads of a small part of a chunk that was verified once: each is checked against
# the digests of the SUB_BLOCK pieces that chunk had when its whole checksum matched, so a
# 4 KiB read from disk costs a 64 KiB read and hash instead of the whole 1 MiB chunk's (fio
# --rw=randread --bs=4k over 1 GiB: every read missed the 16 MiB of verified chunks kept in
# memory and re-read and re-hashed its whole chunk). Remembered for SUB_SUMS_MAX chunks
# (~200 bytes each), only where a random read of at most half a chunk asked: a sequential
# reader reads whole chunks and pays nothing for this.
SUB_BLOCK = 64 << 10
SUB_SUMS_MAX = 16384


def index_error(exc: lmdb.Error) -> OSError:
    """An LMDB failure as the OSError it is (a full disk, mostly), so callers handle it as
    cache trouble instead of letting an unknown exception kill the mount."""
    full = isinstance(exc, lmdb.MapFullError) or "No space" in str(exc)
    return OSError(errno.ENOSPC if full else errno.EIO, f"cache index: {exc}")


def lock_cache_dir(cache_dir: Path) -> int:
    """Create cache_dir (0700) and hold its lock for the life of the process.

    One mount (or `caiosfs warm`) per cache directory: a second one is refused with a clear
    error rather than sharing a journal it does not own.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cache_dir, 0o700)
        fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UserError(f"cache_dir {cache_dir} is not usable: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise UserError(f"cache_dir {cache_dir} is in use by another caiosfs process "
                        f"({holder or 'unknown'}); give each mount its own cache_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    try:
        probe = cache_dir / ".probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        os.close(fd)
        raise UserError(f"cache_dir {cache_dir} is not writable: {exc.strerror}") from None
    return fd


@dataclass(frozen=True)
class Load:
    """A cached chunk to read ahead of its reader (``BlockCache.loadable``/``load``)."""

    chunk: int
    length: int
    csum: int  # its xxh3, from the index
    path: str  # its block file
    offset: int  # in the block file


def load_runs(todo: list[Load], chunk_size: int) -> list[list[Load]]:
    """``todo`` (in chunk order) cut into runs of consecutive chunks of one block file:
    what one ``preadv`` reads."""
    out: list[list[Load]] = []
    for ld in todo:
        if out and ld.path == out[-1][-1].path and ld.offset == out[-1][-1].offset + chunk_size:
            out[-1].append(ld)
        else:
            out.append([ld])
    return out


class ChunkWriter:
    """Receives a GET's pieces (in a worker thread) and writes whole chunks to block files.

    ``done`` collects (chunk number, xxh3) for the loop to commit to the index.
    """

    def __init__(self, cache: BlockCache, ident: bytes, obj_size: int,
                 on_chunk: Callable[[int, int, bytes], None] | None = None,
                 end: int | None = None) -> None:
        self.cache, self.ident, self.obj_size = cache, ident, obj_size
        self.buf = bytearray()
        self.buf_start = -1
        self.done: list[tuple[int, int]] = []
        # Called (in the thread) after each chunk is written, with its checksum and bytes.
        self.on_chunk = on_chunk
        # The block file being written stays open from chunk to chunk (an open and a close
        # per chunk were ~3 % of a cold read's CPU), closed by the thread itself when the
        # GET reaches ``end`` (the range's end), or when the writer goes.
        self.end = obj_size if end is None else end
        self._fd = -1
        self._open: tuple[int, bool] | None = None  # (block number, O_DIRECT) of _fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._open = -1, None

    def __del__(self) -> None:
        self.close()

    def __call__(self, offset: int, data: bytes) -> None:
        cs = self.cache.chunk_size
        if self.buf_start < 0 or offset != self.buf_start + len(self.buf):
            # A retry restarts the range: drop the partial chunk (whole chunks are kept).
            self.buf = bytearray()
            self.buf_start = offset
            if offset % cs:
                raise ValueError("GET pieces must start on a chunk boundary")
        if not self.buf and len(data) == cs and offset % cs == 0:
            # The common case (pieces are chunk-sized and aligned): no buffering, no copies.
            self._write_chunk(offset // cs, data)
            self.buf_start = offset + cs
            return
        self.buf += data
        while len(self.buf) >= cs or (self.buf and self.buf_start + len(self.buf)
                                      >= self.obj_size):
            n = min(cs, len(self.buf))
            self._write_chunk(self.buf_start // cs, bytes(self.buf[:n]))
            del self.buf[:n]
            self.buf_start += n

    def _write_chunk(self, chunk: int, data: bytes) -> None:
        c = self.cache
        blockno, idx = divmod(chunk, c.chunks_per_block)
        csum = xxhash.xxh3_64_intdigest(data)  # (first: the bytes just came, still cached)
        n = self._write(blockno, data, idx * c.chunk_size)
        if chunk * c.chunk_size + len(data) >= self.end:
            self.close()
        if n != len(data):  # a short write: the disk filled up
            raise OSError(errno.ENOSPC, f"short write to the cache ({n} of {len(data)})")
        self.done.append((chunk, csum))
        if self.on_chunk is not None:
            self.on_chunk(chunk, csum, data)

    def _write(self, blockno: int, data: bytes, offset: int) -> int:
        """Write fetched bytes into a block file; the bytes written. A whole aligned
        buffer (``iobuf.aligned``, as GET pieces arrive) goes with O_DIRECT: no copy into
        the page cache, which cost more CPU than anything else on a cold read (module
        docstring of :mod:`caiosfs.iobuf`); anything else, or on a file system that
        refuses O_DIRECT (then never again), through the page cache."""
        c = self.cache
        direct = c.direct and not len(data) % ALIGN and is_aligned(data)
        try:
            return os.pwrite(self._file(blockno, direct), data, offset)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
        c.refuse_direct()
        return os.pwrite(self._file(blockno, False), data, offset)

    def _file(self, blockno: int, direct: bool) -> int:
        if self._open != (blockno, direct):
            self.close()
            self._fd = self.cache.open_block(self.ident, blockno, direct)
            self._open = (blockno, direct)
        return self._fd


class BlockCache:
    def __init__(self, cache_dir: Path, index: Index, metrics: Metrics, cache_size: int,
                 block_size: int, chunk_size: int = 1 << 20,
                 verified_budget: int = 16 << 20) -> None:
        self.dir = cache_dir
        self.blocks_dir = cache_dir / "blocks"
        self.blocks_dir.mkdir(exist_ok=True, mode=0o700)
        self._blocks_str = str(self.blocks_dir)
        self._hexes: dict[bytes, str] = {}  # ident -> its xxh3-128 (block file names)
        self.index = index
        self.metrics = metrics
        self.cache_size = cache_size
        # The cache also yields to its disk: it keeps a tenth of it (up to MIN_FREE_MAX)
        # free, so dirty data — which cannot be dropped — never finds the disk full of
        # clean copies that could have been evicted.
        try:
            self.min_free = min(MIN_FREE_MAX, shutil.disk_usage(cache_dir).total // 10)
        except OSError:
            self.min_free = 0
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.direct = hasattr(os, "O_DIRECT")  # (ChunkWriter._write: until refused)
        self.direct_read = self.direct  # (load: until refused)
        self.chunks_per_block = block_size // chunk_size
        assert self.chunks_per_block <= 64, "bitmap is 64 bits"
        # Chunks verified since they were read from disk: (ident, chunk) -> bytes.
        self._verified: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._verified_bytes = 0
        self._verified_budget = verified_budget
        # Chunks read by small reads: (ident, chunk) -> (the chunk's checksum, the digests
        # of its SUB_BLOCK pieces), derived from bytes that matched that checksum.
        self._subsums: OrderedDict[tuple[bytes, int], tuple[int, array[int]]] = OrderedDict()
        # Chunks fetched for a reader and not read yet: (ident, chunk) -> (bytes, charge,
        # time held, order). They are on disk too; keeping them saves a sequential reader a
        # disk read and a checksum per chunk. Their bytes stay charged to the read memory
        # budget until read (then they move to the small LRU above) or dropped (drop_stale,
        # those no reader came for; drop_farther, those asked for after a chunk that needs
        # the room, by ``order``, through the max-heap _far: also what the read budget
        # reclaims for a new request, Fetcher._reclaim).
        self._fresh: OrderedDict[tuple[bytes, int], tuple[bytes, int, float, int]] = \
            OrderedDict()
        self._far: list[tuple[int, tuple[bytes, int]]] = []  # (-order, key), lazily pruned
        self.fresh_bytes = 0
        self.release_charge: Callable[[int], None] = lambda n: None
        self.recycle: Callable[[bytearray], None] | None = None  # (see _recycle)
        self._atimes: dict[tuple[bytes, int], float] = {}
        self._free_seen = (-1e9, 0, 0)  # last look at the disk: (when, free bytes, used)
        self.used = sum(e.nbytes for _, _, e in index.iter_blocks())
        metrics.cache_bytes.set(self.used)
        metrics.cache_limit_bytes.set(cache_size)

    def block_path(self, ident: bytes, blockno: int) -> Path:
        return Path(self.block_file(ident, blockno))

    def block_file(self, ident: bytes, blockno: int) -> str:
        """The block file's path as a string: built per chunk read or written, where
        pathlib's joins cost ~6 us each; the ident's hash is remembered."""
        h = self._hexes.get(ident)
        if h is None:
            if len(self._hexes) > 4096:
                self._hexes.clear()
            h = self._hexes[ident] = xxhash.xxh3_128_hexdigest(ident)
        return f"{self._blocks_str}/{h[:2]}/{h}.{blockno}"

    def open_block(self, ident: bytes, blockno: int, direct: bool) -> int:
        """A block file opened for writing (made, and its directory, if missing)."""
        path = self.block_file(ident, blockno)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0)
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            return os.open(path, flags, 0o600)

    def refuse_direct(self) -> None:
        if self.direct:
            log.info("the cache's file system refuses O_DIRECT writes: writing through "
                     "the page cache")
        self.direct = False

    def chunk_len(self, chunk: int, obj_size: int) -> int:
        return max(0, min(self.chunk_size, obj_size - chunk * self.chunk_size))

    # lookups (loop) ----------------------------------------------------------------------
    def missing(self, ident: bytes, first: int, last: int) -> list[int]:
        """Chunks in [first, last] that are not on disk."""
        out = []
        cpb = self.chunks_per_block
        entry, cur_block = None, -1
        for chunk in range(first, last + 1):
            blockno, idx = divmod(chunk, cpb)
            if blockno != cur_block:
                entry, cur_block = self.index.get_block(ident, blockno), blockno
            if entry is None or not entry.present >> idx & 1:
                out.append(chunk)
        return out

    def read(self, ident: bytes, offset: int, size: int, obj_size: int,
             random: bool = False) -> bytes | None:
        """Bytes [offset, offset+size) if every chunk is cached and verifies, else None.
        ``random``: the reader is not streaming (see SUB_BLOCK)."""
        end = min(offset + size, obj_size)
        if end <= offset:
            return b""
        cs = self.chunk_size
        parts = []
        for chunk in range(offset // cs, (end - 1) // cs + 1):
            lo = max(offset - chunk * cs, 0)
            hi = min(end - chunk * cs, self.chunk_len(chunk, obj_size))
            pieces = random and 2 * (hi - lo) <= self.chunk_len(chunk, obj_size)
            part = self._pieces(ident, chunk, lo, hi, obj_size) if pieces else None
            if part is not None:
                parts.append(part)
                continue
            data = self._chunk(ident, chunk, obj_size)
            if data is None:
                return None
            if pieces:
                self._note_pieces(ident, chunk, data)
            parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        self.metrics.cache_hit_bytes.inc(end - offset)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _pieces(self, ident: bytes, chunk: int, lo: int, hi: int, obj_size: int
                ) -> bytes | None:
        """Bytes [lo, hi) of a chunk read from disk and checked against the digests of its
        SUB_BLOCK pieces; None where those are not known (or the chunk is in memory:
        ``_chunk`` serves it), or the chunk is gone. A piece that does not match drops the
        chunk, as a failed checksum does (None: the caller refetches)."""
        k = (ident, chunk)
        rec = self._subsums.get(k)
        if rec is None or k in self._verified or k in self._fresh:
            return None
        blockno, idx = divmod(chunk, self.chunks_per_block)
        entry = self.index.get_block(ident, blockno)
        if entry is None or not entry.present >> idx & 1 or entry.sums[idx] != rec[0]:
            self._subsums.pop(k, None)
            return None
        self._subsums.move_to_end(k)
        sub = SUB_BLOCK
        first, last = lo // sub, (hi - 1) // sub
        start = first * sub
        want = min((last + 1) * sub, self.chunk_len(chunk, obj_size)) - start
        data = self._pread(ident, blockno, want, idx * self.chunk_size + start)
        sums = rec[1]
        ok = len(data) == want and all(
            xxhash.xxh3_64_intdigest(data[i * sub - start:(i + 1) * sub - start]) == sums[i]
            for i in range(first, last + 1))
        if not ok:
            self.metrics.cache_checksum_failures.inc()
            log.warning("cache chunk failed its checksum, dropping it and refetching")
            self._drop_chunk(ident, blockno, idx, entry, self.chunk_len(chunk, obj_size))
            return None
        self.metrics.cache_hit_chunks.inc()
        self._atimes[(ident, blockno)] = now()
        return data[lo - start:hi - start]

    def _note_pieces(self, ident: bytes, chunk: int, data: bytes) -> None:
        """Remember the SUB_BLOCK digests of a chunk's verified bytes (see ``_pieces``)."""
        k = (ident, chunk)
        if k in self._subsums:
            self._subsums.move_to_end(k)
            return
        blockno, idx = divmod(chunk, self.chunks_per_block)
        entry = self.index.get_block(ident, blockno)
        # (the bytes are checked against the index's checksum here, whatever path brought
        # them: the pieces' digests are worth exactly what that checksum is)
        if (entry is None or not entry.present >> idx & 1
                or xxhash.xxh3_64_intdigest(data) != entry.sums[idx]):
            return
        view = memoryview(data)
        self._subsums[k] = (entry.sums[idx], array("Q", (
            xxhash.xxh3_64_intdigest(view[i:i + SUB_BLOCK])
            for i in range(0, len(data), SUB_BLOCK))))
        if len(self._subsums) > SUB_SUMS_MAX:
            self._subsums.popitem(last=False)

    def _chunk(self, ident: bytes, chunk: int, obj_size: int) -> bytes | None:
        k = (ident, chunk)
        fresh = self._fresh.pop(k, None)
        if fresh is not None:
            self._release_fresh(fresh)
            self.remember(ident, chunk, fresh[0])
            return fresh[0]
        data = self._verified.get(k)
        if data is not None:
            self._verified.move_to_end(k)
            return data
        blockno, idx = divmod(chunk, self.chunks_per_block)
        entry = self.index.get_block(ident, blockno)
        if entry is None or not entry.present >> idx & 1:
            return None
        want = self.chunk_len(chunk, obj_size)
        data = self._pread(ident, blockno, want, idx * self.chunk_size)
        if len(data) != want or xxhash.xxh3_64_intdigest(data) != entry.sums[idx]:
            self.metrics.cache_checksum_failures.inc()
            log.warning("cache chunk failed its checksum, dropping it and refetching")
            self._drop_chunk(ident, blockno, idx, entry, want)
            return None
        self.metrics.cache_hit_chunks.inc()
        self._atimes[(ident, blockno)] = now()
        self.remember(ident, chunk, data)
        return data

    def _pread(self, ident: bytes, blockno: int, n: int, offset: int) -> bytes:
        """Bytes of a block file; empty if it cannot be read (the caller's checksum fails)."""
        try:
            fd = os.open(self.block_file(ident, blockno), os.O_RDONLY)
            try:
                return os.pread(fd, n, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cache block unreadable (%s), refetching", exc.strerror)
            return b""

    def remember(self, ident: bytes, chunk: int, data: bytes) -> None:
        """Keep a chunk known to match its checksum in memory (the bytes just read and
        verified, or just fetched and written): the next read of it needs no disk read."""
        k = (ident, chunk)
        old = self._verified.pop(k, None)
        if old is not None:
            self._verified_bytes -= len(old)
        self._verified[k] = data
        self._verified_bytes += len(data)
        while self._verified_bytes > self._verified_budget:
            _, old = self._verified.popitem(last=False)
            self._verified_bytes -= len(old)
            self._recycle(old, 1)

    def _recycle(self, data: bytes | bytearray, refs: int) -> None:
        """Give the buffer of a chunk the cache let go of back to the GETs that fill
        buffers (``recycle``: the store's ``iobuf.Pool``) if nothing but the caller's
        ``refs`` references hold it: no reader, reply or slice can see it change then."""
        # (+2: this frame's name and getrefcount's argument)
        if (self.recycle is not None and isinstance(data, bytearray)
                and sys.getrefcount(data) == refs + 2):
            self.recycle(data)

    def hold(self, ident: bytes, chunk: int, data: bytes, charge: int, order: int = 0) -> None:
        """Keep a chunk just fetched (and written) for a reader that has not read it yet;
        ``charge`` bytes of the memory budget are released when it is read or dropped.
        ``order``: when it was asked for (lower: nearer its reader)."""
        k = (ident, chunk)
        old = self._fresh.pop(k, None)
        if old is not None:
            self._release_fresh(old)
        self._fresh[k] = (data, charge, time.monotonic(), order)
        self.fresh_bytes += charge
        heapq.heappush(self._far, (-order, k))
        if len(self._far) > 4 * len(self._fresh) + 1024:  # entries of chunks read since
            self._far = [(-v[3], key) for key, v in self._fresh.items()]
            heapq.heapify(self._far)

    def drop_farther(self, order: int, want: int) -> int:
        """Drop held chunks asked for after ``order``, latest first, until ``want`` bytes
        of charge are released; returns the charge released."""
        freed = 0
        while freed < want and self._far:
            neg, k = self._far[0]
            got = self._fresh.get(k)
            if got is None or got[3] != -neg:
                heapq.heappop(self._far)  # read or dropped since
                continue
            if -neg <= order:
                break
            heapq.heappop(self._far)
            del self._fresh[k]
            freed += got[1]
            self._release_fresh(got)
            self._recycle(got[0], 1)
        return freed

    def drop_stale(self, age: float) -> None:
        """Drop held chunks held longer than ``age`` seconds (their reader went away)."""
        limit = time.monotonic() - age
        while self._fresh:
            k, got = next(iter(self._fresh.items()))
            if got[2] > limit:
                break
            del self._fresh[k]
            self._release_fresh(got)

    def _release_fresh(self, got: tuple[bytes, int, float, int]) -> None:
        self.fresh_bytes -= got[1]
        self.release_charge(got[1])

    def _drop_chunk(self, ident: bytes, blockno: int, idx: int, entry: BlockEntry,
                    nbytes: int) -> None:
        self._subsums.pop((ident, blockno * self.chunks_per_block + idx), None)
        entry.present &= ~(1 << idx)
        entry.sums[idx] = 0
        entry.nbytes = max(0, entry.nbytes - nbytes)
        try:
            self.index.put_block(ident, blockno, entry)
        except lmdb.Error as exc:  # still listed, but it fails its checksum every time
            log.warning("could not drop a bad cache chunk from the index: %s", exc)
            return
        self.used = max(0, self.used - nbytes)
        self.metrics.cache_bytes.set(self.used)

    # loads ahead of a streaming reader (caiosfs.diskahead) -------------------------------
    def loadable(self, ident: bytes, first: int, last: int, obj_size: int
                 ) -> tuple[list[Load], int]:
        """What ``load`` should read of chunks [first, last] for a streaming reader: the
        chunks on disk and not in memory, up to the first that is not cached (missing or
        being fetched: the fetcher brings it); and the chunk after the last one looked at
        (``last + 1`` if all were)."""
        out: list[Load] = []
        cpb, cs = self.chunks_per_block, self.chunk_size
        entry, cur = None, -1
        for chunk in range(first, last + 1):
            k = (ident, chunk)
            if k in self._fresh or k in self._verified:
                continue
            blockno, idx = divmod(chunk, cpb)
            if blockno != cur:
                entry, cur = self.index.get_block(ident, blockno), blockno
            if entry is None or not entry.present >> idx & 1:
                return out, chunk
            out.append(Load(chunk, self.chunk_len(chunk, obj_size), entry.sums[idx],
                            self.block_file(ident, blockno), idx * cs))
        return out, last + 1

    def load(self, todo: list[Load], take: Callable[[], bytearray]
             ) -> list[tuple[Load, bytes | bytearray | None]]:
        """In a worker thread: the chunks ``loadable`` listed, read from their block files
        and checked against their checksums; None for one that could not be read or does
        not match (its reader then reads it itself, and drops and refetches it: ``_chunk``).
        Whole aligned chunks are read with O_DIRECT into buffers from ``take`` (recycled
        GET buffers): straight from the disk into the buffer the FUSE reply is copied
        from, with no copy in the page cache, where the same bytes would sit beside the
        kernel's own pages of the mounted file; the chunks of one block go in one
        ``preadv``."""
        out: list[tuple[Load, bytes | bytearray | None]] = []
        for run in load_runs(todo, self.chunk_size):
            for ld, data in zip(run, self._load_run(run, take), strict=True):
                ok = (data is not None and len(data) == ld.length
                      and xxhash.xxh3_64_intdigest(data) == ld.csum)
                out.append((ld, data if ok else None))
        return out

    def _load_run(self, run: list[Load], take: Callable[[], bytearray]
                  ) -> list[bytes | bytearray | None]:
        """Consecutive chunks of one block file, read (see ``load``)."""
        cs = self.chunk_size
        whole = all(ld.length == cs for ld in run) and not cs % ALIGN
        if self.direct_read and whole:
            bufs = [take() for _ in run]
            if all(len(b) == cs and is_aligned(b) for b in bufs):
                try:
                    fd = os.open(run[0].path, os.O_RDONLY | os.O_DIRECT)
                    try:
                        n = os.preadv(fd, bufs, run[0].offset)
                    finally:
                        os.close(fd)
                    got: list[bytes | bytearray | None] = []
                    for k, b in enumerate(bufs):  # (a short read: the chunks it did not fill)
                        if n >= (k + 1) * cs:
                            got.append(b)
                        else:
                            got.append(None)
                    return got
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        return [None] * len(run)
                    log.info("the cache's file system refuses O_DIRECT reads: reading "
                             "through the page cache")
                    self.direct_read = False
        out: list[bytes | bytearray | None] = []
        try:
            fd = os.open(run[0].path, os.O_RDONLY)
        except OSError:
            return [None] * len(run)
        try:
            for ld in run:
                try:
                    out.append(os.pread(fd, ld.length, ld.offset))
                except OSError:
                    out.append(None)
        finally:
            os.close(fd)
        return out

    # fills (thread writes, loop commits) -------------------------------------------------
    def writer(self, ident: bytes, obj_size: int,
               on_chunk: Callable[[int, int, bytes], None] | None = None,
               end: int | None = None) -> ChunkWriter:
        """What a GET of the object streams into (``end``: where the GET ends)."""
        return ChunkWriter(self, ident, obj_size, on_chunk, end)

    def commit(self, ident: bytes, obj_size: int, chunks: list[tuple[int, int]]) -> None:
        """Record fetched chunks in the index (one transaction)."""
        self.commit_many([(ident, obj_size, chunks)])

    def commit_many(self, batches: list[tuple[bytes, int, list[tuple[int, int]]]]) -> None:
        """Record fetched chunks (ident, object size, [(chunk, xxh3)]) of any number of
        objects in the index, in one write transaction (each block entry read in it too):
        the fetcher commits whatever its GETs delivered since the loop last looked."""
        cpb = self.chunks_per_block
        per_block: dict[tuple[bytes, int], list[tuple[int, int, int]]] = {}
        for ident, obj_size, chunks in batches:
            for chunk, csum in chunks:
                blockno, idx = divmod(chunk, cpb)
                per_block.setdefault((ident, blockno), []).append(
                    (idx, csum, self.chunk_len(chunk, obj_size)))
        if not per_block:
            return
        t = now()
        added = 0

        def merge(key: tuple[bytes, int], entry: BlockEntry | None) -> BlockEntry:
            nonlocal added
            if entry is None:
                entry = BlockEntry(t, 0, 0, [0] * cpb)
            for idx, csum, n in per_block[key]:
                if not entry.present >> idx & 1:
                    entry.nbytes += n
                    added += n
                entry.present |= 1 << idx
                entry.sums[idx] = csum
            entry.atime = t
            return entry
        try:
            self.index.merge_blocks(list(per_block), merge)
        except lmdb.Error as exc:  # not recorded: the chunks stay unknown, fetched again
            raise index_error(exc) from None
        self.metrics.cache_miss_chunks.inc(sum(len(v) for v in per_block.values()))
        self.used += added
        self.metrics.cache_bytes.set(self.used)

    # access times and eviction -----------------------------------------------------------
    def flush_atimes(self) -> None:
        """Write batched access times (reads do not write to LMDB one by one)."""
        if not self._atimes:
            return
        updates: dict[tuple[bytes, int], BlockEntry | None] = {}
        for (ident, blockno), t in self._atimes.items():
            e = self.index.get_block(ident, blockno)
            if e is not None:
                e.atime = max(e.atime, t)
                updates[(ident, blockno)] = e
        self._atimes.clear()
        try:
            self.index.update_blocks(updates)
        except lmdb.Error as exc:  # access times only steer eviction: best effort
            log.warning("cache access times not saved: %s", exc)

    def free_shortfall(self) -> int:
        """Bytes missing from the disk's free-space floor (0 when there is enough)."""
        if not self.min_free:
            return 0
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            return 0
        self._free_seen = (time.monotonic(), free, self.used)
        return max(0, self.min_free - free)

    def over_limit(self) -> bool:
        """Whether to evict now (the fetcher asks after every GET). The disk's free space
        is looked at again only when the last look is FREE_RECHECK old or found less than
        FREE_MARGIN above the floor (less what the cache wrote since): a statfs per GET was
        ~2 % of the loop's time for small files."""
        if self.used > self.cache_size:
            return True
        if not self.used or not self.min_free:
            return False
        when, free, used = self._free_seen
        if (time.monotonic() - when < FREE_RECHECK
                and free - max(0, self.used - used) - self.min_free > FREE_MARGIN):
            return False
        return self.free_shortfall() > 0

    def evict(self, target: int | None = None, protect: set[bytes] | None = None) -> int:
        """Evict least recently used blocks until ``used <= target``; returns bytes freed.

        Runs a full index scan, so it is called in batches (down to 90% of the limit).
        """
        if target is None:
            target = int(self.cache_size * 0.9)
            short = self.free_shortfall()
            if short:
                target = max(0, min(target, self.used - short - self.block_size))
        if self.used <= target:
            return 0
        self.flush_atimes()
        entries = sorted(self.index.iter_blocks(), key=lambda t: t[2].atime)
        freed = 0
        updates: dict[tuple[bytes, int], BlockEntry | None] = {}
        for ident, blockno, e in entries:
            if self.used - freed <= target:
                break
            if protect and ident in protect:
                continue
            updates[(ident, blockno)] = None
            self._unlink(self.block_path(ident, blockno))
            freed += e.nbytes
            self.metrics.cache_evicted_blocks.inc()
            for idx in range(self.chunks_per_block):
                v = self._verified.pop((ident, blockno * self.chunks_per_block + idx), None)
                if v is not None:
                    self._verified_bytes -= len(v)
                self._subsums.pop((ident, blockno * self.chunks_per_block + idx), None)
        try:
            self.index.update_blocks(updates)
        except lmdb.Error as exc:  # files gone, entries left: they fail their checksums
            raise index_error(exc) from None
        self.used -= freed
        self.metrics.cache_evicted_bytes.inc(freed)
        self.metrics.cache_bytes.set(self.used)
        return freed

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def fsck(index: Index, cache_dir: Path, repair: bool, chunk_size: int = 1 << 20
         ) -> dict[str, int]:
    """Check every indexed chunk against its block file; with ``repair`` drop bad entries
    and delete block files the index does not know. The caller owns ``index``."""
    metrics = Metrics()
    stats = {"blocks": 0, "chunks_ok": 0, "chunks_bad": 0, "orphan_files": 0,
             "journal_entries": 0, "journal_missing_data": 0}
    try:
        entries = list(index.iter_blocks())
        cpb = max((len(e.sums) for _, _, e in entries), default=8)
        cache = BlockCache(cache_dir, index, metrics, 1 << 62, cpb * chunk_size, chunk_size)
        known: set[Path] = set()
        updates: dict[tuple[bytes, int], BlockEntry | None] = {}
        for ident, blockno, e in entries:
            stats["blocks"] += 1
            path = cache.block_path(ident, blockno)
            known.add(path)
            changed = False
            for idx in range(len(e.sums)):
                if not e.present >> idx & 1:
                    continue
                try:
                    with open(path, "rb") as fh:
                        fh.seek(idx * chunk_size)
                        data = fh.read(chunk_size)
                except OSError:
                    data = b""
                # A block file ends where its last chunk ends, so a short read is exactly
                # the object's short last chunk.
                ok = bool(data) and xxhash.xxh3_64_intdigest(data) == e.sums[idx]
                if ok:
                    stats["chunks_ok"] += 1
                else:
                    stats["chunks_bad"] += 1
                    e.present &= ~(1 << idx)
                    e.sums[idx] = 0
                    changed = True
            if changed:
                e.nbytes = sum(chunk_size for i in range(len(e.sums)) if e.present >> i & 1)
                updates[(ident, blockno)] = e if e.present else None
        for path in cache.blocks_dir.glob("*/*"):
            if path not in known:
                stats["orphan_files"] += 1
                if repair:
                    path.unlink()
        if repair and updates:
            index.update_blocks(updates)
        for fid, j in index.all_journal().items():
            stats["journal_entries"] += 1
            # An inline file's content is in the journal itself (absent: empty).
            if not j.deleted and not j.inline and not (
                    cache_dir / "dirty" / str(fid)).exists():
                stats["journal_missing_data"] += 1
    except OSError as exc:
        raise UserError(f"fsck of {cache_dir} failed: {exc.strerror or errno.errorcode}") from None
    return stats
