"""The CSI node plugin driven over gRPC on a unix socket, with a fake caiosfs (csi-sanity-like)."""

from __future__ import annotations

import errno
import logging
import os
import threading

import grpc
import pytest

# csi_testlib is also a pytest plugin (below): let pytest rewrite its asserts on first import.
pytest.register_assert_rewrite("csi_testlib")

from csi_testlib import (
    DEFAULT_DRIVER_NAME,
    Mounter,
    Plugin,
    __version__,
    csi_pb2,
    make_mounter,
    mount_cap,
    publish_request,
    start_plugin,
    stop_plugin,
)

# Registers the `plugin` and `fake_caiosfs` fixtures (see csi_testlib on why not conftest.py).
pytest_plugins = ("csi_testlib",)

SECRETS = {"accessKeyId": "AKIDEXAMPLE123", "secretAccessKey": "s3cr3t-Very-Private/Value"}


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call(*args)
    return exc.value.code()


def opts_of(call: dict) -> dict:
    argv = call["argv"]
    out = {}
    for part in argv[argv.index("-o") + 1].split(","):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def unpublish(plugin: Plugin, target: str, volume_id: str = "vol-1"):
    return plugin.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))


# -- Identity -------------------------------------------------------------------------------


def test_plugin_info(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DEFAULT_DRIVER_NAME
    assert info.vendor_version == __version__


def test_plugin_capabilities_node_only(plugin: Plugin) -> None:
    caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    kinds = [c.service.type for c in caps.capabilities]
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE not in kinds


def test_probe_ready(plugin: Plugin) -> None:
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_probe_not_ready_without_caiosfs(plugin: Plugin) -> None:
    plugin.mounter.caiosfs_bin = "/nonexistent/caiosfs"
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False


def test_node_capabilities_and_info(plugin: Plugin) -> None:
    caps = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    rpcs = {c.rpc.type for c in caps.capabilities}
    rpc = csi_pb2.NodeServiceCapability.RPC
    assert rpc.VOLUME_MOUNT_GROUP in rpcs
    assert rpc.STAGE_UNSTAGE_VOLUME not in rpcs  # we publish directly; no staging
    assert plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "node-1"


def test_stage_is_unimplemented(plugin: Plugin) -> None:
    req = csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x")
    assert code_of(plugin.node.NodeStageVolume, req) == grpc.StatusCode.UNIMPLEMENTED


# -- Required fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: r.ClearField("volume_id"), id="no-volume-id"),
        pytest.param(lambda r: r.ClearField("target_path"), id="no-target"),
        pytest.param(lambda r: setattr(r, "target_path", "relative/path"), id="relative-target"),
        pytest.param(lambda r: r.ClearField("volume_capability"), id="no-capability"),
        pytest.param(lambda r: r.volume_capability.ClearField("access_mode"), id="no-mode"),
        pytest.param(lambda r: r.volume_capability.block.SetInParent(), id="block"),
        pytest.param(lambda r: r.volume_context.pop("bucket"), id="no-bucket"),
        pytest.param(lambda r: r.volume_context.update(bukket="x"), id="unknown-attribute"),
        pytest.param(lambda r: r.volume_context.update(endpoint="http://h,credentials_file=/x"),
                     id="comma-injection"),
        pytest.param(lambda r: r.volume_capability.mount.mount_flags.append(
            "credentials_file=/etc/shadow"), id="plugin-owned-flag"),
        pytest.param(lambda r: r.volume_capability.mount.mount_flags.append("bogus"),
                     id="unknown-flag"),
        pytest.param(lambda r: r.volume_context.update(profile="fast"), id="bad-profile"),
        pytest.param(lambda r: r.secrets.update(accessKeyId="only-half"), id="half-secret"),
        pytest.param(lambda r: setattr(r.volume_capability.mount, "fs_type", "ext4"),
                     id="fs-type"),
    ],
)
def test_publish_invalid_argument(plugin: Plugin, mutate) -> None:
    req = publish_request(plugin.target())
    mutate(req)
    assert code_of(plugin.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.fake.calls("mount") == []
    assert not os.path.exists(plugin.target())


@pytest.mark.parametrize("field", ["volume_id", "target_path"])
def test_unpublish_required_fields(plugin: Plugin, field: str) -> None:
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path=plugin.target())
    req.ClearField(field)
    assert code_of(plugin.node.NodeUnpublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT


# -- Publish --------------------------------------------------------------------------------


def test_publish_runs_caiosfs_with_options_and_creds_file(plugin: Plugin) -> None:
    target = plugin.target()
    ctx = {"bucket": "data", "prefix": "/team/a/", "endpoint": "caios", "cacheSize": "20G",
           "profile": "dataset", "warm": "background", "pathStyle": "true",
           "csi.storage.k8s.io/pod.name": "trainer-0",
           "csi.storage.k8s.io/ephemeral": "false"}
    cap = mount_cap(flags=["read_ahead_kb=2048", "noatime,_netdev"])
    plugin.node.NodePublishVolume(publish_request(target, context=ctx, secrets=SECRETS, cap=cap))

    (call,) = plugin.fake.calls("mount")
    argv = call["argv"]
    assert argv[:3] == ["mount", "s3://data/team/a", target]
    opts = opts_of(call)
    assert opts["endpoint"] == "caios" and opts["cache_size"] == "20G"
    assert opts["profile"] == "dataset" and opts["warm"] == "background"
    assert opts["read_ahead_kb"] == "2048"
    assert "path_style" in opts and "allow_other" in opts and "ro" not in opts
    assert "noatime" not in opts and "_netdev" not in opts
    assert opts["cache_dir"].startswith(str(plugin.cache_root) + "/data-")
    # Secrets reach caiosfs only through a 0600 file, never argv or the environment.
    assert call["creds_mode"] == 0o600
    assert "aws_access_key_id = AKIDEXAMPLE123" in call["creds"]
    assert "aws_secret_access_key = s3cr3t-Very-Private/Value" in call["creds"]
    assert not any(SECRETS["secretAccessKey"] in a for a in argv)
    assert "AWS_SECRET_ACCESS_KEY" not in call["env"]
    assert target in plugin.fake.mounted()
    assert os.path.isdir(target)


def test_publish_without_secrets_uses_plugin_environment(plugin: Plugin,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "node-identity")
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    (call,) = plugin.fake.calls("mount")
    assert "credentials_file" not in opts_of(call)
    assert call["env"].get("AWS_ACCESS_KEY_ID") == "node-identity"


def test_secrets_strip_plugin_credential_env(plugin: Plugin,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "node-identity")
    monkeypatch.setenv("AWS_PROFILE", "node")
    plugin.node.NodePublishVolume(publish_request(plugin.target(), secrets=SECRETS))
    (call,) = plugin.fake.calls("mount")
    assert "AWS_ACCESS_KEY_ID" not in call["env"] and "AWS_PROFILE" not in call["env"]


@pytest.mark.parametrize(
    "how",
    ["request", "attribute", "flag", "reader-mode"],
)
def test_publish_readonly(plugin: Plugin, how: str) -> None:
    kwargs: dict = {}
    if how == "request":
        kwargs["readonly"] = True
    elif how == "attribute":
        kwargs["context"] = {"bucket": "data", "readOnly": "true"}
    elif how == "flag":
        kwargs["cap"] = mount_cap(flags=["ro"])
    else:
        kwargs["cap"] = mount_cap(mode="MULTI_NODE_READER_ONLY")
    plugin.node.NodePublishVolume(publish_request(plugin.target(), **kwargs))
    (call,) = plugin.fake.calls("mount")
    assert "ro" in opts_of(call)


def test_readonly_request_beats_readwrite_attribute(plugin: Plugin) -> None:
    req = publish_request(plugin.target(), readonly=True,
                          context={"bucket": "data", "readOnly": "false"})
    plugin.node.NodePublishVolume(req)
    assert "ro" in opts_of(plugin.fake.calls("mount")[0])


def test_volume_mount_group_maps_to_gid(plugin: Plugin) -> None:
    plugin.node.NodePublishVolume(publish_request(plugin.target(), cap=mount_cap(group="2000")))
    opts = opts_of(plugin.fake.calls("mount")[0])
    assert opts["gid"] == "2000" and opts["file_mode"] == "0664" and opts["dir_mode"] == "0775"


def test_publish_twice_is_idempotent(plugin: Plugin) -> None:
    target = plugin.target()
    req = publish_request(target, secrets=SECRETS)
    plugin.node.NodePublishVolume(req)
    plugin.node.NodePublishVolume(req)
    assert len(plugin.fake.calls("mount")) == 1
    assert plugin.fake.mounted() == [target]


def test_republish_with_rotated_secret_replaces_creds_file(plugin: Plugin) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target, secrets=SECRETS))
    creds_file = opts_of(plugin.fake.calls("mount")[0])["credentials_file"]
    rotated = dict(SECRETS, secretAccessKey="rotated-value")
    plugin.node.NodePublishVolume(publish_request(target, secrets=rotated))
    assert len(plugin.fake.calls("mount")) == 1  # no second mount
    with open(creds_file) as f:
        assert "aws_secret_access_key = rotated-value" in f.read()
    assert os.stat(creds_file).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"context": {"bucket": "data", "prefix": "team/b"}}, id="prefix"),
        pytest.param({"readonly": True}, id="readonly"),
        pytest.param({"volume_id": "vol-2"}, id="volume-id"),
        pytest.param({"cap": mount_cap(mode="SINGLE_NODE_WRITER")}, id="access-mode"),
    ],
)
def test_same_target_different_args_already_exists(plugin: Plugin, change: dict) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    code = code_of(plugin.node.NodePublishVolume, publish_request(target, **change))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert len(plugin.fake.calls("mount")) == 1


def test_foreign_mount_at_target_already_exists(plugin: Plugin) -> None:
    target = plugin.target()
    os.makedirs(target)
    with open(plugin.fake.mountinfo, "a") as f:
        f.write(f"77 1 0:5 / {target} rw - tmpfs tmpfs rw\n")
    code = code_of(plugin.node.NodePublishVolume, publish_request(target))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert plugin.fake.calls("mount") == []


def test_same_volume_two_targets_get_separate_caches(plugin: Plugin) -> None:
    a, b = plugin.target("pod-a"), plugin.target("pod-b")
    plugin.node.NodePublishVolume(publish_request(a))
    plugin.node.NodePublishVolume(publish_request(b))
    ca, cb = (opts_of(c)["cache_dir"] for c in plugin.fake.calls("mount"))
    assert ca != cb and cb == ca + "-1"
    # After pod-a leaves, a new pod of the same data gets the warm first cache back.
    unpublish(plugin, a)
    c = plugin.target("pod-c")
    plugin.node.NodePublishVolume(publish_request(c, volume_id="csi-ephemeral-xyz"))
    assert opts_of(plugin.fake.calls("mount")[-1])["cache_dir"] == ca


def test_mount_failure_is_reported_and_cleaned_up(plugin: Plugin,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CAIOSFS_FAIL_MOUNT", "caiosfs: error: bucket 'data' does not exist")
    target = plugin.target()
    with pytest.raises(grpc.RpcError) as exc:
        plugin.node.NodePublishVolume(publish_request(target, secrets=SECRETS))
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "bucket 'data' does not exist" in exc.value.details()
    assert not os.path.exists(target)
    assert plugin.service.store.all() == []
    assert list(plugin.service.store.creds.iterdir()) == []


def test_concurrent_publish_same_target_aborted(plugin: Plugin,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CAIOSFS_MOUNT_DELAY", "1.5")
    target = plugin.target()
    results: list = []

    def call() -> None:
        try:
            plugin.node.NodePublishVolume(publish_request(target))
            results.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            results.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(r.name for r in results) == ["ABORTED", "ABORTED", "OK"]
    assert len(plugin.fake.calls("mount")) == 1
    # Once the first call finished, a retry succeeds idempotently.
    plugin.node.NodePublishVolume(publish_request(target))


def test_concurrent_publish_different_targets_both_succeed(
        plugin: Plugin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CAIOSFS_MOUNT_DELAY", "0.5")
    targets = [plugin.target(f"pod-{i}") for i in range(3)]
    errors: list = []

    def call(t: str) -> None:
        try:
            plugin.node.NodePublishVolume(publish_request(t))
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    caches = {opts_of(c)["cache_dir"] for c in plugin.fake.calls("mount")}
    assert len(caches) == 3  # allocation is serialised: no two daemons share a cache


# -- Unpublish ------------------------------------------------------------------------------


def test_unpublish_drains_unmounts_and_removes(plugin: Plugin) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target, secrets=SECRETS))
    unpublish(plugin, target)
    (call,) = plugin.fake.calls("umount")
    assert call["argv"][:2] == ["umount", target] and "--timeout" in call["argv"]
    assert plugin.fake.mounted() == []
    assert not os.path.exists(target)
    assert plugin.service.store.all() == []
    assert list(plugin.service.store.creds.iterdir()) == []


def test_unpublish_missing_target_ok(plugin: Plugin) -> None:
    target = plugin.target()
    unpublish(plugin, target)
    unpublish(plugin, target)
    assert plugin.fake.calls() == []


def test_unpublish_twice_ok(plugin: Plugin) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    unpublish(plugin, target)
    unpublish(plugin, target)
    assert len(plugin.fake.calls("umount")) == 1


def test_unpublish_failed_drain_keeps_mount(plugin: Plugin,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    monkeypatch.setenv("FAKE_CAIOSFS_FAIL_UMOUNT", "caiosfs: 3 files not yet uploaded: timeout")
    with pytest.raises(grpc.RpcError) as exc:
        unpublish(plugin, target)
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "not yet uploaded" in exc.value.details()
    assert plugin.fake.mounted() == [target]  # never dropped silently
    assert plugin.service.store.load(target) is not None
    monkeypatch.delenv("FAKE_CAIOSFS_FAIL_UMOUNT")
    unpublish(plugin, target)  # the CO's retry succeeds
    assert plugin.fake.mounted() == []


class DeadMounter(Mounter):
    """Reports ENOTCONN for stat of any mounted target, like a FUSE mount whose daemon died."""

    def _stat(self, path: str) -> os.stat_result:
        if self.entries_at(path):
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", path)
        return os.stat(path)


def test_unpublish_dead_mount_detaches_lazily(plugin: Plugin) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    stop_plugin(plugin)
    start_plugin(plugin, make_mounter(plugin.fake, DeadMounter))
    unpublish(plugin, target)
    assert [c["argv"][0] for c in plugin.fake.calls("lazy-umount")] == ["lazy-umount"]
    assert plugin.fake.mounted() == [] and not os.path.exists(target)
    # The dead daemon's journal is uploaded before unpublish answers: its cache dir is
    # mounted once more at a private mountpoint and unmounted (which drains).
    first, drain = plugin.fake.calls("mount")
    assert opts_of(drain)["cache_dir"] == opts_of(first)["cache_dir"]
    assert drain["argv"][2].startswith(str(plugin.state_dir / "orphans"))
    assert [c["argv"][1] for c in plugin.fake.calls("umount")] == [drain["argv"][2]]


def test_publish_over_dead_mount_remounts(plugin: Plugin) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    stop_plugin(plugin)
    start_plugin(plugin, make_mounter(plugin.fake, DeadMounter))
    plugin.node.NodePublishVolume(publish_request(target))
    assert len(plugin.fake.calls("lazy-umount")) == 1
    assert len(plugin.fake.calls("mount")) == 2
    assert plugin.fake.mounted() == [target]


def test_default_cache_size_applies_only_when_the_volume_sets_none(plugin: Plugin) -> None:
    plugin.service.config.default_cache_size = "300G"
    a, b = plugin.target("pod-a"), plugin.target("pod-b")
    plugin.node.NodePublishVolume(publish_request(a))
    plugin.node.NodePublishVolume(publish_request(
        b, context={"bucket": "data", "prefix": "team/b", "cacheSize": "5G"}))
    first, second = plugin.fake.calls("mount")
    assert opts_of(first)["cache_size"] == "300G"
    assert opts_of(second)["cache_size"] == "5G"


class StartingMounter(Mounter):
    """The mounter still brings up the daemon of a publish that a killed plugin started."""

    def busy(self, target: str) -> bool:
        return True

    def _stat(self, path: str) -> os.stat_result:
        raise AssertionError("stat of a mount whose daemon is starting would block")


def test_mount_still_starting_answers_aborted(plugin: Plugin) -> None:
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target))
    stop_plugin(plugin)
    start_plugin(plugin, make_mounter(plugin.fake, StartingMounter))
    assert code_of(plugin.node.NodePublishVolume, publish_request(target)) == \
        grpc.StatusCode.ABORTED
    assert code_of(unpublish, plugin, target) == grpc.StatusCode.ABORTED
    assert plugin.fake.mounted() == [target]  # nothing touched


# -- Restart --------------------------------------------------------------------------------


def test_restarted_plugin_knows_its_targets(plugin: Plugin) -> None:
    target = plugin.target()
    req = publish_request(target, secrets=SECRETS)
    plugin.node.NodePublishVolume(req)
    stop_plugin(plugin)
    start_plugin(plugin, make_mounter(plugin.fake))
    plugin.node.NodePublishVolume(req)  # idempotent across the restart: no second mount
    assert len(plugin.fake.calls("mount")) == 1
    code = code_of(plugin.node.NodePublishVolume, publish_request(target, readonly=True))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    unpublish(plugin, target)
    assert plugin.fake.mounted() == []


# -- Logs -----------------------------------------------------------------------------------


def test_secrets_never_logged(plugin: Plugin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    target = plugin.target()
    plugin.node.NodePublishVolume(publish_request(target, secrets=SECRETS))
    bad = publish_request(plugin.target("pod-b"), secrets={"accessKeyId": SECRETS["accessKeyId"]})
    code_of(plugin.node.NodePublishVolume, bad)
    unpublish(plugin, target)
    text = caplog.text
    assert "NodePublishVolume request" in text  # requests are logged...
    assert "***stripped***" in text  # ...with their secrets replaced
    for value in SECRETS.values():
        assert value not in text
