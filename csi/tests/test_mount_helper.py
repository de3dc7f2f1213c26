"""mount-helpers/mount.caiosfs and umount.caiosfs: option handling, and mount(8)/umount(8) end to end.

The end-to-end tests run in a private mount namespace (`unshare -m`) where /usr/sbin is
overlaid with the helpers, so mount(8) finds them exactly as after `caiosfs install-helper`,
without touching the host's /sbin. The "caiosfs" there is a fake that makes a real, tiny
FUSE mount of type fuse.caiosfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parents[2] / "mount-helpers"
MOUNT_HELPER = HELPERS / "mount.caiosfs"
UMOUNT_HELPER = HELPERS / "umount.caiosfs"
FAKE_FUSE = Path(__file__).resolve().parent / "fake_caiosfs_fuse.py"
SHELLS = [s for s in ("dash", "bash", "busybox") if shutil.which(s)] or ["sh"]


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A fake caiosfs that writes its argv (one JSON list) to a file."""
    out = tmp_path / "argv.json"
    exe = tmp_path / "caiosfs"
    exe.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        open({str(out)!r}, "w").write(json.dumps(sys.argv[1:]))
        """))
    exe.chmod(0o755)
    return exe, out


def run_helper(helper: Path, args: list[str], caiosfs: Path | None, shell: str = "sh",
               env: dict | None = None) -> subprocess.CompletedProcess:
    e = {"PATH": "/usr/bin:/bin"} | (env or {})
    if caiosfs is not None:
        e["CAIOSFS_BIN"] = str(caiosfs)
    cmd = [shell, "sh", str(helper), *args] if shell == "busybox" else [shell, str(helper), *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("shell", SHELLS)
def test_generic_options_stripped_ro_passed(recorder, shell: str) -> None:
    exe, out = recorder
    opts = ("_netdev,nofail,defaults,rw,noauto,auto,user,users,nouser,x-systemd.automount,"
            "x-systemd.mount-timeout=30,comment=x-gvfs-hide,suid,nosuid,dev,nodev,exec,noexec,"
            "noatime,relatime,cache_dir=/nvme/caiosfs,credentials_file=/etc/caiosfs/creds,"
            "profile=dataset,ro")
    r = run_helper(MOUNT_HELPER, ["s3://bucket/pre fix", "/mnt/data", "-o", opts], exe, shell)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == [
        "mount", "s3://bucket/pre fix", "/mnt/data", "-o",
        "cache_dir=/nvme/caiosfs,credentials_file=/etc/caiosfs/creds,profile=dataset,ro",
    ]


def test_last_of_ro_rw_wins_and_flags_ignored(recorder) -> None:
    exe, out = recorder
    r = run_helper(MOUNT_HELPER, ["s3://b", "/m", "-n", "-o", "ro", "-o", "rw,uid=1000"], exe)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == ["mount", "s3://b", "/m", "-o", "uid=1000"]


def test_no_options_and_bare_bucket_source(recorder) -> None:
    exe, out = recorder
    r = run_helper(MOUNT_HELPER, ["bucket/prefix", "/m", "-o", "defaults"], exe)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == ["mount", "s3://bucket/prefix", "/m"]


def test_sloppy_drops_unknown_options(recorder) -> None:
    exe, out = recorder
    r = run_helper(MOUNT_HELPER, ["s3://b", "/m", "-s", "-o", "bogus=1,warm=blocking"], exe)
    assert json.loads(out.read_text()) == ["mount", "s3://b", "/m", "-o", "warm=blocking"]
    r = run_helper(MOUNT_HELPER, ["s3://b", "/m", "-o", "bogus=1"], exe)
    assert json.loads(out.read_text())[-1] == "bogus=1"  # without -s caiosfs gets to refuse it
    assert r.returncode == 0


def test_options_are_not_glob_expanded(recorder, tmp_path: Path) -> None:
    exe, out = recorder
    (tmp_path / "aaa").mkdir()
    r = run_helper(MOUNT_HELPER, ["s3://b", "/m", "-o", f"cache_dir={tmp_path}/a*"], exe)
    assert r.returncode == 0
    assert json.loads(out.read_text())[-1] == f"cache_dir={tmp_path}/a*"


def test_fake_mode_does_not_run_caiosfs(recorder) -> None:
    exe, out = recorder
    r = run_helper(MOUNT_HELPER, ["s3://b", "/m", "-fv", "-o", "ro"], exe)
    assert r.returncode == 0
    assert not out.exists()
    assert "mount s3://b /m -o ro" in r.stderr


def test_usage_errors_and_missing_binary(tmp_path: Path) -> None:
    assert run_helper(MOUNT_HELPER, ["s3://b"], None).returncode == 1
    assert run_helper(MOUNT_HELPER, ["gs://b", "/m"], None).returncode == 1
    r = run_helper(MOUNT_HELPER, ["s3://b", "/m"], None)
    assert r.returncode == 1 and "caiosfs not found" in r.stderr


def test_finds_caiosfs_next_to_itself(tmp_path: Path, recorder) -> None:
    exe, out = recorder
    helper = tmp_path / "mount.caiosfs"
    shutil.copy(MOUNT_HELPER, helper)
    assert exe.parent == helper.parent
    r = run_helper(helper, ["s3://b", "/m"], None)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == ["mount", "s3://b", "/m"]


def test_installed_path_is_used(tmp_path: Path, recorder) -> None:
    exe, out = recorder
    helper = tmp_path / "sbin" / "mount.caiosfs"
    helper.parent.mkdir()
    text = MOUNT_HELPER.read_text().replace('INSTALLED_CAIOSFS_BIN=""',
                                            f'INSTALLED_CAIOSFS_BIN="{exe}"', 1)
    helper.write_text(text)
    r = run_helper(helper, ["s3://b", "/m"], None)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == ["mount", "s3://b", "/m"]


def test_umount_helper_drains_via_caiosfs(recorder) -> None:
    exe, out = recorder
    r = run_helper(UMOUNT_HELPER, ["/mnt/data", "-n", "-t", "fuse.caiosfs"], exe,
                   env={"CAIOSFS_UMOUNT_TIMEOUT": "600"})
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == ["umount", "/mnt/data", "--timeout", "600"]


def test_umount_helper_refuses_without_caiosfs() -> None:
    r = run_helper(UMOUNT_HELPER, ["/mnt/data"], None)
    assert r.returncode == 1 and "refusing" in r.stderr


# -- mount(8) / umount(8) end to end ----------------------------------------------------------


def _system_ok() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "needs /dev/fuse and fusermount3"
    if not shutil.which("unshare"):
        return "needs unshare"
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError:
        return "needs pyfuse3 and trio"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                       capture_output=True, timeout=10, check=False)
    if r.returncode != 0:
        return "cannot create a mount namespace"
    return None


needs_system = pytest.mark.skipif(_system_ok() is not None, reason=str(_system_ok()))


def _run_in_namespace(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run `body` (sh) in a private mount namespace with the helpers in /usr/sbin."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    exe = fake / "caiosfs"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_FUSE}" "$@"\n')
    exe.chmod(0o755)
    calls = tmp_path / "calls"
    calls.mkdir()
    sbin = os.path.realpath("/sbin")
    script = tmp_path / "run.sh"
    script.write_text(textwrap.dedent(f"""\
        set -eu
        T={tmp_path}
        mkdir -p $T/ovl
        mount -t tmpfs none $T/ovl
        mkdir -p $T/ovl/upper $T/ovl/work
        cp {MOUNT_HELPER} $T/ovl/upper/mount.caiosfs
        cp {UMOUNT_HELPER} $T/ovl/upper/umount.fuse.caiosfs
        mount -t overlay overlay -o lowerdir={sbin},upperdir=$T/ovl/upper,workdir=$T/ovl/work {sbin}
        mkdir -p $T/mnt
        """) + textwrap.dedent(body))
    env = dict(os.environ, CAIOSFS_BIN=str(exe), FAKE_CAIOSFS_DIR=str(calls))
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(script)],
                              env=env, capture_output=True, text=True, timeout=60,
                              check=False)
    finally:
        # A daemon left behind by a failed run would keep its namespace alive.
        pids = calls / "daemons"
        if pids.exists():
            for pid in pids.read_text().split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass


def _calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls" / "calls.jsonl"
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()]


@needs_system
def test_mount_t_caiosfs_and_umount_drains(tmp_path: Path) -> None:
    r = _run_in_namespace(tmp_path, """\
        mount -t caiosfs s3://bucket/prefix $T/mnt -o noatime,cache_dir=/nvme/c,ro
        findmnt -n -o FSTYPE,SOURCE,OPTIONS $T/mnt
        cat $T/mnt/hello
        umount $T/mnt
        if mountpoint -q $T/mnt; then echo STILL-MOUNTED; fi
        """)
    assert r.returncode == 0, r.stderr
    fstype, source, options = r.stdout.splitlines()[0].split()
    assert (fstype, source) == ("fuse.caiosfs", "s3://bucket/prefix")
    assert options.split(",")[0] == "ro"
    assert "hello from fake caiosfs" in r.stdout and "STILL-MOUNTED" not in r.stdout
    mnt = str(tmp_path / "mnt")
    assert _calls(tmp_path) == [
        ["mount", "s3://bucket/prefix", mnt, "-o", "cache_dir=/nvme/c,ro"],
        ["umount", mnt],  # umount(8) went through umount.fuse.caiosfs
    ]


@needs_system
def test_fstab_entry_with_T(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    mnt = tmp_path / "mnt"
    fstab.write_text(
        "# test fstab\n"
        f"s3://bucket/data {mnt} caiosfs "
        "_netdev,nofail,x-systemd.requires=network-online.target,cache_size=1G 0 0\n"
        f"s3://bucket/other {tmp_path}/never caiosfs noauto,cache_size=1G 0 0\n"
    )
    r = _run_in_namespace(tmp_path, f"""\
        mount -T {fstab} $T/mnt
        cat $T/mnt/hello
        umount $T/mnt
        mount -T {fstab} -a
        findmnt -n -o SOURCE $T/mnt
        umount $T/mnt
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "s3://bucket/data"
    calls = _calls(tmp_path)
    mount_call = ["mount", "s3://bucket/data", str(mnt), "-o", "cache_size=1G"]
    assert calls == [mount_call, ["umount", str(mnt)], mount_call, ["umount", str(mnt)]]
