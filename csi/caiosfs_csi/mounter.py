"""Run `caiosfs mount` / `caiosfs umount` and inspect mounts on this node.

The FUSE daemon is started as `caiosfs mount ...` in a new session (start_new_session) and
daemonizes itself: it is never a child the plugin waits on, so restarting or upgrading the
plugin process does not take the mounts down. Everything the plugin needs to know later is in
/proc/self/mountinfo and the state directory.

The command output is captured through a temporary file rather than a pipe: a daemon that
inherited a pipe would keep it open and make the plugin wait forever for EOF.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Environment that must not leak into a mount whose credentials come from a file: otherwise the
# daemon might silently use the plugin's own identity instead of the volume's secret.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)

# Not EIO: a live daemon may answer EIO when the store is unreachable, and lazily detaching a
# live mount would strand its writers.
_DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}


class MountError(Exception):
    """`caiosfs mount`/`umount` failed; the message is caiosfs's own one-line error."""


class MountTimeout(MountError):
    """The command did not finish within its time limit."""


class MountState(enum.Enum):
    NOT_MOUNTED = "not mounted"
    MOUNTED = "mounted"  # a live caiosfs mount
    DEAD = "dead"  # in the mount table, but the daemon is gone (ENOTCONN)
    FOREIGN = "foreign"  # something other than caiosfs is mounted there


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    device: str = ""  # major:minor, names the mount's /sys/class/bdi entry


def _unescape(field: str) -> str:
    # mountinfo escapes blank, tab, newline and backslash as \ooo octal.
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse /proc/self/mountinfo text into entries (mount point, fstype, source)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            entries.append(
                MountEntry(
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                    device=fields[2],
                )
            )
        except (ValueError, IndexError):
            continue
    return entries


def is_caiosfs(entry: MountEntry) -> bool:
    """True for a mount made by caiosfs (`fuse.caiosfs`, or plain fuse with an s3:// source)."""
    if entry.fstype in ("fuse.caiosfs", "caiosfs"):
        return True
    return entry.fstype.startswith("fuse") and entry.source.startswith("s3://")


def find_caiosfs(explicit: str | None = None) -> str:
    """Locate the caiosfs executable: explicit arg, $CAIOSFS_BIN, this venv, PATH, /usr/local/bin."""
    candidates = [
        explicit,
        os.environ.get("CAIOSFS_BIN"),
        str(Path(sys.executable).parent / "caiosfs"),
        shutil.which("caiosfs"),
        "/usr/local/bin/caiosfs",
    ]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return explicit or os.environ.get("CAIOSFS_BIN") or "caiosfs"


def _canonical(path: str) -> str:
    # Resolve symlinks in the parent only: resolving the target itself would stat a possibly
    # dead FUSE mount point.
    path = os.path.normpath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


class Mounter:
    """Runs caiosfs for the node plugin. Every external command is configurable for tests."""

    def __init__(
        self,
        caiosfs_bin: str | None = None,
        *,
        mountinfo: str = "/proc/self/mountinfo",
        mount_timeout: float = 300.0,
        blocking_warm_timeout: float = 3600.0,
        umount_timeout: float = 90.0,
        lazy_umount_cmds: Sequence[Sequence[str]] = (("fusermount3", "-u", "-z"),
                                                     ("umount", "-l")),
        launch_prefix: Sequence[str] = (),
    ) -> None:
        self.caiosfs_bin = find_caiosfs(caiosfs_bin)
        self.mountinfo = mountinfo
        self.mount_timeout = mount_timeout
        self.blocking_warm_timeout = blocking_warm_timeout
        self.umount_timeout = umount_timeout
        self.lazy_umount_cmds = [list(c) for c in lazy_umount_cmds]
        self.launch_prefix = list(launch_prefix)

    # -- inspection -------------------------------------------------------------------------

    def entries_at(self, target: str) -> list[MountEntry]:
        """Mount table entries whose mount point is `target` (stacked mounts: last is on top)."""
        want = _canonical(target)
        try:
            text = Path(self.mountinfo).read_text()
        except FileNotFoundError:
            return []
        return [e for e in parse_mountinfo(text) if os.path.normpath(e.mount_point) == want]

    def _stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def state(self, target: str) -> MountState:
        """What is mounted at `target` right now."""
        entries = self.entries_at(target)
        if not entries:
            return MountState.NOT_MOUNTED
        top = entries[-1]
        try:
            self._stat(target)
        except OSError as e:
            if e.errno in _DEAD_ERRNOS:
                return MountState.DEAD
            raise
        return MountState.MOUNTED if is_caiosfs(top) else MountState.FOREIGN

    def busy(self, target: str) -> bool:
        """True while a mount of `target` is still starting somewhere the plugin cannot see
        (only with a mounter process; see fdmount.py)."""
        return False

    def executable_ok(self) -> bool:
        """True if the caiosfs command can be run (used by Probe)."""
        path = self.caiosfs_bin
        if os.sep not in path:
            path = shutil.which(path) or ""
        return bool(path) and os.access(path, os.X_OK)

    # -- actions ----------------------------------------------------------------------------

    def _run(self, argv: list[str], timeout: float, env: Mapping[str, str] | None) -> str:
        """Run argv to completion; return its output, raise MountError on failure."""
        with tempfile.TemporaryFile(mode="w+b") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                # A session of its own: the daemon caiosfs forks is not in the plugin's process
                # group, so signals sent to the plugin (or its group) never reach it.
                start_new_session=True,
                close_fds=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
                raise MountTimeout(f"{os.path.basename(argv[0])} {argv[1]} timed out "
                                   f"after {timeout:.0f}s") from None
            out.seek(0)
            text = out.read().decode(errors="replace")
        if rc != 0:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            msg = lines[-1] if lines else f"exit status {rc}"
            raise MountError(msg)
        return text

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def mount(
        self,
        source: str,
        target: str,
        options: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        strip_credential_env: bool = False,
        volume_id: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """`caiosfs mount SOURCE TARGET -o OPTIONS`; returns once the mount is live."""
        run_env = dict(os.environ if env is None else env)
        if strip_credential_env:
            for name in CREDENTIAL_ENV:
                run_env.pop(name, None)
        argv = [*self.launch_prefix, self.caiosfs_bin, "mount", source, target]
        if options:
            argv += ["-o", ",".join(options)]
        timeout = self.mount_timeout
        if "warm=blocking" in options:
            timeout = max(timeout, self.blocking_warm_timeout)
        log.info("running: %s", " ".join(argv))  # argv never holds secrets (by construction)
        try:
            self._run(argv, timeout, run_env)
        except MountTimeout:
            # The mount may have gone live just as we gave up: do not leave it behind unowned.
            if self.state(target) in (MountState.MOUNTED, MountState.DEAD):
                self.force_unmount(target)
            raise

    def unmount(self, target: str) -> None:
        """`caiosfs umount TARGET`: drains dirty data to the store, then unmounts."""
        argv = [self.caiosfs_bin, "umount", target, "--timeout", f"{self.umount_timeout:g}"]
        log.info("running: %s", " ".join(argv))
        # Give the command a little longer than its own drain timeout so it can report.
        self._run(argv, self.umount_timeout + 30.0, None)

    def bind(self, source: str, target: str) -> None:
        """Bind-mount `source` (a live caiosfs mount) at `target`: one daemon, many targets."""
        self._run(["mount", "--bind", source, target], 30.0, None)

    def unbind(self, target: str) -> None:
        """Remove a bind mount made by bind() (the mount it shows stays)."""
        self._run(["umount", target], 30.0, None)

    def force_unmount(self, target: str) -> None:
        """Lazily detach a mount whose daemon is gone (no data to drain from it)."""
        errors = []
        for cmd in self.lazy_umount_cmds:
            try:
                self._run([*cmd, target], 30.0, None)
                return
            except (MountError, OSError) as e:
                errors.append(f"{cmd[0]}: {e}")
        raise MountError("lazy unmount failed: " + "; ".join(errors))
