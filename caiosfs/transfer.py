"""Bulk copies between an S3 prefix and a local directory: ``caiosfs cp`` and ``caiosfs ls``.

One process copies a whole tree with many requests in flight: small objects one GET (or PUT)
each, ``parallel`` at a time; large ones as parallel ranged GETs of ``max_request`` bytes
written in place into the destination file, or as multipart uploads of ``part_size`` parts.
Every request goes through the package's :class:`StoreClient` (retries with backoff, the
S3-code table, endpoint aliases and credentials exactly as for ``mount``), each with bounded
patience (``read_timeout``): a store that keeps failing fails that object, listed at the end.

Resumable and safe to run side by side:

- a download is written to ``.caiosfs-<hash>-<pid>.tmp`` in the destination directory,
  fsynced, given its mode and mtime, and renamed: a partial file never has the final name.
  Temp files left by a killed run are removed by the next run that copies the same names;
- an object already complete at the destination is skipped: a local file with the object's
  size and ETag (kept in the ``user.caiosfs.etag`` xattr; on filesystems without user xattrs,
  size and mtime), an object with the file's size and a Last-Modified not older than it;
- ``--shard I/N`` takes the paths whose xxh64 is I modulo N (the relative path, so both
  directions agree); ``--files-from`` takes a list (``caiosfs ls --split`` writes them).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import socket
import stat
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio
import xxhash

from .attrs import Attrs, from_meta
from .config import MountConfig, Source
from .errors import PreconditionFailed, StoreError, UserError
from .etag import etag_matches
from .listing import (
    Item,
    Result,
    connect,
    list_s3,
    open_bucket,
    parse_side,
    quiet_logs,
    read_list,
    select_shard,
    valid_rel,
    walk_local,
)
from .store import ObjectInfo, PartSource

ETAG_XATTR = "user.caiosfs.etag"
MAX_PARTS = 10_000
TMP_PREFIX, TMP_SUFFIX = ".caiosfs-", ".tmp"


# The copy ------------------------------------------------------------------------------
class Copier:
    def __init__(self, cfg: MountConfig, client: Any, local: Path, verify: bool,
                 progress: Any) -> None:
        self.cfg, self.client, self.store = cfg, client, client.store
        self.local, self.verify, self.progress = local, verify, progress
        self.res = Result()
        self.timeout = cfg.read_timeout
        self.xattrs = True
        self._dirs: set[Path] = set()  # destination directories known to exist
        self._put_limiter = trio.CapacityLimiter(cfg.parallel)

    async def _call(self, op: str, fn: Any, *args: Any, write: bool | None = False) -> Any:
        """StoreClient's retry loop with bounded patience: a copy reports an object that
        keeps failing instead of waiting for the store forever, as dirty data must.
        ``write``: True for multipart calls (the write limiter), None for whole-file PUTs
        (a limiter of ``parallel``), False for reads."""
        c = self.client
        limiter = {True: c.write_limiter, None: self._put_limiter}.get(write, c.read_limiter)
        return await c._run(op, fn, *args, limiter=limiter, deadline=self.timeout)

    def fail(self, rel: str, exc: BaseException) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, PreconditionFailed):
            why = "changed in the store since it was listed (run again to copy it)"
        self.res.failures.append((rel, why or exc.__class__.__name__))
        self.progress.update(0, 0)

    async def run(self, items: list[Item], worker: Any) -> None:
        send, recv = trio.open_memory_channel[Item](0)

        async def work() -> None:
            async for it in recv:
                try:
                    await worker(it)
                except (StoreError, OSError, ValueError) as exc:
                    self.fail(it.rel, exc)

        async with trio.open_nursery() as n:
            for _ in range(max(4, self.cfg.parallel * 2)):
                n.start_soon(work)
            async with send:
                # Largest first: the long transfers overlap with the many small ones.
                for it in sorted(items, key=lambda x: -x.size):
                    await send.send(it)
            # (workers end when the channel closes)

    # S3 -> local ---------------------------------------------------------------------
    def plan_download(self, src: Source, items: list[Item]) -> list[Item]:
        """What is not complete at the destination yet; stale temp files of those names
        removed. One directory scan per directory (in a thread)."""
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
            ours = {_tmp_hash(os.path.basename(it.rel)) for it in its}
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
        have = _get_etag(e.path)
        if have is not None:
            return have == it.etag
        # No xattr (another tool wrote it, or the filesystem has none): an mtime that is the
        # object's Last-Modified or later means it was written from this version or after.
        return not self.xattrs and st.st_mtime >= it.mtime - 1

    async def download(self, src: Source, it: Item) -> None:
        dest = self.local / it.rel
        tmp = dest.parent / f"{TMP_PREFIX}{_tmp_hash(dest.name)}-{os.getpid()}{TMP_SUFFIX}"
        key = src.prefix + it.rel
        step = max(self.cfg.max_request, math.ceil(it.size / 10_000))
        if it.size <= step:
            # Everything in one thread hop, retried as a whole: on two cores, each hop
            # between the loop and a worker costs as much as a small file's write.
            await self._call("get", self._small, key, it, dest, tmp)
        else:
            await self._large(key, it, dest, tmp, step)
        self.res.copied += 1
        self.res.bytes += it.size
        self.progress.update(it.size if it.size <= step else 0, 1)

    def _open_tmp(self, dest: Path, tmp: Path) -> int:
        if dest.parent not in self._dirs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(dest.parent)
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def _small(self, key: str, it: Item, dest: Path, tmp: Path) -> None:
        """In a worker thread: GET the whole object into a temp file, then finish it."""
        fd = self._open_tmp(dest, tmp)
        h = (0, it.size, xxhash.xxh3_64()) if self.verify else None
        try:
            if it.size == 0:
                meta = self.store.head(key).metadata
            else:
                meta = self.store.get_range(key, 0, it.size, it.etag or None, _writer(fd, h))
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        try:
            self._finish(fd, tmp, dest, it, self._attrs(meta, it), [h] if h else [])
        except BaseException:
            _unlink(tmp)
            raise

    def _attrs(self, meta: dict[str, str] | None, it: Item) -> Attrs:
        return from_meta(meta, is_dir=False, default_mode=self.cfg.file_mode, uid=0, gid=0,
                         mtime=it.mtime, size=it.size)

    async def _large(self, key: str, it: Item, dest: Path, tmp: Path, step: int) -> None:
        """Parallel ranged GETs written in place into one temp file."""
        fd = await trio.to_thread.run_sync(self._open_tmp, dest, tmp)
        done = False
        hashes: dict[int, Any] = {}  # --verify: range start -> (start, length, xxh3)
        metas: list[dict[str, str] | None] = []
        try:
            async def one(off: int) -> None:
                n = min(step, it.size - off)
                h = hashes[off] = (off, n, xxhash.xxh3_64()) if self.verify else None
                metas.append(await self._call("get", self.store.get_range, key, off, n,
                                              it.etag or None, _writer(fd, h)))
                self.progress.update(n)
            async with trio.open_nursery() as nursery:
                for off in range(0, it.size, step):
                    nursery.start_soon(one, off)
            owned, fd = fd, -1  # _finish closes it, whatever happens
            await trio.to_thread.run_sync(self._finish, owned, tmp, dest, it,
                                         self._attrs(metas[0], it), list(hashes.values()))
            done = True
        finally:
            if not done:
                if fd >= 0:
                    os.close(fd)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unlink, tmp)

    def _finish(self, fd: int, tmp: Path, dest: Path, it: Item, attrs: Attrs,
                hashes: list[Any]) -> None:
        """In a thread: check, persist, then give the file its name (and close ``fd``)."""
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
            else:
                os.fchmod(fd, stat.S_IMODE(attrs.mode))
                os.fsync(fd)
            _set_etag(tmp, it.etag)
            os.utime(tmp, (attrs.mtime, attrs.mtime), follow_symlinks=False)
            os.rename(tmp, dest)
        finally:
            if fd >= 0:
                os.close(fd)

    # local -> S3 ---------------------------------------------------------------------
    def plan_upload(self, items: list[Item], have: dict[str, ObjectInfo]) -> list[Item]:
        todo = []
        for it in items:
            o = have.get(it.rel)
            if o is not None and o.size == it.size and o.mtime >= math.floor(it.mtime):
                self.res.skipped += 1
            else:
                todo.append(it)
        return todo

    async def upload(self, dst: Source, it: Item) -> None:
        path = str(self.local / it.rel)
        key = dst.prefix + it.rel
        st = await trio.to_thread.run_sync(os.lstat, path)
        meta = Attrs(st.st_mode, st.st_uid, st.st_gid, st.st_mtime).to_meta()
        if stat.S_ISLNK(st.st_mode):
            body = os.fsencode(await trio.to_thread.run_sync(os.readlink, path))
            await self._call("put", self.store.put_file, key, body, len(body), meta,
                             write=None)
            size = len(body)
        elif not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        elif st.st_size <= self.cfg.part_size:
            size = st.st_size
            # Whole files go as many at once as downloads do: the halved write limiter is
            # for the 64 MiB parts (see listing.client_for).
            etag = await self._call("put", self.store.put_file, key, path if size else None,
                                    size, meta, write=None)
            if self.verify and not await trio.to_thread.run_sync(
                    etag_matches, path, size, etag, self.cfg.part_size):
                raise ValueError(f"verify: the store's ETag {etag} does not match the file")
        else:
            size = st.st_size
            await self._multipart(key, path, size, meta)
        self.progress.update(size, 1)
        self.res.copied += 1
        self.res.bytes += size

    async def _multipart(self, key: str, path: str, size: int, meta: dict[str, str]) -> None:
        part = max(self.cfg.part_size, math.ceil(size / MAX_PARTS / (1 << 20)) << 20)
        upload_id = await self._call("create_multipart", self.store.create_multipart, key,
                                     meta, write=True)
        etags: dict[int, str] = {}
        ok = False
        try:
            async def one(i: int, off: int) -> None:
                src = PartSource(i + 1, path=path, offset=off, length=min(part, size - off))
                etags[i] = await self._call("upload_part", self.store.upload_part, key,
                                            upload_id, src, write=True)
                if self.verify:
                    want = await trio.to_thread.run_sync(_md5_range, path, off, src.length)
                    if etags[i].strip('"') != want:
                        raise ValueError(f"verify: part {i + 1} ETag mismatch")
            async with trio.open_nursery() as n:
                for i, off in enumerate(range(0, size, part)):
                    n.start_soon(one, i, off)
            tags = [etags[i] for i in range(len(etags))]
            try:
                await self._call("complete_multipart", self.store.complete_multipart, key,
                                 upload_id, tags, write=True)
            except StoreError as exc:
                # A retried complete after a lost answer: done if the object is ours.
                if exc.code != "NoSuchUpload":
                    raise
                want = hashlib.md5(b"".join(bytes.fromhex(t.strip('"')) for t in tags))
                have = await self._call("head", self.store.head, key)
                if have.etag.strip('"') != f"{want.hexdigest()}-{len(tags)}":
                    raise
            ok = True
        finally:
            if not ok:
                with trio.move_on_after(10, shield=True):
                    try:
                        await self._call("abort_multipart", self.store.abort_multipart, key,
                                         upload_id, write=True)
                    except StoreError:
                        pass


def _tmp_hash(name: str) -> str:
    return xxhash.xxh64_hexdigest(name.encode(errors="surrogateescape"))


def _writer(fd: int, h: Any = None) -> Any:
    """A sink writing a range's pieces in place; ``h``: (start, length, xxh3) of the range,
    reset when an attempt starts again at its start."""
    def sink(off: int, piece: bytes) -> None:
        if h is not None:
            if off == h[0]:
                h[2].reset()
            h[2].update(piece)
        view = memoryview(piece)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
    return sink


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _get_etag(path: str) -> str | None:
    try:
        return os.getxattr(path, ETAG_XATTR, follow_symlinks=False).decode()
    except OSError:
        return None


def _set_etag(path: Path, etag: str) -> None:
    if not etag:
        return
    try:
        os.setxattr(path, ETAG_XATTR, etag.encode(), follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
            raise


def _md5_range(path: str, off: int, length: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        fh.seek(off)
        left = length
        while left:
            b = fh.read(min(left, 8 << 20))
            if not b:
                raise ValueError("the file shrank while uploading")
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def _xattrs_work(d: Path) -> bool:
    probe = d / f"{TMP_PREFIX}probe-{socket.gethostname()}-{os.getpid()}{TMP_SUFFIX}"
    try:
        probe.write_bytes(b"")
        try:
            os.setxattr(probe, ETAG_XATTR, b"x")
            return True
        except OSError:
            return False
        finally:
            probe.unlink()
    except OSError as exc:
        raise UserError(f"destination {d} is not writable: {exc.strerror}") from None


# Commands ------------------------------------------------------------------------------
async def _source_items(a: argparse.Namespace, cp: Copier | None, client: Any,
                        side: Source | Path, res: Result) -> list[Item]:
    """The source's items for this shard: listed once, or from --files-from."""
    from .progress import parse_shard
    shard = parse_shard(a.shard)
    if getattr(a, "files_from", None):
        wanted = [it for it in read_list(a.files_from) if valid_rel(it.rel) or
                  res.failures.append((it.rel, "not a valid relative path"))]
        wanted = select_shard(wanted, shard)
        if isinstance(side, Path):
            out = []
            for it in wanted:
                try:
                    st = os.lstat(side / it.rel)
                except OSError as exc:
                    res.failures.append((it.rel, exc.strerror or "cannot stat"))
                    continue
                out.append(Item(it.rel, st.st_size, "", st.st_mtime, stat.S_ISLNK(st.st_mode)))
            return out
        missing = [it for it in wanted if it.size < 0]

        async def head(it: Item) -> None:
            try:
                o = await client.head(side.prefix + it.rel)
                it.size, it.etag, it.mtime = o.size, o.etag, o.mtime
            except StoreError as exc:
                res.failures.append((it.rel, "not found" if exc.code in (
                    "NoSuchKey", "404", "NotFound") else str(exc)))
        async with trio.open_nursery() as n:
            for it in missing:
                n.start_soon(head, it)
        return [it for it in wanted if it.size >= 0]
    if isinstance(side, Path):
        return select_shard(await trio.to_thread.run_sync(walk_local, side), shard)
    items, _dirs = await list_s3(client, side, res)
    return select_shard(items, shard)


def cp_command(a: argparse.Namespace) -> int:
    src, dst = parse_side(a.src), parse_side(a.dst)
    if isinstance(src, Path) == isinstance(dst, Path):
        raise UserError("cp copies between s3://BUCKET[/PREFIX] and a local directory: "
                        "give one of each")
    s3side = src if isinstance(src, Source) else dst
    local = dst if isinstance(dst, Path) else src
    assert isinstance(s3side, Source) and isinstance(local, Path)
    if isinstance(src, Path) and not src.is_dir():
        raise UserError(f"source {a.src} is not a directory")
    from .progress import parse_shard
    parse_shard(a.shard)  # (bad input fails before anything is contacted)
    quiet_logs()
    cfg, client = connect(f"s3://{s3side.bucket}/{s3side.prefix}", a.o)
    return trio.run(_cp, a, cfg, client, src, dst, local)


async def _cp(a: argparse.Namespace, cfg: MountConfig, client: Any, src: Source | Path,
              dst: Source | Path, local: Path) -> int:
    from .progress import Progress
    t0 = time.monotonic()
    res = Result()
    progress = Progress(0, 0, quiet=a.quiet or not sys.stderr.isatty(), label="cp")
    cp = Copier(cfg, client, local, a.verify, progress)
    cp.res = res
    if isinstance(dst, Path):
        await trio.to_thread.run_sync(lambda: _mkdir(dst))
        cp.xattrs = await trio.to_thread.run_sync(_xattrs_work, dst)
    await open_bucket(cfg, client)
    try:
        items = await _source_items(a, cp, client, src, res)
        if isinstance(src, Source):
            todo = await trio.to_thread.run_sync(cp.plan_download, src, items)
            worker: Any = lambda it: cp.download(src, it)
        else:
            assert isinstance(dst, Source)
            have: dict[str, ObjectInfo] = {}
            listed, _ = await list_s3(client, dst, Result())
            have = {it.rel: ObjectInfo(it.rel, it.size, it.etag, it.mtime) for it in listed}
            todo = cp.plan_upload(items, have)
            worker = lambda it: cp.upload(dst, it)
            # Multipart uploads a killed run left behind, of the names this run uploads
            # (only this shard's: another task's may be running).
            mine = {dst.prefix + it.rel for it in todo}
            for u in await client.list_multipart(dst.prefix):
                if u.key in mine:
                    await cp._call("abort_multipart", client.store.abort_multipart, u.key,
                                   u.upload_id, write=True)
                    res.aborted += 1
    except StoreError as exc:
        raise UserError(f"listing failed: {exc}") from None
    progress.total, progress.nobjects = sum(it.size for it in todo), len(todo)
    await cp.run(todo, worker)
    progress.finish() if not progress.quiet else None
    el = time.monotonic() - t0
    summary = {"copied": res.copied, "skipped": res.skipped, "failed": len(res.failures),
               "bytes": res.bytes, "seconds": round(el, 3), "invalid_keys": res.invalid,
               "aborted_uploads": res.aborted,
               "failures": [{"path": p, "error": e} for p, e in res.failures]}
    if a.json:
        print(json.dumps(summary))
    if not a.quiet:
        print(f"caiosfs cp: {res.copied} copied ({res.bytes / 1e6:,.1f} MB), {res.skipped} "
              f"already there, {len(res.failures)} failed in {el:.1f}s "
              f"({res.bytes / 1e6 / max(el, 1e-6):,.1f} MB/s, "
              f"{res.copied / max(el, 1e-6):,.0f} files/s)", file=sys.stderr)
        if res.aborted:
            print(f"caiosfs cp: aborted {res.aborted} multipart uploads an interrupted run "
                  "left", file=sys.stderr)
        if res.invalid:
            print(f"caiosfs cp: {res.invalid} keys skipped: they cannot be a path "
                  "(a//b, '.', '..', a name over 255 bytes)", file=sys.stderr)
    for p, e in res.failures[:1000]:
        print(f"caiosfs cp: failed: {p}: {e}", file=sys.stderr)
    if len(res.failures) > 1000:
        print(f"caiosfs cp: ... and {len(res.failures) - 1000} more", file=sys.stderr)
    return 1 if res.failures else 0


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"destination {d} is not writable: {exc.strerror}") from None


