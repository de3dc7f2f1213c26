"""The plugin as a real process (`python -m caiosfs_csi`) making real FUSE mounts.

The "caiosfs" here is fake_caiosfs_fuse.py: it daemonizes a tiny pyfuse3 filesystem of type
fuse.caiosfs, so these tests check the process model without an object store: the FUSE daemon
is outside the plugin's session, survives the plugin being killed, and a restarted plugin
(or the --supervise parent restarting its server) finds and unpublishes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_testlib import (
    CSI_DIR,
    csi_pb2,
    csi_pb2_grpc,
    parse_mountinfo,
    publish_request,
    wait_serving,
)

FAKE_FUSE = Path(__file__).resolve().parent / "fake_caiosfs_fuse.py"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "needs /dev/fuse and fusermount3"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "needs pyfuse3"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


class Proc:
    """A plugin process and a client for it."""

    def __init__(self, tmp: Path, sock: str, extra: list[str]) -> None:
        self.tmp, self.sock, self.extra = tmp, sock, extra
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        fake = self.tmp / "caiosfs"
        fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_FUSE}" "$@"\n')
        fake.chmod(0o755)
        env = dict(os.environ, PYTHONPATH=str(CSI_DIR), FAKE_CAIOSFS_DIR=str(self.tmp),
                   **self.env)
        with open(self.tmp / "plugin.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "caiosfs_csi", "--endpoint", f"unix://{self.sock}",
                 "--state-dir", str(self.tmp / "state"), "--caiosfs-bin", str(fake),
                 "--node-id", "n1", *self.extra],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.connect()

    def connect(self) -> None:
        if self.channel is not None:
            self.channel.close()
        # Wait until the plugin accepts connections before gRPC tries: a channel whose first
        # attempts met the killed plugin's stale socket backs off (the restart test once
        # waited out its 30 s while the new plugin had been serving for 0.2 s).
        deadline = time.monotonic() + 30
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(self.sock)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        wait_serving(self.identity)

    def daemons(self) -> list[int]:
        path = self.tmp / "daemons"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def mounts(self) -> list[str]:
        path = self.tmp / "calls.jsonl"
        return [ln for ln in path.read_text().splitlines() if '"mount"' in ln] \
            if path.exists() else []


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    sockdir = tempfile.mkdtemp(prefix="csi-", dir="/tmp")
    p = Proc(tmp_path, f"{sockdir}/csi.sock", [])
    try:
        yield p
    finally:
        if p.channel is not None:
            p.channel.close()
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
            if m.mount_point.startswith(str(tmp_path)):
                subprocess.run(["fusermount3", "-u", "-z", m.mount_point], check=False)
        for pid in p.daemons():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(sockdir, ignore_errors=True)


def _hello(target: str) -> str:
    with open(os.path.join(target, "hello")) as f:
        return f.read()


def _target(tmp: Path) -> str:
    parent = tmp / "pods" / "uid-1" / "volumes"
    parent.mkdir(parents=True)
    return str(parent / "mount")


def test_mount_survives_plugin_kill_and_restart(proc: Proc, tmp_path: Path) -> None:
    proc.start()
    assert proc.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    target = _target(tmp_path)
    req = publish_request(target, context={"bucket": "data", "prefix": "x"})
    proc.node.NodePublishVolume(req)
    assert os.path.ismount(target) and "fake caiosfs" in _hello(target)
    (daemon,) = proc.daemons()
    # Not in the plugin's session or process group: signals to the plugin never reach it.
    assert os.getsid(daemon) != os.getsid(proc.proc.pid)

    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait()
    assert "fake caiosfs" in _hello(target)  # still serving with no plugin at all

    proc.start()
    proc.node.NodePublishVolume(req)  # idempotent: the new plugin knows this target
    assert len(proc.mounts()) == 1
    proc.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=target))
    assert not os.path.exists(target)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=30) == 0


def test_sigterm_during_a_slow_mount_exits_within_grace(proc: Proc, tmp_path: Path) -> None:
    """A stopping plugin does not wait for a call still in flight (a mount that would take
    minutes): kubelet's grace period is 30 s, and the plugin's own is 10 s."""
    proc.env = {"FAKE_CAIOSFS_MOUNT_DELAY": "120"}
    proc.start()
    target = _target(tmp_path)
    errors: list[grpc.RpcError] = []

    def publish() -> None:
        try:
            proc.node.NodePublishVolume(publish_request(target), timeout=150)
        except grpc.RpcError as exc:
            errors.append(exc)

    caller = threading.Thread(target=publish, daemon=True)
    caller.start()
    deadline = time.monotonic() + 30
    while not proc.mounts() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.mounts(), "the plugin never ran caiosfs mount"
    t = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    try:
        assert proc.proc.wait(timeout=25) == 0
    finally:  # the fake `caiosfs mount`, still asleep, is an orphan now
        subprocess.run(["pkill", "-f", target], check=False)
    assert time.monotonic() - t < 25
    caller.join(timeout=10)
    assert errors and not caller.is_alive(), "the call in flight got no answer"


def test_supervisor_restarts_server_and_keeps_mounts(proc: Proc, tmp_path: Path) -> None:
    proc.extra = ["--supervise"]
    proc.start()
    target = _target(tmp_path)
    proc.node.NodePublishVolume(publish_request(target))
    children = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True,
                              text=True, check=False).stdout.split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)  # the gRPC server dies, the container would not
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{children[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)  # until the supervisor has reaped it
    proc.connect()  # waits until the restarted server answers
    assert proc.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    assert "fake caiosfs" in _hello(target)
    proc.node.NodePublishVolume(publish_request(target))
    assert len(proc.mounts()) == 1
    proc.proc.send_signal(signal.SIGTERM)  # stopping the plugin leaves the mount alone
    assert proc.proc.wait(timeout=30) == 0
    assert os.path.ismount(target) and "fake caiosfs" in _hello(target)
