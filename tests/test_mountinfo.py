"""caiosfs.mountinfo: the one reader of /proc/self/mountinfo in caiosfs, tests/ and bench/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from caiosfs import mountinfo
from caiosfs.mountinfo import Mount, parse, unescape

LINES = [
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro",
    # no optional field; a blank in the mount point and in the source
    r"97 22 0:55 / /mnt/my\040data rw,nosuid,nodev - fuse.caiosfs s3://b/with\040blank rw",
    # two optional fields; tab, backslash and newline escaped
    r"98 22 0:56 / /srv/a\011b\134c\012d rw shared:7 master:2 - tmpfs none rw",
    "not a mountinfo line",
    "99 22 0:57 / /no/separator rw",
    "",
    # a second mount stacked on /mnt/my data
    r"100 97 0:58 / /mnt/my\040data rw - fuse.caiosfs s3://c rw",
]
SAMPLE = "\n".join(LINES)


def test_unescape_decodes_octal_only() -> None:
    assert unescape(r"/a\040b") == "/a b"
    assert unescape(r"\011\012\134") == "\t\n\\"
    assert unescape(r"/a\04") == r"/a\04"  # not three digits: left as is
    assert unescape(r"/a\089") == r"/a\089"  # 8 and 9 are not octal


def test_parse_sample() -> None:
    mounts = parse(SAMPLE)
    assert mounts == [
        Mount(22, "8:1", "/", "ext4", "/dev/vda1"),
        Mount(97, "0:55", "/mnt/my data", "fuse.caiosfs", "s3://b/with blank"),
        Mount(98, "0:56", "/srv/a\tb\\c\nd", "tmpfs", "none"),
        Mount(100, "0:58", "/mnt/my data", "fuse.caiosfs", "s3://c"),
    ]


def test_find_returns_the_topmost_mount(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(SAMPLE)
    top = mountinfo.find("/mnt/my data", table)
    assert top is not None and top.mount_id == 100 and top.source == "s3://c"
    assert mountinfo.find(r"/mnt/my\040data", table) is None  # callers pass real paths
    assert mountinfo.find("/srv/a\tb\\c\nd", table) is not None
    assert mountinfo.find("/mnt", table) is None


def test_read_this_process_table() -> None:
    root = mountinfo.find("/")
    assert root is not None and root.mount_id > 0 and ":" in root.device
    proc = mountinfo.find("/proc")
    assert proc is not None and proc.fstype == "proc"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_mount_with_blank_and_tab(tmp_path: Path) -> None:
    """The kernel's own escaping, not just our sample's."""
    mp = tmp_path / "with blank\tand tab"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "caiosfs test", str(mp)],
                   check=True)
    try:
        m = mountinfo.find(str(mp))
        assert m is not None
        assert (m.fstype, m.source) == ("tmpfs", "caiosfs test")
        st = os.stat(mp)
        assert m.device == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    finally:
        subprocess.run(["umount", str(mp)], check=True)
    assert mountinfo.find(str(mp)) is None
