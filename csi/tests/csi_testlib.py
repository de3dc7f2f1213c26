"""Helpers and fixtures for the CSI tests: an in-process plugin on a unix socket, a fake caiosfs.

There is deliberately no csi/tests/conftest.py: the project's tests/conftest.py is imported by
its tests as the top-level module `conftest`, and a second conftest.py without a package
would replace it in sys.modules when both directories are collected in one run. Test modules
import helpers from here, and get the fixtures with `pytest_plugins = ("csi_testlib",)`.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CSI_DIR = Path(__file__).resolve().parents[1]
REPO = CSI_DIR.parent
if str(CSI_DIR) not in sys.path:
    sys.path.insert(0, str(CSI_DIR))

grpc = pytest.importorskip("grpc", reason="the CSI plugin needs the `csi` extra (grpcio)")

from caiosfs_csi import DEFAULT_DRIVER_NAME, __version__  # noqa: F401  (re-exported for tests)
from caiosfs_csi.mounter import Mounter, parse_mountinfo
from caiosfs_csi.server import PluginConfig, build_server
from caiosfs_csi.stubs import load

csi_pb2, csi_pb2_grpc = load()
FAKE = Path(__file__).resolve().parent / "fake_caiosfs.py"


def write_exe(path: Path, text: str) -> Path:
    """Write an executable script."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@dataclass
class FakeCaiosfs:
    """The fake caiosfs command and the files it keeps."""

    dir: Path
    bin: Path
    mountinfo: Path

    def calls(self, cmd: str | None = None) -> list[dict]:
        """Recorded invocations, optionally only those of one subcommand."""
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [c for c in out if cmd is None or (c["argv"] and c["argv"][0] == cmd)]

    def mounted(self) -> list[str]:
        """Mount points currently in the fake mount table."""
        return [m.mount_point for m in parse_mountinfo(self.mountinfo.read_text())]


@pytest.fixture
def fake_caiosfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCaiosfs:
    """A fake `caiosfs` executable with its own call log and mount table."""
    d = tmp_path / "fake"
    d.mkdir()
    table = d / "mountinfo"
    table.write_text("")
    exe = write_exe(d / "caiosfs", f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    monkeypatch.setenv("FAKE_CAIOSFS_DIR", str(d))
    monkeypatch.setenv("FAKE_MOUNTINFO", str(table))
    return FakeCaiosfs(dir=d, bin=exe, mountinfo=table)


@dataclass
class Plugin:
    """A running plugin and gRPC clients connected to it."""

    endpoint: str
    state_dir: Path
    cache_root: Path
    workdir: Path
    fake: FakeCaiosfs
    identity: object = None
    node: object = None
    server: object = None
    service: object = None
    channel: object = None
    mounter: Mounter | None = None
    extra: dict = field(default_factory=dict)

    def target(self, name: str = "pod-a") -> str:
        """A fresh target path whose parent exists, as kubelet guarantees."""
        parent = self.workdir / "pods" / name / "volumes"
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "mount")


def make_mounter(fake: FakeCaiosfs, cls: type[Mounter] = Mounter) -> Mounter:
    """A Mounter that runs the fake caiosfs and reads its fake mount table."""
    return cls(str(fake.bin), mountinfo=str(fake.mountinfo), mount_timeout=20,
               umount_timeout=5, lazy_umount_cmds=[(str(fake.bin), "lazy-umount")])


def start_plugin(plugin: Plugin, mounter: Mounter) -> Plugin:
    """Start (or restart) the gRPC server of `plugin` with `mounter`."""
    config = PluginConfig(endpoint=plugin.endpoint, node_id="node-1",
                          state_dir=str(plugin.state_dir), cache_root=str(plugin.cache_root),
                          max_workers=8)
    server, service = build_server(config, mounter)
    server.start()
    channel = grpc.insecure_channel(plugin.endpoint)
    grpc.channel_ready_future(channel).result(timeout=10)
    plugin.server, plugin.service, plugin.channel, plugin.mounter = server, service, channel, mounter
    plugin.identity = csi_pb2_grpc.IdentityStub(channel)
    plugin.node = csi_pb2_grpc.NodeStub(channel)
    wait_serving(plugin.identity)
    return plugin


def wait_serving(identity, timeout: float = 30.0) -> None:
    """Call Probe until the server answers: a channel can report READY while a server that
    is going away still resets the first stream, and a CO retries such calls the same way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_plugin(plugin: Plugin) -> None:
    """Stop the server (as a plugin restart would); FUSE mounts are left alone."""
    plugin.channel.close()
    plugin.server.stop(grace=None).wait()


@pytest.fixture
def plugin(tmp_path: Path, fake_caiosfs: FakeCaiosfs) -> Iterator[Plugin]:
    """The node plugin serving on a unix socket in a temporary directory."""
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    sockdir = tempfile.mkdtemp(prefix="csi-", dir="/tmp")
    p = Plugin(endpoint=f"unix://{sockdir}/csi.sock", state_dir=tmp_path / "state",
               cache_root=tmp_path / "cache", workdir=tmp_path, fake=fake_caiosfs)
    start_plugin(p, make_mounter(fake_caiosfs))
    try:
        yield p
    finally:
        stop_plugin(p)
        shutil.rmtree(sockdir, ignore_errors=True)


def mount_cap(mode: str = "MULTI_NODE_MULTI_WRITER", flags=(), group: str = ""):
    """A mount VolumeCapability with the given access mode name and mount flags."""
    am = csi_pb2.VolumeCapability.AccessMode
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=list(flags),
                                                   volume_mount_group=group),
        access_mode=am(mode=am.Mode.Value(mode)),
    )


def publish_request(target: str, *, volume_id: str = "vol-1", context=None, secrets=None,
                    readonly: bool = False, cap=None):
    """A NodePublishVolumeRequest with sensible defaults."""
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=target,
        volume_capability=cap if cap is not None else mount_cap(),
        readonly=readonly,
        volume_context=context if context is not None else {"bucket": "data", "prefix": "team/a"},
        secrets=secrets if secrets is not None else {},
    )


# A real S3 server for the tests that run real caiosfs daemons ---------------------------
@contextmanager
def seaweed_with_auth(tmp_path_factory: pytest.TempPathFactory, identity: str) -> Iterator[Any]:
    """A SeaweedFS whose S3 requires signed requests from ``identity`` (a broken import or
    a missing weed binary fails here, it does not skip)."""
    from caiosfs import seaweed
    seaweed.find_weed()  # raises with the reason if the binary is missing
    server = seaweed.SeaweedServer(tmp_path_factory.mktemp("seaweed"), access_key=identity,
                                   secret_key=uuid.uuid4().hex)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_bucket(store: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    store.client().create_bucket(Bucket=name)
    return name


def secrets_of(store: Any) -> dict[str, str]:
    """The node-publish secrets of the server's identity."""
    return {"accessKeyId": store.access_key, "secretAccessKey": store.secret_key}
