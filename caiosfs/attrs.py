"""File attributes in the s3fs convention (x-amz-meta-mode/uid/gid/mtime/ctime), both ways.

Times are kept in integer nanoseconds and stored exactly (s3fs writes ``SEC`` or
``SEC.NNNNNNNNN``): git compares mtime and ctime to the nanosecond, and a time that comes
back rounded after a remount makes it read and hash every file again.
"""

from __future__ import annotations

import stat

NS = 1_000_000_000
# The object of a directory holding its files' attributes (dirattrs.py): never a file.
RECORD = ".caiosfs-attrs"


MAX_NAME = 255  # bytes of one path component


def valid_name(name: str) -> bool:
    """Whether ``name`` can be one component of a path (an object key's part between
    slashes that cannot be shown as a file or directory is skipped)."""
    return bool(name) and name not in (".", "..") and "/" not in name and \
        len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME and "\0" not in name


def is_record(key: str) -> bool:
    """Whether an object key (or a relative path) names a directory attribute record."""
    return key == RECORD or key.endswith("/" + RECORD)


def fmt_ns(ns: int) -> str:
    """Nanoseconds since the epoch as s3fs writes a time: ``SEC`` or ``SEC.NNNNNNNNN``."""
    sec, frac = divmod(ns, NS)
    return f"{sec}.{frac:09d}" if frac else str(sec)


def parse_ns(text: str) -> int:
    """``SEC[.FRACTION]`` -> nanoseconds (exact: no float on the way). ValueError if not a
    time."""
    t = text.strip()
    neg = t.startswith("-")
    sec, _, frac = t.lstrip("+-").partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(f"not a time: {text!r}")
    ns = int(sec) * NS + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns


class Attrs:
    """mode (full st_mode, type bits included), owner, times (ns) and size of a file."""

    __slots__ = ("_ctime_ns", "gid", "mode", "mtime_ns", "rdev", "size", "uid")

    def __init__(self, mode: int, uid: int, gid: int, mtime: float, size: int = 0, *,
                 mtime_ns: int | None = None, ctime_ns: int | None = None,
                 rdev: int = 0) -> None:
        self.mode, self.uid, self.gid, self.size, self.rdev = mode, uid, gid, size, rdev
        self.mtime_ns = mtime_ns if mtime_ns is not None else round(mtime * NS)
        self._ctime_ns = ctime_ns

    @property
    def mtime(self) -> float:
        return self.mtime_ns / NS

    @mtime.setter
    def mtime(self, value: float) -> None:
        # A change of content (or of mtime by seconds) changes ctime too, as on any
        # filesystem; the kernel then sends its own exact times (setattr).
        self.mtime_ns = self._ctime_ns = round(value * NS)

    @property
    def ctime_ns(self) -> int:
        return self.mtime_ns if self._ctime_ns is None else self._ctime_ns

    @ctime_ns.setter
    def ctime_ns(self, value: int) -> None:
        self._ctime_ns = value

    def copy(self) -> Attrs:
        return Attrs(self.mode, self.uid, self.gid, 0.0, self.size, mtime_ns=self.mtime_ns,
                     ctime_ns=self._ctime_ns, rdev=self.rdev)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Attrs) and (self.mode, self.uid, self.gid, self.mtime_ns,
                                             self.ctime_ns, self.size) == (
            other.mode, other.uid, other.gid, other.mtime_ns, other.ctime_ns, other.size)

    def __repr__(self) -> str:
        return (f"Attrs(mode={self.mode:o}, uid={self.uid}, gid={self.gid}, "
                f"mtime_ns={self.mtime_ns}, ctime_ns={self.ctime_ns}, size={self.size})")

    def to_meta(self) -> dict[str, str]:
        # s3fs writes the full st_mode in decimal, times as SEC[.NNNNNNNNN].
        meta = {"mode": str(self.mode), "uid": str(self.uid), "gid": str(self.gid),
                "mtime": fmt_ns(self.mtime_ns)}
        if self.ctime_ns != self.mtime_ns:
            meta["ctime"] = fmt_ns(self.ctime_ns)
        if self.rdev:
            meta["rdev"] = str(self.rdev)
        return meta


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
        elif not is_dir and t in (0, stat.S_IFREG, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
                                  stat.S_IFCHR, stat.S_IFBLK):
            mode = (t or stat.S_IFREG) | stat.S_IMODE(m)
    except (KeyError, ValueError):
        pass

    def num(name: str, default: int) -> int:
        try:
            return int(meta[name])
        except (KeyError, ValueError):
            return default

    def ns(name: str) -> int | None:
        try:
            return parse_ns(meta[name])
        except (KeyError, ValueError):
            return None
    mt = ns("mtime")
    return Attrs(mode, num("uid", uid), num("gid", gid), mtime, size,
                 mtime_ns=mt, ctime_ns=ns("ctime") if mt is not None else None,
                 rdev=num("rdev", 0) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0)
