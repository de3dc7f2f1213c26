"""Listing a copy's source once: ``caiosfs ls`` (and ``--split N`` into N lists), the list
format that ``cp --files-from`` reads, shard assignment, and what both cp and ls share to
reach the bucket.

A list line is a path relative to the listed root, optionally followed by its size, ETag
and mtime, tab-separated (``--long``; ``--split`` always writes them): ``cp`` then needs no
HEAD per object. Paths containing a newline cannot be a line: ``ls`` leaves them out and
says how many.
"""

from __future__ import annotations

import argparse
import heapq
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from .attrs import is_record
from .config import MountConfig, Source, build_config
from .errors import StoreError, UserError, describe_store_error


@dataclass
class Item:
    """One file to copy: its path relative to both roots ('/'-separated) and what the
    source side knows of it."""

    rel: str
    size: int = -1  # -1: unknown yet (a --files-from line without metadata)
    etag: str = ""
    mtime: float = 0.0  # Last-Modified (S3) or st_mtime (local)
    link: bool = False  # a local symlink


@dataclass
class Result:
    copied: int = 0
    skipped: int = 0
    bytes: int = 0
    invalid: int = 0  # keys that cannot be a path (a//b, .., names over 255 bytes)
    aborted: int = 0  # stale multipart uploads of the names uploaded (a killed run's)
    failures: list[tuple[str, str]] = field(default_factory=list)


def valid_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and "\0" not in rel and all(
        p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts)


def shard_of(rel: str, n: int) -> int:
    return xxhash.xxh64_intdigest(rel.encode()) % n


def parse_side(text: str) -> Source | Path:
    if text.startswith("s3://"):
        from .config import parse_source
        return parse_source(text)
    if "://" in text:
        raise UserError(f"{text!r}: expected s3://BUCKET[/PREFIX] or a local directory")
    return Path(text).absolute()


# Lists ---------------------------------------------------------------------------------
def format_line(it: Item) -> str:
    """A list line: the path, then size, ETag and mtime tab-separated (``cp`` needs no HEAD
    for such a line); a bare path works too."""
    return f"{it.rel}\t{it.size}\t{it.etag}\t{it.mtime:.3f}"


def read_list(path: str) -> list[Item]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read --files-from {path}: {exc.strerror}") from None
    out = []
    for line in lines:
        if not line or line[0] in "#;":
            continue
        f = line.rsplit("\t", 3)
        if len(f) == 4 and f[1].isdigit():
            try:
                out.append(Item(f[0].strip("/"), int(f[1]), f[2], float(f[3])))
                continue
            except ValueError:
                pass
        out.append(Item(line.strip("/")))
    return out


def split_balanced(items: list[Item], n: int) -> list[list[Item]]:
    """N lists of about equal bytes (largest first into the lightest list), each sorted."""
    heap = [(0, 0, i) for i in range(n)]
    out: list[list[Item]] = [[] for _ in range(n)]
    for it in sorted(items, key=lambda x: -x.size):
        b, c, i = heapq.heappop(heap)
        out[i].append(it)
        heapq.heappush(heap, (b + max(it.size, 1), c + 1, i))
    return [sorted(lst, key=lambda x: x.rel) for lst in out]


async def list_s3(client: Any, src: Source, res: Result) -> tuple[list[Item], list[str]]:
    """Every object under the prefix (one flat listing); directory markers separately."""
    items: list[Item] = []
    dirs: list[str] = []
    token = None
    while True:
        page = await client.list(src.prefix, None, token)
        token = _add_page(page, src, items, dirs, res)
        if not token:
            return items, dirs


def list_prefix(store: Any, src: Source, res: Result, cfg: MountConfig,
                ) -> tuple[list[Item], list[str]]:
    """:func:`list_s3` in the calling thread, straight on the store (``cp``): every page of
    :func:`iter_prefix`."""
    items: list[Item] = []
    dirs: list[str] = []
    for page_items, page_dirs in iter_prefix(store, src, res, cfg):
        items += page_items
        dirs += page_dirs
    return items, dirs


def iter_prefix(store: Any, src: Source, res: Result, cfg: MountConfig,
                ) -> Iterator[tuple[list[Item], list[str]]]:
    """The listing page by page, for a copy to start on the first while the next is
    fetched. The first page is fetched before this returns: it is the bucket check, and
    fails within BUCKET_CHECK_SECONDS with the one line :func:`open_bucket` would give
    (UserError); a later page's failure is StoreError, raised when it is reached."""
    from .copypool import retrying
    try:
        page = retrying("list", min(cfg.read_timeout, BUCKET_CHECK_SECONDS), store.list,
                        src.prefix, None, None)
    except StoreError as exc:
        raise UserError(describe_store_error(cfg, exc)) from None

    def pages(page: Any) -> Iterator[tuple[list[Item], list[str]]]:
        while True:
            items: list[Item] = []
            dirs: list[str] = []
            token = _add_page(page, src, items, dirs, res)
            yield items, dirs
            if not token:
                return
            page = retrying("list", cfg.read_timeout, store.list, src.prefix, None, token)
    return pages(page)


def _add_page(page: Any, src: Source, items: list[Item], dirs: list[str],
              res: Result) -> str | None:
    for o in page.objects:
        rel = o.key[len(src.prefix):]
        if is_record(rel):
            continue  # a mount's directory attribute record: no file
        if rel.endswith("/"):
            if valid_rel(rel.rstrip("/")):
                dirs.append(rel.rstrip("/"))
        elif valid_rel(rel):
            items.append(Item(rel, o.size, o.etag, o.mtime))
        else:
            res.invalid += 1
    return page.next_token


def walk_local(root: Path) -> list[Item]:
    items = []
    for d, dirnames, files in os.walk(root):
        dirnames.sort()
        base = os.path.relpath(d, root)
        for name in files:
            rel = name if base == "." else f"{base}/{name}"
            try:
                st = os.lstat(os.path.join(d, name))
            except OSError:
                continue  # vanished while walking
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                items.append(Item(rel, st.st_size, "", st.st_mtime, stat.S_ISLNK(st.st_mode)))
    return items


# Reaching the bucket -------------------------------------------------------------------
def connect(s3_text: str, options: list[str] | None) -> tuple[MountConfig, Any]:
    cfg = build_config(s3_text, ",".join(options or []))
    return cfg, client_for(cfg)


# How long the first request may keep retrying: an endpoint that cannot be reached (LOTA
# off the GPU nodes) should fail the command soon, so that a fallback endpoint can be tried.
BUCKET_CHECK_SECONDS = 10.0


def quiet_logs() -> None:
    """Retried requests are not the user's business on a terminal: only what finally
    failed is reported (in the failure list or as the one-line error)."""
    import logging
    logging.getLogger("caiosfs").setLevel(logging.ERROR)


def client_for(cfg: MountConfig) -> Any:
    from .metrics import Metrics
    from .store.client import StoreClient
    from .store.s3 import S3Store
    # (as mount.build_store, without importing the FUSE side)
    store = S3Store(cfg.source.bucket, cfg.endpoint, cfg.region, cfg.path_style,
                    cfg.credentials_file, cfg.aws_profile, max_connections=cfg.parallel * 2 + 8)
    # Uploads keep the mount's max(4, parallel / 2) requests in flight: 16 parts of 64 MiB
    # at once made SeaweedFS drop connections here (9 parts re-sent, half the rate of 8).
    return StoreClient(store, Metrics(), cfg.parallel, cfg.read_timeout)


def store_for(cfg: MountConfig) -> Any:
    """The store ``cp`` calls from its own threads (no StoreClient: see copypool.py). One
    attempt waits at most ``read_timeout`` (<= 30 s) for the store's answer; retries are
    the caller's (copypool.retrying).

    :class:`~caiosfs.store.copystore.CopyStore`: listings, GETs, PUTs and HEADs signed and sent
    without boto3 (importing boto3 and building its client was 0.5-1 s of a 1,000-file
    copy's start-up on the 2-core VM), multipart calls through an S3Store made when first
    needed. With a proxy variable set (urllib3 and http.client do not follow them) or a
    dotted bucket name in virtual-hosted style, everything goes through S3Store."""
    import os

    from .store.copystore import CopyS3, CopyStore
    from .store.lean import proxies_configured
    from .store.sigv4 import keys_from
    read_timeout = min(30.0, cfg.read_timeout)

    def full() -> Any:
        from .store.s3 import S3Store
        return S3Store(cfg.source.bucket, cfg.endpoint, cfg.region, cfg.path_style,
                       cfg.credentials_file, cfg.aws_profile,
                       # (one connection per copy thread: parallel + 2 x parallel, see
                       # Copier.download_all; a full urllib3 pool discards the surplus)
                       max_connections=cfg.parallel * 3 + 8, read_timeout=read_timeout)
    bucket = cfg.source.bucket
    if proxies_configured(dict(os.environ)) or (not cfg.path_style and "." in bucket):
        return full()
    http = CopyS3(cfg.endpoint, bucket, cfg.region, cfg.path_style,
                  keys_from(cfg.credentials_file, cfg.aws_profile),
                  payload_signing=not cfg.endpoint.startswith("https://"),
                  read_timeout=read_timeout, ca_bundle=os.environ.get("AWS_CA_BUNDLE"))
    return CopyStore(bucket, http, full)


async def open_bucket(cfg: MountConfig, client: Any) -> None:
    try:  # (retried like any request: a transient fault must not fail the whole copy)
        await client._run("head_bucket", client.store.check_bucket,
                          limiter=client.meta_limiter, deadline=min(cfg.read_timeout,
                                                                    BUCKET_CHECK_SECONDS))
    except StoreError as exc:
        raise UserError(describe_store_error(cfg, exc)) from None


def select_shard(items: Iterable[Item], shard: tuple[int, int]) -> list[Item]:
    return [it for it in items if shard[1] == 1 or shard_of(it.rel, shard[1]) == shard[0]]


def ls_command(a: argparse.Namespace) -> int:
    side = parse_side(a.source)
    if a.split is not None and (a.split < 1 or not a.output):
        raise UserError("--split N needs N >= 1 and --output DIR")
    shard = _shard(a)
    if isinstance(side, Path):
        if not side.is_dir():
            raise UserError(f"{a.source} is not a directory")
        return _ls_out(a, select_shard(walk_local(side), shard), Result())
    quiet_logs()
    cfg, client = connect(a.source, a.o)

    async def main() -> int:
        await open_bucket(cfg, client)
        res = Result()
        try:
            items, _ = await list_s3(client, side, res)
        except StoreError as exc:
            raise UserError(f"listing failed: {exc}") from None
        return _ls_out(a, select_shard(items, _shard(a)), res)
    import trio
    return trio.run(main)


def _shard(a: argparse.Namespace) -> tuple[int, int]:
    from .progress import parse_shard
    return parse_shard(a.shard)


def _ls_out(a: argparse.Namespace, items: list[Item], res: Result) -> int:
    listable = [it for it in items if "\n" not in it.rel and "\r" not in it.rel]
    skipped = res.invalid + len(items) - len(listable)
    if a.split is None:
        out = sys.stdout
        try:
            for it in sorted(listable, key=lambda x: x.rel):
                out.write((format_line(it) if a.long else it.rel) + "\n")
            out.flush()
        except BrokenPipeError:  # `caiosfs ls ... | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if skipped:
            print(f"caiosfs ls: {skipped} keys left out: they cannot be a path or a line",
                  file=sys.stderr)
        return 0
    d = Path(a.output)
    try:
        d.mkdir(parents=True, exist_ok=True)
        lists = split_balanced(listable, a.split)
        for i, lst in enumerate(lists):
            tmp = d / f".shard-{i}.list.tmp"
            tmp.write_text("".join(format_line(it) + "\n" for it in lst),
                           errors="surrogateescape")
            tmp.replace(d / f"shard-{i}.list")
    except OSError as exc:
        raise UserError(f"cannot write the lists in {d}: {exc.strerror}") from None
    sizes = [sum(it.size for it in lst) for lst in lists]
    print(f"caiosfs ls: {len(listable)} objects, {sum(sizes) / 1e6:,.1f} MB in {a.split} "
          f"lists ({d}/shard-0.list ... shard-{a.split - 1}.list), "
          f"{min(sizes) / 1e6:,.1f}-{max(sizes) / 1e6:,.1f} MB each"
          + (f"; {skipped} keys left out (not a path or a line)" if skipped else ""),
          file=sys.stderr)
    return 0
