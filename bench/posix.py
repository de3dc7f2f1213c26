"""A compact POSIX conformance suite for S3-backed FUSE mounts (issue #17).

Every case is a small function that gets an empty directory of its own and raises when the
filesystem does not behave as POSIX (and Linux on a local filesystem) does. Its outcome is

    ok            the behaviour expected
    EXXX          an operation that should have worked failed with this errno
    wrong: ...    a wrong result (a different errno, wrong bytes, wrong mode, ...)
    timeout       the case did not finish within its time limit (the process is killed)
    error: ...    the case itself broke (a bug of the suite)

The suite runs once on a local directory (the reference, ``/var/tmp``), then on each system
(caiosfs, rclone mount, s3fs, each mounted on a SeaweedFS S3 server started here); a system
*differs* on a case when its outcome is not the reference's. Cases marked ``as nobody`` do
their checks in a forked child that dropped to uid/gid 65534 (``nobody``): the mount must be
made with ``allow_other``, as it is here for every system.

Every case runs in a forked child with a time limit, so a case that hangs or crashes costs
that case only. The cases are written for this project from the categories of well-known
suites (open flags, I/O, truncate, unlink, rename, directories, links, metadata, special
files, permissions); no code is taken from them.

``tests/test_posix.py`` runs the same table against a caiosfs mount and keeps the list of its
known differences true; docs/SEMANTICS.md ("POSIX conformance") shows a run's table.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NOBODY = 65534
CASE_TIMEOUT = 30.0
MANY = 1000  # entries of the readdir case: one full S3 listing page


class Wrong(Exception):
    """The filesystem answered, but not what POSIX says."""


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    doc: str
    fn: Callable[[Path], None]
    as_nobody: bool = False  # part of the case runs as uid 65534 (needs allow_other)
    timeout: float = 0.0  # its own time limit, when longer than the run's


CASES: list[Case] = []


def case(category: str, doc: str, *, as_nobody: bool = False, timeout: float = 0.0
         ) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES.append(Case(fn.__name__, category, doc, fn, as_nobody, timeout))
        return fn
    return register


# ---- helpers --------------------------------------------------------------------------------


def errname(code: int | None) -> str:
    return errno.errorcode.get(code or 0, f"errno {code}")


def expect(codes: int | tuple[int, ...], fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """``fn(*args)`` must fail with (one of) ``codes``."""
    want = codes if isinstance(codes, tuple) else (codes,)
    names = "/".join(errname(c) for c in want)
    try:
        fn(*args, **kw)
    except OSError as e:
        if e.errno in want:
            return
        raise Wrong(f"{errname(e.errno)}, want {names}") from None
    raise Wrong(f"succeeded, want {names}")


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Wrong(what)


def put(p: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def get(p: Path | int, n: int = 1 << 26) -> bytes:
    fd = os.open(p, os.O_RDONLY) if not isinstance(p, int) else p
    try:
        out = bytearray()
        while len(out) < n:
            b = os.read(fd, min(1 << 20, n - len(out)))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        if not isinstance(p, int):
            os.close(fd)


def same(got: bytes, want: bytes, what: str = "content") -> None:
    if got != want:
        g = hashlib.sha256(got).hexdigest()[:12]
        w = hashlib.sha256(want).hexdigest()[:12]
        raise Wrong(f"{what}: {len(got)} bytes sha256 {g}, want {len(want)} bytes {w}")


def mode_is(p: Path, want: int, follow: bool = True) -> None:
    st = os.stat(p, follow_symlinks=follow)
    got = stat.S_IMODE(st.st_mode)
    check(got == want, f"mode {got:04o}, want {want:04o}")


def in_child(fn: Callable[[], Any], uid: int | None = None, timeout: float = CASE_TIMEOUT) -> Any:
    """Run ``fn`` in a forked child (as ``uid``/gid ``uid`` with no supplementary groups when
    given); return its value or raise its exception here. A child that does not answer within
    ``timeout`` is killed and TimeoutError raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            res: tuple[str, Any] = ("value", fn())
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            res = ("raise", e)
        try:
            blob = pickle.dumps(res)
        except Exception as e:  # noqa: BLE001 - an unpicklable exception or value
            blob = pickle.dumps(("raise", RuntimeError(f"unpicklable result: {e!r}")))
        try:
            with os.fdopen(w, "wb") as f:
                f.write(blob)
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"no answer in {timeout:.0f} s")
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
        _reap(pid)
    if not chunks:
        raise RuntimeError("child died without an answer")
    kind, val = pickle.loads(b"".join(chunks))
    if kind == "raise":
        raise val
    return val


def _reap(pid: int) -> None:
    for _ in range(100):  # a child stuck in a FUSE request may need a moment to die
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)


def as_nobody(fn: Callable[[], Any]) -> Any:
    return in_child(fn, uid=NOBODY)


def outcome_of(fn: Callable[[], None]) -> str:
    try:
        fn()
    except Wrong as e:
        return f"wrong: {e}"
    except OSError as e:
        if isinstance(e, TimeoutError) and e.errno is None:
            return "timeout"
        return errname(e.errno) if e.errno else f"error: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a broken case is reported, not raised
        return f"error: {type(e).__name__}: {e}"
    return "ok"


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400


def renameat2(old: Path, new: Path, flags: int) -> None:
    f = _libc.renameat2
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if f(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ---- open -----------------------------------------------------------------------------------


@case("open", "O_CREAT|O_EXCL makes a new empty file")
def open_excl_new(d: Path) -> None:
    os.close(os.open(d / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    st = os.stat(d / "f")
    check(stat.S_ISREG(st.st_mode) and st.st_size == 0, "not an empty regular file")


@case("open", "O_CREAT|O_EXCL on an existing file: EEXIST")
def open_excl_exists(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.EEXIST, os.open, d / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


@case("open", "O_CREAT|O_EXCL on a dangling symlink: EEXIST (not followed)")
def open_excl_dangling_symlink(d: Path) -> None:
    os.symlink("nowhere", d / "l")
    expect(errno.EEXIST, os.open, d / "l", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    check(not (d / "nowhere").exists(), "the target was created")


@case("open", "O_CREAT on an existing file keeps its content")
def open_creat_existing(d: Path) -> None:
    put(d / "f", b"keep")
    os.close(os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644))
    same(get(d / "f"), b"keep")


@case("open", "O_CREAT applies mode & ~umask")
def open_creat_mode_umask(d: Path) -> None:
    os.umask(0o027)
    os.close(os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o666))
    mode_is(d / "f", 0o640)


@case("open", "O_TRUNC empties a file")
def open_trunc(d: Path) -> None:
    put(d / "f", b"x" * 5000)
    os.close(os.open(d / "f", os.O_WRONLY | os.O_TRUNC))
    check(os.stat(d / "f").st_size == 0, "size not 0")
    same(get(d / "f"), b"")


@case("open", "O_APPEND writes at the end whatever the offset")
def open_append(d: Path) -> None:
    put(d / "f", b"abc")
    fd = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"def")
    os.close(fd)
    same(get(d / "f"), b"abcdef")


@case("open", "two O_APPEND descriptors interleave without overwriting")
def open_append_two(d: Path) -> None:
    put(d / "f", b"")
    a = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
    b = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
    for i in range(3):
        os.write(a, b"A%d" % i)
        os.write(b, b"B%d" % i)
    os.close(a)
    os.close(b)
    same(get(d / "f"), b"A0B0A1B1A2B2")


@case("open", "O_DIRECTORY on a file: ENOTDIR")
def open_directory_on_file(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.ENOTDIR, os.open, d / "f", os.O_RDONLY | os.O_DIRECTORY)


@case("open", "open of a missing name without O_CREAT: ENOENT")
def open_missing(d: Path) -> None:
    expect(errno.ENOENT, os.open, d / "none", os.O_RDONLY)


@case("open", "O_CREAT in a missing directory: ENOENT")
def open_creat_missing_parent(d: Path) -> None:
    expect(errno.ENOENT, os.open, d / "none" / "f", os.O_WRONLY | os.O_CREAT, 0o644)


@case("open", "a file used as a directory in a path: ENOTDIR")
def open_file_as_dir(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.ENOTDIR, os.open, d / "f" / "g", os.O_RDONLY)


@case("open", "a directory opened for writing: EISDIR")
def open_dir_for_write(d: Path) -> None:
    os.mkdir(d / "s")
    expect(errno.EISDIR, os.open, d / "s", os.O_WRONLY)


@case("open", "O_NOFOLLOW on a symlink: ELOOP")
def open_nofollow(d: Path) -> None:
    put(d / "f", b"x")
    os.symlink("f", d / "l")
    expect(errno.ELOOP, os.open, d / "l", os.O_RDONLY | os.O_NOFOLLOW)


@case("open", "O_TMPFILE: an unnamed file, then linkat gives it a name")
def open_tmpfile(d: Path) -> None:
    fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"tmp")
        check(os.listdir(d) == [], "the unnamed file has a name")
        # os.link calls link(2), which would link the /proc magic link itself (EXDEV).
        f = _libc.linkat
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        if f(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(d / "named"),
             AT_SYMLINK_FOLLOW) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)
    same(get(d / "named"), b"tmp")


# ---- read / write ---------------------------------------------------------------------------


@case("io", "read at EOF returns 0 bytes")
def read_at_eof(d: Path) -> None:
    put(d / "f", b"abc")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        check(os.read(fd, 10) == b"abc", "first read")
        check(os.read(fd, 10) == b"", "read at EOF not empty")
    finally:
        os.close(fd)


@case("io", "pread beyond EOF returns 0 bytes")
def pread_beyond_eof(d: Path) -> None:
    put(d / "f", b"abc")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        check(os.pread(fd, 10, 1 << 20) == b"", "data beyond EOF")
        check(os.pread(fd, 10, 2) == b"c", "short read at the end")
    finally:
        os.close(fd)


@case("io", "pwrite beyond EOF leaves a hole that reads as zeros")
def pwrite_hole(d: Path) -> None:
    put(d / "f", b"head")
    fd = os.open(d / "f", os.O_WRONLY)
    os.pwrite(fd, b"tail", 3 << 20)
    os.close(fd)
    check(os.stat(d / "f").st_size == (3 << 20) + 4, "size")
    same(get(d / "f"), b"head" + bytes((3 << 20) - 4) + b"tail")


@case("io", "pwrite in the middle changes only those bytes")
def pwrite_middle(d: Path) -> None:
    base = bytes(range(256)) * 64
    put(d / "f", base)
    fd = os.open(d / "f", os.O_WRONLY)
    os.pwrite(fd, b"XYZ", 1000)
    os.close(fd)
    same(get(d / "f"), base[:1000] + b"XYZ" + base[1003:])


@case("io", "O_RDWR: a write is read back through the same descriptor")
def rdwr_same_fd(d: Path) -> None:
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"hello world")
        os.lseek(fd, 6, os.SEEK_SET)
        check(os.read(fd, 5) == b"world", "read after write")
    finally:
        os.close(fd)


@case("io", "a write through one descriptor is seen by a read through another")
def two_fds_coherent(d: Path) -> None:
    put(d / "f", b"0" * 100)
    w = os.open(d / "f", os.O_WRONLY)
    r = os.open(d / "f", os.O_RDONLY)
    try:
        os.pwrite(w, b"new", 10)
        check(os.pread(r, 13, 0) == b"0" * 10 + b"new", "the other descriptor reads old data")
    finally:
        os.close(w)
        os.close(r)


@case("io", "write on an O_RDONLY descriptor: EBADF")
def write_rdonly_fd(d: Path) -> None:
    put(d / "f", b"x")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        expect(errno.EBADF, os.write, fd, b"y")
    finally:
        os.close(fd)


@case("io", "read on an O_WRONLY descriptor: EBADF")
def read_wronly_fd(d: Path) -> None:
    put(d / "f", b"x")
    fd = os.open(d / "f", os.O_WRONLY)
    try:
        expect(errno.EBADF, os.read, fd, 1)
    finally:
        os.close(fd)


@case("io", "8 MiB written in odd-sized writes read back identical")
def large_file(d: Path) -> None:
    blob = hashlib.shake_256(b"posix").digest(1 << 16) * 128
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    for i in range(0, len(blob), 99_991):
        os.write(fd, blob[i:i + 99_991])
    os.close(fd)
    same(get(d / "f"), blob)


@case("io", "lseek SEEK_END gives the size; SEEK_DATA past EOF: ENXIO")
def lseek_end_data(d: Path) -> None:
    put(d / "f", b"x" * 1234)
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        check(os.lseek(fd, 0, os.SEEK_END) == 1234, "SEEK_END")
        expect(errno.ENXIO, os.lseek, fd, 5000, os.SEEK_DATA)
    finally:
        os.close(fd)


@case("io", "SEEK_DATA/SEEK_HOLE answers are consistent with a sparse file")
def lseek_hole(d: Path) -> None:
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"d", 4 << 20)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        # Reporting the whole file as data is allowed; a hole past EOF is not.
        check(data <= 4 << 20, f"SEEK_DATA {data} past the data")
        check(hole <= (4 << 20) + 1, f"SEEK_HOLE {hole} past EOF")
    finally:
        os.close(fd)


@case("io", "shared mmap: a store through the map is read back by read()")
def mmap_shared(d: Path) -> None:
    put(d / "f", b"." * 8192)
    fd = os.open(d / "f", os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192) as m:
            m[100:105] = b"hello"
            m.flush()
    finally:
        os.close(fd)
    same(get(d / "f")[98:107], b"..hello..")


@case("io", "posix_fallocate extends the file with zeros")
def fallocate(d: Path) -> None:
    put(d / "f", b"abc")
    fd = os.open(d / "f", os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 100_000)
    finally:
        os.close(fd)
    same(get(d / "f"), b"abc" + bytes(100_000 - 3))


# ---- truncate -------------------------------------------------------------------------------


@case("truncate", "truncate shrinks and keeps the prefix")
def truncate_shrink(d: Path) -> None:
    put(d / "f", b"0123456789")
    os.truncate(d / "f", 4)
    same(get(d / "f"), b"0123")


@case("truncate", "truncate grows with zeros")
def truncate_grow(d: Path) -> None:
    put(d / "f", b"ab")
    os.truncate(d / "f", 70_000)
    same(get(d / "f"), b"ab" + bytes(69_998))


@case("truncate", "ftruncate shrink, then a write past the end: zeros between")
def ftruncate_shrink_write(d: Path) -> None:
    put(d / "f", b"x" * 1000)
    fd = os.open(d / "f", os.O_RDWR)
    try:
        os.ftruncate(fd, 10)
        os.pwrite(fd, b"end", 20)
    finally:
        os.close(fd)
    same(get(d / "f"), b"x" * 10 + bytes(10) + b"end")


@case("truncate", "ftruncate on an O_RDONLY descriptor: EINVAL or EBADF")
def ftruncate_rdonly(d: Path) -> None:
    put(d / "f", b"abc")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        expect((errno.EINVAL, errno.EBADF), os.ftruncate, fd, 0)
    finally:
        os.close(fd)
    same(get(d / "f"), b"abc")


@case("truncate", "truncate of a directory: EISDIR")
def truncate_dir(d: Path) -> None:
    os.mkdir(d / "s")
    expect(errno.EISDIR, os.truncate, d / "s", 0)


@case("truncate", "truncate updates mtime")
def truncate_mtime(d: Path) -> None:
    put(d / "f", b"abc")
    os.utime(d / "f", ns=(10**18, 10**18))
    os.truncate(d / "f", 1)
    check(os.stat(d / "f").st_mtime_ns > 10**18, "mtime unchanged")


# ---- unlink ---------------------------------------------------------------------------------


@case("unlink", "an unlinked open file stays readable through its descriptor")
def unlink_open_read(d: Path) -> None:
    put(d / "f", b"still here")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        os.unlink(d / "f")
        check(not os.path.lexists(d / "f"), "the name is still there")
        same(get(fd), b"still here")
    finally:
        os.close(fd)


@case("unlink", "an unlinked file written and fsynced (in the store) stays readable")
def unlink_open_stored(d: Path) -> None:
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"stored")
    os.fsync(fd)
    os.close(fd)
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        os.unlink(d / "f")
        same(get(fd), b"stored")
    finally:
        os.close(fd)
    check(os.listdir(d) == [], f"listing after unlink: {os.listdir(d)}")


@case("unlink", "an unlinked open file can still be written and read back")
def unlink_open_write(d: Path) -> None:
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"one")
        os.unlink(d / "f")
        os.write(fd, b"two")
        check(os.pread(fd, 10, 0) == b"onetwo", "read after unlink")
    finally:
        os.close(fd)
    check(os.listdir(d) == [], "the name came back")


@case("unlink", "fstat of an unlinked open file: st_nlink 0")
def unlink_open_nlink(d: Path) -> None:
    put(d / "f", b"x")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        os.unlink(d / "f")
        n = os.fstat(fd).st_nlink
        check(n == 0, f"st_nlink {n}")
    finally:
        os.close(fd)


@case("unlink", "unlink of a directory: EISDIR")
def unlink_dir(d: Path) -> None:
    os.mkdir(d / "s")
    expect(errno.EISDIR, os.unlink, d / "s")


@case("unlink", "unlink of a missing name: ENOENT")
def unlink_missing(d: Path) -> None:
    expect(errno.ENOENT, os.unlink, d / "none")


@case("unlink", "a name unlinked and created again has the new content")
def unlink_recreate(d: Path) -> None:
    put(d / "f", b"old content")
    os.unlink(d / "f")
    put(d / "f", b"new")
    same(get(d / "f"), b"new")


# ---- rename ---------------------------------------------------------------------------------


@case("rename", "file over file: the target has the source's content, the source is gone")
def rename_file_over_file(d: Path) -> None:
    put(d / "a", b"source")
    put(d / "b", b"target, longer")
    os.rename(d / "a", d / "b")
    same(get(d / "b"), b"source")
    check(not os.path.lexists(d / "a"), "source still there")
    check(sorted(os.listdir(d)) == ["b"], f"listing {sorted(os.listdir(d))}")


@case("rename", "file over a file that is open: the open descriptor keeps the old content")
def rename_over_open_target(d: Path) -> None:
    put(d / "a", b"new")
    put(d / "b", b"old")
    fd = os.open(d / "b", os.O_RDONLY)
    try:
        os.rename(d / "a", d / "b")
        same(get(fd), b"old", "the open target")
    finally:
        os.close(fd)
    same(get(d / "b"), b"new")


@case("rename", "an open file renamed: its descriptor still reads and writes it")
def rename_open_file(d: Path) -> None:
    fd = os.open(d / "a", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before ")
        os.rename(d / "a", d / "b")
        os.write(fd, b"after")
    finally:
        os.close(fd)
    same(get(d / "b"), b"before after")


@case("rename", "rename into another directory")
def rename_across_dirs(d: Path) -> None:
    os.mkdir(d / "x")
    os.mkdir(d / "y")
    put(d / "x" / "f", b"moved")
    os.rename(d / "x" / "f", d / "y" / "g")
    same(get(d / "y" / "g"), b"moved")
    check(os.listdir(d / "x") == [], "source dir not empty")


@case("rename", "a directory with contents: everything below moves")
def rename_dir_tree(d: Path) -> None:
    os.makedirs(d / "a" / "b")
    put(d / "a" / "f", b"1")
    put(d / "a" / "b" / "g", b"2")
    os.rename(d / "a", d / "z")
    same(get(d / "z" / "f"), b"1")
    same(get(d / "z" / "b" / "g"), b"2")
    check(not os.path.lexists(d / "a"), "source still there")


@case("rename", "directory over an empty directory replaces it")
def rename_dir_over_empty_dir(d: Path) -> None:
    os.mkdir(d / "a")
    put(d / "a" / "f", b"x")
    os.mkdir(d / "b")
    os.rename(d / "a", d / "b")
    check(os.listdir(d / "b") == ["f"], "content")
    check(not os.path.lexists(d / "a"), "source still there")


@case("rename", "directory over a non-empty directory: ENOTEMPTY")
def rename_dir_over_nonempty(d: Path) -> None:
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    put(d / "b" / "f", b"x")
    expect((errno.ENOTEMPTY, errno.EEXIST), os.rename, d / "a", d / "b")
    same(get(d / "b" / "f"), b"x")


@case("rename", "file over a directory: EISDIR")
def rename_file_over_dir(d: Path) -> None:
    put(d / "a", b"x")
    os.mkdir(d / "b")
    expect(errno.EISDIR, os.rename, d / "a", d / "b")


@case("rename", "directory over a file: ENOTDIR")
def rename_dir_over_file(d: Path) -> None:
    os.mkdir(d / "a")
    put(d / "b", b"x")
    expect(errno.ENOTDIR, os.rename, d / "a", d / "b")


@case("rename", "directory into its own subdirectory: EINVAL")
def rename_dir_into_itself(d: Path) -> None:
    os.makedirs(d / "a" / "sub")
    expect(errno.EINVAL, os.rename, d / "a", d / "a" / "sub" / "a")
    check((d / "a" / "sub").is_dir(), "the tree changed")


@case("rename", "a file renamed to itself: nothing happens")
def rename_to_itself(d: Path) -> None:
    put(d / "a", b"same")
    os.rename(d / "a", d / "a")
    same(get(d / "a"), b"same")


@case("rename", "a missing source: ENOENT")
def rename_missing(d: Path) -> None:
    expect(errno.ENOENT, os.rename, d / "none", d / "b")


@case("rename", "RENAME_NOREPLACE over an existing name: EEXIST")
def rename_noreplace(d: Path) -> None:
    put(d / "a", b"a")
    put(d / "b", b"b")
    expect(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    same(get(d / "c"), b"a")


@case("rename", "RENAME_EXCHANGE swaps two names atomically")
def rename_exchange(d: Path) -> None:
    put(d / "a", b"first")
    put(d / "b", b"second")
    renameat2(d / "a", d / "b", RENAME_EXCHANGE)
    same(get(d / "a"), b"second")
    same(get(d / "b"), b"first")


# ---- directories ----------------------------------------------------------------------------


@case("dir", "mkdir of an existing directory: EEXIST")
def mkdir_exists(d: Path) -> None:
    os.mkdir(d / "s")
    expect(errno.EEXIST, os.mkdir, d / "s")


@case("dir", "mkdir over a file: EEXIST")
def mkdir_over_file(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.EEXIST, os.mkdir, d / "f")


@case("dir", "mkdir in a missing directory: ENOENT")
def mkdir_missing_parent(d: Path) -> None:
    expect(errno.ENOENT, os.mkdir, d / "none" / "s")


@case("dir", "mkdir below a file: ENOTDIR")
def mkdir_below_file(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.ENOTDIR, os.mkdir, d / "f" / "s")


@case("dir", "mkdir applies mode & ~umask")
def mkdir_mode(d: Path) -> None:
    os.umask(0o022)
    os.mkdir(d / "s", 0o777)
    os.mkdir(d / "t", 0o700)
    mode_is(d / "s", 0o755)
    mode_is(d / "t", 0o700)


@case("dir", "rmdir of a non-empty directory: ENOTEMPTY")
def rmdir_nonempty(d: Path) -> None:
    os.mkdir(d / "s")
    put(d / "s" / "f", b"x")
    expect((errno.ENOTEMPTY, errno.EEXIST), os.rmdir, d / "s")


@case("dir", "rmdir of a file: ENOTDIR")
def rmdir_file(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.ENOTDIR, os.rmdir, d / "f")


@case("dir", "rmdir of DIR/.: EINVAL")
def rmdir_dot(d: Path) -> None:
    os.mkdir(d / "s")
    expect(errno.EINVAL, os.rmdir, str(d / "s") + "/.")


@case("dir", "rmdir removes the name; a new mkdir of it is empty")
def rmdir_then_mkdir(d: Path) -> None:
    os.mkdir(d / "s")
    put(d / "s" / "f", b"x")
    os.unlink(d / "s" / "f")
    os.rmdir(d / "s")
    expect(errno.ENOENT, os.stat, d / "s")
    os.mkdir(d / "s")
    check(os.listdir(d / "s") == [], "old entries came back")


@case("dir", "an empty directory made by mkdir stays listed")
def mkdir_empty_persists(d: Path) -> None:
    os.mkdir(d / "s")
    check(os.listdir(d) == ["s"], f"listing {os.listdir(d)}")
    check(os.listdir(d / "s") == [], "not empty")


@case("dir", "directory nlink is 2 + subdirectories (find's leaf optimisation relies on it)")
def dir_nlink(d: Path) -> None:
    os.makedirs(d / "s" / "a")
    os.mkdir(d / "s" / "b")
    put(d / "s" / "f", b"x")
    n = os.stat(d / "s").st_nlink
    check(n == 4, f"st_nlink {n}, want 4")


@case("dir", "creating an entry updates the directory's mtime")
def dir_mtime_on_create(d: Path) -> None:
    os.mkdir(d / "s")
    os.utime(d / "s", ns=(10**18, 10**18))
    put(d / "s" / "f", b"x")
    check(os.stat(d / "s").st_mtime_ns > 10**18, "directory mtime unchanged")


@case("dir", "find and du see every level of a tree (whatever nlink says)")
def find_descends(d: Path) -> None:
    os.makedirs(d / "s" / "a" / "b" / "c")
    put(d / "s" / "a" / "b" / "c" / "f", b"x" * 5000)
    out = subprocess.run(["find", "s"], cwd=d, capture_output=True, text=True, check=True)
    got = sorted(out.stdout.split())
    want = ["s", "s/a", "s/a/b", "s/a/b/c", "s/a/b/c/f"]
    check(got == want, f"find: {got}")
    du = subprocess.run(["du", "-a", "--apparent-size", "-b", "s"], cwd=d, capture_output=True,
                        text=True, check=True).stdout
    check("s/a/b/c/f" in du, f"du: {du.split()}")


@case("dir", "Python imports a module created after its directory was scanned (dir mtime)")
def import_new_module(d: Path) -> None:
    import importlib

    put(d / "first_posix_mod.py", b"X = 1\n")
    sys.path.insert(0, str(d))
    importlib.import_module("first_posix_mod")  # the FileFinder caches the listing of d
    time.sleep(0.05)
    put(d / "second_posix_mod.py", b"X = 2\n")
    try:
        importlib.import_module("second_posix_mod")
    except ModuleNotFoundError:
        # importlib rescans a directory only when its mtime changed
        raise Wrong("ModuleNotFoundError (directory mtime did not change)") from None


# s3fs makes a PUT and a few HEADs per create: about 40 s for the 1,000 here.
@case("dir", f"readdir of {MANY} files: each once, no other names", timeout=180)
def readdir_many(d: Path) -> None:
    names = {f"n{i:05d}" for i in range(MANY)}
    for n in names:
        os.close(os.open(d / n, os.O_WRONLY | os.O_CREAT, 0o644))
    got = os.listdir(d)
    check(len(got) == len(set(got)), f"{len(got) - len(set(got))} duplicates")
    check(set(got) == names, f"missing {len(names - set(got))}, extra {len(set(got) - names)}")
    for n in sorted(names)[::2]:
        os.unlink(d / n)
    left = os.listdir(d)
    check(sorted(left) == sorted(names)[1::2], "after unlinking half")


@case("dir", "readdir shows . and .. (getdents via ls -f)")
def readdir_dots(d: Path) -> None:
    put(d / "f", b"x")
    out = subprocess.run(["ls", "-f", str(d)], capture_output=True, text=True, check=True)
    got = sorted(out.stdout.split())
    check(got == [".", "..", "f"], f"entries {got}")


@case("dir", "readdir entry types (d_type) are right for file, dir, symlink")
def readdir_types(d: Path) -> None:
    put(d / "f", b"x")
    os.mkdir(d / "s")
    os.symlink("f", d / "l")
    kinds = {e.name: (e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False),
                      e.is_symlink()) for e in os.scandir(d)}
    want = {"f": (True, False, False), "s": (False, True, False), "l": (False, False, True)}
    check(kinds == want, f"types {kinds}")


# ---- symlinks and hard links ----------------------------------------------------------------


@case("link", "symlink + readlink give the target back")
def symlink_readlink(d: Path) -> None:
    os.symlink("some/where/../target", d / "l")
    check(os.readlink(d / "l") == "some/where/../target", "readlink")


@case("link", "lstat of a symlink: S_IFLNK, size = length of the target")
def symlink_lstat(d: Path) -> None:
    os.symlink("0123456789", d / "l")
    st = os.lstat(d / "l")
    check(stat.S_ISLNK(st.st_mode), f"mode {st.st_mode:o}")
    check(st.st_size == 10, f"size {st.st_size}")


@case("link", "open through a symlink reads the target; stat follows it")
def symlink_follow(d: Path) -> None:
    put(d / "f", b"target data")
    os.symlink("f", d / "l")
    same(get(d / "l"), b"target data")
    check(os.stat(d / "l").st_size == 11, "stat does not follow")


@case("link", "a symlink to a directory can be traversed")
def symlink_dir(d: Path) -> None:
    os.mkdir(d / "s")
    put(d / "s" / "f", b"in")
    os.symlink("s", d / "l")
    check(os.listdir(d / "l") == ["f"], "listing through the link")
    same(get(d / "l" / "f"), b"in")


@case("link", "a dangling symlink: stat ENOENT, lstat works")
def symlink_dangling(d: Path) -> None:
    os.symlink("none", d / "l")
    expect(errno.ENOENT, os.stat, d / "l")
    check(stat.S_ISLNK(os.lstat(d / "l").st_mode), "lstat")


@case("link", "symlink over an existing name: EEXIST")
def symlink_exists(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.EEXIST, os.symlink, "t", d / "f")


@case("link", "readlink of a regular file: EINVAL")
def readlink_file(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.EINVAL, os.readlink, d / "f")


@case("link", "a symlink loop: ELOOP")
def symlink_loop(d: Path) -> None:
    os.symlink("b", d / "a")
    os.symlink("a", d / "b")
    expect(errno.ELOOP, os.stat, d / "a")


@case("link", "lchown changes the symlink, not its target")
def lchown_symlink(d: Path) -> None:
    put(d / "f", b"x")
    os.symlink("f", d / "l")
    os.lchown(d / "l", NOBODY, NOBODY)
    check(os.lstat(d / "l").st_uid == NOBODY, "link owner")
    check(os.stat(d / "f").st_uid == os.getuid(), "target owner changed")


@case("link", "utime without following: the symlink's mtime changes, not its target's")
def utime_symlink_nofollow(d: Path) -> None:
    put(d / "f", b"x")
    os.symlink("f", d / "l")
    t = 1_500_000_000_000_000_000
    os.utime(d / "l", ns=(t, t), follow_symlinks=False)
    check(os.lstat(d / "l").st_mtime_ns == t, "link mtime")
    check(os.stat(d / "f").st_mtime_ns != t, "target mtime changed")


@case("link", "hard link: both names are one file (nlink 2, one inode)")
def hardlink(d: Path) -> None:
    put(d / "a", b"shared")
    os.link(d / "a", d / "b")
    a, b = os.stat(d / "a"), os.stat(d / "b")
    check(a.st_ino == b.st_ino and a.st_nlink == 2, f"ino {a.st_ino}/{b.st_ino} nlink {a.st_nlink}")
    with open(d / "b", "ab") as f:
        f.write(b"!")
    same(get(d / "a"), b"shared!")


# ---- metadata -------------------------------------------------------------------------------


@case("meta", "chmod sets the permission bits")
def chmod_file(d: Path) -> None:
    put(d / "f", b"x")
    for m in (0o600, 0o751, 0o000, 0o644):
        os.chmod(d / "f", m)
        mode_is(d / "f", m)


@case("meta", "chmod keeps setuid, setgid and sticky bits")
def chmod_special_bits(d: Path) -> None:
    put(d / "f", b"x")
    os.chmod(d / "f", 0o6755)
    mode_is(d / "f", 0o6755)
    os.mkdir(d / "s")
    os.chmod(d / "s", 0o1777)
    mode_is(d / "s", 0o1777)


@case("meta", "chmod of a directory")
def chmod_dir(d: Path) -> None:
    os.mkdir(d / "s")
    os.chmod(d / "s", 0o710)
    mode_is(d / "s", 0o710)


@case("meta", "chown (as root) sets uid and gid; -1 keeps one")
def chown_file(d: Path) -> None:
    put(d / "f", b"x")
    os.chown(d / "f", NOBODY, NOBODY)
    st = os.stat(d / "f")
    check((st.st_uid, st.st_gid) == (NOBODY, NOBODY), f"owner {st.st_uid}:{st.st_gid}")
    os.chown(d / "f", -1, 0)
    st = os.stat(d / "f")
    check((st.st_uid, st.st_gid) == (NOBODY, 0), f"after -1: {st.st_uid}:{st.st_gid}")


@case("meta", "a new file is owned by the creating uid")
def owner_of_new_file(d: Path) -> None:
    put(d / "f", b"x")
    st = os.stat(d / "f")
    check((st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), f"owner {st.st_uid}:{st.st_gid}")


@case("meta", "utimensat sets mtime to the nanosecond")
def utime_mtime_ns(d: Path) -> None:
    put(d / "f", b"x")
    m = 1_700_000_000_987_654_321
    os.utime(d / "f", ns=(1_600_000_000_123_456_789, m))
    got = os.stat(d / "f").st_mtime_ns
    check(got == m, f"mtime_ns {got}, want {m}")


@case("meta", "utimensat sets atime to the nanosecond")
def utime_atime_ns(d: Path) -> None:
    put(d / "f", b"x")
    a = 1_600_000_000_123_456_789
    os.utime(d / "f", ns=(a, 1_700_000_000_987_654_321))
    got = os.stat(d / "f").st_atime_ns
    check(got == a, f"atime_ns {got}, want {a}")


@case("meta", "utime(None) sets the times to now")
def utime_now(d: Path) -> None:
    put(d / "f", b"x")
    os.utime(d / "f", ns=(10**18, 10**18))
    t0 = time.time_ns()
    os.utime(d / "f")
    got = os.stat(d / "f").st_mtime_ns
    check(abs(got - t0) < 5 * 10**9, f"mtime {got - t0} ns from now")


@case("meta", "a write updates mtime")
def write_updates_mtime(d: Path) -> None:
    put(d / "f", b"x")
    os.utime(d / "f", ns=(10**18, 10**18))
    with open(d / "f", "r+b") as f:
        f.write(b"y")
    check(os.stat(d / "f").st_mtime_ns > 10**18, "mtime unchanged")


@case("meta", "chmod updates ctime, not mtime")
def chmod_ctime(d: Path) -> None:
    put(d / "f", b"x")
    os.utime(d / "f", ns=(10**18, 10**18))
    c0 = os.stat(d / "f").st_ctime_ns
    time.sleep(0.02)
    os.chmod(d / "f", 0o600)
    st = os.stat(d / "f")
    check(st.st_ctime_ns > c0, "ctime unchanged")
    check(st.st_mtime_ns == 10**18, "mtime changed")


@case("meta", "mtime survives close (no later write-back changes it)")
def mtime_after_close(d: Path) -> None:
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"data")
    os.utime(fd, ns=(10**18, 10**18))
    os.close(fd)
    time.sleep(0.1)
    got = os.stat(d / "f").st_mtime_ns
    check(got == 10**18, f"mtime {got}")


@case("meta", "st_size follows writes and truncates")
def stat_size(d: Path) -> None:
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 777)
        check(os.fstat(fd).st_size == 777, "after write (fstat)")
        check(os.stat(d / "f").st_size == 777, "after write (stat)")
        os.ftruncate(fd, 100)
        check(os.stat(d / "f").st_size == 100, "after ftruncate")
    finally:
        os.close(fd)


@case("meta", "st_nlink is 1 for a file")
def stat_nlink_file(d: Path) -> None:
    put(d / "f", b"x")
    check(os.stat(d / "f").st_nlink == 1, f"st_nlink {os.stat(d / 'f').st_nlink}")


@case("meta", "st_blocks covers the data of a dense file; st_blksize > 0")
def stat_blocks(d: Path) -> None:
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"z" * 100_000)
    os.fsync(fd)
    os.close(fd)
    st = os.stat(d / "f")
    check(st.st_blocks * 512 >= 100_000, f"st_blocks {st.st_blocks}")
    check(st.st_blksize > 0, f"st_blksize {st.st_blksize}")


@case("meta", "st_blocks of a sparse file counts only its data")
def stat_blocks_sparse(d: Path) -> None:
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"z", 64 << 20)
    os.fsync(fd)
    os.close(fd)
    st = os.stat(d / "f")
    check(st.st_blocks * 512 < 1 << 20, f"st_blocks {st.st_blocks} for one byte of data")


@case("meta", "a 255-byte name works; a 256-byte one: ENAMETOOLONG")
def name_max(d: Path) -> None:
    put(d / ("n" * 255), b"x")
    same(get(d / ("n" * 255)), b"x")
    expect(errno.ENAMETOOLONG, os.open, d / ("n" * 256), os.O_WRONLY | os.O_CREAT, 0o644)
    expect(errno.ENAMETOOLONG, os.mkdir, d / ("m" * 256))


@case("meta", "a name with spaces, unicode and shell characters round-trips")
def odd_names(d: Path) -> None:
    names = ["a b", "é-ü-日本", "x;$(y)*?", "-dash", ".hidden", "a%2Fb", "tab\tin", "q'\""]
    for n in names:
        put(d / n, n.encode())
    check(sorted(os.listdir(d)) == sorted(names), f"listing {sorted(os.listdir(d))}")
    for n in names:
        same(get(d / n), n.encode(), n)


@case("meta", "statvfs: block size, names of 255 bytes, consistent counts")
def statvfs(d: Path) -> None:
    s = os.statvfs(d)
    check(s.f_bsize > 0 and s.f_frsize > 0, "block size 0")
    check(s.f_namemax >= 255, f"f_namemax {s.f_namemax}")
    check(s.f_blocks > 0, "f_blocks 0")
    check(s.f_bavail <= s.f_bfree <= s.f_blocks, "free > total")


# ---- durability calls -----------------------------------------------------------------------


@case("sync", "fsync of a written file succeeds and the data reads back")
def fsync_file(d: Path) -> None:
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.close(fd)
    same(get(d / "f"), b"durable")


@case("sync", "fdatasync of a written file")
def fdatasync_file(d: Path) -> None:
    fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"durable")
    os.fdatasync(fd)
    os.close(fd)


@case("sync", "fsync of a directory")
def fsync_dir(d: Path) -> None:
    os.mkdir(d / "s")
    put(d / "s" / "f", b"x")
    fd = os.open(d / "s", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@case("sync", "fsync on a read-only descriptor")
def fsync_rdonly(d: Path) -> None:
    put(d / "f", b"x")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- special files --------------------------------------------------------------------------


@case("special", "mkfifo: a fifo that carries bytes from a writer to a reader")
def fifo(d: Path) -> None:
    os.mkfifo(d / "p", 0o600)
    check(stat.S_ISFIFO(os.stat(d / "p").st_mode), "not a fifo")
    r = os.open(d / "p", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(d / "p", os.O_WRONLY)
    try:
        os.write(w, b"through the pipe")
        check(os.read(r, 100) == b"through the pipe", "bytes")
    finally:
        os.close(w)
        os.close(r)


@case("special", "mknod of a character device: type and rdev")
def mknod_chr(d: Path) -> None:
    os.mknod(d / "c", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(d / "c")
    check(stat.S_ISCHR(st.st_mode), f"mode {st.st_mode:o}")
    check(st.st_rdev == os.makedev(1, 3), f"rdev {st.st_rdev:x}")


@case("special", "mknod of a regular file")
def mknod_reg(d: Path) -> None:
    os.mknod(d / "f", 0o640 | stat.S_IFREG)
    st = os.stat(d / "f")
    check(stat.S_ISREG(st.st_mode) and st.st_size == 0, f"mode {st.st_mode:o}")


@case("special", "a unix socket: bind, connect, send, receive; S_IFSOCK; unlink")
def unix_socket(d: Path) -> None:
    os.chdir(d)  # a relative name: sun_path holds 108 bytes, deep mount paths do not fit
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind("s")
        srv.listen(1)
        check(stat.S_ISSOCK(os.stat("s").st_mode), "not a socket")
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.settimeout(5)
        cli.connect("s")
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        check(conn.recv(10) == b"ping", "bytes")
        conn.close()
        cli.close()
    finally:
        srv.close()
    os.unlink("s")
    check(os.listdir(".") == [], "name left after unlink")


# ---- extended attributes and locks ----------------------------------------------------------


@case("xattr", "setxattr/getxattr/listxattr of a user.* attribute")
def xattr_user(d: Path) -> None:
    put(d / "f", b"x")
    os.setxattr(d / "f", "user.caiosfs", b"value")
    check(os.getxattr(d / "f", "user.caiosfs") == b"value", "getxattr")
    check("user.caiosfs" in os.listxattr(d / "f"), "listxattr")


@case("xattr", "getxattr of a missing attribute: ENODATA")
def xattr_missing(d: Path) -> None:
    put(d / "f", b"x")
    expect(errno.ENODATA, os.getxattr, d / "f", "user.none")


@case("xattr", "listxattr of a fresh file has no user.* names")
def xattr_list_empty(d: Path) -> None:
    put(d / "f", b"x")
    got = [n for n in os.listxattr(d / "f") if n.startswith("user.")]
    check(got == [], f"names {got}")


@case("lock", "flock: a second exclusive lock on another open file: EWOULDBLOCK")
def flock_exclusive(d: Path) -> None:
    put(d / "f", b"x")
    a = os.open(d / "f", os.O_RDWR)
    b = os.open(d / "f", os.O_RDWR)
    try:
        fcntl.flock(a, fcntl.LOCK_EX)
        expect(errno.EWOULDBLOCK, fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)


@case("lock", "fcntl record lock held by one process blocks another: EAGAIN/EACCES")
def fcntl_lock(d: Path) -> None:
    put(d / "f", b"x" * 100)
    fd = os.open(d / "f", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)

        def other() -> None:
            fd2 = os.open(d / "f", os.O_RDWR)
            try:
                expect((errno.EAGAIN, errno.EACCES), fcntl.lockf, fd2,
                       fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
                fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)  # another range
            finally:
                os.close(fd2)

        in_child(other)
    finally:
        os.close(fd)


# ---- permissions as another user (uid 65534) ------------------------------------------------


@case("perm", "nobody reads a 0644 file of root's", as_nobody=True)
def nobody_read_0644(d: Path) -> None:
    put(d / "f", b"public", 0o644)
    os.chmod(d / "f", 0o644)
    same(as_nobody(lambda: get(d / "f")), b"public")


@case("perm", "nobody cannot open root's 0644 file for writing: EACCES", as_nobody=True)
def nobody_write_0644(d: Path) -> None:
    put(d / "f", b"x")
    os.chmod(d / "f", 0o644)
    as_nobody(lambda: expect(errno.EACCES, os.open, d / "f", os.O_WRONLY))


@case("perm", "nobody cannot read root's 0600 file: EACCES", as_nobody=True)
def nobody_read_0600(d: Path) -> None:
    put(d / "f", b"secret")
    os.chmod(d / "f", 0o600)
    as_nobody(lambda: expect(errno.EACCES, os.open, d / "f", os.O_RDONLY))


@case("perm", "chmod 0600 -> 0644 lets nobody read", as_nobody=True)
def nobody_read_after_chmod(d: Path) -> None:
    put(d / "f", b"now public")
    os.chmod(d / "f", 0o600)
    as_nobody(lambda: expect(errno.EACCES, os.open, d / "f", os.O_RDONLY))
    os.chmod(d / "f", 0o644)
    same(as_nobody(lambda: get(d / "f")), b"now public")


@case("perm", "chown to nobody of a 0600 file lets nobody read and write it", as_nobody=True)
def nobody_after_chown(d: Path) -> None:
    put(d / "f", b"yours")
    os.chmod(d / "f", 0o600)
    os.chown(d / "f", NOBODY, NOBODY)

    def use() -> bytes:
        with open(d / "f", "ab") as f:
            f.write(b"!")
        return get(d / "f")

    same(as_nobody(use), b"yours!")


@case("perm", "nobody writes root's 0666 file", as_nobody=True)
def nobody_write_0666(d: Path) -> None:
    put(d / "f", b"")
    os.chmod(d / "f", 0o666)

    def write() -> None:
        fd = os.open(d / "f", os.O_WRONLY)
        os.write(fd, b"by nobody")
        os.close(fd)

    as_nobody(write)
    same(get(d / "f"), b"by nobody")


@case("perm", "access(): R_OK/W_OK/X_OK as nobody follow the mode bits", as_nobody=True)
def nobody_access(d: Path) -> None:
    put(d / "r", b"x")
    os.chmod(d / "r", 0o644)
    put(d / "x", b"x")
    os.chmod(d / "x", 0o755)

    def probe() -> tuple[bool, ...]:
        return (os.access(d / "r", os.R_OK), os.access(d / "r", os.W_OK),
                os.access(d / "r", os.X_OK), os.access(d / "x", os.X_OK))

    got = as_nobody(probe)
    check(got == (True, False, False, True), f"R,W,X of 0644 and X of 0755: {got}")


@case("perm", "nobody cannot create in root's 0755 directory: EACCES", as_nobody=True)
def nobody_create_0755_dir(d: Path) -> None:
    os.mkdir(d / "s")
    os.chmod(d / "s", 0o755)
    as_nobody(lambda: expect(errno.EACCES, os.open, d / "s" / "f",
                             os.O_WRONLY | os.O_CREAT, 0o644))


@case("perm", "nobody creates in a 0777 directory; the file is nobody's", as_nobody=True)
def nobody_create_0777_dir(d: Path) -> None:
    os.mkdir(d / "s")
    os.chmod(d / "s", 0o777)
    as_nobody(lambda: put(d / "s" / "f", b"mine"))
    st = os.stat(d / "s" / "f")
    check((st.st_uid, st.st_gid) == (NOBODY, NOBODY), f"owner {st.st_uid}:{st.st_gid}")


@case("perm", "nobody cannot enter root's 0700 directory: EACCES", as_nobody=True)
def nobody_traverse_0700(d: Path) -> None:
    os.mkdir(d / "s")
    put(d / "s" / "f", b"x")
    os.chmod(d / "s", 0o700)
    as_nobody(lambda: expect(errno.EACCES, os.stat, d / "s" / "f"))
    as_nobody(lambda: expect(errno.EACCES, os.listdir, d / "s"))


@case("perm", "sticky 1777 directory: nobody cannot remove root's file: EPERM", as_nobody=True)
def nobody_sticky(d: Path) -> None:
    os.mkdir(d / "s")
    os.chmod(d / "s", 0o1777)
    put(d / "s" / "f", b"x")
    as_nobody(lambda: expect((errno.EPERM, errno.EACCES), os.unlink, d / "s" / "f"))
    check((d / "s" / "f").exists(), "removed")


@case("perm", "nobody cannot chmod root's file: EPERM", as_nobody=True)
def nobody_chmod_other(d: Path) -> None:
    put(d / "f", b"x")
    os.chmod(d / "f", 0o666)
    as_nobody(lambda: expect(errno.EPERM, os.chmod, d / "f", 0o777))
    mode_is(d / "f", 0o666)


@case("perm", "nobody chmods its own file", as_nobody=True)
def nobody_chmod_own(d: Path) -> None:
    put(d / "f", b"x")
    os.chown(d / "f", NOBODY, NOBODY)
    as_nobody(lambda: os.chmod(d / "f", 0o600))
    mode_is(d / "f", 0o600)


@case("perm", "nobody cannot give its file to root: EPERM", as_nobody=True)
def nobody_chown(d: Path) -> None:
    put(d / "f", b"x")
    os.chown(d / "f", NOBODY, NOBODY)
    as_nobody(lambda: expect(errno.EPERM, os.chown, d / "f", 0, 0))


@case("perm", "nobody may set a 0666 file's times to now, not to a given time", as_nobody=True)
def nobody_utime(d: Path) -> None:
    put(d / "f", b"x")
    os.chmod(d / "f", 0o666)
    as_nobody(lambda: os.utime(d / "f"))
    as_nobody(lambda: expect(errno.EPERM, os.utime, d / "f", ns=(10**18, 10**18)))


@case("perm", "nobody cannot rename in root's 0755 directory: EACCES", as_nobody=True)
def nobody_rename(d: Path) -> None:
    put(d / "f", b"x")
    os.chmod(d / "f", 0o666)
    as_nobody(lambda: expect(errno.EACCES, os.rename, d / "f", d / "g"))


@case("perm", "a write by nobody clears the setuid bit of root's 04777 file", as_nobody=True)
def nobody_write_clears_suid(d: Path) -> None:
    put(d / "f", b"x")
    os.chmod(d / "f", 0o4777)

    def write() -> None:
        with open(d / "f", "ab") as f:
            f.write(b"y")

    as_nobody(write)
    got = stat.S_IMODE(os.stat(d / "f").st_mode)
    check(not got & stat.S_ISUID, f"mode {got:04o}")


# ---- running --------------------------------------------------------------------------------


def run_suite(base: Path, cases: list[Case] | None = None, timeout: float = CASE_TIMEOUT,
              log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run ``cases`` (default all) in fresh subdirectories of ``base``; {case: outcome}.

    Each case gets ``base/<case name>`` (mode 0755, made here) and runs in a forked child
    with umask 022, as the caller's user (root for the ``as nobody`` cases)."""
    out: dict[str, str] = {}
    for c in cases if cases is not None else CASES:
        d = base / c.name
        t0 = time.monotonic()
        try:
            # No chmod: s3fs on SeaweedFS fails a directory's chmod with ENOENT, and that is
            # a case's finding (chmod_dir), not a reason to skip every case.
            old_umask = os.umask(0o022)
            try:
                os.mkdir(d, 0o755)
            finally:
                os.umask(old_umask)
        except OSError as e:
            out[c.name] = f"error: setup: mkdir: {errname(e.errno)}"
            continue

        def body(fn: Callable[[Path], None] = c.fn, d: Path = d) -> str:
            os.umask(0o022)
            return outcome_of(lambda: fn(d))

        try:
            out[c.name] = in_child(body, timeout=max(timeout, c.timeout))
        except TimeoutError:
            out[c.name] = "timeout"
        except Exception as e:  # noqa: BLE001 - a child that died
            out[c.name] = f"error: {type(e).__name__}: {e}"
        if log is not None:
            log(f"  {c.name:28s} {time.monotonic() - t0:6.2f} s  {out[c.name]}")
    return out


def short(outcome: str) -> str:
    """The table cell of an outcome: ok, the errno, wrong, timeout or error."""
    return outcome.split(":", 1)[0]


def differences(reference: dict[str, str], other: dict[str, str]) -> dict[str, str]:
    """{case: outcome} of the cases where ``other`` does not give the reference's outcome."""
    return {k: v for k, v in other.items() if k in reference and reference[k] != v}


def select_cases(only: str, user_cases: bool = True) -> list[Case]:
    """Cases whose name or category is in the comma-separated ``only`` (all if empty)."""
    want = {x.strip() for x in only.split(",") if x.strip()}
    out = [c for c in CASES if not want or c.name in want or c.category in want]
    if not user_cases:
        out = [c for c in out if not c.as_nobody]
    unknown = want - {c.name for c in CASES} - {c.category for c in CASES}
    if unknown:
        raise SystemExit(f"posix: no case or category {', '.join(sorted(unknown))}")
    return out


# ---- reports --------------------------------------------------------------------------------


def text_table(results: dict[str, dict[str, str]], cases: list[Case]) -> str:
    systems = list(results)
    w = max(len("matches the reference"), *(len(c.name) for c in cases)) + 2
    widths = [max(12, len(s) + 2) for s in systems]
    lines = ["case".ljust(w) + "".join(s.ljust(x) for s, x in zip(systems, widths, strict=True))]
    ref = results[systems[0]]
    for c in cases:
        cells = []
        for s, x in zip(systems, widths, strict=True):
            v = results[s].get(c.name, "-")
            mark = "*" if s != systems[0] and v != ref.get(c.name) else " "
            cells.append((short(v) + mark).ljust(x))
        lines.append(c.name.ljust(w) + "".join(cells))
    lines.append("")
    lines.append("matches the reference".ljust(w) + "".join(
        f"{sum(results[s].get(c.name) == ref.get(c.name) for c in cases)}/{len(cases)}".ljust(x)
        for s, x in zip(systems, widths, strict=True)))
    return "\n".join(lines)


def markdown(results: dict[str, dict[str, str]], cases: list[Case], meta: dict[str, Any]) -> str:
    systems = list(results)
    ref = results[systems[0]]
    out = [f"# POSIX conformance, {meta['date']}", "",
           f"`{meta['command']}` on {meta['machine']}; reference: {meta['reference']}.", "",
           "Systems: " + "; ".join(f"**{k}** {v}" for k, v in meta["systems"].items()), "",
           ("A cell is `ok` (the expected behaviour), the errno of an operation that should have "
            "worked, `wrong` (details below), `timeout` or `error`. **Bold**: differs from the "
            "reference."), "",
           "| case | category | " + " | ".join(systems) + " |",
           "|---|---|" + "---|" * len(systems)]
    for c in cases:
        cells = []
        for s in systems:
            v = short(results[s].get(c.name, "-"))
            cells.append(f"**{v}**" if s != systems[0] and results[s].get(c.name) !=
                         ref.get(c.name) else v)
        out.append(f"| `{c.name}` | {c.category} | " + " | ".join(cells) + " |")
    out.append("| **matches the reference** | | " + " | ".join(
        f"{sum(results[s].get(c.name) == ref.get(c.name) for c in cases)}/{len(cases)}"
        for s in systems) + " |")
    out += ["", "## Differences in full", ""]
    for c in cases:
        diffs = [(s, results[s][c.name]) for s in systems[1:]
                 if c.name in results[s] and results[s][c.name] != ref.get(c.name)]
        if diffs:
            out.append(f"- `{c.name}` ({c.doc}; reference: {ref.get(c.name)}): "
                       + "; ".join(f"{s}: {v}" for s, v in diffs))
    out += ["", "## Cases", ""]
    out += [f"- `{c.name}` ({c.category}{', as nobody' if c.as_nobody else ''}): {c.doc}"
            for c in cases]
    return "\n".join(out) + "\n"


# ---- command line ---------------------------------------------------------------------------

DESCRIPTION = """\
Run a compact POSIX conformance suite on a local directory (the reference) and on FUSE
mounts of an S3 prefix (caiosfs, rclone mount, s3fs), and compare.

A SeaweedFS S3 server is started on 127.0.0.1 (or --endpoint names one), each system is
mounted on s3://caiosfs-bench/root with allow_other and the options bench/run uses
(bench/systems.py), and every case runs in its own new directory, in a forked child with a
time limit, as root; the cases marked "as nobody" switch to uid/gid 65534 for their checks.
The table shows, per case and system, "ok", the errno of an operation that should have
worked, "wrong" (a wrong result or a different errno; the details are in the Markdown
report), "timeout" or "error". A star marks a cell that differs from the reference.

Outputs: the table on stdout; bench/results/posix-YYYYmmdd-HHMMSS.md (the table, every
difference in full, the list of cases) and .json (every outcome) unless --no-save.
Must run as root (mounts, chown, uid switch)."""

EPILOG = """\
exit status:
  0  the suite ran (differences between systems are results, not failures)
  1  a case failed on the reference directory (a suite bug, or an unusual local filesystem)
  2  bad usage, or a system could not be mounted

examples:
  python -m bench.posix                          # reference, caiosfs, rclone, s3fs
  python -m bench.posix --systems caiosfs --only rename,perm
  python -m bench.posix --systems none --path mine=/mnt/somefs   # any mounted directory
  python -m bench.posix --list                   # the cases, by category

tests/test_posix.py runs the suite against caiosfs and keeps its known differences listed;
docs/SEMANTICS.md ("POSIX conformance") explains each of them."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cats = sorted({c.category for c in CASES})
    epilog = EPILOG + f"\n\ncategories ({len(CASES)} cases): " + ", ".join(
        f"{k} ({sum(c.category == k for c in CASES)})" for k in cats)
    ap = argparse.ArgumentParser(prog="python -m bench.posix", description=DESCRIPTION,
                                 epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="caiosfs,rclone,s3fs", metavar="LIST",
                    help="comma-separated systems to mount and test: caiosfs, rclone, s3fs, "
                    "or none (default: %(default)s)")
    ap.add_argument("--path", action="append", default=[], metavar="NAME=DIR",
                    help="also test DIR, a directory on a filesystem mounted already, as "
                    "system NAME (repeatable); the suite works in a new subdirectory of it. "
                    "For the cases as nobody, uid 65534 must be able to reach DIR")
    ap.add_argument("--reference", metavar="DIR", default="/var/tmp",
                    help="where the reference run makes its directory (default: %(default)s)")
    ap.add_argument("--only", default="", metavar="LIST",
                    help="comma-separated case names or categories (default: all)")
    ap.add_argument("--no-nobody", action="store_true",
                    help="leave out the cases that run as uid 65534")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--timeout", type=float, default=CASE_TIMEOUT, metavar="S",
                    help="time limit of one case in seconds (default: %(default)s)")
    ap.add_argument("--caiosfs", default=str(Path(__file__).resolve().parent.parent / ".venv"
                                             / "bin" / "caiosfs"), metavar="EXE",
                    help="the caiosfs executable (default: this checkout's venv)")
    ap.add_argument("--caiosfs-opts", default="", metavar="OPTS",
                    help="extra -o options for caiosfs, e.g. profile=devbox")
    ap.add_argument("--endpoint", help="an S3 server on 127.0.0.1 to use instead of starting one "
                    "(the bucket caiosfs-bench is made if missing; the suite works below "
                    "root/posix-SYSTEM-*)")
    ap.add_argument("--access-key", help="with --endpoint")
    ap.add_argument("--secret-key", help="with --endpoint")
    ap.add_argument("--workdir", metavar="DIR",
                    help="mounts, caches and the server's data (default: a new directory under "
                    "/var/tmp, removed at the end)")
    ap.add_argument("--no-save", action="store_true",
                    help="print the table only; write nothing under bench/results/")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fresh_dir(parent: Path, name: str) -> Path:
    d = parent / f"{name}-{datetime.now(UTC).strftime('%H%M%S')}-{os.getpid()}"
    old_umask = os.umask(0o022)
    try:
        os.mkdir(d, 0o755)
    finally:
        os.umask(old_umask)
    return d


def open_systems(names: list[str], args: argparse.Namespace, workdir: Path,
                 store: Any) -> list[Any]:
    """The bench adapters of ``names``, each made to mount with allow_other."""
    from bench.systems import Caiosfs, Env, Rclone, S3fs

    env = Env(store.endpoint, store.access_key, store.secret_key, workdir, cache_size_gib=2)

    class RcloneAllowOther(Rclone):
        FLAGS = (*Rclone.FLAGS, "--allow-other")

    class S3fsAllowOther(S3fs):
        OPTS = (*S3fs.OPTS, "allow_other")

    opts = ",".join(x for x in ("allow_other", args.caiosfs_opts) if x)
    made: dict[str, Any] = {
        "caiosfs": lambda: Caiosfs(env, Path(args.caiosfs), opts),
        "rclone": lambda: RcloneAllowOther(env),
        "s3fs": lambda: S3fsAllowOther(env),
    }
    out = []
    for n in names:
        if n not in made:
            raise SystemExit(f"posix: unknown system {n!r} (caiosfs, rclone, s3fs, none)")
        s = made[n]()
        why = s.unavailable()
        if why:
            raise SystemExit(f"posix: {n}: {why}")
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = select_cases(args.only, not args.no_nobody)
    if args.list:
        for c in cases:
            print(f"{c.category:9s} {c.name:28s} {c.doc}{'  [as nobody]' if c.as_nobody else ''}")
        return 0
    if os.geteuid() != 0:
        log("posix: must run as root (mounts, chown, switching to uid 65534)")
        return 2
    names = [] if args.systems.strip() == "none" else [
        s.strip() for s in args.systems.split(",") if s.strip()]
    paths = dict(p.split("=", 1) for p in args.path)
    results: dict[str, dict[str, str]] = {}
    described: dict[str, str] = {}
    t_start = time.monotonic()

    ref = fresh_dir(Path(args.reference), "caiosfs-posix-ref")
    fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(ref)],
                            capture_output=True, text=True, check=False).stdout.strip() or "?"
    log(f"reference: {ref} ({fstype})")
    try:
        results["reference"] = run_suite(ref, cases, args.timeout, log)
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    described["reference"] = f"{args.reference} ({fstype})"

    for name, path in paths.items():
        d = fresh_dir(Path(path), "caiosfs-posix")
        log(f"{name}: {d}")
        results[name] = run_suite(d, cases, args.timeout, log)
        described[name] = f"directory {path}"

    rc = 0
    if names:
        rc = _run_mounted(names, args, cases, results, described)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.posix " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} cores, {os.uname().release}, SeaweedFS on loopback",
        "reference": described["reference"],
        "systems": {k: v for k, v in described.items() if k != "reference"},
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(text_table(results, cases))
    if not args.no_save:
        outdir = Path(__file__).resolve().parent / "results"
        outdir.mkdir(exist_ok=True)
        stem = outdir / f"posix-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        stem.with_suffix(".md").write_text(markdown(results, cases, meta))
        stem.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "cases": {c.name: {"category": c.category, "doc": c.doc,
                                              "as_nobody": c.as_nobody} for c in cases},
             "results": results}, indent=1) + "\n")
        log(f"wrote {stem}.md and .json")
    bad = {k: v for k, v in results["reference"].items() if v != "ok"}
    if bad:
        log(f"posix: {len(bad)} case(s) fail on the reference: {bad}")
        rc = rc or 1
    return rc


def _run_mounted(names: list[str], args: argparse.Namespace, cases: list[Case],
                 results: dict[str, dict[str, str]], described: dict[str, str]) -> int:
    from bench.procs import BenchError
    from bench.store import BUCKET, PREFIX, Store

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="caiosfs-posix-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    # uid 65534 must reach the mount points (mkdtemp makes 0700; /var/tmp is 1777).
    os.chmod(workdir, 0o755)
    store = Store(workdir, args.endpoint, args.access_key, args.secret_key)
    rc = 0
    try:
        store.start()
        # The mounted prefix's own marker: s3fs cannot create anything below a prefix that
        # has no object (ENOENT), as a fresh bucket has.
        store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/", Body=b"")
        for s in open_systems(names, args, workdir, store):
            for p in (s.root.parent, s.root, s.mnt):
                p.mkdir(parents=True, exist_ok=True)
                os.chmod(p, 0o755)
            log(f"{s.name}: mounting ({s.version()})")
            try:
                with s.mounted(cold=True) as m:
                    d = fresh_dir(m.mountpoint, f"posix-{s.name}")
                    results[s.name] = run_suite(d, cases, args.timeout, log)
                described[s.name] = f"{s.version()}: {s.describe()}"
            except BenchError as e:
                log(f"posix: {s.name} failed: {e}")
                described[s.name] = f"failed: {e}"
                rc = 2
    finally:
        store.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
