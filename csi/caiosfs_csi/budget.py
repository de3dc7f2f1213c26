"""A node-wide cache budget across datasets: whole idle cache directories, LRU.

Each daemon keeps its own cache under its `cache_size` (LRU inside one dataset). Across
datasets the plugin keeps the cache root under `--cache-budget`:

    total = sum of cache_size of the live mounts  +  disk used by every idle cache directory

and, when a new mount would push the total over the budget, deletes idle directories, least
recently used first, until it fits. Only a directory the plugin itself left clean can go: it
writes IDLE_STAMP after an unmount that drained everything (and removes it when the directory
is mounted again), so a cache that may still hold unsent writes (a dead daemon's journal, a
failed drain) is never deleted; neither is one that a caiosfs process holds (`caiosfs
mount`/`warm` keep an exclusive flock on `<cache dir>/lock`, which the plugin takes while
deleting).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterable

log = logging.getLogger(__name__)

IDLE_STAMP = ".caiosfs-csi-idle"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
CAIOSFS_DEFAULT_CACHE_SIZE = 20 << 30  # caiosfs's cache_size default (caiosfs/config.py)


def parse_size(text: str) -> int:
    """caiosfs's size syntax (`20G`, `512Mi`, `1.5T`, plain bytes) -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])


def disk_usage(path: str) -> int:
    """Bytes allocated on disk under `path` (like du)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def mark_idle(cache_dir: str) -> None:
    """After a clean unmount: this directory holds nothing unsent and may be evicted."""
    if cache_dir and os.path.isdir(cache_dir):
        with contextlib.suppress(OSError), open(os.path.join(cache_dir, IDLE_STAMP), "w"):
            pass


def mark_busy(cache_dir: str) -> None:
    """Before a mount: not evictable until the next clean unmount."""
    if cache_dir:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cache_dir, IDLE_STAMP))


def _evict(path: str) -> bool:
    """Delete an idle cache directory unless a caiosfs process holds its lock."""
    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a mount or a warm uses it right now
        if not os.path.exists(os.path.join(path, IDLE_STAMP)):
            return False
        shutil.rmtree(path)
        return True
    finally:
        os.close(fd)


def enforce(cache_root: str, budget: int, live: Iterable[tuple[str, int]]) -> list[str]:
    """Evict idle cache dirs under `cache_root` (LRU by their stamp's mtime) until the live
    mounts' reservations plus idle disk use fit `budget`. `live`: (cache dir, cache_size) of
    every mount that is or is about to be live. Returns the evicted directories."""
    live = list(live)
    in_use = {os.path.normpath(d) for d, _ in live}
    total = sum(size for _, size in live)
    idle: list[tuple[float, str, int]] = []
    try:
        names = os.listdir(cache_root)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.normpath(os.path.join(cache_root, name))
        if path in in_use or not os.path.isdir(path):
            continue
        used = disk_usage(path)
        total += used
        stamp = os.path.join(path, IDLE_STAMP)
        if os.path.exists(stamp):
            idle.append((os.stat(stamp).st_mtime, path, used))
    evicted = []
    for _mtime, path, used in sorted(idle):
        if total <= budget:
            break
        if _evict(path):
            total -= used
            evicted.append(path)
            log.info("cache budget: evicted idle cache %s (%d MiB, least recently used)",
                     path, used >> 20)
    if total > budget:
        log.warning("cache budget %d MiB exceeded: %d MiB reserved or in use, nothing more "
                    "is evictable", budget >> 20, total >> 20)
    return evicted
