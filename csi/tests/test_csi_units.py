"""Unit tests of the plugin's pure parts: options, credentials, mountinfo parsing, redaction, state."""

from __future__ import annotations

import os

import pytest
from csi_testlib import CSI_DIR, csi_pb2

assert CSI_DIR  # importing csi_testlib put csi/ on sys.path: caiosfs_csi is importable now

from caiosfs_csi.credentials import credentials_ini
from caiosfs_csi.mounter import MountEntry, is_caiosfs, parse_mountinfo
from caiosfs_csi.options import OptionError, build_mount_spec, split_flags
from caiosfs_csi.redact import STRIPPED, redact, redacted
from caiosfs_csi.server import socket_path
from caiosfs_csi.state import Publication, StateStore


def test_spec_source_and_sorted_options() -> None:
    spec = build_mount_spec({"bucketName": "b", "prefix": "/a/b/", "cache-size": "10G",
                             "Profile": "devbox"})
    assert spec.source == "s3://b/a/b"
    assert spec.option_list() == ["allow_other", "cache_size=10G", "profile=devbox"]
    assert build_mount_spec({"bucket": "b"}).source == "s3://b"


def test_mount_options_attribute_and_flags_merge() -> None:
    spec = build_mount_spec({"bucket": "b", "mountOptions": "entry_ttl=5,list_ttl=inf"},
                            ["negative_ttl=1", "uid=1000,gid=1000", "defaults"],
                            default_allow_other=False)
    assert spec.options == {"entry_ttl": "5", "list_ttl": "inf", "negative_ttl": "1",
                            "uid": "1000", "gid": "1000"}


@pytest.mark.parametrize("attr, value, option", [
    ("dirAhead", "0", "dirahead"), ("dirAttrs", "1", "dirattrs"),
    ("lookupMisses", "listing", "lookup_misses"), ("unlink", "batch", "unlink"),
])
def test_camel_case_attributes_reach_their_option(attr: str, value: str, option: str) -> None:
    """A volume attribute documented in camelCase becomes its -o option (an attribute the
    table does not map is refused as unknown)."""
    assert build_mount_spec({"bucket": "b", attr: value}).options[option] == value


def test_allow_other_can_be_disabled() -> None:
    assert "allow_other" not in build_mount_spec({"bucket": "b", "allowOther": "false"}).options


@pytest.mark.parametrize(
    "ctx, flags",
    [
        ({"bucket": "b", "prefix": "a//b"}, []),
        ({"bucket": "b", "prefix": "a/../b"}, []),
        ({"bucket": "b", "prefix": "a,b"}, []),
        ({"bucket": "b/c"}, []),
        ({"bucket": "b", "cacheSize": "lots"}, []),
        ({"bucket": "b", "uid": "-1"}, []),
        ({"bucket": "b", "fileMode": "0999"}, []),
        ({"bucket": "b", "endpoint": "ftp://x"}, []),
        ({"bucket": "b", "readOnly": "maybe"}, []),
        ({"bucket": "b", "mountOptions": "cache_dir=/"}, []),
        ({"bucket": "b"}, ["metrics=0.0.0.0:9100"]),
        ({"bucket": "b"}, ["profile"]),
        ({"bucket": "b"}, ["path_style=1"]),
        ({"bucket": "b"}, ["warm=eventually"]),
    ],
)
def test_invalid_specs(ctx: dict, flags: list) -> None:
    with pytest.raises(OptionError):
        build_mount_spec(ctx, flags)


def test_pod_info_attributes_ignored() -> None:
    spec = build_mount_spec({"bucket": "b", "csi.storage.k8s.io/pod.name": "p",
                             "csi.storage.k8s.io/serviceAccount.tokens": "{...}"})
    assert spec.option_list() == ["allow_other"]


def test_split_flags() -> None:
    assert split_flags(["a,b=c", " d ", ""]) == [("a", None), ("b", "c"), ("d", None)]


def test_credentials_ini_accepts_aws_style_keys() -> None:
    text = credentials_ini({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S",
                            "AWS_SESSION_TOKEN": "T"})
    assert text == ("[default]\naws_access_key_id = A\naws_secret_access_key = S\n"
                    "aws_session_token = T\n")
    assert credentials_ini({}) is None


@pytest.mark.parametrize("secrets", [{"foo": "bar"}, {"accessKeyId": "A"},
                                     {"accessKeyId": "A", "secretAccessKey": "S\n[evil]"}])
def test_credentials_ini_rejects(secrets: dict) -> None:
    with pytest.raises(OptionError) as exc:
        credentials_ini(secrets)
    assert "bar" not in str(exc.value) and "evil" not in str(exc.value)  # values never echoed


def test_parse_mountinfo_unescapes_and_finds_type() -> None:
    text = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        r"90 22 0:50 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my\040vol/mount "
        r"rw,nosuid,nodev,relatime shared:60 - fuse.caiosfs s3://b/p rw,user_id=0" "\n"
        "91 22 0:51 / /mnt/x rw master:3 - fuse s3://c rw\n"
        "garbage\n"
    )
    entries = parse_mountinfo(text)
    assert [e.mount_point for e in entries] == [
        "/", "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my vol/mount", "/mnt/x"]
    assert [is_caiosfs(e) for e in entries] == [False, True, True]
    assert not is_caiosfs(MountEntry("/m", "fuse.sshfs", "host:/"))


def test_parse_mountinfo_decodes_every_escape_the_kernel_writes() -> None:
    # The kernel escapes blank, tab, newline and backslash; the fake caiosfs writes its mount
    # table with the same escapes (fake_caiosfs.escape), and both must round-trip.
    from fake_caiosfs import escape

    odd = "/pods/a b\tc\\d\ne"
    text = (f"95 22 0:52 / {escape(odd)} rw shared:61 master:1 - fuse.caiosfs "
            r"s3://b/x\040y rw" "\n")
    [entry] = parse_mountinfo(text)
    assert entry.mount_point == odd
    assert entry.source == "s3://b/x y"
    assert entry.device == "0:52"


def test_redact_strips_every_secret_field() -> None:
    req = csi_pb2.NodePublishVolumeRequest(volume_id="v", secrets={"k": "v1", "k2": "v2"},
                                           volume_context={"bucket": "b"})
    text = redact(req)
    assert "v1" not in text and "v2" not in text and STRIPPED in text and '"b"' in text
    assert req.secrets["k"] == "v1"  # the original is untouched
    # Nested messages: CreateVolumeRequest has secrets too, and is redacted by the same walk.
    cv = redacted(csi_pb2.CreateVolumeRequest(name="n", secrets={"a": "b"}))
    assert dict(cv.secrets) == {"a": STRIPPED}


def test_socket_path() -> None:
    assert socket_path("unix:///csi/csi.sock") == "/csi/csi.sock"
    assert socket_path("unix:/csi/csi.sock") == "/csi/csi.sock"
    assert socket_path("/csi/csi.sock") == "/csi/csi.sock"
    for bad in ("tcp://1.2.3.4:5", "unix://relative"):
        with pytest.raises(ValueError):
            socket_path(bad)


def test_state_store_roundtrip_and_modes(tmp_path) -> None:
    store = StateStore(tmp_path / "s")
    pub = Publication(target_path="/t/x", volume_id="v", fingerprint="f", source="s3://b",
                      options=["ro"])
    store.save(pub)
    assert store.load("/t/x") == pub and store.load("/t/x/") == pub
    path = store.write_creds("/t/x", "[default]\n")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(store.creds).st_mode & 0o777 == 0o700
    (store.targets / "junk.json").write_text("{not json")
    assert store.all() == [pub]
    store.delete("/t/x")
    assert store.load("/t/x") is None and not path.exists()
