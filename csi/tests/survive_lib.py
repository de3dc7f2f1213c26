"""Shared pieces of the tests where FUSE daemons live in caiosfs-mounter, not in the plugin.

The plugin runs as a container would run it: in its own PID namespace (`unshare --pid
--fork`), so SIGKILL to that namespace's init kills every process of the "container" at once.
caiosfs-mounter runs in the test's own namespace, standing for its separate container.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from csi_testlib import (
    CSI_DIR,
    csi_pb2,
    csi_pb2_grpc,
    new_bucket,
    seaweed_with_auth,
    secrets_of,
    wait_serving,
)

assert CSI_DIR  # csi_testlib put csi/ on sys.path

from caiosfs_csi import fdpass
from caiosfs_csi.mounter import find_caiosfs, parse_mountinfo

FIGURES = CSI_DIR.parent / "tests" / "figures"


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root for FUSE mounts"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    for tool in ("unshare", "fusermount3"):
        if not shutil.which(tool):
            return f"needs {tool}"
    return None


def wait_for(pred, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class MounterProc:
    """caiosfs-mounter as a process; its stdout (the daemons' logs) goes to a file."""

    def __init__(self, root: Path, caiosfs_bin: str, extra: tuple[str, ...] = ()) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="mnt-", dir="/tmp")
        self.socket = f"{self.sockdir}/mounter.sock"
        self.log = root / "mounter.log"
        self.argv = [sys.executable, "-m", "caiosfs_csi.mounterd", "--socket", self.socket,
                     "--caiosfs-bin", caiosfs_bin, *extra]
        self.start()

    def start(self) -> None:
        """Start (or, after it exited, restart) the mounter on the same socket."""
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        env = dict(os.environ, PYTHONPATH=str(CSI_DIR), PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.socket), 30, "the mounter socket")

    def daemons(self) -> dict[str, dict]:
        reply = fdpass.call(self.socket, {"cmd": "list"}, timeout=10)
        return {d["target"]: d for d in reply["daemons"]}

    def stop(self) -> None:
        if self.proc.poll() is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)
            return
        for pid in [d["pid"] for d in self.daemons().values()] if self.proc.poll() is None \
                else []:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)


class NsPlugin:
    """The plugin in a PID namespace of its own: a container as far as processes go."""

    def __init__(self, root: Path, caiosfs_bin: str, mounter_socket: str) -> None:
        self.root = root
        self.caiosfs_bin = caiosfs_bin
        self.mounter_socket = mounter_socket
        self.sockdir = tempfile.mkdtemp(prefix="csi-", dir="/tmp")
        self.endpoint = f"unix://{self.sockdir}/csi.sock"
        self.log = root / "plugin.log"
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.node: Any = None
        self.started = 0.0
        self.extra: list[str] = []

    def start(self) -> float:
        """Start the plugin; return seconds until it answers gRPC."""
        env = dict(os.environ, PYTHONPATH=str(CSI_DIR))
        self.started = time.monotonic()
        with open(self.log, "ab") as log:
            log.write(f"---- plugin start {uuid.uuid4().hex[:6]}\n".encode())
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", sys.executable, "-m", "caiosfs_csi",
                 "--endpoint", self.endpoint, "--state-dir", str(self.root / "state"),
                 "--cache-root", str(self.root / "cache"), "--caiosfs-bin", self.caiosfs_bin,
                 "--mounter-socket", self.mounter_socket, "--node-id", "n1",
                 "--mount-timeout", "60", "--umount-timeout", "60", *self.extra],
                env=env, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(self.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        wait_serving(csi_pb2_grpc.IdentityStub(self.channel))
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        return time.monotonic() - self.started

    def init_pid(self) -> int:
        """PID (in our namespace) of the namespace's init: unshare's only child."""
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return int(wait_for(lambda: path.read_text().split(), 10, "the namespace init")[0])

    def kill_namespace(self) -> None:
        """SIGKILL the namespace's init: the kernel kills everything else in it."""
        init = self.init_pid()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        os.kill(init, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.kill_namespace()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def mounts_under(root: Path) -> list[str]:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [m.mount_point for m in mounts if m.mount_point.startswith(str(root))]


def detach_all(root: Path) -> None:
    for mp in reversed(mounts_under(root)):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


@pytest.fixture(scope="module")
def sv_caiosfs_bin() -> str:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    return find_caiosfs()


@pytest.fixture(scope="module")
def sv_store(sv_caiosfs_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with seaweed_with_auth(tmp_path_factory, "csi-survive") as server:
        yield server


@pytest.fixture
def sv_bucket(sv_store: Any) -> str:
    return new_bucket(sv_store, "surv")


@pytest.fixture
def sv_secrets(sv_store: Any) -> dict[str, str]:
    return secrets_of(sv_store)


@pytest.fixture
def sv_node(tmp_path: Path, sv_caiosfs_bin: str) -> Iterator[tuple[MounterProc, NsPlugin]]:
    """A node: caiosfs-mounter (--stop-daemons, as deployed) plus the plugin in its own PID
    namespace (not started)."""
    mounter = MounterProc(tmp_path, sv_caiosfs_bin, ("--stop-daemons", "--stop-timeout", "60"))
    plugin = NsPlugin(tmp_path, sv_caiosfs_bin, mounter.socket)
    try:
        yield mounter, plugin
    finally:
        plugin.close()
        mounter.stop()
        detach_all(tmp_path)


def context(store: Any, bucket: str, prefix: str, pod: tuple[str, str] | None = None,
            **extra: str) -> dict[str, str]:
    ctx = {"bucket": bucket, "prefix": prefix, "endpoint": store.endpoint, "pathStyle": "true",
           **extra}
    if pod:  # what kubelet adds with podInfoOnMount
        ctx["csi.storage.k8s.io/pod.namespace"], ctx["csi.storage.k8s.io/pod.name"] = pod
    return ctx


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET http://address/metrics -> {name: [(labels, value)]} (enough for the tests)."""
    import re
    import urllib.request
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert m, f"malformed sample line: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                 m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def unpublish(node: Any, target: str, volume_id: str) -> None:
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id,
                                                                target_path=target))


def target_path(root: Path, pod: str) -> str:
    parent = root / "pods" / pod / "volumes" / "kubernetes.io~csi" / "pv"
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent / "mount")


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Print figures; with CAIOSFS_RECORD_FIGURES=1 also merge them into
    tests/figures/csi_restart.json (README's source), as tests/mounting.py does: a plain run
    leaves the tree as it was. Called after the test's assertions."""
    print(f"\nFIGURES {name}: {json.dumps(figures, sort_keys=True)}")
    if os.environ.get("CAIOSFS_RECORD_FIGURES") != "1":
        return
    path = FIGURES / "csi_restart.json"
    try:
        allf = json.loads(path.read_text())
    except (OSError, ValueError):
        allf = {}
    allf[name] = {**figures, "measured": time.strftime("%Y-%m-%d"),
                  "machine": "2 cores, SeaweedFS on loopback"}
    FIGURES.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(allf, indent=2, sort_keys=True) + "\n")
