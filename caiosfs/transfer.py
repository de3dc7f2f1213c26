"""Bulk copies between an S3 prefix and a local directory: the engine of ``caiosfs cp``
(the command itself, its sides and summary: :mod:`caiosfs.cp`).

One process copies a whole tree with many requests in flight, on plain threads
(:mod:`caiosfs.copypool`: why no event loop): small objects one GET (or PUT) each, written
by the thread that fetched them; large ones as parallel ranged GETs of ``max_request``
bytes written in place (``os.pwrite``) into one temp file, or as multipart uploads of
``part_size`` parts. Every request goes through :class:`caiosfs.store.s3.S3Store` (endpoint
aliases and credentials exactly as for ``mount``) and is retried with backoff for at most
``read_timeout`` seconds: a store that keeps failing fails that object, listed at the end.

Resumable and safe to run side by side:

- a download is written to ``.caiosfs-<hash>-<pid>.tmp`` in the destination directory,
  given its mode, mtime and ETag xattr, and renamed: a partial file never has the final
  name. Temp files left by a killed run are removed by the next run that copies the same
  names. No fsync per file: one syncfs of the destination before the summary (docs/cp.md,
  "Durability": why);
- an object already complete at the destination is skipped: a local file with the object's
  size and ETag (kept in the ``user.caiosfs.etag`` xattr; on filesystems without user xattrs,
  size and mtime), an object with the file's size and a Last-Modified not older than it;
- ``--shard I/N`` takes the paths whose xxh64 is I modulo N (the relative path, so both
  directions agree); ``--files-from`` takes a list (``caiosfs ls --split`` writes them).
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import xxhash

from .attrs import Attrs, from_meta
from .config import MountConfig, Source
from .copypool import MAX_PARTS, Job, Pool, retrying
from .errors import PreconditionFailed, StoreError
from .etag import etag_matches
from .listing import (
    Item,
    Result,
)
from .localfiles import (
    TMP_PREFIX,
    TMP_SUFFIX,
    get_etag,
    range_writer,
    set_etag,
    start_writeback,
    syncfs,
    tmp_hash,
    unlink_quiet,
)

# Small objects up to this size are received into memory and written at once into a temp
# file created with their mode; larger ones are written as they arrive.
SMALL_BUFFER = 1 << 20


# The copy ------------------------------------------------------------------------------
class Copier:
    def __init__(self, cfg: MountConfig, store: Any, local: Path, verify: bool,
                 progress: Any) -> None:
        self.cfg, self.store = cfg, store
        self.local, self.verify, self.progress = local, verify, progress
        self.res = Result()
        self.timeout = cfg.read_timeout
        self.xattrs = True
        self._dirs: set[Path] = set()  # destination directories known to exist
        self._lock = threading.Lock()  # the counters and the progress line
        self.retries: dict[str, int] = {}  # error code -> requests retried after it
        self._pid = os.getpid()
        self._umask = os.umask(0o022)  # (read once, before any copy thread runs)
        os.umask(self._umask)

    def call(self, op: str, fn: Any, *args: Any) -> Any:
        """One request with bounded patience: a copy reports an object that keeps failing
        instead of waiting for the store forever."""
        return retrying(op, self.timeout, fn, *args, on_retry=self._retried)

    def _retried(self, exc: StoreError) -> None:
        with self._lock:
            self.retries[exc.code] = self.retries.get(exc.code, 0) + 1

    def fail(self, rel: str, exc: BaseException) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, PreconditionFailed):
            why = "changed in the store since it was listed (run again to copy it)"
        with self._lock:
            self.res.failures.append((rel, why or exc.__class__.__name__))
            self.progress.update(0, 0)

    def copied(self, size: int, nbytes: int) -> None:
        with self._lock:
            self.res.copied += 1
            self.res.bytes += size
            self.progress.update(nbytes, 1)

    def moved(self, nbytes: int) -> None:
        with self._lock:
            self.progress.update(nbytes)

    def guard(self, rel: str, fn: Callable[[], None]) -> Callable[[], None]:
        def task() -> None:
            try:
                fn()
            except (StoreError, OSError, ValueError) as exc:
                self.fail(rel, exc)
        return task

    def step(self, it: Item) -> int:
        """Size of one ranged GET of this object (at most MAX_PARTS of them)."""
        return max(self.cfg.max_request, math.ceil(it.size / MAX_PARTS))

    # S3 -> local ---------------------------------------------------------------------
    def plan_download(self, src: Source, items: list[Item]) -> list[Item]:
        """What is not complete at the destination yet; stale temp files of those names
        removed. One directory scan per directory."""
        by_dir: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_dir[os.path.dirname(it.rel)].append(it)
        todo: list[Item] = []
        for d, its in by_dir.items():
            path = self.local / d
            try:
                entries = {e.name: e for e in os.scandir(path)}
            except OSError:  # not there yet (or not a directory: each file fails, listed)
                todo += its
                continue
            ours = {tmp_hash(os.path.basename(it.rel)) for it in its}
            for name in entries:
                if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX) and \
                        name[len(TMP_PREFIX):len(TMP_PREFIX) + 16] in ours:
                    try:
                        os.unlink(path / name)
                    except FileNotFoundError:
                        pass
            for it in its:
                e = entries.get(os.path.basename(it.rel))
                if e is not None and self._complete(e, it):
                    self.res.skipped += 1
                else:
                    todo.append(it)
        return todo

    def _complete(self, e: os.DirEntry[str], it: Item) -> bool:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):  # (no user xattrs on symlinks: its target's MD5)
            target = hashlib.md5(os.fsencode(os.readlink(e.path))).hexdigest()
            return st.st_size == it.size and target == it.etag.strip('"')

        if not stat.S_ISREG(st.st_mode) or st.st_size != it.size:
            return False
        have = get_etag(e.path)
        if have is not None:
            return have == it.etag
        # No xattr (another tool wrote it, or the filesystem has none): an mtime that is the
        # object's Last-Modified or later means it was written from this version or after.
        return not self.xattrs and st.st_mtime >= it.mtime - 1

    def download_all(self, src: Source, items: list[Item]) -> None:
        """Every item copied or in the failure list; then the destination synced."""
        self.download_pages(src, iter([items]))

    def download_pages(self, src: Source, pages: Iterable[list[Item]]) -> None:
        """:meth:`download_all` of a listing page by page: each page is planned and its
        objects queued as it arrives, while the threads copy what earlier pages brought
        (the first GET starts after the first page, not after the whole listing). A page
        that cannot be listed stops the listing, not what was queued: that is copied and
        synced, then the error is raised."""
        # Ranged GETs: ``parallel`` in flight (16 x 50 MB/s behind the WAN proxy is more
        # than the 2-core VM moves). Small objects: twice that, as a small GET is mostly
        # waiting for its first byte (20 ms behind the proxy: 1,000 files / 16 in flight
        # would take 1.25 s of waiting alone); the ranged-GET threads join them when no
        # range is left, the small-object threads never take ranges.
        pool = Pool(self.cfg.parallel, 2 * self.cfg.parallel, small_takes_large=False)
        pool.start()
        try:
            for items in pages:
                todo = self.plan_download(src, items)
                with self._lock:
                    self.progress.total += sum(it.size for it in todo)
                    self.progress.nobjects += len(todo)
                pool.add(*self._download_tasks(src, todo))
        finally:
            pool.close()
            pool.join()
            self._sync()

    def _download_tasks(self, src: Source, items: list[Item],
                        ) -> tuple[list[Callable[[], None]], list[Callable[[], None]]]:
        large: list[Callable[[], None]] = []
        small: list[Callable[[], None]] = []
        # Largest first: the long transfers overlap with the many small ones.
        for it in sorted(items, key=lambda x: -x.size):
            step = self.step(it)
            if it.size <= step:
                small.append(self.guard(it.rel, partial(self._small, src, it)))
                continue
            job = Job(it, math.ceil(it.size / step))
            large += [partial(self._range, src, job, off, step)
                      for off in range(0, it.size, step)]
        return large, small

    def _paths(self, it: Item) -> tuple[Path, Path]:
        dest = self.local / it.rel
        tmp = dest.parent / f"{TMP_PREFIX}{tmp_hash(dest.name)}-{self._pid}{TMP_SUFFIX}"
        return dest, tmp

    def _open_tmp(self, dest: Path, tmp: Path, mode: int = 0o600) -> int:
        if dest.parent not in self._dirs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(dest.parent)
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)

    def _small(self, src: Source, it: Item) -> None:
        """GET the whole object, then write it into a temp file created with its mode and
        finish it (in this thread). Objects above SMALL_BUFFER are written as they arrive
        (at most 2 x parallel bodies are held)."""
        if it.size > SMALL_BUFFER:
            return self._small_streamed(src, it)
        key = src.prefix + it.rel
        h = (0, it.size, xxhash.xxh3_64()) if self.verify else None
        buf = bytearray()

        def sink(off: int, piece: bytes) -> None:
            if off == 0:  # (an attempt starting again)
                buf.clear()
                if h is not None:
                    h[2].reset()
            buf.extend(piece)
            if h is not None:
                h[2].update(piece)
        if it.size == 0:
            meta = self.call("head", self.store.head, key).metadata
        else:
            meta = self.call("get", self.store.get_range, key, 0, it.size, it.etag or None,
                              sink)
        attrs = self._attrs(meta, it)
        mode = stat.S_IMODE(attrs.mode)
        dest, tmp = self._paths(it)
        # Created with its mode (the umask permitting): no fchmod.
        fd = self._open_tmp(dest, tmp, mode if not stat.S_ISLNK(attrs.mode) else 0o600)
        try:
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            self._finish(fd, tmp, dest, it, attrs, [h] if h else [],
                         mode_set=mode & ~self._umask == mode)
        except BaseException:
            unlink_quiet(tmp)
            raise
        self.copied(it.size, it.size)

    def _small_streamed(self, src: Source, it: Item) -> None:
        """GET the whole object into a temp file as it arrives, then finish it."""
        dest, tmp = self._paths(it)
        key = src.prefix + it.rel
        fd = self._open_tmp(dest, tmp)
        h = (0, it.size, xxhash.xxh3_64()) if self.verify else None
        try:
            meta = self.call("get", self.store.get_range, key, 0, it.size, it.etag or None,
                              range_writer(fd, h))
        except BaseException:
            os.close(fd)
            unlink_quiet(tmp)
            raise
        try:
            self._finish(fd, tmp, dest, it, self._attrs(meta, it), [h] if h else [])
        except BaseException:
            unlink_quiet(tmp)
            raise
        self.copied(it.size, it.size)

    def _attrs(self, meta: dict[str, str] | None, it: Item) -> Attrs:
        return from_meta(meta, is_dir=False, default_mode=self.cfg.file_mode, uid=0, gid=0,
                         mtime=it.mtime, size=it.size)

    def _range(self, src: Source, job: Job, off: int, step: int) -> None:
        """One ranged GET of a large object, written in place into its temp file; the last
        range to finish finishes the file (or removes it, if any range failed)."""
        it = job.it
        dest, tmp = self._paths(it)
        exc: BaseException | None = None
        try:
            with job.lock:
                if job.error is None and job.fd < 0:
                    job.fd = self._open_tmp(dest, tmp)
            if job.error is None:  # (once one range failed, the others are not fetched)
                n = min(step, it.size - off)
                h = (off, n, xxhash.xxh3_64()) if self.verify else None
                meta = self.call("get", self.store.get_range, src.prefix + it.rel, off, n,
                                  it.etag or None, range_writer(job.fd, h))
                start_writeback(job.fd, off, n)
                with job.lock:
                    if off == 0:
                        job.meta = meta
                    if h:
                        job.hashes.append(h)
                self.moved(n)
        except (StoreError, OSError, ValueError) as e:
            exc = e
        if not job.piece_done(exc):
            return
        fd, job.fd = job.fd, -1
        if job.error is not None:
            if fd >= 0:
                os.close(fd)
            unlink_quiet(tmp)
            self.fail(it.rel, job.error)
            return
        try:
            self._finish(fd, tmp, dest, it, self._attrs(job.meta, it), job.hashes)
        except (StoreError, OSError, ValueError) as e:
            unlink_quiet(tmp)
            self.fail(it.rel, e)
            return
        self.copied(it.size, 0)

    def _finish(self, fd: int, tmp: Path, dest: Path, it: Item, attrs: Attrs,
                hashes: list[Any], mode_set: bool = False) -> None:
        """Check, then give the file its attributes and its name (and close ``fd``);
        ``mode_set``: the file was created with its mode already."""
        try:
            if self.verify:
                if os.fstat(fd).st_size != it.size:
                    raise ValueError(f"verify: {os.fstat(fd).st_size} bytes written, "
                                     f"{it.size} expected")
                ok = etag_matches(str(tmp), it.size, it.etag, self.cfg.part_size)
                if ok is False:
                    raise ValueError(f"verify: content does not match the ETag {it.etag}")
                if ok is None:
                    # No MD5 to compare with: read back what was written and compare it
                    # with the checksum of what arrived.
                    for start, n, h in hashes:
                        if xxhash.xxh3_64_intdigest(os.pread(fd, n, start)) != h.intdigest():
                            raise ValueError(f"verify: bytes {start}-{start + n} read back "
                                             "differ from those received")
            if stat.S_ISLNK(attrs.mode):
                target = os.pread(fd, max(it.size, 1), 0)
                os.close(fd)
                fd = -1
                os.unlink(tmp)
                os.symlink(target, tmp)
                set_etag(tmp, it.etag)
                os.utime(tmp, (attrs.mtime, attrs.mtime), follow_symlinks=False)
            else:  # (through the descriptor: no path lookups)
                if not mode_set:
                    os.fchmod(fd, stat.S_IMODE(attrs.mode))
                set_etag(fd, it.etag)
                os.utime(fd, (attrs.mtime, attrs.mtime))
            # (every byte is written: a killed process cannot leave this name partial)
            os.rename(tmp, dest)
        finally:
            if fd >= 0:
                os.close(fd)

    def _sync(self) -> None:
        """One syncfs of the destination's filesystem: when cp reports a file copied, it
        is on disk (docs/cp.md, "Durability")."""
        try:
            fd = os.open(self.local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.fail(".", exc)
            return
        try:
            syncfs(fd)
        except OSError as exc:
            self.fail(".", OSError(exc.errno, "writing the copied files back to the "
                                   f"destination's disk failed: {exc.strerror}"))
        finally:
            os.close(fd)
