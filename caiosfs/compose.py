"""The composition root: the one place that builds caiosfs's parts and wires them together.

A process that owns a cache directory (the mount daemon, a standalone ``caiosfs warm``,
``caiosfs fsck``) gets its index, its store and the parts built on them from here, so the
component graph is written down once. The factories take what they need and return the
part; owning it (closing the index, the cache-dir lock) stays with the caller.

Dependencies point one way: mount, warm and cli import this module; it imports the parts;
no part imports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cache import BlockCache
from .config import MountConfig
from .core import Core
from .dirahead import DirAhead
from .errors import StoreError, UserError, describe_store_error
from .index import Index
from .metrics import Metrics
from .namespace import Namespace
from .reader import Fetcher, MemoryBudget, Reader
from .store import ObjectStore
from .store.client import StoreClient
from .writeback import WriteBack

if TYPE_CHECKING:  # the FUSE side is imported by build_filesystem only
    from .fs import Filesystem

log = logging.getLogger("caiosfs")

def build_store(cfg: MountConfig) -> ObjectStore:
    """The S3 store of ``cfg`` (not contacted yet)."""
    from .store.s3 import S3Store  # boto3 is slow to import: only the processes that use it
    return S3Store(cfg.source.bucket, cfg.endpoint, cfg.region, cfg.path_style,
                   cfg.credentials_file, cfg.aws_profile, max_connections=cfg.parallel * 2 + 8)


def open_store(cfg: MountConfig) -> ObjectStore:
    """The S3 store of ``cfg``, once its bucket answered; else one line for the user."""
    store = build_store(cfg)
    try:
        store.check_bucket()
    except StoreError as exc:
        raise UserError(describe_store_error(cfg, exc)) from None
    return store


@dataclass
class ReadParts:
    """What fetches objects into the block cache: enough for warming, no filesystem."""

    client: StoreClient
    cache: BlockCache
    fetcher: Fetcher


def build_read_parts(cfg: MountConfig, store: ObjectStore, index: Index,
                     metrics: Metrics) -> ReadParts:
    client = StoreClient(store, metrics, cfg.parallel, cfg.read_timeout, cfg.parallel_max)
    cache = BlockCache(cfg.cache_dir, index, metrics, cfg.cache_size, cfg.block_size,
                       cfg.chunk_size)
    fetcher = Fetcher(client, cache, metrics, MemoryBudget(cfg.memory_limit, metrics),
                      cfg.max_request)
    return ReadParts(client, cache, fetcher)


def build_core(cfg: MountConfig, store: ObjectStore, index: Index,
                metrics: Metrics | None = None) -> Core:
    """The filesystem without FUSE: the read parts, the write-back and the namespace on
    ``store`` and ``index``. (Tests build it on the in-memory store.)"""
    metrics = metrics or Metrics()
    rp = build_read_parts(cfg, store, index, metrics)
    reader = Reader(rp.cache, rp.fetcher, metrics, cfg.readahead_max)
    wb = WriteBack(rp.client, index, metrics, cfg.cache_dir, cfg.source.prefix,
                   part_size=cfg.part_size, dirty_limit=cfg.dirty_limit,
                   upload_delay=cfg.upload_delay, fsync_local=cfg.fsync == "local",
                   on_uploaded=lambda f, etag: None)  # (the core takes it over)
    ns = Namespace(cfg, rp.client, index, metrics, wb)
    wb.tagged = ns.needs_tag
    core = Core(cfg, index, metrics, rp.client, rp.cache, rp.fetcher, reader, wb, ns)
    if cfg.dirahead:
        core.files.ahead = DirAhead(cfg, ns.view, wb, rp.fetcher, metrics)
    return core


def build_filesystem(cfg: MountConfig, store: ObjectStore, index: Index,
                     metrics: Metrics) -> Filesystem:
    """The mounted filesystem: the core behind its pyfuse3 adapter."""
    from .fs import Filesystem  # pyfuse3: only the mount needs it
    return Filesystem(build_core(cfg, store, index, metrics))
