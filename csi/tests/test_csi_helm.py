"""The Helm chart (csi/deploy/helm/caiosfs-csi), checked without a helm binary.

There is no helm here. The chart's templates keep to a small subset of Helm's template
language (`{{ .Values.x }}`, `{{ .Release.Namespace }}`, `| quote`, `toYaml ... | nindent N`,
`{{-` trimming), which this file renders strictly: an unknown construct or a missing value
fails the test instead of rendering empty as Helm would. The rendered objects must parse and
agree with the kustomize manifests in csi/deploy, which the rest of the suite checks.
Not checked: Helm's own parser and its Sprig functions beyond these.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

CSI = Path(__file__).resolve().parents[1]
if str(CSI) not in sys.path:
    sys.path.insert(0, str(CSI))

import caiosfs_csi

yaml = pytest.importorskip("yaml", reason="chart checks need pyyaml")

CHART = CSI / "deploy" / "helm" / "caiosfs-csi"
ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _lookup(path: str, ctx: dict[str, Any], used: set[str]) -> Any:
    if not path.startswith("."):
        raise AssertionError(f"unsupported template term {path!r}")
    node: Any = ctx
    parts = path[1:].split(".")
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise AssertionError(f"template refers to {path}, which is not set")
        node = node[part]
    if parts[0] == "Values":
        used.add(".".join(parts[1:]))
    return node


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _evaluate(expr: str, ctx: dict[str, Any], used: set[str]) -> str:
    stages = [s.strip() for s in expr.split("|")]
    head = stages[0].split()
    if head[0] == "toYaml" and len(head) == 2:
        value: Any = yaml.safe_dump(_lookup(head[1], ctx, used), default_flow_style=False,
                                    sort_keys=False).rstrip("\n")
    elif len(head) == 1:
        value = _scalar(_lookup(head[0], ctx, used))
    else:
        raise AssertionError(f"unsupported template action {expr!r}")
    for stage in stages[1:]:
        words = stage.split()
        if words == ["quote"]:
            value = json.dumps(str(value))
        elif len(words) == 2 and words[0] in ("nindent", "indent"):
            pad = " " * int(words[1])
            value = "\n".join(pad + line if line else line for line in value.split("\n"))
            if words[0] == "nindent":
                value = "\n" + value
        else:
            raise AssertionError(f"unsupported template function {stage!r}")
    return value


def render(text: str, values: dict[str, Any], used: set[str]) -> str:
    """Render one template with Helm's semantics for the subset the chart uses."""
    ctx = {"Values": values, "Release": {"Namespace": "caiosfs-csi", "Name": "caiosfs-csi"},
           "Chart": yaml.safe_load((CHART / "Chart.yaml").read_text())}
    out, pos = "", 0
    for m in ACTION.finditer(text):
        out += text[pos : m.start()]
        if m.group(1):
            out = out.rstrip(" \t\n")
        out += _evaluate(m.group(2), ctx, used)
        pos = m.end()
        if m.group(3):
            while pos < len(text) and text[pos] in " \t\n":
                pos += 1
    return out + text[pos:]


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def rendered(vals: dict[str, Any] | None = None, used: set[str] | None = None) -> list[dict]:
    vals = values() if vals is None else vals
    used = set() if used is None else used
    docs: list[dict] = []
    for tpl in sorted((CHART / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(render(tpl.read_text(), vals, used)) if d]
    return docs


def kustomize() -> list[dict]:
    docs: list[dict] = []
    for name in yaml.safe_load((CSI / "deploy" / "kustomization.yaml").read_text())["resources"]:
        docs += [d for d in yaml.safe_load_all((CSI / "deploy" / name).read_text()) if d]
    return docs


def by_kind_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_chart_metadata_matches_the_plugin() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "caiosfs-csi"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == caiosfs_csi.__version__ == values()["image"]["tag"]


def test_chart_renders_the_same_objects_as_kustomize() -> None:
    helm, kust = by_kind_name(rendered()), by_kind_name(kustomize())
    assert set(helm) == set(kust) - {("Namespace", "caiosfs-csi")}  # helm: --create-namespace
    assert helm[("CSIDriver", "csi.caiosfs.io")]["spec"] == \
        kust[("CSIDriver", "csi.caiosfs.io")]["spec"]
    for name in ("caiosfs-csi-node", "caiosfs-mounter"):
        h, k = helm[("DaemonSet", name)]["spec"], kust[("DaemonSet", name)]["spec"]
        assert h["updateStrategy"] == k["updateStrategy"], name
        hp, kp = h["template"]["spec"], k["template"]["spec"]
        assert hp["hostNetwork"] is kp["hostNetwork"] is True
        hc = {c["name"]: c for c in hp["containers"]}
        kc = {c["name"]: c for c in kp["containers"]}
        assert set(hc) == set(kc), name
        for cname, c in kc.items():
            assert hc[cname].get("securityContext") == c.get("securityContext"), cname
            # Every variable kustomize sets, helm sets to the same value (helm may set more).
            henv = {e["name"]: e for e in hc[cname].get("env", [])}
            for e in c.get("env", []):
                assert henv[e["name"]] == e, (cname, e["name"])

            def mounts(pod: dict, ctr: dict) -> dict[str, Any]:
                vols = {v["name"]: v for v in pod["volumes"]}
                return {m["mountPath"]: (vols[m["name"]].get("hostPath"),
                                         m.get("mountPropagation"))
                        for m in ctr.get("volumeMounts", [])}
            assert mounts(hp, hc[cname]) == mounts(kp, c), cname
        assert "livenessProbe" not in hc.get("caiosfs-mounter", {})


def test_every_value_is_used() -> None:
    used: set[str] = set()
    rendered(used=used)

    def leaves(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            path = f"{prefix}{k}"
            out |= leaves(v, path + ".") if isinstance(v, dict) and path not in used else {path}
        return out
    unused = {p for p in leaves(values()) if not any(p == u or p.startswith(u + ".")
                                                      for u in used)}
    assert unused == set()


def test_values_reach_both_daemonsets() -> None:
    vals = values()
    vals["image"]["repository"] = "registry.example/caiosfs-csi"
    vals["cache"]["root"] = "/nvme0/caiosfs"
    vals["nodeSelector"] = {"node.kubernetes.io/instance-type": "gpu"}
    vals["mounter"]["daemonMemoryMax"] = "4G"
    vals["metrics"]["port"] = 9999
    docs = by_kind_name(rendered(vals))
    for name in ("caiosfs-csi-node", "caiosfs-mounter"):
        pod = docs[("DaemonSet", name)]["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "registry.example/caiosfs-csi:0.1.0"
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "gpu"}
        cache = next(v for v in pod["volumes"] if v["name"] == "cache")
        assert cache["hostPath"]["path"] == "/nvme0/caiosfs"
    mounter = docs[("DaemonSet", "caiosfs-mounter")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "CAIOSFS_MOUNTER_DAEMON_MEMORY_MAX", "value": "4G"} in mounter["env"]
    plugin = docs[("DaemonSet", "caiosfs-csi-node")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "CAIOSFS_CSI_METRICS_ADDRESS", "value": "0.0.0.0:9999"} in plugin["env"]
    assert {"name": "metrics", "containerPort": 9999} in plugin["ports"]


def test_renderer_refuses_what_it_does_not_know() -> None:
    with pytest.raises(AssertionError, match="not set"):
        render("x: {{ .Values.nope }}", {}, set())
    with pytest.raises(AssertionError, match="unsupported"):
        render("{{ if .Values.a }}x{{ end }}", {"a": 1}, set())
