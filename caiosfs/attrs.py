"""File attributes in the s3fs convention (x-amz-meta-mode/uid/gid/mtime), both ways."""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass
class Attrs:
    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    mtime: float
    size: int = 0

    def to_meta(self) -> dict[str, str]:
        # s3fs writes the full st_mode in decimal and mtime in whole seconds.
        return {"mode": str(self.mode), "uid": str(self.uid), "gid": str(self.gid),
                "mtime": str(int(self.mtime))}


def from_meta(meta: dict[str, str] | None, *, is_dir: bool, default_mode: int,
              uid: int, gid: int, mtime: float, size: int = 0) -> Attrs:
    """Attributes of an object: its metadata where present and valid, else the defaults."""
    meta = meta or {}
    kind = stat.S_IFDIR if is_dir else stat.S_IFREG
    mode = kind | default_mode
    try:
        m = int(meta["mode"])
        t = stat.S_IFMT(m)
        if is_dir and t in (0, stat.S_IFDIR):
            mode = stat.S_IFDIR | stat.S_IMODE(m)
        elif not is_dir and t in (0, stat.S_IFREG, stat.S_IFLNK):
            mode = (t or stat.S_IFREG) | stat.S_IMODE(m)
    except (KeyError, ValueError):
        pass

    def num(name: str, default: int) -> int:
        try:
            return int(meta[name])
        except (KeyError, ValueError):
            return default
    try:
        mt = float(meta["mtime"])
    except (KeyError, ValueError):
        mt = mtime
    return Attrs(mode, num("uid", uid), num("gid", gid), mt, size)
