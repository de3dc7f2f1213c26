"""Integration tests: the CSI plugin and the mount helpers with the real caiosfs against SeaweedFS.

These need root, /dev/fuse, the `caiosfs` command and the `weed` binary, as the rest of the
suite does; without them they fail (a broken CLI must not turn the only real-caiosfs CSI tests
into skips).
The object store is the project's `seaweed` fixture when it is visible here, or else a
SeaweedFS started for this module with caiosfs.seaweed (the same helper tests/conftest.py uses).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from csi_testlib import (
    CSI_DIR,
    csi_pb2,
    csi_pb2_grpc,
    mount_cap,
    new_bucket,
    publish_request,
    seaweed_with_auth,
    secrets_of,
    wait_serving,
)

assert CSI_DIR  # csi_testlib put csi/ on sys.path

from caiosfs_csi.mounter import Mounter, find_caiosfs, parse_mountinfo  # noqa: I001
from caiosfs_csi.server import PluginConfig, build_server

import grpc

HELPERS = CSI_DIR.parent / "mount-helpers"


def _caiosfs_or_fail() -> str:
    if os.geteuid() != 0:
        pytest.fail("needs root for FUSE mounts")
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.fail("needs /dev/fuse and fusermount3")
    exe = find_caiosfs()
    try:
        r = subprocess.run([exe, "mount", "--help"], capture_output=True, text=True,
                           timeout=60, check=False)
    except OSError as exc:
        pytest.fail(f"the caiosfs command {exe} cannot run: {exc}")
    if r.returncode != 0:
        pytest.fail(f"`{exe} mount --help` exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return exe


@pytest.fixture(scope="module")
def caiosfs_bin() -> str:
    return _caiosfs_or_fail()


@pytest.fixture(scope="module")
def store(request: pytest.FixtureRequest, caiosfs_bin: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running SeaweedFS with S3 auth: the project's fixture if visible, else our own."""
    try:
        yield request.getfixturevalue("seaweed")
        return
    except pytest.FixtureLookupError:
        pass
    with seaweed_with_auth(tmp_path_factory, "csi-test") as server:
        yield server


@pytest.fixture
def bucket(store: Any) -> str:
    return new_bucket(store, "csi")


@pytest.fixture
def secrets(store: Any) -> dict[str, str]:
    return secrets_of(store)


def _context(store: Any, bucket: str, **extra: str) -> dict[str, str]:
    return {"bucket": bucket, "prefix": "team", "endpoint": store.endpoint, "pathStyle": "true",
            **extra}


def _mounts_under(root: Path) -> list[str]:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [m.mount_point for m in mounts if m.mount_point.startswith(str(root))]


def _daemon_pids(target: str) -> list[int]:
    """PIDs of caiosfs processes whose command line names `target`."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if target.encode() in argv and any(b"caiosfs" in a for a in argv[:3]):
            pids.append(int(d.name))
    return pids


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, with every mount under it detached and its daemons killed afterwards."""
    try:
        yield tmp_path
    finally:
        for mp in reversed(_mounts_under(tmp_path)):
            for pid in _daemon_pids(mp):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["fusermount3", "-u", "-z", mp], check=False, capture_output=True)


class InProcessPlugin:
    def __init__(self, root: Path, caiosfs_bin: str) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="csi-", dir="/tmp")
        self.endpoint = f"unix://{self.sockdir}/csi.sock"
        config = PluginConfig(endpoint=self.endpoint, node_id="n1", state_dir=str(root / "state"),
                              cache_root=str(root / "cache"))
        self.server, self.service = build_server(
            config, Mounter(caiosfs_bin, mount_timeout=120, umount_timeout=120))
        self.server.start()
        self.channel = grpc.insecure_channel(self.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None).wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def plugin(workdir: Path, caiosfs_bin: str) -> Iterator[InProcessPlugin]:
    p = InProcessPlugin(workdir, caiosfs_bin)
    try:
        yield p
    finally:
        p.close()


def _target(root: Path, pod: str = "pod-1") -> str:
    parent = root / "pods" / pod / "volumes" / "kubernetes.io~csi" / "data"
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent / "mount")


def _unpublish(node: Any, target: str) -> None:
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1",
                                                                target_path=target))


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_publish_write_unpublish_drains_to_store(plugin: InProcessPlugin, store: Any,
                                                 bucket: str, secrets: dict,
                                                 workdir: Path) -> None:
    target = _target(workdir)
    plugin.node.NodePublishVolume(publish_request(
        target, context=_context(store, bucket, profile="devbox"), secrets=secrets))
    assert os.path.ismount(target)
    # The secret is in a 0600 file only: no process on the node has it on its command line.
    assert not any(secrets["secretAccessKey"].encode() in (d / "cmdline").read_bytes()
                   for d in Path("/proc").iterdir() if d.name.isdigit()
                   and (d / "cmdline").exists())
    payload = os.urandom(3 << 20)
    os.makedirs(os.path.join(target, "src"))
    with open(os.path.join(target, "src", "blob.bin"), "wb") as f:
        f.write(payload)
    with open(os.path.join(target, "notes.txt"), "w") as f:
        f.write("hello\n")

    _unpublish(plugin.node, target)  # drains, unmounts, removes the target

    assert not os.path.exists(target)
    s3 = store.client()
    body = s3.get_object(Bucket=bucket, Key="team/src/blob.bin")["Body"].read()
    assert _sha(body) == _sha(payload)
    assert s3.get_object(Bucket=bucket, Key="team/notes.txt")["Body"].read() == b"hello\n"


def test_readonly_publish(plugin: InProcessPlugin, store: Any, bucket: str, secrets: dict,
                          workdir: Path) -> None:
    payload = os.urandom(1 << 20)
    store.client().put_object(Bucket=bucket, Key="team/data/part-0", Body=payload)
    target = _target(workdir)
    plugin.node.NodePublishVolume(publish_request(
        target, context=_context(store, bucket, profile="dataset"), secrets=secrets,
        readonly=True, cap=mount_cap(mode="MULTI_NODE_READER_ONLY")))
    with open(os.path.join(target, "data", "part-0"), "rb") as f:
        assert _sha(f.read()) == _sha(payload)
    with pytest.raises(OSError) as exc:
        open(os.path.join(target, "new"), "wb").close()
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    _unpublish(plugin.node, target)
    assert not os.path.exists(target)


def test_wrong_credentials_fail_publish_cleanly(plugin: InProcessPlugin, store: Any,
                                                bucket: str, workdir: Path) -> None:
    target = _target(workdir)
    bad = {"accessKeyId": store.access_key, "secretAccessKey": "not-the-secret"}
    with pytest.raises(grpc.RpcError) as exc:
        plugin.node.NodePublishVolume(publish_request(
            target, context=_context(store, bucket), secrets=bad))
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "not-the-secret" not in exc.value.details()
    assert not os.path.exists(target) and _mounts_under(workdir) == []


def test_dead_daemon_is_detached_and_its_journal_replayed(
        plugin: InProcessPlugin, store: Any, bucket: str, secrets: dict, workdir: Path) -> None:
    """Kill -9 the FUSE daemon with un-uploaded data; publish again; nothing is lost.

    Relies on caiosfs journaling writes in cache_dir and replaying them on the next mount of
    the same cache, which the plugin arranges by giving the target the same cache directory.
    """
    target = _target(workdir)
    req = publish_request(target, context=_context(store, bucket),
                          cap=mount_cap(flags=["upload_delay=600"]), secrets=secrets)
    plugin.node.NodePublishVolume(req)
    payload = os.urandom(1 << 20)
    with open(os.path.join(target, "journaled.bin"), "wb") as f:
        f.write(payload)
    pids = _daemon_pids(target)
    assert pids, "cannot find the caiosfs daemon of the mount"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.stat(target)
        except OSError as e:
            assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        time.sleep(0.1)

    plugin.node.NodePublishVolume(req)  # detaches the dead mount, mounts again
    with open(os.path.join(target, "journaled.bin"), "rb") as f:
        assert _sha(f.read()) == _sha(payload)
    _unpublish(plugin.node, target)
    body = store.client().get_object(Bucket=bucket, Key="team/journaled.bin")["Body"].read()
    assert _sha(body) == _sha(payload)


def test_mount_survives_plugin_restart(store: Any, bucket: str, secrets: dict,
                                       workdir: Path, caiosfs_bin: str) -> None:
    sockdir = tempfile.mkdtemp(prefix="csi-", dir="/tmp")
    endpoint = f"unix://{sockdir}/csi.sock"
    env = dict(os.environ, PYTHONPATH=str(CSI_DIR))

    def start() -> tuple[subprocess.Popen, grpc.Channel, Any]:
        with open(workdir / "plugin.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "caiosfs_csi", "--endpoint", endpoint,
                 "--state-dir", str(workdir / "state"), "--cache-root", str(workdir / "cache"),
                 "--caiosfs-bin", caiosfs_bin, "--node-id", "n1"],
                env=env, stdout=subprocess.DEVNULL, stderr=log)
        ch = grpc.insecure_channel(endpoint)
        grpc.channel_ready_future(ch).result(timeout=30)
        wait_serving(csi_pb2_grpc.IdentityStub(ch))
        return proc, ch, csi_pb2_grpc.NodeStub(ch)

    target = _target(workdir)
    req = publish_request(target, context=_context(store, bucket), secrets=secrets)
    proc, ch, node = start()
    try:
        node.NodePublishVolume(req)
        ch.close()
        proc.kill()
        proc.wait()
        with open(os.path.join(target, "after-plugin-death.txt"), "w") as f:
            f.write("still here\n")  # the mount serves with no plugin running
        proc, ch, node = start()
        node.NodePublishVolume(req)  # the restarted plugin recognises its mount
        assert _mounts_under(workdir) == [target]
        _unpublish(node, target)
    except grpc.RpcError as e:
        log = (workdir / "plugin.log").read_text()[-3000:]
        raise AssertionError(f"{e.code()}: {e.details()}\nplugin log:\n{log}") from None
    finally:
        ch.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    body = store.client().get_object(Bucket=bucket, Key="team/after-plugin-death.txt")
    assert body["Body"].read() == b"still here\n"


def test_fstab_mount_and_draining_umount(store: Any, bucket: str, workdir: Path,
                                         caiosfs_bin: str) -> None:
    if not shutil.which("unshare"):
        pytest.fail("needs unshare (util-linux)")
    creds = workdir / "creds"
    creds.write_text(f"[default]\naws_access_key_id = {store.access_key}\n"
                     f"aws_secret_access_key = {store.secret_key}\n")
    creds.chmod(0o600)
    mnt = workdir / "mnt"
    fstab = workdir / "fstab"
    fstab.write_text(
        f"s3://{bucket}/fs {mnt} caiosfs _netdev,nofail,noatime,x-systemd.mount-timeout=30min,"
        f"endpoint={store.endpoint},path_style,credentials_file={creds},"
        f"cache_dir={workdir}/cache 0 0\n")
    sbin = os.path.realpath("/sbin")
    script = workdir / "run.sh"
    script.write_text(textwrap.dedent(f"""\
        set -eu
        T={workdir}
        mkdir -p $T/ovl $T/mnt
        mount -t tmpfs none $T/ovl
        mkdir -p $T/ovl/upper $T/ovl/work
        cp {HELPERS}/mount.caiosfs $T/ovl/upper/mount.caiosfs
        cp {HELPERS}/umount.caiosfs $T/ovl/upper/umount.fuse.caiosfs
        mount -t overlay overlay -o lowerdir={sbin},upperdir=$T/ovl/upper,workdir=$T/ovl/work {sbin}
        mount -T {fstab} -a
        findmnt -n -o FSTYPE $T/mnt
        head -c 2097152 /dev/urandom > $T/payload
        cp $T/payload $T/mnt/payload
        umount $T/mnt
        if mountpoint -q $T/mnt; then echo STILL-MOUNTED; fi
        sha256sum $T/payload
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["CAIOSFS_BIN"] = caiosfs_bin
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(script)],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "fuse.caiosfs" and "STILL-MOUNTED" not in r.stdout
    # umount(8) went through umount.fuse.caiosfs, so the data was in the store before it returned.
    body = store.client().get_object(Bucket=bucket, Key="fs/payload")["Body"].read()
    assert _sha(body) == lines[1]
