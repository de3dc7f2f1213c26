"""Pod volumes outlive the plugin: the FUSE daemons run in caiosfs-mounter.

Real mounts, real SeaweedFS, the plugin in a PID namespace of its own that is SIGKILLed as a
whole (a container restart, OOM kill or upgrade). The workload must see no error at all, and
everything it wrote must be in the store, by hash, after unpublish.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.register_assert_rewrite("survive_lib")

from csi_testlib import CSI_DIR, mount_cap, publish_request
from survive_lib import (
    MounterProc,
    NsPlugin,
    context,
    detach_all,
    free_port,
    record_figures,
    scrape,
    target_path,
    unpublish,
    wait_for,
)

assert CSI_DIR  # csi_testlib put csi/ on sys.path

from caiosfs_csi import fdpass
from caiosfs_csi.fdmount import mount_fuse
from caiosfs_csi.mounter import parse_mountinfo

pytest_plugins = ("survive_lib",)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Workload:
    """A writer (write, fsync, rename) on one volume, readers on both; bounded by `stop`."""

    def __init__(self, rw: str, ro: str, dataset: dict[str, str]) -> None:
        self.rw, self.ro, self.dataset = rw, ro, dataset
        self.stop = threading.Event()
        self.written: dict[str, str] = {}  # committed name -> sha256
        self.sizes: dict[str, int] = {}
        self.done: list[tuple[float, str]] = []  # (completion time, kind) of every operation
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True)
                        for fn in (self._writer, self._dataset_reader, self._rw_reader)]

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            self.errors.append(f"{fn.__name__}: {errno.errorcode.get(e.errno, e.errno)} {e}")
        except AssertionError as e:
            self.errors.append(f"{fn.__name__}: {e}")

    def _op(self, kind: str) -> None:
        with self._lock:
            self.done.append((time.monotonic(), kind))

    def _writer(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 10_000:
            body = os.urandom(64 << 10) + str(i).encode()
            tmp = os.path.join(self.rw, f".ckpt-{i}.tmp")
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            final = os.path.join(self.rw, f"ckpt-{i:05d}.bin")
            os.rename(tmp, final)
            with self._lock:
                self.written[os.path.basename(final)] = _sha(body)
                self.sizes[os.path.basename(final)] = len(body)
            self._op("commit")
            i += 1

    def _dataset_reader(self) -> None:
        n = 0
        while not self.stop.is_set() and n < 100_000:
            for name, sha in self.dataset.items():
                os.stat(self.ro)
                with open(os.path.join(self.ro, name), "rb") as f:
                    assert _sha(f.read()) == sha, f"{name} read back wrong"
                self._op("read")
                n += 1

    def _rw_reader(self) -> None:
        n = 0
        while not self.stop.is_set() and n < 100_000:
            with self._lock:
                latest = sorted(self.written)[-1:] if self.written else []
                want = self.written[latest[0]] if latest else ""
            if latest:
                with open(os.path.join(self.rw, latest[0]), "rb") as f:
                    assert _sha(f.read()) == want, f"{latest[0]} read back wrong"
                os.listdir(self.rw)
                self._op("read")
            else:
                time.sleep(0.01)
            n += 1

    def ops_between(self, t0: float, t1: float, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for t, k in self.done if t0 <= t <= t1 and kind in (None, k))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "workload thread stuck"


def _publish_two(plugin: NsPlugin, store: Any, bucket: str, secrets: dict,
                 root: Path) -> tuple[Any, Any]:
    rw = publish_request(target_path(root, "writer"), volume_id="vol-work",
                         context=context(store, bucket, "work", ("team-a", "writer-0"),
                                         profile="devbox"),
                         secrets=secrets)
    ro = publish_request(target_path(root, "reader"), volume_id="vol-data",
                         context=context(store, bucket, "data", ("team-b", "reader-0"),
                                         profile="dataset"),
                         secrets=secrets, readonly=True,
                         cap=mount_cap(mode="MULTI_NODE_READER_ONLY"))
    for req in (rw, ro):
        plugin.node.NodePublishVolume(req, timeout=60)
    return rw, ro


def test_killing_the_plugin_namespace_leaves_volumes_serving(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, tmp_path: Path) -> None:
    mounter, plugin = sv_node
    store, bucket, secrets = sv_store, sv_bucket, sv_secrets
    s3 = store.client()
    dataset = {}
    for i in range(4):
        body = os.urandom(512 << 10)
        s3.put_object(Bucket=bucket, Key=f"data/part-{i}", Body=body)
        dataset[f"part-{i}"] = _sha(body)

    metrics = f"127.0.0.1:{free_port()}"
    plugin.extra = ["--metrics-address", metrics]
    plugin.start()
    try:
        rw, ro = _publish_two(plugin, store, bucket, secrets, tmp_path)
    except grpc.RpcError as e:
        raise AssertionError(f"{e.code()}: {e.details()}\n{plugin.log_tail()}") from None
    # The read-only dataset is served from its shared mount (bind-mounted at the target).
    (shared,) = [t for t in mounter.daemons() if t != rw.target_path]
    assert "/shared/" in shared

    work = Workload(rw.target_path, ro.target_path, dataset)
    work.start()
    try:
        wait_for(lambda: len(work.written) >= 3, 30, "the writer's first commits")
        t_kill = time.monotonic()
        plugin.kill_namespace()  # every process of the plugin's "container" is gone
        time.sleep(1.0)  # no plugin at all for a second: the volumes must not notice
        assert work.errors == []
        plugin.start()
        for req in (rw, ro):  # kubelet's periodic republish (requiresRepublish)
            plugin.node.NodePublishVolume(req, timeout=30)
        t_adopted = time.monotonic()
        adopt_log = re.findall(r"adopted (\d+) live volume\(s\) in ([0-9.]+)s",
                               plugin.log.read_text())
        ops_after = len(work.done)
        wait_for(lambda: len(work.done) > ops_after + 10, 30, "operations after adoption")
    finally:
        work.finish()
    assert work.errors == [], work.errors
    ops_during = work.ops_between(t_kill, t_adopted)
    commits_during = work.ops_between(t_kill, t_adopted, "commit")
    assert commits_during > 0, "the writer stalled while the plugin was gone"
    assert adopt_log and adopt_log[-1][0] == "2", plugin.log_tail()
    # The same daemons as before the kill: nothing was remounted.
    assert set(mounter.daemons()) == {rw.target_path, shared}
    _check_node_metrics(metrics, shared)

    for req in (rw, ro):
        unpublish(plugin.node, req.target_path, req.volume_id)
        assert not os.path.exists(req.target_path)
    assert mounter.daemons() == {}
    lost = 0
    for name, sha in work.written.items():
        try:
            body = s3.get_object(Bucket=bucket, Key=f"work/{name}")["Body"].read()
        except s3.exceptions.NoSuchKey:
            body = b""
        if _sha(body) != sha:
            lost += work.sizes[name]
    assert lost == 0
    log = mounter.log.read_text()
    # Daemon logs name their volume (a shared mount: its dataset key, mapped in the plugin log).
    assert "volume=vol-work " in log and "volume=shared:" in log
    assert secrets["secretAccessKey"] not in log + plugin.log.read_text()
    record_figures("plugin_namespace_sigkill", {
        "volumes": 2,
        "files_committed": len(work.written),
        "ops_total": len(work.done),
        "ops_during_restart": ops_during,
        "commits_during_restart": commits_during,
        "restart_seconds": round(t_adopted - t_kill, 2),
        "workload_errors": len(work.errors),
        "bytes_lost": lost,
        "adopt_seconds_in_plugin": float(adopt_log[-1][1]),
        "start_to_republished_seconds": round(t_adopted - plugin.started, 2),
    })


def _check_node_metrics(address: str, shared: str) -> None:
    """The restarted plugin's node endpoint: both volumes with their pods, each daemon's
    own metrics labelled, RSS and CPU of each daemon."""
    m = scrape(address)
    info = {lb["volume_id"]: lb for lb, v in m["caiosfs_csi_volume_info"] if v == 1}
    assert (info["vol-work"]["pod_namespace"], info["vol-work"]["pod_name"]) == \
        ("team-a", "writer-0")
    assert (info["vol-data"]["pod_namespace"], info["vol-data"]["pod_name"]) == \
        ("team-b", "reader-0")
    shared_daemon = info["vol-data"]["daemon"]
    assert shared_daemon.startswith("shared:") and info["vol-work"]["daemon"] == "vol-work"
    # The daemons' own series, read after the workload wrote and read through them.
    out = {lb["daemon"]: (lb, v) for lb, v in m["caiosfs_s3_bytes_out_total"]}
    lb, v = out["vol-work"]
    assert v > 0 and (lb["pod_namespace"], lb["pod_name"]) == ("team-a", "writer-0")
    ins = {lb["daemon"]: v for lb, v in m["caiosfs_s3_bytes_in_total"]}
    assert ins[shared_daemon] >= 4 * (512 << 10)  # the dataset was read through it
    rss = {lb["daemon"]: v for lb, v in m["caiosfs_csi_daemon_rss_bytes"]}
    assert set(rss) == {"vol-work", shared_daemon} and min(rss.values()) > 10 << 20
    assert all(v > 0 for _, v in m["caiosfs_csi_daemon_cpu_seconds_total"])


def test_plugin_killed_during_publish_retry_succeeds(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, tmp_path: Path) -> None:
    mounter, plugin = sv_node
    store, bucket, secrets = sv_store, sv_bucket, sv_secrets
    body = os.urandom(256 << 10)
    store.client().put_object(Bucket=bucket, Key="data/f", Body=body)
    req = publish_request(target_path(tmp_path, "p1"), volume_id="vol-1",
                          context=context(store, bucket, "data"), secrets=secrets)
    target = req.target_path
    plugin.start()
    # kubelet's call; it dies with the plugin, and that is fine.
    call = plugin.node.NodePublishVolume.future(req, timeout=60)
    wait_for(lambda: mounter.daemons().get(target, {}).get("state") == "starting", 30,
             "the daemon to be starting", interval=0.01)
    plugin.kill_namespace()
    with pytest.raises(grpc.RpcError):
        call.result(timeout=30)
    plugin.start()
    codes = []
    deadline = time.monotonic() + 60
    while True:  # kubelet retries with back-off
        try:
            plugin.node.NodePublishVolume(req, timeout=30)
            break
        except grpc.RpcError as e:
            codes.append(e.code())
            assert e.code() == grpc.StatusCode.ABORTED, (e.details(), plugin.log_tail())
            assert time.monotonic() < deadline
            time.sleep(0.2)
    with open(os.path.join(target, "f"), "rb") as f:
        assert _sha(f.read()) == _sha(body)
    mine = [m for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
            if m.mount_point == target]
    assert len(mine) == 1, mine  # one mount, one daemon: the retry adopted the first one
    assert list(mounter.daemons()) == [target]

    # The plugin killed after mount(2) but before handing the descriptor over: the
    # descriptor dies with it, the mount is dead, the retry detaches it and mounts again.
    target2 = target_path(tmp_path, "p2")
    os.makedirs(target2)
    fd = mount_fuse("s3://x/y", target2, readonly=False, allow_other=True)
    os.close(fd)
    with pytest.raises(OSError) as exc:
        os.stat(target2)
    assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    req2 = publish_request(target2, volume_id="vol-2", context=context(store, bucket, "data"),
                           secrets=secrets)
    plugin.node.NodePublishVolume(req2, timeout=60)
    with open(os.path.join(target2, "f"), "rb") as f:
        assert _sha(f.read()) == _sha(body)
    for r in (req, req2):
        unpublish(plugin.node, r.target_path, r.volume_id)
    assert mounter.daemons() == {}


def _status(caiosfs_bin: str, mountpoint: str) -> dict:
    r = subprocess.run([caiosfs_bin, "status", mountpoint, "--json"], capture_output=True,
                       text=True, timeout=30, check=True)
    return json.loads(r.stdout)


def test_four_pods_one_dataset_one_daemon(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, sv_caiosfs_bin: str, tmp_path: Path) -> None:
    """Four read-only publishes of one dataset: one daemon, one cache, S3 bytes ~1x."""
    mounter, plugin = sv_node
    s3 = sv_store.client()
    dataset = {}
    for i in range(4):
        body = os.urandom(8 << 20)
        s3.put_object(Bucket=sv_bucket, Key=f"ds/shard-{i}", Body=body)
        dataset[f"shard-{i}"] = _sha(body)
    size = 4 * (8 << 20)
    plugin.start()
    reqs = [publish_request(target_path(tmp_path, f"pod-{i}"), volume_id=f"inline-{i}",
                            context=context(sv_store, sv_bucket, "ds", profile="dataset"),
                            secrets=sv_secrets, readonly=True,
                            cap=mount_cap(mode="MULTI_NODE_READER_ONLY"))
            for i in range(4)]
    for r in reqs:
        plugin.node.NodePublishVolume(r, timeout=60)
    (shared,) = mounter.daemons()
    errors: list[str] = []

    def read_all(target: str) -> None:
        for name, sha in dataset.items():
            with open(os.path.join(target, name), "rb") as f:
                if _sha(f.read()) != sha:
                    errors.append(f"{target}/{name}")

    threads = [threading.Thread(target=read_all, args=(r.target_path,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    bytes_in = _status(sv_caiosfs_bin, shared)["bytes_in"]
    assert size <= bytes_in < 1.25 * size, bytes_in  # once, not four times
    caches = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    assert len(caches) == 1, caches

    for r in reqs[:3]:
        unpublish(plugin.node, r.target_path, r.volume_id)
        assert not os.path.exists(r.target_path)
    assert list(mounter.daemons()) == [shared]  # the last user keeps it
    read_all(reqs[3].target_path)
    assert errors == []
    unpublish(plugin.node, reqs[3].target_path, reqs[3].volume_id)
    assert mounter.daemons() == {} and not os.path.exists(shared)
    record_figures("four_pods_one_dataset", {
        "pods": 4, "daemons": 1, "dataset_bytes": size, "s3_bytes_in": bytes_in,
        "s3_bytes_ratio": round(bytes_in / size, 3)})


def test_warm_job_fills_the_cache_pod_volumes_read(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, sv_caiosfs_bin: str, tmp_path: Path) -> None:
    """What the documented warm Job runs, then a pod volume of the dataset: nothing is
    fetched again (the warm filled the very cache directory the volume's daemon uses)."""
    mounter, plugin = sv_node
    s3 = sv_store.client()
    dataset = {}
    for i in range(3):
        body = os.urandom(4 << 20)
        s3.put_object(Bucket=sv_bucket, Key=f"train/f{i}", Body=body)
        dataset[f"f{i}"] = _sha(body)
    ctx = context(sv_store, sv_bucket, "/train/", profile="dataset")
    cache_dir = subprocess.run(
        [sys.executable, "-m", "caiosfs_csi.cachedir", "--cache-root", str(tmp_path / "cache"),
         "--bucket", sv_bucket, "--prefix", ctx["prefix"], "--endpoint", ctx["endpoint"]],
        capture_output=True, text=True, check=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(CSI_DIR))).stdout.strip()
    creds = tmp_path / "creds.ini"
    creds.write_text(f"[default]\naws_access_key_id = {sv_secrets['accessKeyId']}\n"
                     f"aws_secret_access_key = {sv_secrets['secretAccessKey']}\n")
    creds.chmod(0o600)
    opts = f"endpoint={sv_store.endpoint},path_style,credentials_file={creds}"
    subprocess.run([sv_caiosfs_bin, "warm", f"s3://{sv_bucket}/train", "--cache-dir", cache_dir,
                    "-q", "-o", opts], check=True, timeout=120, capture_output=True)

    plugin.start()
    req = publish_request(target_path(tmp_path, "trainer"), volume_id="vol-train",
                          context=ctx, secrets=sv_secrets, readonly=True,
                          cap=mount_cap(mode="MULTI_NODE_READER_ONLY"))
    plugin.node.NodePublishVolume(req, timeout=60)
    for name, sha in dataset.items():
        with open(os.path.join(req.target_path, name), "rb") as f:
            assert _sha(f.read()) == sha
    (daemon_path,) = mounter.daemons()
    status = _status(sv_caiosfs_bin, daemon_path)
    assert status["cache_dir"] == cache_dir
    assert status["bytes_in"] == 0, status["bytes_in"]  # every byte came from the warm
    unpublish(plugin.node, req.target_path, req.volume_id)


def test_cache_budget_evicts_the_least_recently_used_idle_dataset(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, sv_caiosfs_bin: str, tmp_path: Path) -> None:
    """--cache-budget: datasets A then B used and unpublished (idle caches), then C needs
    room: A (least recently used) is evicted, B stays cached."""
    from caiosfs_csi.budget import disk_usage
    from caiosfs_csi.cachedir import dataset_cache_dir
    mounter, plugin = sv_node
    s3 = sv_store.client()
    for name in ("a", "b", "c"):
        s3.put_object(Bucket=sv_bucket, Key=f"{name}/blob", Body=os.urandom(8 << 20))

    def use(name: str, check_bytes_in: int | None = None) -> str:
        req = publish_request(target_path(tmp_path, f"pod-{name}"), volume_id=f"vol-{name}",
                              context=context(sv_store, sv_bucket, name, profile="dataset",
                                              cacheSize="20M"),
                              secrets=sv_secrets, readonly=True,
                              cap=mount_cap(mode="MULTI_NODE_READER_ONLY"))
        plugin.node.NodePublishVolume(req, timeout=60)
        with open(os.path.join(req.target_path, "blob"), "rb") as f:
            f.read()
        if check_bytes_in is not None:
            (daemon,) = mounter.daemons()
            got = _status(sv_caiosfs_bin, daemon)["bytes_in"]
            assert got == check_bytes_in, (name, got)
        unpublish(plugin.node, req.target_path, req.volume_id)
        return dataset_cache_dir(str(tmp_path / "cache"), sv_bucket, name, sv_store.endpoint)

    plugin.start()
    dir_a = use("a")
    time.sleep(1.1)  # distinct stamp times
    dir_b = use("b")
    plugin.kill_namespace()
    # A budget that holds C's 20M and B's idle cache but not A's as well.
    budget = (20 << 20) + disk_usage(dir_b) + disk_usage(dir_a) // 2
    plugin.extra = ["--cache-budget", str(budget)]
    plugin.start()
    use("c")
    assert not os.path.exists(dir_a) and os.path.isdir(dir_b)  # A was the older one
    assert "evicted idle cache" in plugin.log.read_text()
    use("b", check_bytes_in=0)  # B is still cached: nothing fetched


def test_warm_blocking_fills_the_volume_cache_before_publish_returns(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, tmp_path: Path) -> None:
    """warm: blocking through the mounter: publish returns with the dataset in the cache the
    volume reads (the daemon's bytes_in on the node's page); reading fetches nothing more.
    (caiosfs_warm_bytes_total is not checked: caiosfs/warm.py never increments it yet.)"""
    _mounter, plugin = sv_node
    s3 = sv_store.client()
    size = 0
    for i in range(3):
        s3.put_object(Bucket=sv_bucket, Key=f"wb/f{i}", Body=os.urandom(3 << 20))
        size += 3 << 20
    metrics = f"127.0.0.1:{free_port()}"
    plugin.extra = ["--metrics-address", metrics]
    plugin.start()
    req = publish_request(target_path(tmp_path, "w"), volume_id="vol-wb",
                          context=context(sv_store, sv_bucket, "wb", ("ml", "train-0"),
                                          profile="dataset", warm="blocking"),
                          secrets=sv_secrets, readonly=True,
                          cap=mount_cap(mode="MULTI_NODE_READER_ONLY"))
    plugin.node.NodePublishVolume(req, timeout=120)

    def counter(page: dict, name: str) -> float:
        (value,) = [v for lb, v in page[name] if lb["daemon"].startswith("shared:")]
        return value
    assert counter(scrape(metrics), "caiosfs_s3_bytes_in_total") == size
    for i in range(3):
        with open(os.path.join(req.target_path, f"f{i}"), "rb") as f:
            assert len(f.read()) == 3 << 20
    assert counter(scrape(metrics), "caiosfs_s3_bytes_in_total") == size  # all from cache
    unpublish(plugin.node, req.target_path, req.volume_id)


def test_orphaned_writes_drain_at_plugin_start(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, tmp_path: Path) -> None:
    """A volume's daemon killed and its target removed while no plugin runs: the next plugin
    uploads the journal at start, without waiting for a later mount of that data."""
    mounter, plugin = sv_node
    plugin.start()
    req = publish_request(target_path(tmp_path, "gone"), volume_id="vol-o",
                          context=context(sv_store, sv_bucket, "o"), secrets=sv_secrets,
                          cap=mount_cap(flags=["upload_delay=600"]))
    target = req.target_path
    plugin.node.NodePublishVolume(req, timeout=60)
    body = os.urandom(700 << 10)
    with open(os.path.join(target, "orphan.bin"), "wb") as f:
        f.write(body)  # journaled; its upload waits 600 s
    plugin.kill_namespace()
    os.kill(mounter.daemons()[target]["pid"], signal.SIGKILL)
    wait_for(lambda: mounter.daemons() == {}, 30, "the daemon to be reaped")
    subprocess.run(["umount", "-l", target], check=True)
    os.rmdir(target)  # the pod is gone
    s3 = sv_store.client()
    assert "Contents" not in s3.list_objects_v2(Bucket=sv_bucket, Prefix="o/")

    t0 = time.monotonic()
    plugin.start()

    def uploaded() -> bytes | None:
        try:
            return s3.get_object(Bucket=sv_bucket, Key="o/orphan.bin")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
    got = wait_for(uploaded, 60, "the orphaned file in the store", interval=0.2)
    assert _sha(got) == _sha(body)
    wait_for(lambda: "journal replayed and uploaded" in plugin.log.read_text(), 30,
             "the plugin to log the drain")
    assert mounter.daemons() == {}
    assert list((tmp_path / "state" / "targets").iterdir()) == []  # the record is dropped
    record_figures("orphan_drain_at_start", {"bytes": len(body),
                                             "seconds_to_durable": round(time.monotonic() - t0, 2)})


def test_stopping_the_mounter_uploads_before_the_daemons_exit(
        sv_node: tuple[MounterProc, NsPlugin], sv_store: Any, sv_bucket: str,
        sv_secrets: dict, tmp_path: Path) -> None:
    """Upgrading the mounter (SIGTERM, as at pod deletion): volumes end, writes do not."""
    mounter, plugin = sv_node
    plugin.start()
    req = publish_request(target_path(tmp_path, "p"), volume_id="vol-w",
                          context=context(sv_store, sv_bucket, "w"), secrets=sv_secrets,
                          cap=mount_cap(flags=["upload_delay=600"]))
    plugin.node.NodePublishVolume(req, timeout=60)
    body = os.urandom(300 << 10)
    with open(os.path.join(req.target_path, "late.bin"), "wb") as f:
        f.write(body)  # would wait 600 s for its upload
    mounter.proc.send_signal(signal.SIGTERM)
    assert mounter.proc.wait(timeout=90) == 0
    got = sv_store.client().get_object(Bucket=sv_bucket, Key="w/late.bin")["Body"].read()
    assert _sha(got) == _sha(body)
    # The volume is over (ENOTCONN). Unpublish detaches it, then must check its journal,
    # which takes a mounter: INTERNAL (kubelet retries) until the DaemonSet restarted it.
    with pytest.raises(grpc.RpcError) as exc:
        unpublish(plugin.node, req.target_path, req.volume_id)
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    mounter.start()
    unpublish(plugin.node, req.target_path, req.volume_id)
    assert not os.path.exists(req.target_path)


def test_daemon_over_its_memory_limit_is_killed_alone(
        sv_caiosfs_bin: str, sv_store: Any, sv_bucket: str, sv_secrets: dict,
        tmp_path: Path) -> None:
    """--daemon-memory-max: a daemon over it is killed (its volume ends or never starts);
    the mounter and its other daemons go on. 25 MiB is less than any daemon needs."""
    mounter = MounterProc(tmp_path, sv_caiosfs_bin, ("--daemon-memory-max", "25M"))
    plugin = NsPlugin(tmp_path, sv_caiosfs_bin, mounter.socket)
    try:
        plugin.start()
        req = publish_request(target_path(tmp_path, "big"), volume_id="vol-big",
                              context=context(sv_store, sv_bucket, "m"), secrets=sv_secrets)
        try:
            plugin.node.NodePublishVolume(req, timeout=60)
            published = True  # ready before the watchdog's next look: killed right after
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INTERNAL, e.details()
            assert "memory limit exceeded" in e.details()
            published = False
        wait_for(lambda: mounter.daemons() == {}, 30, "the daemon to be killed")
        assert "memory limit exceeded: resident" in mounter.log.read_text()
        assert fdpass.call(mounter.socket, {"cmd": "ping"})["memory_kills"] == 1
        if published:
            unpublish(plugin.node, req.target_path, req.volume_id)  # a dead mount: detached
        assert not os.path.exists(req.target_path)
    finally:
        plugin.close()
        mounter.stop()
        detach_all(tmp_path)


def test_mounter_refuses_a_bad_memory_limit(sv_caiosfs_bin: str) -> None:
    r = subprocess.run([sys.executable, "-m", "caiosfs_csi.mounterd", "--socket", "/tmp/x.sock",
                        "--daemon-memory-max", "lots"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(CSI_DIR)), check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == ("caiosfs-mounter: --daemon-memory-max 'lots' is not a size "
                                "such as 2G")


def test_caiosfs_refuses_bad_fd_mounts(sv_caiosfs_bin: str, tmp_path: Path) -> None:
    """`caiosfs mount ... /dev/fd/N`: one line and exit 1 for every misuse, no traceback."""
    def run(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run([sv_caiosfs_bin, "mount", "s3://bkt/p", *args], capture_output=True,
                              text=True, timeout=60, pass_fds=pass_fds, check=False)

    r = run("/dev/fd/97", "--target", str(tmp_path))
    # UserError: exit status 2 (bad usage), one line
    assert r.returncode == 2 and r.stderr.strip() == \
        "caiosfs: /dev/fd/97: file descriptor 97 is not open"
    with open(tmp_path / "plain", "w") as f:
        r = run(f"/dev/fd/{f.fileno()}", "--target", str(tmp_path), pass_fds=(f.fileno(),))
    assert r.returncode == 2 and "is not a /dev/fuse descriptor" in r.stderr
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        r = run(f"/dev/fd/{fd}", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert r.returncode == 2 and "needs --target" in r.stderr
    r = run(str(tmp_path), "--target", "/x")
    assert r.returncode == 2 and "only for a /dev/fd/N mountpoint" in r.stderr
    assert "Traceback" not in r.stderr
