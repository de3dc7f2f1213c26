"""One adapter per system under test: how to mount it, unmount it, wait until what was written
is durable in the store, and which processes make up its daemon (for the RSS figures).

Each system mounts the same source, ``s3://BUCKET/PREFIX``, with its own cache directory, and
is configured as a careful user would: a full local cache, large read-ahead, large parallel
multipart parts. The options are listed in ``describe()`` and end up in the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import BenchError
from bench.store import BUCKET, PREFIX

MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 300.0  # caiosfs umount drains dirty data first; we wait for durability before


@dataclass
class Env:
    """What every adapter needs to know about the run."""

    endpoint: str  # what systems talk to: the server, or the WAN proxy in front of it
    access_key: str
    secret_key: str
    workdir: Path
    peer_read_ahead_kb: int = 1024
    cache_size_gib: int = 20


@dataclass
class Mount:
    """A live mount. ``peak_rss_mib`` is set when the mount is torn down."""

    system: FsSystem
    mountpoint: Path
    cache_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    sampler: procs.RssSampler | None = None
    peak_rss_mib: float | None = None
    notes: list[str] = field(default_factory=list)
    log_path: Path | None = None
    aborted: bool = False  # the daemon was killed because an operation hung
    counters: dict[str, Any] | None = None  # the daemon's own statistics, read before unmount

    def abort(self, stuck_pid: int | None = None) -> None:
        """An operation on this mount hung: note where it waits, then kill the daemon (the
        kernel then fails every pending request, so the stuck process can exit) and abort the
        FUSE connection for good measure."""
        if stuck_pid is not None:
            stacks = [procs.kernel_stacks(p) for p in procs.process_tree(stuck_pid)]
            self.notes.append(
                "hung operation, kernel stacks: " + " | ".join(x for x in stacks if x)
            )
        tail = self.log_tail(8)
        if tail:
            self.notes.append(f"daemon log before kill: {tail[:1500]}")
        self.aborted = True
        for root in self.pids:
            for pid in reversed(procs.process_tree(root)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        procs.abort_fuse(self.mountpoint)

    def path(self, rel: str) -> Path:
        return self.mountpoint / rel

    def cpu(self) -> tuple[float, float | None]:
        """CPU seconds so far of the daemon's process tree (all threads), and of its event
        loop thread (the main thread) for a system that has one, else None."""
        total = sum(procs.tree_cpu(p) for p in self.pids)
        loop = None
        if self.system.loop_thread and self.pids:
            loop = procs.thread_cpu(self.pids[0], self.pids[0])
        return total, loop

    def log_tail(self, n: int = 15) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])


class FsSystem(ABC):
    """A FUSE filesystem under test."""

    name: str = ""
    #: The daemon's main thread is its event loop (caiosfs: trio); its CPU is reported apart.
    loop_thread: bool = False

    def __init__(self, env: Env) -> None:
        self.env = env
        self.root = env.workdir / "systems" / self.name
        self.mnt = self.root / "mnt"
        self.cache = self.root / "cache"
        self.logs = self.root / "logs"

    @abstractmethod
    def unavailable(self) -> str | None:
        """Why this system cannot run here (missing binary), or None."""

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def describe(self) -> str:
        """The mount options in words, for the report."""

    @abstractmethod
    def _start(self, m: Mount, profile: str) -> None:
        """Start the daemon; return once the mount is live (or raise BenchError)."""

    def _stop(self, m: Mount) -> None:
        """Unmount and wait for the daemon to exit (bounded)."""
        r = subprocess.run(
            ["fusermount3", "-u", str(m.mountpoint)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            m.notes.append(f"fusermount3 -u failed: {r.stderr.strip()[:200]}")
        if m.proc is not None:
            try:
                m.proc.wait(timeout=UMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                m.notes.append("daemon did not exit after unmount; killed")

    def counters(self, m: Mount) -> dict[str, Any] | None:
        """The daemon's own statistics (requests, bytes), if it offers them."""
        return None

    def wait_durable(
        self,
        m: Mount,
        store: Any,
        rel_prefix: str,
        expected: dict[str, int],
        timeout: float,
        gone: Any = None,
    ) -> float:
        """Return the monotonic time at which everything in ``expected`` was durable.

        Every system (and raw boto3) is judged the same way: the store is polled (a listing
        every 0.1 s) until each object is there with its full size; the workload then
        compares the content. No system's own flush command is used (caiosfs's ``flush``
        skips its upload delay, rclone has none), so the delays each system chose count.
        """
        return store.wait_durable(rel_prefix, expected, timeout, gone=gone)

    # ---- the common life cycle ---------------------------------------------------------------

    def _prepare(self, cold: bool, cache: Path) -> None:
        for d in (self.mnt, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        procs.force_unmount(self.mnt)
        if cold or not cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)

    @contextlib.contextmanager
    def mounted(
        self, *, cold: bool = True, profile: str = "", cache_dir: Path | None = None
    ) -> Iterator[Mount]:
        """Mount (with an emptied cache and dropped page cache when ``cold``), yield, unmount.
        ``cache_dir``: use this cache directory as it is (e.g. one ``caiosfs warm`` filled).

        Whatever happens inside, the mount is gone afterwards and the daemon dead.
        """
        cache = cache_dir or self.cache
        self._prepare(cold and cache_dir is None, cache)
        if cold:
            procs.drop_caches()
        m = Mount(self, self.mnt, cache)
        try:
            self._start(m, profile)
            if not procs.wait_for(lambda: procs.is_fuse_mounted(self.mnt), MOUNT_TIMEOUT):
                raise BenchError(
                    f"{self.name}: not mounted after {MOUNT_TIMEOUT:.0f} s; log: {m.log_tail()}"
                )
            if not m.pids:
                m.notes.append("daemon pid not found: no RSS figure")
            m.sampler = procs.RssSampler(m.pids).start()
            yield m
            m.counters = self.counters(m)
        except Exception as e:
            # The daemon's last words usually say more than the symptom seen by the workload.
            extra = list(m.notes)
            if not m.aborted and m.log_path is not None:
                tail = m.log_tail(5)[:600]
                if tail:
                    extra.append(f"{self.name} log: {tail}")
            raise BenchError(f"{e}" + "".join(f" [{x}]" for x in extra)) from e
        finally:
            if m.sampler is not None:
                m.peak_rss_mib = m.sampler.stop()
            self._teardown(m)

    def _teardown(self, m: Mount) -> None:
        try:
            if procs.mount_entry(self.mnt) is not None and not m.aborted:
                self._stop(m)
        except (BenchError, subprocess.TimeoutExpired, OSError) as e:
            m.notes.append(f"unmount failed: {e}")
        if procs.mount_entry(self.mnt) is not None:
            m.notes.append("still mounted after unmount: forced")
            procs.force_unmount(self.mnt)
        for pid in m.pids:
            self._reap(pid)
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(timeout=30)
        self._keep_log(m)

    def _keep_log(self, m: Mount) -> None:
        """Hook: save the daemon's log before the next cold mount wipes the cache dir."""

    @staticmethod
    def _reap(pid: int) -> None:
        """Make sure a daemon that is not our child is gone (SIGTERM, then SIGKILL)."""
        if not procs.wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return
                if procs.wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10):
                    return

    def _spawn(self, m: Mount, argv: list[str], env: dict[str, str]) -> None:
        """Start a foreground daemon as our child, its output in a log file."""
        m.log_path = self.logs / f"{self.name}-{int(time.time() * 1000)}.log"
        with open(m.log_path, "wb") as log:
            m.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        m.pids = [m.proc.pid]

        def up() -> bool:
            if m.proc is not None and m.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited {m.proc.returncode} while mounting: {m.log_tail()}"
                )
            return procs.is_fuse_mounted(self.mnt)

        if not procs.wait_for(up, MOUNT_TIMEOUT, 0.05):
            raise BenchError(
                f"{self.name}: not mounted after {MOUNT_TIMEOUT:.0f} s: {m.log_tail()}"
            )
        set_read_ahead(self.mnt, self.env.peer_read_ahead_kb, m)


def base_env() -> dict[str, str]:
    """The environment for every child: ours, with loopback exempt from any proxy."""
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def set_read_ahead(mountpoint: Path, kb: int, m: Mount) -> None:
    """Raise the kernel readahead of a FUSE mount (the bdi of its anonymous device).

    FUSE caps readahead at the bdi's read_ahead_kb, 128 KiB by default; caiosfs raises it
    itself (docs/DESIGN.md, "Kernel readahead of the mount"), and a careful rclone or s3fs
    user would do the same, so the peers get the same setting here.
    """
    if kb <= 0:
        return
    e = procs.mount_entry(mountpoint)
    if e is None:
        return
    path = Path(f"/sys/class/bdi/{e['dev']}/read_ahead_kb")
    try:
        path.write_text(str(kb))
    except OSError as err:
        m.notes.append(f"could not set read_ahead_kb: {err}")


def read_ahead_of(mountpoint: Path) -> int | None:
    e = procs.mount_entry(mountpoint)
    if e is None:
        return None
    try:
        return int(Path(f"/sys/class/bdi/{e['dev']}/read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


# ---- caiosfs -------------------------------------------------------------------------------


class Caiosfs(FsSystem):
    """caiosfs from this repository's venv (the CLI contract in the lead's brief)."""

    name = "caiosfs"
    loop_thread = True

    def __init__(self, env: Env, binary: Path, extra_opts: str = "", name: str = "caiosfs"
                 ) -> None:
        # name "caiosfs-base": another build (an older commit's venv) measured in the same
        # run, so a refactoring is judged by ratios taken side by side, not across runs.
        self.name = name
        super().__init__(env)
        self.binary = binary
        self.extra_opts = extra_opts

    def unavailable(self) -> str | None:
        if not self.binary.exists():
            return f"{self.binary} not found"
        return None

    def version(self) -> str:
        # The checkout the executable belongs to (REPO/.venv/bin/caiosfs).
        repo = str(self.binary.parent.parent.parent)
        rev = _first_line(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "caiosfs"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        return f"caiosfs git {rev}{' (+uncommitted changes)' if dirty else ''}"

    def options(self, profile: str, cache_dir: Path) -> str:
        opts = [
            f"endpoint={self.env.endpoint}",
            "path_style",
            f"cache_dir={cache_dir}",
            f"cache_size={self.env.cache_size_gib}G",
        ]
        if profile:
            opts.append(f"profile={profile}")
        if self.extra_opts:
            opts.append(self.extra_opts)
        return ",".join(opts)

    def describe(self) -> str:
        return (
            f"caiosfs mount s3://{BUCKET}/{PREFIX} MNT -o endpoint=...,path_style,"
            f"cache_dir=...,cache_size={self.env.cache_size_gib}G[,profile=<per workload>]"
            + (f",{self.extra_opts}" if self.extra_opts else "")
        )

    def child_env(self) -> dict[str, str]:
        env = base_env()
        env["AWS_ACCESS_KEY_ID"] = self.env.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.env.secret_key
        return env

    def _start(self, m: Mount, profile: str) -> None:
        m.log_path = self.logs / f"caiosfs-mount-{int(time.time() * 1000)}.log"
        argv = [
            str(self.binary),
            "mount",
            f"s3://{BUCKET}/{PREFIX}",
            str(self.mnt),
            "-o",
            self.options(profile, m.cache_dir),
        ]
        res = procs.run_bounded(argv, MOUNT_TIMEOUT, env=self.child_env(), check=False)
        m.log_path.write_text(f"$ {' '.join(argv)}\n{res.stdout}\n{res.stderr}")
        if res.returncode != 0:
            raise BenchError(
                f"caiosfs mount exited {res.returncode}: {(res.stderr or res.stdout).strip()[-400:]}"
            )
        if not procs.wait_for(lambda: procs.is_fuse_mounted(self.mnt), 10):
            raise BenchError("caiosfs mount exited 0 but nothing is mounted")
        m.pids = self.find_pids()
        # caiosfs logs into its cache dir; the mount command's own output is in the file above.
        m.log_path = m.cache_dir / "caiosfs.log"

    def _keep_log(self, m: Mount) -> None:
        if m.log_path is not None and m.log_path.exists():
            dest = self.logs / f"caiosfs-daemon-{int(time.time() * 1000)}.log"
            shutil.copyfile(m.log_path, dest)
            m.log_path = dest

    def counters(self, m: Mount) -> dict[str, Any] | None:
        """``caiosfs status --json``: S3 requests and bytes of this mount's life, so the report
        can show how many bytes each workload pulled (read amplification) and any errors."""
        try:
            r = subprocess.run(
                [str(self.binary), "status", str(m.mountpoint), "--json"],
                capture_output=True,
                text=True,
                timeout=15,
                env=self.child_env(),
                check=False,
            )
            info = json.loads(r.stdout) if r.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None
        if not isinstance(info, dict):
            return None
        keys = (
            "s3_requests",
            "s3_get_requests",
            "bytes_in",
            "bytes_out",
            "s3_errors",
            "fuse_errors",
            "checksum_failures",
            "uploads_failed",
            "skipped_keys",
        )
        return {k: info[k] for k in keys if isinstance(info.get(k), (int, float))}

    def find_pids(self) -> list[int]:
        """The daemon's pid: from ``caiosfs status --json`` if it says, else by scanning /proc
        for a caiosfs process with the mountpoint among its arguments."""
        try:
            r = subprocess.run(
                [str(self.binary), "status", str(self.mnt), "--json"],
                capture_output=True,
                text=True,
                timeout=15,
                env=self.child_env(),
                check=False,
            )
            if r.returncode == 0:
                info = json.loads(r.stdout)
                items = info if isinstance(info, list) else info.get("mounts", [info])
                pids = [int(i["pid"]) for i in items if isinstance(i, dict) and i.get("pid")]
                pids = [p for p in pids if Path(f"/proc/{p}").exists()]
                if pids:
                    return pids
        except (OSError, ValueError, subprocess.TimeoutExpired, TypeError, KeyError):
            pass
        found = procs.find_pids_by_arg(str(self.mnt), "caiosfs")
        # Keep only the top of each tree: the RSS sampler adds the descendants itself.
        return [p for p in found if not any(p in procs.children(q) for q in found if q != p)]

    def _stop(self, m: Mount) -> None:
        res = procs.run_bounded(
            [str(self.binary), "umount", str(m.mountpoint)],
            UMOUNT_TIMEOUT,
            env=self.child_env(),
            check=False,
        )
        if res.returncode != 0:
            m.notes.append(f"caiosfs umount exited {res.returncode}: {res.stderr.strip()[-300:]}")
        for pid in m.pids:
            if not procs.wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), 30):
                m.notes.append(f"caiosfs daemon {pid} still running 30 s after umount")

    def warm(self, rel_prefix: str, cache_dir: Path, timeout: float) -> float:
        """``caiosfs warm`` of a prefix into an empty cache dir; return its wall time."""
        res = procs.run_bounded(
            [
                str(self.binary),
                "warm",
                f"s3://{BUCKET}/{PREFIX}/{rel_prefix}",
                "--cache-dir",
                str(cache_dir),
                "-o",
                f"endpoint={self.env.endpoint},path_style",
            ],
            timeout,
            env=self.child_env(),
            stdout_to_devnull=True,
        )
        return res.seconds


# ---- rclone --------------------------------------------------------------------------------


class Rclone(FsSystem):
    """rclone mount with a full VFS cache (the configuration rclone recommends for
    applications that read and write files normally)."""

    name = "rclone"

    FLAGS = (
        "--vfs-cache-mode",
        "full",
        "--vfs-read-chunk-size",
        "16M",  # first ranged GET; doubles per chunk (no limit)
        "--buffer-size",
        "32M",  # in-memory read-ahead per open file
        "--vfs-read-ahead",
        "256M",  # extra read-ahead into the disk cache
        "--max-read-ahead",
        "1M",  # FUSE max_readahead (the bdi is raised to match)
        "--s3-chunk-size",
        "64M",  # multipart part size, like caiosfs's default
        "--s3-upload-concurrency",
        "8",
        "--s3-disable-checksum",  # don't MD5 whole files before uploading them
        "--s3-no-check-bucket",
        "--transfers",
        "8",  # parallel uploads from the write-back queue
        "--vfs-write-back",
        "1s",  # upload 1 s after close (default 5 s)
        "--use-server-modtime",  # stat from the listing, not one HEAD per file
        "--dir-cache-time",
        "5m",
        "--log-level",
        "NOTICE",
    )

    def unavailable(self) -> str | None:
        return None if shutil.which("rclone") else "rclone not installed"

    def version(self) -> str:
        return _first_line(["rclone", "version"])

    def describe(self) -> str:
        return (
            "rclone mount " + " ".join(self.FLAGS) + " --cache-dir DIR --vfs-cache-max-size "
            f"{self.env.cache_size_gib}G, read_ahead_kb={self.env.peer_read_ahead_kb}"
        )

    def _start(self, m: Mount, profile: str) -> None:
        env = base_env()
        # Debian's rclone refuses the machine's AWS_CA_BUNDLE; nothing here uses TLS anyway.
        env.pop("AWS_CA_BUNDLE", None)
        remote = "RCLONE_CONFIG_BENCHS3_"
        env.update(
            {
                remote + "TYPE": "s3",
                remote + "PROVIDER": "Other",
                remote + "ENDPOINT": self.env.endpoint,
                remote + "ACCESS_KEY_ID": self.env.access_key,
                remote + "SECRET_ACCESS_KEY": self.env.secret_key,
                remote + "REGION": "us-east-1",
                remote + "FORCE_PATH_STYLE": "true",
            }
        )
        argv = [
            "rclone",
            "--config",
            "/dev/null",
            "mount",
            f"benchs3:{BUCKET}/{PREFIX}",
            str(self.mnt),
            "--cache-dir",
            str(m.cache_dir),
            "--vfs-cache-max-size",
            f"{self.env.cache_size_gib}G",
            *self.FLAGS,
        ]
        self._spawn(m, argv, env)


# ---- s3fs ----------------------------------------------------------------------------------


class S3fs(FsSystem):
    """s3fs-fuse with its local file cache, parallel multipart up- and downloads."""

    name = "s3fs"

    OPTS = (
        "use_path_request_style",
        "parallel_count=16",  # parallel parts for multipart up/download
        "multipart_size=64",  # MiB per part
        "multireq_max=20",  # parallel HEADs while listing
        "endpoint=us-east-1",
        "dbglevel=warn",
    )

    def unavailable(self) -> str | None:
        return None if shutil.which("s3fs") else "s3fs not installed"

    def version(self) -> str:
        return _first_line(["s3fs", "--version"])

    def describe(self) -> str:
        return (
            "s3fs -f -o " + ",".join(self.OPTS) + ",use_cache=DIR,passwd_file=F, "
            f"read_ahead_kb={self.env.peer_read_ahead_kb}"
        )

    def _start(self, m: Mount, profile: str) -> None:
        passwd = self.root / "passwd-s3fs"
        fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.env.access_key}:{self.env.secret_key}\n")
        os.chmod(passwd, stat.S_IRUSR | stat.S_IWUSR)  # s3fs refuses a readable passwd file
        opts = [
            f"url={self.env.endpoint}",
            *self.OPTS,
            f"use_cache={m.cache_dir}",
            f"passwd_file={passwd}",
        ]
        argv = ["s3fs", f"{BUCKET}:/{PREFIX}", str(self.mnt), "-f", "-o", ",".join(opts)]
        self._spawn(m, argv, base_env())
