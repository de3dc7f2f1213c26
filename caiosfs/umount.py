"""``caiosfs umount``: drain a mount through its control socket, unmount it, wait for its daemon.

Kept apart from ``mount`` (the daemon's side, which imports the whole filesystem and boto3):
the command only talks to the socket and runs fusermount3, and starts in a third of the time.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from . import control
from .errors import UserError


def unmount(mountpoint: str, timeout: float, flush: bool = True,
            progress: Callable[[str], None] | None = None) -> None:
    """Drain a mount, unmount it, and wait for its daemon to exit."""
    mp = os.path.abspath(mountpoint)
    info = next((i for i in control.registered() if i.get("mountpoint") == mp), None)
    try:
        os.stat(mp)
        dead = False
    except OSError as exc:
        dead = exc.errno == errno.ENOTCONN
        if not dead:
            raise UserError(f"{mountpoint}: {exc.strerror}") from None
    if dead:
        _fusermount(mp, lazy=True)
        return
    if not os.path.ismount(mp):
        raise UserError(f"{mountpoint} is not mounted")
    if flush and info is not None:
        def show(p: dict[str, Any]) -> None:
            if progress is not None:
                progress(f"uploading: {p['files']} file(s), {p['bytes'] / 2**20:.1f} MiB left")
        try:
            control.flush(mp, timeout, show)
        except (TimeoutError, OSError):
            raise UserError(f"{mountpoint}: dirty data not uploaded within {timeout:.0f}s; "
                            "not unmounted (data is safe in the cache journal)") from None
    _fusermount(mp, lazy=False)
    if info is not None:
        end = time.monotonic() + timeout
        while control._alive(info["pid"]) and time.monotonic() < end:
            time.sleep(0.05)


def _fusermount(mp: str, lazy: bool) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mp]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unmount failed"])[-1]
        msg = msg.replace("fusermount3: ", "")
        raise UserError(f"cannot unmount {mp}: {msg}")
