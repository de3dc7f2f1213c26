"""The mount table, read from /proc/self/mountinfo.

The daemon asks the kernel's table rather than ``os.path.ismount``: a stat of its own
mountpoint would wait for the daemon itself to answer. Every caiosfs module (and tests/,
bench/) reads the table through :func:`parse`; the CSI plugin, a separate distribution that
does not import caiosfs, has its own reader in ``caiosfs_csi/mounter.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

# The kernel writes blank, tab, newline and backslash inside a path as a backslash and
# three octal digits (mangle() in the kernel's fs/proc_namespace.c).
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_id: int
    device: str  # major:minor; a FUSE mount's readahead lives in /sys/class/bdi/<device>
    mount_point: str
    fstype: str
    source: str


def unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    """Every well-formed line of mountinfo ``text``, in order (a later mount on the same
    path is stacked on the earlier ones); other lines are skipped."""
    out = []
    for line in text.splitlines():
        # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        head, dash, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not dash or len(fields) < 6 or not rest or not fields[0].isdigit():
            continue
        out.append(Mount(mount_id=int(fields[0]), device=fields[2],
                         mount_point=unescape(fields[4]), fstype=rest[0],
                         source=unescape(rest[1]) if len(rest) > 1 else ""))
    return out


def read(path: Path = MOUNTINFO) -> list[Mount]:
    """This process's mount table; OSError if it cannot be read."""
    # Mount points are bytes to the kernel: keep what is not UTF-8 rather than fail.
    return parse(path.read_bytes().decode("utf-8", "surrogateescape"))


def find(mount_point: str, path: Path = MOUNTINFO) -> Mount | None:
    """The topmost mount on ``mount_point`` (an absolute path), or None."""
    found = None
    for m in read(path):
        if m.mount_point == mount_point:
            found = m
    return found
