"""The local side of ``caiosfs cp``: temp names, writing ranges in place, the ETag xattr,
hashes of file ranges, asking the kernel to write back early, and the one syncfs."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import xxhash

from .errors import UserError

ETAG_XATTR = "user.caiosfs.etag"
TMP_PREFIX, TMP_SUFFIX = ".caiosfs-", ".tmp"


def tmp_hash(name: str) -> str:
    return xxhash.xxh64_hexdigest(name.encode(errors="surrogateescape"))


def range_writer(fd: int, h: Any = None) -> Any:
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


def unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def get_etag(path: str) -> str | None:
    try:
        return os.getxattr(path, ETAG_XATTR, follow_symlinks=False).decode()
    except OSError:
        return None


def set_etag(path: Path | int, etag: str) -> None:
    """The ETag xattr of a path (not followed) or an open file."""
    if not etag:
        return
    try:
        if isinstance(path, int):
            os.setxattr(path, ETAG_XATTR, etag.encode())
        else:
            os.setxattr(path, ETAG_XATTR, etag.encode(), follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
            raise


def md5_range(path: str, off: int, length: int) -> str:
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


def xattrs_work(d: Path) -> bool:
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


def start_writeback(fd: int, off: int, n: int) -> None:
    """Have the kernel start writing a range to disk now, without waiting (Linux's
    POSIX_FADV_DONTNEED writes dirty pages back asynchronously, then drops the clean ones):
    the final syncfs then finds little left to write, and the copy does not fill the page
    cache with what it will not read."""
    try:
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # (advice: a filesystem may refuse it)


def syncfs(fd: int) -> None:
    """syncfs(2): write back every dirty page of the filesystem holding ``fd`` and wait
    (one call, where an fsync per file costs a journal commit each); os.sync() where the C
    library lacks it."""
    global _libc
    if _libc is None:
        import ctypes
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs  # noqa: B018 (AttributeError: not there)
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        os.sync()
        return
    if _libc.syncfs(fd) != 0:
        import ctypes
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_libc: Any = None
