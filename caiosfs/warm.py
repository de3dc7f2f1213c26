"""Pre-warming: fill the block cache with a whole prefix before a job needs it.

Objects are fetched with the same Fetcher the mount uses (parallel ranged GETs of up to
``max_request``, within the memory budget); chunks already cached and valid are skipped, so
a warm that was interrupted resumes where it stopped. ``--shard I/N`` takes the objects
whose key hashes to I modulo N, so N nodes warm one prefix together without coordinating.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import xxhash

from . import compose, control
from .attrs import is_record
from .cache import BlockCache
from .config import MountConfig
from .errors import StoreError, UserError
from .index import open_index
from .metrics import Metrics
from .progress import Progress, in_shard, parse_shard
from .reader import Fetcher, ObjRef
from .store import ObjectInfo
from .store.client import StoreClient

OBJECTS_IN_PARALLEL = 8


async def list_objects(client: StoreClient, prefix: str, shard: tuple[int, int]
                       ) -> list[ObjectInfo]:
    out: list[ObjectInfo] = []
    token = None
    while True:
        page = await client.list(prefix, None, token)
        out += [o for o in page.objects if not o.key.endswith("/") and not is_record(o.key)
                and in_shard(o.key, shard)]
        token = page.next_token
        if not token:
            return out


async def warm_objects(fetcher: Fetcher, cache: BlockCache, bucket: str, objects: list[ObjectInfo],
                       progress: Progress,
                       tick: Callable[[], Awaitable[None]] | None = None) -> dict[str, int]:
    """Make every object local. Returns counts; one failing object does not stop the rest."""
    cs = cache.chunk_size
    stats = {"objects": len(objects), "bytes": sum(o.size for o in objects), "fetched": 0,
             "failed": 0}
    limiter = trio.CapacityLimiter(OBJECTS_IN_PARALLEL)

    async def one(o: ObjectInfo) -> None:
        async with limiter:
            if o.size == 0:
                progress.update(0, 1)
                return
            obj = ObjRef(bucket, o.key, o.etag, o.size)
            last = (o.size - 1) // cs
            missing = len(cache.missing(obj.ident, 0, last))
            try:
                # In slices, so progress moves and the budget is shared fairly.
                step = max(1, fetcher.max_chunks * 4)
                for a in range(0, last + 1, step):
                    b = min(last, a + step - 1)
                    await fetcher.ensure(obj, a, b)
                    progress.update(min(o.size, (b + 1) * cs) - a * cs)
                progress.update(0, 1)
                stats["fetched"] += missing * cs
                fetcher.metrics.warm_bytes.inc(min(missing * cs, o.size))
            except (StoreError, OSError) as exc:
                stats["failed"] += 1
                print(f"\ncaiosfs: warm: {o.key}: {exc}", file=sys.stderr)
            if tick is not None:
                await tick()

    async with trio.open_nursery() as n:
        for o in objects:
            n.start_soon(one, o)
    stats["fetched"] = min(stats["fetched"], stats["bytes"])
    return stats


async def warm_in_mount(fs: Any, report: Callable[[str], None] | None,
                        progress_async: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                        shard: tuple[int, int] = (0, 1),
                        request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Warm the whole mounted prefix using the mount's own cache (warm= option), or the
    objects a ``caiosfs warm`` sent through the control socket (``request``)."""
    if request is not None and "objects" in request:
        return await serve_request(fs.fetcher, fs.cache, fs.cfg, request, progress_async)
    objects = await list_objects(fs.client, fs.cfg.source.prefix, shard)
    prog = Progress(sum(o.size for o in objects), len(objects), quiet=True)
    last = 0.0

    async def tick() -> None:
        nonlocal last
        if time.monotonic() - last > 2:
            last = time.monotonic()
            if report is not None:
                report(prog.line())
            if progress_async is not None:
                await progress_async({"line": prog.line(), "done": prog.done,
                                      "total": prog.total})
    stats = await warm_objects(fs.fetcher, fs.cache, fs.cfg.source.bucket, objects, prog, tick)
    if report is not None:
        report(prog.line())
    return stats


BATCH = 5000  # objects per request to the process that owns the cache directory


def warm_command(a: argparse.Namespace) -> int:
    """List (or read --files-from) this shard once, then warm it: in this process if it can
    own the cache directory, else through whoever owns it — a mount (its control socket)
    or another ``caiosfs warm`` (the socket it serves for that) — so that several warm
    processes, one per shard, fill one cache directory side by side."""
    from .cache import lock_cache_dir
    from .config import build_config
    opts = ",".join(a.o or [])
    opts = (opts + "," if opts else "") + f"cache_dir={a.cache_dir}"
    cfg = build_config(a.source, opts)
    shard = parse_shard(a.shard)
    objects = trio.run(_objects, cfg, shard, getattr(a, "files_from", None))
    for m in control.registered():
        if os.path.abspath(m.get("cache_dir", "")) == str(cfg.cache_dir):
            if not m["source"].startswith(str(cfg.source).rstrip("/")):
                raise UserError(f"{cfg.cache_dir} is used by the mount of {m['source']}")
            return _submit(partial(control.request, m["mountpoint"]), cfg, objects, a.quiet)
    deadline = time.monotonic() + 60
    while True:
        try:
            lockfd = lock_cache_dir(cfg.cache_dir)
        except UserError as exc:
            if "in use" not in str(exc):
                raise
            try:  # the owner is a warm process: it takes our objects too
                return _submit(partial(control.request_socket, warm_socket(cfg.cache_dir)),
                               cfg, objects, a.quiet)
            except OSError:
                # It was finishing (or the owner is not a warm): try again, briefly.
                if time.monotonic() > deadline:
                    raise exc from None
                time.sleep(0.2)
                continue
        return trio.run(_warm_standalone, cfg, objects, a.quiet, lockfd)


def warm_socket(cache_dir: Path) -> Path:
    return control.runtime_dir() / f"warm-{xxhash.xxh64_hexdigest(str(cache_dir).encode())}.sock"


async def _objects(cfg: MountConfig, shard: tuple[int, int], files_from: str | None
                   ) -> list[ObjectInfo]:
    from .listing import client_for, open_bucket, read_list, valid_rel
    client = client_for(cfg)
    await open_bucket(cfg, client)
    prefix = cfg.source.prefix
    try:
        if not files_from:
            return await list_objects(client, prefix, shard)
        items = [it for it in read_list(files_from) if valid_rel(it.rel)
                 and in_shard(prefix + it.rel, shard)]
        out: list[ObjectInfo] = []

        async def head(it: Any) -> None:
            try:
                out.append(await client.head(prefix + it.rel))
            except StoreError as exc:
                print(f"caiosfs: warm: {it.rel}: {exc}", file=sys.stderr)
        async with trio.open_nursery() as n:
            for it in items:
                if it.size >= 0:
                    out.append(ObjectInfo(prefix + it.rel, it.size, it.etag, it.mtime))
                else:
                    n.start_soon(head, it)
        return out
    except StoreError as exc:
        raise UserError(f"listing failed: {exc}") from None


def _submit(send: Callable[[dict[str, Any]], Any], cfg: MountConfig, objects: list[ObjectInfo],
            quiet: bool) -> int:
    """Hand the objects over in batches; print the owner's progress; 1 if any failed."""
    failed = 0
    total = {"objects": 0, "bytes": 0, "fetched": 0}
    for i in range(0, max(len(objects), 1), BATCH):
        req = {"cmd": "warm", "bucket": cfg.source.bucket, "endpoint": cfg.endpoint,
               "objects": [[o.key, o.size, o.etag] for o in objects[i:i + BATCH]]}
        for msg in send(req):
            if "progress" in msg and not quiet:
                print(msg["progress"].get("line", ""), file=sys.stderr)
            elif "result" in msg:
                res = msg["result"]
                if "error" in res:
                    raise UserError(res["error"])
                failed += res.get("failed", 0)
                for k in total:
                    total[k] += res.get(k, 0)
    if not quiet:
        print(f"caiosfs: warm done: {total['objects']} objects, "
              f"{total['bytes'] / 2**20:,.1f} MiB in the cache, "
              f"{total['fetched'] / 2**20:,.1f} MiB downloaded, {failed} failed "
              "(by the process that owns the cache directory)", file=sys.stderr)
    return 1 if failed else 0


async def serve_request(fetcher: Fetcher, cache: BlockCache, cfg: MountConfig,
                        req: dict[str, Any],
                        progress: Callable[[dict[str, Any]], Awaitable[None]] | None
                        ) -> dict[str, Any]:
    """Warm the objects another ``caiosfs warm`` sent, with this process's fetcher."""
    if req.get("bucket") != cfg.source.bucket or req.get("endpoint") != cfg.endpoint:
        return {"error": f"{cfg.cache_dir} is being filled from s3://{cfg.source.bucket} at "
                f"{cfg.endpoint}; use another cache_dir for s3://{req.get('bucket')}"}
    objects = [ObjectInfo(k, int(n), e, 0.0) for k, n, e in req["objects"]]
    prog = Progress(sum(o.size for o in objects), len(objects), quiet=True)
    last = 0.0

    async def tick() -> None:
        nonlocal last
        if progress is not None and time.monotonic() - last > 2:
            last = time.monotonic()
            await progress({"line": prog.line(), "done": prog.done, "total": prog.total})
    return await warm_objects(fetcher, cache, cfg.source.bucket, objects, prog, tick)


@dataclass
class _Served:
    """Requests from other warm processes being served; ``idle`` is set when none is."""

    active: int = 0
    idle: trio.Event = field(default_factory=trio.Event)


async def _warm_standalone(cfg: MountConfig, objects: list[ObjectInfo], quiet: bool,
                           lockfd: int) -> int:
    index = open_index(cfg.cache_dir)
    sock = warm_socket(cfg.cache_dir)
    try:
        metrics = Metrics()
        parts = compose.build_read_parts(cfg, compose.build_store(cfg), index, metrics)
        fetcher, cache = parts.fetcher, parts.cache
        total = sum(o.size for o in objects)
        if total > cfg.cache_size:
            print(f"caiosfs: warning: the shard holds {total / 2**30:.1f} GiB but cache_size is "
                  f"{cfg.cache_size / 2**30:.1f} GiB; older blocks will be evicted",
                  file=sys.stderr)
        prog = Progress(total, len(objects), quiet)
        served = _Served()

        async def handle(req: dict[str, Any], progress: Any) -> dict[str, Any]:
            if req.get("cmd") != "warm":
                raise ValueError(f"unknown request {req.get('cmd')!r}")
            served.active += 1
            try:
                return await serve_request(fetcher, cache, cfg, req, progress)
            finally:
                served.active -= 1
                if not served.active:
                    served.idle.set()
                    served.idle = trio.Event()

        async with trio.open_nursery() as n:
            fetcher.nursery = n
            serving = trio.CancelScope()
            n.start_soon(_serve_until, sock, handle, serving)
            stats = await warm_objects(fetcher, cache, cfg.source.bucket, objects, prog)
            # Other shards' processes may still be waiting on us: finish their work, then
            # stop listening (no await between the check and the cancel, so no request
            # slips in between; one that connected but was not read yet gets EOF and
            # takes the lock itself).
            while served.active:
                await served.idle.wait()
            serving.cancel()
            n.cancel_scope.cancel()
        cache.flush_atimes()
        prog.finish()
        if not quiet:
            print(f"caiosfs: warm done: {stats['objects']} objects, "
                  f"{stats['bytes'] / 2**20:,.1f} MiB in the cache, "
                  f"{metrics.value('caiosfs_s3_bytes_in_total') / 2**20:,.1f} MiB downloaded "
                  f"(other processes' shards included), {stats['failed']} failed",
                  file=sys.stderr)
        return 1 if stats["failed"] else 0
    finally:
        sock.unlink(missing_ok=True)
        index.close()
        os.close(lockfd)


async def _serve_until(sock: Path, handle: Any, scope: trio.CancelScope) -> None:
    with scope:
        await control.serve(sock, handle)
