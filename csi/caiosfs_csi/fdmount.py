"""Mounts that outlive the plugin: the plugin mounts, a mounter process runs the daemon.

`FdMounter` is the `Mounter` the plugin uses with `--mounter-socket`. To publish it

1. opens /dev/fuse and mounts the target with mount(2) (`fuse.caiosfs`, `fd=N`), as
   fusermount3 would;
2. hands the descriptor to caiosfs-mounter (mounterd.py) over its unix socket, which runs
   `caiosfs mount SOURCE /dev/fd/N --target TARGET` and answers once the daemon is ready;
3. closes its own copy. From then on the daemon holds the only descriptor of the mount: the
   plugin can die, be restarted or upgraded, and the mount keeps serving.

If the plugin dies between 1 and 2, its descriptor closes with it, the kernel aborts the
connection (ENOTCONN), and kubelet's retry finds a dead mount, detaches it and starts over.
Unpublish asks the mounter to flush the daemon (everything written is in the store), unmounts
the target (the daemon sees the unmount and exits) and waits for the daemon to exit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from caiosfs_csi import fdpass
from caiosfs_csi.mounter import Mounter, MountError, MountTimeout

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOATIME = 1, 2, 4, 1024
# What `caiosfs mount` asks libfuse for (caiosfs/mount.py, run()); with a /dev/fd/N mount
# point libfuse ignores mount options, so the plugin must set them itself.
ALWAYS_DATA = ("rootmode=40000", "user_id=0", "group_id=0", "default_permissions")
DEFAULT_READ_AHEAD_KB = 1024  # caiosfs's default read_ahead_kb (caiosfs/config.py)


class MounterUnavailable(MountError):
    """caiosfs-mounter does not answer on its socket."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def mount_fuse(source: str, target: str, *, readonly: bool, allow_other: bool) -> int:
    """Open /dev/fuse, mount it at `target` as fuse.caiosfs; return the descriptor."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = [f"fd={fd}", *ALWAYS_DATA]
    if allow_other:
        data.append("allow_other")
    flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (MS_RDONLY if readonly else 0)
    libc = _libc()
    rc = libc.mount(source.encode(), target.encode(), b"fuse.caiosfs", flags,
                    ",".join(data).encode())
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount {target}: {os.strerror(err)}")
    return fd


class FdMounter(Mounter):
    """A Mounter whose daemons run in caiosfs-mounter, fed with /dev/fuse descriptors."""

    def __init__(self, caiosfs_bin: str | None = None, *, mounter_socket: str,
                 **kwargs) -> None:
        super().__init__(caiosfs_bin, **kwargs)
        self.mounter_socket = mounter_socket

    def _call(self, msg: dict, fds: Sequence[int] = (), timeout: float = 30.0) -> dict:
        try:
            reply = fdpass.call(self.mounter_socket, msg, fds, timeout=timeout)
        except (OSError, fdpass.ProtocolError) as e:
            raise MounterUnavailable(
                f"caiosfs-mounter at {self.mounter_socket} does not answer: {e}") from None
        return reply

    def executable_ok(self) -> bool:
        try:
            return bool(self._call({"cmd": "ping"}, timeout=5).get("ok"))
        except MounterUnavailable:
            return False

    def ping(self) -> dict:
        """The mounter's version and counters."""
        return self._call({"cmd": "ping"}, timeout=5)

    def daemons(self) -> dict[str, dict]:
        """The mounter's daemons by target (state: starting / serving)."""
        reply = self._call({"cmd": "list"}, timeout=10)
        return {d["target"]: d for d in reply.get("daemons", [])}

    def busy(self, target: str) -> bool:
        try:
            d = self.daemons().get(os.path.normpath(target))
        except MounterUnavailable:
            return False
        return d is not None and d["state"] == "starting"

    def mount(self, source: str, target: str, options: Sequence[str], *,
              env: Mapping[str, str] | None = None, strip_credential_env: bool = False,
              volume_id: str = "", labels: Mapping[str, str] | None = None) -> None:
        timeout = self.mount_timeout
        if "warm=blocking" in options:
            timeout = max(timeout, self.blocking_warm_timeout)
        fd = mount_fuse(source, target, readonly="ro" in options,
                        allow_other="allow_other" in options)
        log.info("mounted %s at %s (fd %d); handing it to caiosfs-mounter", source, target, fd)
        try:
            reply = self._call({"cmd": "start", "target": target, "source": source,
                                "options": list(options), "volume_id": volume_id,
                                "labels": dict(labels or {}),
                                "strip_credential_env": strip_credential_env,
                                "timeout": timeout}, [fd], timeout=timeout + 30)
        except MountError:
            os.close(fd)
            self._detach_failed(target)
            raise
        os.close(fd)
        if not reply.get("ok"):
            self._detach_failed(target)
            cls = MountTimeout if reply.get("timeout") else MountError
            raise cls(str(reply.get("error", "caiosfs-mounter refused the mount")))
        self._set_read_ahead(target, options)

    def _detach_failed(self, target: str) -> None:
        # Our descriptor is closed and no daemon has one: the mount is dead. Detach it.
        try:
            self.force_unmount(target)
        except MountError as e:
            log.warning("cannot detach the failed mount at %s: %s", target, e)

    def _set_read_ahead(self, target: str, options: Sequence[str]) -> None:
        """Raise the mount's kernel readahead, as caiosfs does for its own mounts. The daemon
        cannot: it runs without privileges. The stat waits until the daemon answered INIT,
        after which the kernel no longer overwrites the value."""
        kb = DEFAULT_READ_AHEAD_KB
        for o in options:
            if o.startswith("read_ahead_kb="):
                kb = int(o.split("=", 1)[1])
        try:
            os.stat(target)
            entries = self.entries_at(target)
            if entries:
                dev = entries[-1].device
                Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(kb))
        except (OSError, ValueError) as e:
            log.info("could not set read_ahead_kb of %s: %s", target, e)

    def unmount(self, target: str) -> None:
        """Flush through the mounter, unmount, wait for the daemon to exit."""
        reply = self._call({"cmd": "flush", "target": target,
                            "timeout": self.umount_timeout}, timeout=self.umount_timeout + 60)
        if not reply.get("ok"):
            if reply.get("unknown"):
                # Not one of the mounter's daemons (made before the plugin used a mounter, or
                # by a mounter that was restarted): caiosfs's own umount drains it.
                log.info("%s: %s; using caiosfs umount", target, reply.get("error"))
                super().unmount(target)
                return
            raise MountError(str(reply.get("error")))
        self._run(["umount", target], 60.0, None)
        reply = self._call({"cmd": "wait", "target": target, "timeout": 30}, timeout=60)
        if not reply.get("exited"):
            log.warning("the daemon of %s has not exited 30s after the unmount", target)
