"""Running a mount: checks, daemonizing, the trio main loop, signals and draining.

``mount()`` validates everything it can before forking, then the daemon reports "ready"
or one error line back through a pipe, so ``caiosfs mount`` exits only once the mount is
live (or has failed) — which is what fstab, systemd and the CSI plugin need.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import __version__, compose, control, mountinfo
from .cache import lock_cache_dir
from .config import MountConfig

# (see PENDING in tests/test_layout.py)
from .errors import UserError
from .index import open_index
from .metrics import Metrics
from .warm import warm_in_mount

log = logging.getLogger("caiosfs")
DRAIN_LIMIT = 600.0  # seconds a SIGTERM/unmount keeps uploading before leaving the rest
# in the journal (it is uploaded at the next mount; nothing is dropped)


FUSE_DEV = (10, 229)  # major, minor of /dev/fuse


def fuse_fd(path: str) -> int | None:
    """N when ``path`` is ``/dev/fd/N``: a /dev/fuse descriptor that a privileged process
    (the CSI plugin) has already mounted and handed to us; libfuse then serves it as is."""
    m = re.fullmatch(r"/dev/fd/([0-9]+)", path)
    return int(m.group(1)) if m else None


def check_fuse_fd(path: str, target: str | None) -> str:
    """Check that ``path`` (``/dev/fd/N``) is an open /dev/fuse descriptor and that the
    mount it serves is named (``--target``): control socket, status and logs use that name."""
    fd = fuse_fd(path)
    assert fd is not None
    try:
        st = os.fstat(fd)
    except OSError:
        raise UserError(f"{path}: file descriptor {fd} is not open") from None
    import stat as _stat
    if not _stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != FUSE_DEV:
        raise UserError(f"{path} is not a /dev/fuse descriptor")
    if not target:
        raise UserError(f"mounting on {path} needs --target: the path it is mounted at")
    return path


def check_mountpoint(path: str) -> str:
    p = os.path.abspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UserError(f"mountpoint {path} is a dead FUSE mount (transport endpoint not "
                            f"connected): run 'caiosfs umount {path}' first") from None
        raise UserError(f"mountpoint {path}: {exc.strerror}") from None
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {path} is not a directory")
    if os.path.ismount(p):
        raise UserError(f"mountpoint {path} is already mounted")
    return p


def setup_logging(cfg: MountConfig, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = cfg.log_file or str(cfg.cache_dir / "caiosfs.log")
    try:
        fh = logging.handlers.RotatingFileHandler(path, maxBytes=20 << 20, backupCount=3)
        os.chmod(path, 0o600)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError:
        pass
    if foreground:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_mounted(mountpoint: str) -> bool:
    """Whether mountpoint is a mount, from mountinfo: the daemon must never stat its own
    mountpoint (the kernel would wait for the daemon to answer)."""
    try:
        return mountinfo.find(mountpoint) is not None
    except OSError:
        return False


FUSE_CONNECTIONS = Path("/sys/fs/fuse/connections")
# Asynchronous requests (readahead, writeback) the kernel keeps in flight to the daemon, and
# how many make it skip readahead (the kernel's defaults: 12 and 9).
FUSE_MAX_BACKGROUND = 64
FUSE_CONGESTION = 48


def raise_fuse_background(device: str, root: Path = FUSE_CONNECTIONS) -> bool:
    """Raise the FUSE connection's max_background and congestion_threshold (never lower
    them) through fusectl. At the kernel's 12/9, 16 threads reading small files kept the
    connection congested, and a congested FUSE skips readahead: the rest of the page a
    read wants comes as 4 KiB synchronous reads - 2.9 FUSE reads per 100 KB file instead of
    one, each a request for the loop. Returns whether both are set."""
    conn = root / device.rpartition(":")[2]
    try:
        for name, value in (("max_background", FUSE_MAX_BACKGROUND),
                            ("congestion_threshold", FUSE_CONGESTION)):
            f = conn / name
            if int(f.read_text()) < value:
                f.write_text(str(value))
        return True
    except (OSError, ValueError) as exc:
        log.info("could not raise the FUSE connection's max_background (%s: %s); the "
                 "kernel's 12 stays (is fusectl mounted at %s?)", conn,
                 getattr(exc, "strerror", None) or exc, root)
        return False


def mount_fusectl(root: Path = FUSE_CONNECTIONS) -> None:
    """Mount the FUSE control filesystem where the kernel expects it if nobody did (systemd
    does at boot; a bare VM or a container often has not): as root only, never fatal."""
    try:
        if not root.is_dir() or os.path.ismount(root) or os.geteuid() != 0:
            return
        r = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(root)],
                           capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("could not mount fusectl at %s (%s)", root, exc)
        return
    if r.returncode != 0:
        log.info("could not mount fusectl at %s (%s)", root, r.stderr.strip())


def set_fuse_background(mountpoint: str) -> None:
    mount_fusectl()
    try:
        for m in mountinfo.read():
            if m.mount_point == mountpoint:
                raise_fuse_background(m.device)
    except OSError as exc:
        log.info("could not read mountinfo (%s)", exc.strerror)


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Raise the kernel readahead of the mount (read from mountinfo: stat'ing our own mount
    here would wait on ourselves)."""
    try:
        for m in mountinfo.read():
            if m.mount_point == mountpoint:
                Path(f"/sys/class/bdi/{m.device}/read_ahead_kb").write_text(str(kb))
    except OSError as exc:
        log.info("could not set read_ahead_kb (%s); kernel default stays", exc.strerror)


def harden_process() -> None:
    """No core dumps, not dumpable: this process holds the store's credentials.

    Also a private umask: everything the daemon creates in cache_dir (LMDB files, block
    files, logs) is readable by its owner only, whatever the caller's umask.
    """
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.debug("cannot disable core dumps: %s", exc)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0: no core, no ptrace by peers
    except (OSError, AttributeError) as exc:
        log.debug("cannot make the process non-dumpable: %s", exc)
    os.umask(0o077)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> None:
    """Keep the heap's freed megabytes for reuse instead of handing them back to the kernel.

    Streaming reads allocate and free a 1 MiB buffer per piece of every GET and per FUSE
    reply. With glibc's defaults these come and go as fresh mappings (or a trimmed heap), so
    each one costs 256 page faults and 1 MiB of zeroing: a fifth of the daemon's CPU on a
    cold sequential read. Allocations under 4 MiB from the heap, a heap trimmed only past 16
    MiB free, and two arenas (the GIL serialises allocation anyway) cut the faults of a 1
    GiB read from ~200,000 to ~60,000 and its system time by a quarter. (A 64 MiB trim
    threshold saved a few more faults but kept up to 64 MiB more resident: the 8-reader
    checkpoint restore reached 313 MiB.) Other C libraries: nothing to do.
    """
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    for param, value in ((M_MMAP_THRESHOLD, 4 << 20), (M_TRIM_THRESHOLD, 16 << 20),
                         (M_ARENA_MAX, 2)):
        if mallopt(param, value) != 1:
            log.debug("mallopt(%d, %d) refused", param, value)


def mount(cfg: MountConfig, mountpoint: str, foreground: bool, target: str | None = None
          ) -> int:
    """``target``: with a ``/dev/fd/N`` mountpoint, where that descriptor is mounted."""
    if fuse_fd(mountpoint) is not None:
        mp = check_fuse_fd(mountpoint, target)
        target = os.path.abspath(target or "")
    else:
        if target:
            raise UserError("--target is only for a /dev/fd/N mountpoint")
        mp = check_mountpoint(mountpoint)
    harden_process()
    if foreground:
        return run(cfg, mp, foreground=True, report=lambda m: print(m, file=sys.stderr),
                   target=target)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        wfile = os.fdopen(w, "w", buffering=1)

        def report(msg: str) -> None:
            try:
                wfile.write(msg + "\n")
            except OSError:
                pass
        code = 1
        try:
            code = run(cfg, mp, foreground=False, report=report, target=target)
        except UserError as exc:
            report(f"error: {exc}")
        except BaseException as exc:  # noqa: BLE001 - the parent prints one line
            report(f"error: mount failed: {exc.__class__.__name__}: {exc}")
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as rfile:
        for line in rfile:
            line = line.rstrip("\n")
            if line == "ready":
                return 0
            if line.startswith("error: "):
                print(f"caiosfs: {line[7:]}", file=sys.stderr)
                _reap(pid)
                return 1
            print(f"caiosfs: {line}", file=sys.stderr)  # progress (e.g. warm=blocking)
    _reap(pid)
    print(f"caiosfs: the mount daemon exited before the mount was ready; see "
          f"{cfg.log_file or cfg.cache_dir / 'caiosfs.log'}", file=sys.stderr)
    return 1


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def run(cfg: MountConfig, mp: str, foreground: bool, report: Callable[[str], None],
        target: str | None = None) -> int:
    """Everything the daemon does. Errors before 'ready' are reported as one line.

    With ``target``, ``mp`` is ``/dev/fd/N``: the mount exists already (made by whoever
    opened /dev/fuse); libfuse serves the descriptor and ignores the mount options, and
    everything that names the mount (control socket, status, readahead) uses ``target``.
    Unmounting is then that process's job too.
    """
    import pyfuse3

    lockfd = lock_cache_dir(cfg.cache_dir)
    setup_logging(cfg, foreground)
    tune_malloc()
    index = open_index(cfg.cache_dir, reserve_for=cfg.cache_size)
    store = compose.open_store(cfg)
    fs = compose.build_filesystem(cfg, store, index, Metrics())
    options = set(pyfuse3.default_options)
    options |= {f"fsname={cfg.source}", "subtype=caiosfs", "default_permissions", "noatime"}
    if cfg.allow_other:
        options.add("allow_other")
    if cfg.ro:
        options.add("ro")
    try:
        pyfuse3.init(fs, mp, options)
    except RuntimeError as exc:
        raise UserError(f"cannot mount on {mp}: {exc}") from None
    name = target or mp
    log.info("caiosfs %s mounted %s on %s (cache %s)", __version__, cfg.source,
             f"{name} (served through {mp})" if target else mp, cfg.cache_dir)
    try:
        trio.run(_main, fs, cfg, name, report)
    except BaseException:
        log.exception("the mount loop failed")
        raise
    finally:
        pyfuse3.close(unmount=target is None and is_mounted(mp))
        control.unregister(name)
        index.close()
        os.close(lockfd)
    return 0


async def _main(fs: Any, cfg: MountConfig, mp: str, report: Callable[[str], None]) -> None:
    import pyfuse3
    sock = control.socket_path(mp)
    async with trio.open_nursery() as nursery:
        n = await fs.start(nursery)
        if n:
            log.info("journal replay: %d file(s) with local changes will be uploaded", n)
        nursery.start_soon(control.serve, sock, lambda req, prog: _control(fs, cfg, mp, req,
                                                                            prog))
        nursery.start_soon(_signals, fs, nursery)
        if cfg.metrics:
            _start_metrics(cfg.metrics, fs.metrics)
        control.register(mp, {"pid": os.getpid(), "source": str(cfg.source), "mountpoint": mp,
                              "cache_dir": str(cfg.cache_dir), "socket": str(sock),
                              "metrics": cfg.metrics, "endpoint": cfg.endpoint})
        nursery.start_soon(_read_ahead_after_init, fs, mp, cfg.read_ahead_kb)
        if cfg.warm:
            if cfg.warm == "blocking":
                await warm_in_mount(fs, report)
            else:
                nursery.start_soon(warm_in_mount, fs, None)
        report("ready")
        await pyfuse3.main()
        # The kernel unmounted us (fusermount -u / umount) or a signal asked us to stop:
        # upload everything before leaving.
        await drain(fs)
        nursery.cancel_scope.cancel()


async def _read_ahead_after_init(fs: Any, mp: str, kb: int) -> None:
    # The kernel applies the INIT reply's max_readahead after our init() returns.
    await fs.initialized.wait()
    await trio.sleep(0.1)
    await trio.to_thread.run_sync(set_read_ahead, mp, kb)
    await trio.to_thread.run_sync(set_fuse_background, mp)


async def drain(fs: Any, limit: float = DRAIN_LIMIT) -> bool:
    start = time.monotonic()
    last = 0.0

    async def progress(p: dict[str, Any]) -> None:
        nonlocal last
        if time.monotonic() - last > 5:
            last = time.monotonic()
            log.info("draining: %d file(s), %d bytes left to upload", p["files"], p["bytes"])
    with trio.move_on_after(limit):
        await fs.wb.flush_all(progress)
        await fs.settle_deletes()
        await fs.flush_records()
        log.info("drained in %.1fs", time.monotonic() - start)
        fs.wb.close_spares()
        return True
    fs.wb.close_spares()
    left = fs.wb.dirty_bytes()
    log.error("drain stopped after %.0fs with %d bytes not uploaded; they stay in the "
              "journal and are uploaded at the next mount of this cache_dir", limit, left)
    return False


async def _signals(fs: Any, nursery: trio.Nursery) -> None:
    import pyfuse3
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                continue
            log.info("signal %s: draining, then unmounting", signal.Signals(sig).name)
            await drain(fs)
            pyfuse3.terminate()
            return


async def _control(fs: Any, cfg: MountConfig, mp: str, req: dict[str, Any],
                   progress: Any) -> dict[str, Any]:
    cmd = req.get("cmd")
    if cmd == "status":
        fs.wb.update_gauges(force=True)
        snap = fs.metrics.snapshot()
        snap.update(source=str(cfg.source), mountpoint=mp, pid=os.getpid(),
                    cache_dir=str(cfg.cache_dir), endpoint=cfg.endpoint, profile=cfg.profile)
        return snap
    if cmd == "flush":
        await fs.wb.flush_all(progress)
        await fs.settle_deletes()
        await fs.flush_records()
        return {"ok": True}
    if cmd == "warm":
        return await warm_in_mount(fs, None, progress_async=progress, request=req)
    raise ValueError(f"unknown control command {cmd!r}")


def _start_metrics(spec: str, metrics: Metrics) -> None:
    from prometheus_client import start_http_server
    host, _, port = spec.rpartition(":")
    try:
        start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.registry)
    except (OSError, ValueError) as exc:
        log.error("metrics endpoint %s not started: %s", spec, exc)
