"""The deploy manifests and examples parse, agree with the plugin, and use only valid attributes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

CSI = Path(__file__).resolve().parents[1]
if str(CSI) not in sys.path:
    sys.path.insert(0, str(CSI))

from caiosfs_csi import DEFAULT_DRIVER_NAME
from caiosfs_csi.credentials import credentials_ini
from caiosfs_csi.options import build_mount_spec

yaml = pytest.importorskip("yaml", reason="manifest checks need pyyaml")

FILES = sorted([*CSI.glob("deploy/*.yaml"), *CSI.glob("examples/*.yaml")])


def docs(path: Path) -> list[dict]:
    # The devbox example is rendered with envsubst; substitute like it would.
    text = path.read_text().replace("${DEV_USERNAME}", "alice")
    return [d for d in yaml.safe_load_all(text) if d]


ALL = {p.name: docs(p) for p in FILES}


def of_kind(kind: str) -> list[dict]:
    return [d for ds in ALL.values() for d in ds if d.get("kind") == kind]


def csi_volumes() -> list[tuple[dict, list[str], bool]]:
    """(csi source, mount options, read-only) of every PV and inline volume."""
    out = []
    for pv in of_kind("PersistentVolume"):
        out.append((pv["spec"]["csi"], pv["spec"].get("mountOptions", []), False))
    for kind in ("Pod", "Deployment", "Job"):
        for d in of_kind(kind):
            spec = d["spec"] if kind == "Pod" else d["spec"]["template"]["spec"]
            for v in spec.get("volumes", []):
                if "csi" in v:
                    out.append((v["csi"], [], bool(v["csi"].get("readOnly"))))
    return out


def test_every_file_parses_and_has_kinds() -> None:
    assert len(FILES) >= 8
    for name, ds in ALL.items():
        if name == "kustomization.yaml":
            continue
        assert ds and all("apiVersion" in d and "kind" in d for d in ds), name


def test_csidriver() -> None:
    (drv,) = of_kind("CSIDriver")
    assert drv["metadata"]["name"] == DEFAULT_DRIVER_NAME
    spec = drv["spec"]
    assert spec["attachRequired"] is False and spec["podInfoOnMount"] is True
    assert set(spec["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}


def daemonset(name: str) -> dict:
    (ds,) = [d for d in of_kind("DaemonSet") if d["metadata"]["name"] == name]
    return ds


def test_daemonset() -> None:
    ds = daemonset("caiosfs-csi-node")
    pod = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"caiosfs-csi", "node-driver-registrar", "liveness-probe"}
    plugin = containers["caiosfs-csi"]
    assert plugin["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in plugin["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    # The FUSE daemons run in caiosfs-mounter: the plugin may be limited and rolled.
    assert "memory" in plugin["resources"]["limits"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in plugin["env"]}
    assert env["CSI_ENDPOINT"]["value"] == "unix:///csi/csi.sock"
    assert env["CAIOSFS_MOUNTER_SOCKET"]["value"].startswith("/run/caiosfs-csi/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["hostPath"]["path"].startswith("/mnt/nvme")
    reg = " ".join(containers["node-driver-registrar"]["args"])
    assert f"/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}/csi.sock" in reg
    assert volumes["socket-dir"]["hostPath"]["path"] == \
        f"/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}"
    probe_port = containers["liveness-probe"]["args"]
    assert "--health-port=9808" in probe_port


def test_mounter_daemonset_shares_paths_with_the_plugin() -> None:
    """The plugin names the socket, credentials files and cache dirs by its own paths: the
    mounter must see the same host directories at the same paths."""
    plugin_ds, mounter_ds = daemonset("caiosfs-csi-node"), daemonset("caiosfs-mounter")
    assert mounter_ds["spec"]["updateStrategy"]["type"] == "OnDelete"
    pod = mounter_ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][-1].endswith("caiosfs-mounter")
    assert "livenessProbe" not in c  # a restart would end every volume of the node
    assert c["securityContext"]["privileged"] is False
    assert pod["hostNetwork"] is True

    def host_paths(ds: dict, container: str) -> dict[str, str]:
        spec = ds["spec"]["template"]["spec"]
        vols = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
        (ct,) = [x for x in spec["containers"] if x["name"] == container]
        return {m["mountPath"]: vols[m["name"]] for m in ct["volumeMounts"]}

    p, m = host_paths(plugin_ds, "caiosfs-csi"), host_paths(mounter_ds, "caiosfs-mounter")
    plugin_env = {e["name"]: e.get("value") for e in
                  plugin_ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    mounter_env = {e["name"]: e.get("value") for e in c["env"]}
    assert plugin_env["CAIOSFS_MOUNTER_SOCKET"] == mounter_env["CAIOSFS_MOUNTER_SOCKET"]
    for env in ("CAIOSFS_CSI_STATE_DIR", "CAIOSFS_CSI_CACHE_ROOT"):
        path = plugin_env[env]
        assert p[path] == m[path], path


def test_warm_job_names_the_cache_dir_of_the_training_volume() -> None:
    """The warm Job's cachedir arguments are the training pod's volume attributes."""
    import re
    jobs = [d for d in ALL["warm-then-train.yaml"] if d["kind"] == "Job"]
    (job,) = jobs
    script = job["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]
    args = dict(re.findall(r"--(bucket|prefix|endpoint) ([^\s)]+)", script))
    (pod,) = [d for d in ALL["warm-then-train.yaml"] if d["kind"] == "Pod"]
    attrs = pod["spec"]["volumes"][0]["csi"]["volumeAttributes"]
    assert args == {k: attrs[k] for k in ("bucket", "prefix", "endpoint")}
    term = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    label = term["matchExpressions"][0]["key"]
    assert f"{label}=true" in job["spec"]["template"]["spec"]["containers"][0]["command"]
    (role,) = of_kind("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"],
                              "verbs": ["get", "patch"]}]


def test_kustomization_resources_exist() -> None:
    (k,) = ALL["kustomization.yaml"]
    for res in k["resources"]:
        assert (CSI / "deploy" / res).is_file()


def test_every_volume_is_accepted_by_the_plugin() -> None:
    vols = csi_volumes()
    assert len(vols) >= 5
    handles = []
    for src, mount_options, ro in vols:
        assert src["driver"] == DEFAULT_DRIVER_NAME
        assert "nodePublishSecretRef" in src
        spec = build_mount_spec(src["volumeAttributes"], mount_options, readonly=ro)
        assert spec.bucket
        if "volumeHandle" in src:
            handles.append(src["volumeHandle"])
    assert len(handles) == len(set(handles))  # kubelet needs unique volume handles


def test_example_secret_is_accepted() -> None:
    for secret in of_kind("Secret"):
        assert credentials_ini(secret["stringData"])
