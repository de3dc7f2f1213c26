"""The local -> S3 side of ``caiosfs cp``: what to skip, whole-file PUTs, multipart uploads
of large files (the first part to run creates the upload, the last to finish completes it)."""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from .attrs import Attrs
from .config import Source
from .copypool import MAX_PARTS, Job, Pool, retrying
from .errors import StoreError
from .etag import etag_matches
from .listing import Item
from .localfiles import md5_range
from .store import ObjectInfo, PartSource

if TYPE_CHECKING:
    from .transfer import Copier


class Uploads:
    """Uploads of a :class:`~caiosfs.transfer.Copier` (its counters, failures, retries)."""

    def __init__(self, copier: Copier) -> None:
        self.c = copier

    def plan(self, items: list[Item], have: dict[str, ObjectInfo]) -> list[Item]:
        todo = []
        for it in items:
            o = have.get(it.rel)
            if o is not None and o.size == it.size and o.mtime >= math.floor(it.mtime):
                self.c.res.skipped += 1
            else:
                todo.append(it)
        return todo

    def upload_all(self, dst: Source, items: list[Item]) -> None:
        large: list[Callable[[], None]] = []
        small: list[Callable[[], None]] = []
        for it in sorted(items, key=lambda x: -x.size):
            if it.link or it.size <= self.c.cfg.part_size:
                small.append(self.c.guard(it.rel, partial(self._put, dst, it)))
                continue
            part = max(self.c.cfg.part_size, math.ceil(it.size / MAX_PARTS / (1 << 20)) << 20)
            job = Job(it, math.ceil(it.size / part))
            large += [partial(self._part, dst, job, i, off, part)
                      for i, off in enumerate(range(0, it.size, part))]
        # Parts of 64 MiB: max(4, parallel / 2) in flight (16 at once made SeaweedFS drop
        # connections here: 9 parts re-sent, half the rate of 8); whole files: parallel.
        Pool(max(4, self.c.cfg.parallel // 2), self.c.cfg.parallel,
             small_takes_large=False).run(large, small)

    def _put(self, dst: Source, it: Item) -> None:
        path = str(self.c.local / it.rel)
        key = dst.prefix + it.rel
        st = os.lstat(path)
        meta = Attrs(st.st_mode, st.st_uid, st.st_gid, st.st_mtime).to_meta()
        if stat.S_ISLNK(st.st_mode):
            body = os.fsencode(os.readlink(path))
            self.c.call("put", self.c.store.put_file, key, body, len(body), meta)
            size = len(body)
        elif not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        elif st.st_size <= self.c.cfg.part_size:
            size = st.st_size
            etag = self.c.call("put", self.c.store.put_file, key, path if size else None,
                              size, meta)
            if self.c.verify and not etag_matches(path, size, etag, self.c.cfg.part_size):
                raise ValueError(f"verify: the store's ETag {etag} does not match the file")
        else:  # (grew since it was listed: still one object, as multipart)
            raise ValueError("the file grew while it was being copied (run again)")
        self.c.copied(size, size)

    def _part(self, dst: Source, job: Job, i: int, off: int, part: int) -> None:
        """One part of a multipart upload; the first part to run creates the upload (the
        others of that file wait for it), the last one to finish completes it."""
        it = job.it
        path = str(self.c.local / it.rel)
        key = dst.prefix + it.rel
        exc: BaseException | None = None
        try:
            with job.lock:
                if job.error is None and not job.upload_id:
                    st = os.lstat(path)
                    if st.st_size != it.size:
                        raise ValueError("the file changed size while it was being copied")
                    job.meta = Attrs(st.st_mode, st.st_uid, st.st_gid, st.st_mtime).to_meta()
                    job.upload_id = self.c.call("create_multipart",
                                               self.c.store.create_multipart, key, job.meta)
            if job.error is None:
                src = PartSource(i + 1, path=path, offset=off, length=min(part, it.size - off))
                etag = self.c.call("upload_part", self.c.store.upload_part, key, job.upload_id,
                                  src)
                if self.c.verify and etag.strip('"') != md5_range(path, off, src.length):
                    raise ValueError(f"verify: part {i + 1} ETag mismatch")
                with job.lock:
                    job.etags[i] = etag
                self.c.moved(src.length)
        except (StoreError, OSError, ValueError) as e:
            exc = e
        if not job.piece_done(exc):
            return
        if job.error is None:
            try:
                self._complete_multipart(key, job)
                self.c.copied(it.size, 0)
                return
            except (StoreError, OSError, ValueError) as e:
                job.error = e
        if job.upload_id:
            try:
                retrying("abort_multipart", 10, self.c.store.abort_multipart, key,
                         job.upload_id)
            except StoreError:
                pass
        self.c.fail(it.rel, job.error)

    def _complete_multipart(self, key: str, job: Job) -> None:
        tags = [job.etags[i] for i in range(len(job.etags))]
        try:
            self.c.call("complete_multipart", self.c.store.complete_multipart, key,
                       job.upload_id, tags)
        except StoreError as exc:
            # A retried complete after a lost answer: done if the object is ours.
            if exc.code != "NoSuchUpload":
                raise
            want = hashlib.md5(b"".join(bytes.fromhex(t.strip('"')) for t in tags))
            have = self.c.call("head", self.c.store.head, key)
            if have.etag.strip('"') != f"{want.hexdigest()}-{len(tags)}":
                raise
