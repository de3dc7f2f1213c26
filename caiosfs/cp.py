"""The ``caiosfs cp`` command: which side is which, what to copy (one listing, or
``--files-from``, then this task's ``--shard``), the bucket check, and the summary. The
copying itself is :mod:`caiosfs.transfer`'s :class:`~caiosfs.transfer.Copier`."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from .config import MountConfig, Source, build_config
from .copypool import Pool, retrying
from .errors import StoreError, UserError, describe_store_error
from .listing import (
    Item,
    Result,
    iter_prefix,
    list_prefix,
    parse_side,
    quiet_logs,
    read_list,
    select_shard,
    store_for,
    valid_rel,
    walk_local,
)
from .localfiles import xattrs_work
from .store import ObjectInfo
from .transfer import Copier
from .uploads import Uploads


def _source_items(a: argparse.Namespace, cfg: MountConfig, store: Any,
                  side: Source | Path, res: Result) -> list[Item]:
    """The source's items for this shard: listed once, or from --files-from."""
    from .progress import parse_shard
    shard = parse_shard(a.shard)
    if getattr(a, "files_from", None):
        wanted = []
        for it in read_list(a.files_from):
            if valid_rel(it.rel):
                wanted.append(it)
            else:
                res.failures.append((it.rel, "not a valid relative path"))
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
        _check_bucket(cfg, store, side)  # (nothing lists: a bad bucket is still one line)
        lock = threading.Lock()

        def head(it: Item) -> None:
            try:
                o = retrying("head", cfg.read_timeout, store.head, side.prefix + it.rel)
                it.size, it.etag, it.mtime = o.size, o.etag, o.mtime
            except StoreError as exc:
                with lock:
                    res.failures.append((it.rel, "not found" if exc.code in (
                        "NoSuchKey", "404", "NotFound") else str(exc)))
        Pool(cfg.parallel, 1).run([partial(head, it) for it in missing], [])
        return [it for it in wanted if it.size >= 0]
    assert isinstance(side, Path)  # (a listing's pages: _source_pages)
    return select_shard(walk_local(side), shard)


def _source_pages(a: argparse.Namespace, cfg: MountConfig, store: Any, src: Source,
                  res: Result) -> Iterator[list[Item]]:
    """A download's items for this shard, a listing page at a time (the first one listed
    before this returns: the bucket check), or all of --files-from at once."""
    if getattr(a, "files_from", None):
        return iter([_source_items(a, cfg, store, src, res)])
    from .progress import parse_shard
    shard = parse_shard(a.shard)
    return (select_shard(items, shard) for items, _dirs in iter_prefix(store, src, res, cfg))


def _check_bucket(cfg: MountConfig, store: Any, side: Source) -> None:
    """A listing of one key: the bucket check where nothing else lists (one line on
    failure, as for mount)."""
    from .listing import BUCKET_CHECK_SECONDS
    try:
        retrying("list", min(cfg.read_timeout, BUCKET_CHECK_SECONDS), store.list,
                 side.prefix, "/", None, 1)
    except StoreError as exc:
        raise UserError(describe_store_error(cfg, exc)) from None


def cp_command(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
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
    cfg = build_config(f"s3://{s3side.bucket}/{s3side.prefix}", ",".join(a.o or []))
    # Building the boto3 client loads its service model (0.3-1.5 s on the 2-core VM): in
    # a thread, while this one prepares the local side.
    made: list[Any] = []

    def make() -> None:
        try:
            made.append(store_for(cfg))
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in this thread)
            made.append(exc)
    maker = threading.Thread(target=make, daemon=True, name="cp-client")
    maker.start()
    xattrs = True
    if isinstance(dst, Path):
        _mkdir(dst)
        xattrs = xattrs_work(dst)
    maker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return _cp(a, cfg, made[0], src, dst, local, xattrs, t0)


def _cp(a: argparse.Namespace, cfg: MountConfig, store: Any, src: Source | Path,
        dst: Source | Path, local: Path, xattrs: bool, t0: float) -> int:
    from .progress import Progress
    res = Result()
    progress = Progress(0, 0, quiet=a.quiet or not sys.stderr.isatty(), label="cp")
    cp = Copier(cfg, store, local, a.verify, progress)
    cp.res = res
    cp.xattrs = xattrs
    try:
        if isinstance(src, Source):
            pages = _source_pages(a, cfg, store, src, res)
        else:
            assert isinstance(dst, Source)
            # (the destination's listing is the bucket check: first)
            listed, _ = list_prefix(store, dst, Result(), cfg)
            items = _source_items(a, cfg, store, src, res)
            have = {it.rel: ObjectInfo(it.rel, it.size, it.etag, it.mtime) for it in listed}
            todo = Uploads(cp).plan(items, have)
            # Multipart uploads a killed run left behind, of the names this run uploads
            # (only this shard's: another task's may be running).
            mine = {dst.prefix + it.rel for it in todo}
            if mine:
                for u in retrying("list_multipart", cfg.read_timeout, store.list_multipart,
                                  dst.prefix):
                    if u.key in mine:
                        retrying("abort_multipart", cfg.read_timeout,
                                 store.abort_multipart, u.key, u.upload_id)
                        res.aborted += 1
    except StoreError as exc:
        raise UserError(f"listing failed: {exc}") from None
    if isinstance(src, Source):
        try:  # (the pages after the first are listed while the first ones are copied)
            cp.download_pages(src, pages)
        except StoreError as exc:
            raise UserError(f"listing failed: {exc}") from None
    else:
        assert isinstance(dst, Source)
        progress.total, progress.nobjects = sum(it.size for it in todo), len(todo)
        Uploads(cp).upload_all(dst, todo)
    progress.finish() if not progress.quiet else None
    el = time.monotonic() - t0
    summary = {"copied": res.copied, "skipped": res.skipped, "failed": len(res.failures),
               "bytes": res.bytes, "seconds": round(el, 3), "invalid_keys": res.invalid,
               "aborted_uploads": res.aborted, "retries": cp.retries,
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
