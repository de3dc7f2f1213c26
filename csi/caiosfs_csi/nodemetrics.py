"""One Prometheus endpoint per node for every caiosfs volume on it.

    GET http://ADDRESS/metrics        (--metrics-address / CAIOSFS_CSI_METRICS_ADDRESS)

Each daemon serves its own metrics on a loopback port that caiosfs-mounter chose for it. On
every scrape the plugin asks the mounter for its daemons, reads each one's /metrics, adds
labels, and serves them all as one page:

- every series of a daemon gets `daemon` (its volume id, or `shared:KEY` for a shared
  dataset mount) and, for a daemon that serves one volume, `volume_id`, `pod_namespace`,
  `pod_name` (kubelet's pod info, podInfoOnMount);
- `caiosfs_csi_volume_info{volume_id, pod_namespace, pod_name, target, daemon} 1` for every
  published target, to join a shared daemon's series to the pods that read through it;
- `caiosfs_csi_daemon_rss_bytes`, `caiosfs_csi_daemon_cpu_seconds_total`,
  `caiosfs_csi_daemon_up` from the mounter (/proc of each daemon);
- the plugin's own counters (orphan drains) and the mounter's memory-limit kills.

The page holds no secret: daemons never export credentials, and neither do the labels.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0  # seconds per daemon; a stuck daemon costs one scrape that much


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


def add_labels(sample: str, labels: dict[str, str]) -> str:
    """`name{a="1"} 2` + {b: x} -> `name{a="1",b="x"} 2` (also for a sample without labels)."""
    extra = _labels(labels)
    if not extra:
        return sample
    space = sample.find(" ")
    brace = sample.find("{")
    if brace != -1 and (space == -1 or brace < space):
        close = sample.rfind("}")
        inner = sample[brace + 1 : close]
        return f"{sample[:brace + 1]}{inner + ',' if inner else ''}{extra}{sample[close:]}"
    return f"{sample[:space]}{{{extra}}}{sample[space:]}"


class Page:
    """Metric families in order, samples of one family kept together (the text format asks
    for that, and several daemons export the same families)."""

    def __init__(self) -> None:
        self.families: dict[str, dict[str, Any]] = {}

    def _family(self, name: str) -> dict[str, Any]:
        return self.families.setdefault(name, {"help": "", "type": "", "samples": []})

    def add(self, name: str, kind: str, help_text: str, value: float,
            labels: dict[str, str] | None = None) -> None:
        fam = self._family(name)
        fam["help"] = fam["help"] or f"# HELP {name} {help_text}"
        fam["type"] = fam["type"] or f"# TYPE {name} {kind}"
        fam["samples"].append(add_labels(f"{name} {value:g}", labels or {}))

    def merge(self, text: str, labels: dict[str, str]) -> None:
        """Add a daemon's exposition text, every sample with `labels` added."""
        current = self._family("")
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = self._family(parts[2])
                    key = "help" if parts[1] == "HELP" else "type"
                    current[key] = current[key] or line
                continue
            current["samples"].append(add_labels(line, labels))

    def render(self) -> str:
        out = []
        for fam in self.families.values():
            if not fam["samples"]:
                continue
            out += [x for x in (fam["help"], fam["type"]) if x]
            out += fam["samples"]
        return "\n".join(out) + "\n"


def collect(service: Any, mounter: Any) -> str:
    """The node's metrics page (service: NodeService, mounter: FdMounter or Mounter)."""
    from caiosfs_csi.node import SHARED_PREFIX

    page = Page()
    records = service.store.all()
    by_target = {p.target_path: p for p in records}
    users = [p for p in records if not p.volume_id.startswith(SHARED_PREFIX)]
    page.add("caiosfs_csi_volumes", "gauge", "Targets published on this node", len(users))
    for p in users:
        owner = by_target.get(p.shared) if p.shared else p
        page.add("caiosfs_csi_volume_info", "gauge",
                 "A published target, its pod, and the daemon that serves it", 1,
                 {"volume_id": p.volume_id, "pod_namespace": p.pod_namespace,
                  "pod_name": p.pod_name, "target": p.target_path,
                  "daemon": owner.volume_id if owner else p.volume_id})
    for key, what in (("orphan_drains", "Dead volumes whose journal was uploaded"),
                      ("orphan_drains_failed", "Orphan journal uploads that failed")):
        page.add(f"caiosfs_csi_{key}_total", "counter", what, service.metrics[key])
    daemons = getattr(mounter, "daemons", None)
    if daemons is None:
        return page.render()
    try:
        listing = daemons()
        info = mounter.ping()
    except Exception as e:  # noqa: BLE001 - the page still shows what the plugin knows
        log.warning("metrics: caiosfs-mounter did not answer: %s", e)
        page.add("caiosfs_csi_mounter_up", "gauge", "caiosfs-mounter answers", 0)
        return page.render()
    page.add("caiosfs_csi_mounter_up", "gauge", "caiosfs-mounter answers", 1)
    page.add("caiosfs_csi_daemon_memory_kills_total", "counter",
             "Daemons killed for exceeding the per-daemon memory limit",
             info.get("memory_kills", 0))
    for target, d in listing.items():
        labels = {"daemon": d["volume_id"]}
        rec = by_target.get(target)
        if rec is not None and not rec.volume_id.startswith(SHARED_PREFIX):
            labels.update(volume_id=rec.volume_id, pod_namespace=rec.pod_namespace,
                          pod_name=rec.pod_name)
        page.add("caiosfs_csi_daemon_up", "gauge", "1 once the daemon serves its mount",
                 1 if d["state"] == "serving" else 0, labels)
        page.add("caiosfs_csi_daemon_rss_bytes", "gauge", "Resident memory of the daemon",
                 d.get("rss_bytes", 0), labels)
        page.add("caiosfs_csi_daemon_cpu_seconds_total", "counter",
                 "CPU time (user+system) of the daemon", d.get("cpu_seconds", 0.0), labels)
        port = d.get("metrics_port")
        if not port or d["state"] != "serving":
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=SCRAPE_TIMEOUT) as r:
                page.merge(r.read().decode(errors="replace"), labels)
        except OSError as e:
            log.info("metrics of %s not read: %s", target, e)
    return page.render()


def serve(address: str, service: Any, mounter: Any) -> ThreadingHTTPServer:
    """Start the endpoint at HOST:PORT in a daemon thread; return the server."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = collect(service, mounter).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # one line per scrape would drown the plugin's log

    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
