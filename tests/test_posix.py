"""The POSIX conformance suite (bench/posix.py) against a real caiosfs mount.

Every case runs on a local directory (the reference) and on a caiosfs mount made with
``allow_other`` (the ``as nobody`` cases switch to uid 65534). Each case must give the
reference's outcome, except the known differences below, which must give exactly the outcome
written next to them: a new failure fails the test, and so does a known difference that starts
to pass or fails differently (then fix the list). docs/SEMANTICS.md, "POSIX conformance",
explains each of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import posix

# case -> (caiosfs's outcome, why it differs from a local filesystem)
KNOWN: dict[str, tuple[str, str]] = {
    "hardlink": (
        "ENOTSUP",
        "an object has one key: a second name would be a copy that diverges on the next write"),
    "open_tmpfile": (
        "ENOTSUP",
        "pyfuse3 has no tmpfile operation; callers fall back to a named temporary file"),
    "rename_exchange": (
        "EINVAL",
        "two copies and two deletes in the store cannot be atomic: refused, not half done"),
    "xattr_user": ("ENOTSUP", "extended attributes are not stored"),
    "xattr_missing": (
        "wrong: ENOTSUP, want ENODATA",
        "no xattr support at all: ENOTSUP for every name (cp -a and rsync -X accept it)"),
    "xattr_list_empty": ("ENOTSUP", "no xattr support: listxattr is refused too"),
    "utime_atime_ns": (
        "wrong: atime_ns 1700000000987654321, want 1600000000123456789",
        "atime is not kept (mounted noatime): it shows the mtime"),
    "stat_blocks_sparse": (
        "wrong: st_blocks 131073 for one byte of data",
        "objects have no holes (uploaded as zeros): st_blocks follows the size"),
    "dir_nlink": (
        "wrong: st_nlink 2, want 4",
        "counting subdirectories costs a listing per stat: fixed 2 (find/du: find_descends)"),
    "readdir_dots": (
        "wrong: entries ['f']",
        "readdir returns no . and .. (POSIX allows it; Linux filesystems return them)"),
}


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A 0755 directory under /var/tmp: uid 65534 must be able to reach the mount point
    (pytest's tmp_path is below a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="caiosfs-posix-test-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_posix_conformance(seaweed: Any, s3_env: dict[str, str], bucket: str,
                           shared_tmp: Path) -> None:
    from mounting import Mounter

    assert os.geteuid() == 0, "the suite chowns and switches to uid 65534: run as root"
    ref = shared_tmp / "ref"
    ref.mkdir(mode=0o755)
    t0 = time.monotonic()
    reference = posix.run_suite(ref, timeout=60)
    t_ref = time.monotonic() - t0
    assert {k: v for k, v in reference.items() if v != "ok"} == {}, (
        "the suite fails on the local reference directory")

    mounter = Mounter(seaweed, {**os.environ, **s3_env}, shared_tmp)
    try:
        m = mounter(bucket, "home", options="allow_other")
        os.chmod(m.path, 0o755)
        d = m.path / "posix"
        d.mkdir(mode=0o755)
        t0 = time.monotonic()
        got = posix.run_suite(d, timeout=60)
        t_mount = time.monotonic() - t0
        problems = m.log_problems()
    finally:
        mounter.cleanup()
    print(f"\nreference {t_ref:.1f} s, caiosfs {t_mount:.1f} s, "
          f"{sum(got[c] == reference[c] for c in got)}/{len(got)} cases match")

    errors = []
    for name, outcome in got.items():
        if name in KNOWN:
            want, why = KNOWN[name]
            if outcome == reference[name]:
                errors.append(f"{name}: known difference ({why}) now passes: drop it from KNOWN")
            elif outcome != want:
                errors.append(f"{name}: known difference ({why}) is now {outcome!r}, "
                              f"was {want!r}")
        elif outcome != reference[name]:
            errors.append(f"{name}: {outcome} (reference: {reference[name]})")
    errors += [f"{name}: in KNOWN but not a case" for name in KNOWN if name not in got]
    assert not errors, "\n".join(errors) + "\ndaemon log: " + "\n".join(problems)
