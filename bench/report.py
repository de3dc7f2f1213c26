"""Results: collecting samples, summarising them, and writing JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workloads import Outcome, Workload

SYSTEM_ORDER = ("caiosfs", "caiosfs-base", "rclone", "s3fs", "boto3")
GiB = 1 << 30
NET_TITLES = {"loopback": "Loopback (the server straight)", "wan": "Behind the WAN proxy"}
COLORS = {"caiosfs": "#1f77b4", "rclone": "#ff7f0e", "s3fs": "#2ca02c", "boto3": "#7f7f7f",
          "caiosfs-base": "#9edae5"}


@dataclass
class Cell:
    """All repetitions of one (workload, system)."""

    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> rates
    seconds: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    rss_mib: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counters: list[dict[str, Any]] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    def cpu_per_gib(self, label: str = "") -> dict[str, float]:
        """{"daemon_s": median CPU seconds per GiB moved, ...} over the repetitions: of the
        whole measurement, or (``label``) of one part of it (see :func:`cpu_parts`)."""
        out: dict[str, list[float]] = {}
        for c in self.cpu:
            part = cpu_parts(c).get(label, {})
            gib = part.get("bytes", 0) / GiB
            if gib <= 0:
                continue
            for k, v in part.items():
                if k.endswith("_s"):
                    out.setdefault(k, []).append(v / gib)
        return {k: statistics.median(v) for k, v in out.items()}

    def cpu_labels(self) -> list[str]:
        return sorted({label for c in self.cpu for label in cpu_parts(c)})

    def to_json(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "seconds": self.seconds,
            "units": self.units,
            "rss_mib": self.rss_mib,
            "counters": self.counters,
            "errors": self.errors,
            "notes": self.notes,
            "summary": {m: summarize(v) for m, v in self.values.items()},
            "seconds_median": {m: statistics.median(v) for m, v in self.seconds.items() if v},
            "peak_rss_mib": max(self.rss_mib) if self.rss_mib else None,
            "cpu": self.cpu,
            "cpu_s_per_gib": self.cpu_per_gib(),
        }


def cpu_parts(cpu: dict[str, float]) -> dict[str, dict[str, float]]:
    """A measurement's CPU figures by part: ``{"": {...}}`` for one measured as a whole,
    ``{"tree": {...}, "big": {...}}`` for one whose parts were measured apart (keys
    ``"tree:bytes"``, ``"tree:client_s"``...: ``caiosfs cp`` of three data sets)."""
    out: dict[str, dict[str, float]] = {}
    for k, v in cpu.items():
        label, _, name = k.rpartition(":")
        out.setdefault(label, {})[name] = v
    return out


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


class Results:
    """Cells by row key and system. A row is one workload on one network: its key is the
    workload's name on loopback and ``name@wan`` behind the WAN proxy."""

    def __init__(self, rows: list[tuple[str, Workload, str]], systems: list[str]) -> None:
        self.rows = rows
        self.systems = [s for s in SYSTEM_ORDER if s in systems]
        self.cells: dict[str, dict[str, Cell]] = {
            key: {s: Cell() for s in self.systems if w.applies(s)} for key, w, _ in rows
        }

    def add(self, workload: str, system: str, out: Outcome) -> None:
        c = self.cells[workload][system]
        for s in out.samples:
            c.values.setdefault(s.metric, []).append(s.rate)
            c.seconds.setdefault(s.metric, []).append(s.seconds)
            c.units[s.metric] = s.unit
        if out.rss_mib is not None:
            c.rss_mib.append(out.rss_mib)
        if out.counters:
            c.counters.append(out.counters)
        if out.cpu:
            c.cpu.append(out.cpu)
        for n in out.notes:
            if n not in c.notes:
                c.notes.append(n)

    def fail(self, workload: str, system: str, message: str) -> None:
        self.cells[workload][system].errors.append(message)

    def median(self, workload: str, system: str, metric: str) -> float | None:
        c = self.cells.get(workload, {}).get(system)
        if c is None or not c.values.get(metric):
            return None
        return statistics.median(c.values[metric])

    def metrics(self, workload: str) -> list[tuple[str, str]]:
        """(metric, unit) pairs of a workload, in first-seen order over its systems."""
        seen: dict[str, str] = {}
        for s in self.systems:
            c = self.cells[workload].get(s)
            if c:
                for m, u in c.units.items():
                    seen.setdefault(m, u)
        return list(seen.items())

    def systems_without_numbers(self) -> list[str]:
        out = []
        for s in self.systems:
            cells = [self.cells[w][s] for w in self.cells if s in self.cells[w]]
            if cells and not any(c.values for c in cells):
                out.append(s)
        return out

    def failures(self) -> list[tuple[str, str, str]]:
        return [
            (w, s, e) for w, row in self.cells.items() for s, c in row.items() for e in c.errors
        ]

    def missing(self) -> list[tuple[str, str]]:
        """(workload, system) pairs that produced no number at all."""
        return [(w, s) for w, row in self.cells.items() for s, c in row.items() if not c.values]

    def ratios(self, workload: str, metric: str) -> dict[str, float]:
        """{"a/b": median(a) / median(b)} for caiosfs against every other system, and for
        the peers against boto3. Higher than 1 means a is faster (all metrics are rates)."""
        pairs = [("caiosfs", o) for o in ("boto3", "rclone", "s3fs")]
        pairs += [("rclone", "boto3"), ("s3fs", "boto3"), ("caiosfs", "caiosfs-base")]
        out = {}
        for a, b in pairs:
            va, vb = self.median(workload, a, metric), self.median(workload, b, metric)
            if va is not None and vb:
                out[f"{a}/{b}"] = va / vb
        return out

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "meta": meta,
            "systems": self.systems,
            "workloads": {
                key: {
                    "workload": w.name,
                    "net": net,
                    "title": w.title,
                    "systems": {s: c.to_json() for s, c in self.cells[key].items()},
                    "ratios": {m: self.ratios(key, m) for m, _ in self.metrics(key)},
                }
                for key, w, net in self.rows
            },
            "targets": targets(self),
        }


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s >= 10 else (f"{s:.2f} s" if s >= 0.1 else f"{s * 1000:.0f} ms")


def _main_table(res: Results, net: str) -> list[str]:
    L: list[str] = []
    head = ["workload", "metric"] + res.systems
    ratio_cols = ["caiosfs/boto3", "caiosfs/rclone", "caiosfs/s3fs", "rclone/boto3", "s3fs/boto3"]
    if "caiosfs-base" in res.systems:
        ratio_cols.append("caiosfs/caiosfs-base")
    L.append("| " + " | ".join(head + ratio_cols) + " |")
    L.append("|" + "---|" * (len(head) + len(ratio_cols)))
    for key, _w, n in res.rows:
        if n != net:
            continue
        for metric, unit in res.metrics(key):
            row = [key, f"{metric} ({unit})"]
            for s in res.systems:
                c = res.cells[key].get(s)
                if c is None:
                    row.append("")
                elif c.values.get(metric):
                    sm = summarize(c.values[metric])
                    secs = statistics.median(c.seconds[metric])
                    rng = f" ({_fmt(sm['min'])}–{_fmt(sm['max'])})" if sm["n"] > 1 else ""
                    row.append(f"{_fmt(sm['median'])}{rng} · {_fmt_s(secs)}")
                elif c.errors:
                    row.append("FAILED")
                else:
                    row.append("")
            ratios = res.ratios(key, metric)
            row += [f"{ratios[k]:.2f}×" if k in ratios else "" for k in ratio_cols]
            L.append("| " + " | ".join(row) + " |")
    return L


def _cpu_table(res: Results) -> list[str]:
    """CPU seconds per GiB moved, per system; caiosfs's loop thread and its ceiling."""
    rows = []
    for key, _w, _net in res.rows:
        labels = sorted({x for c in res.cells[key].values() for x in c.cpu_labels()})
        for label in labels:
            per = {s: c.cpu_per_gib(label) for s, c in res.cells[key].items() if c.cpu}
            if any(per.values()):
                rows.append(_cpu_row(res, f"{key} ({label})" if label else key, per))
    if not rows:
        return []
    return [
        "## CPU seconds per GiB moved (median over repetitions)",
        "",
        "For a mount: its daemon's process tree, every thread, user + system, from",
        "`/proc/PID/stat` before and after the timed part (for writes: until durable). For raw",
        "boto3, and for a copy command (`caiosfs cp`, `rclone copy`): the client process itself.",
        "caiosfs loop: its main thread (the trio event loop, `/proc/PID/task/PID/stat`); loop",
        "ceiling = GiB/s one loop core could carry at that cost. Store: the S3 server's CPU per",
        "GiB (SeaweedFS, on the same cores when the run started it) while caiosfs, and while",
        "rclone, did the work; proxy: the WAN proxy's, the median over the systems. Where the",
        "store's and the client's CPU add up to the machine's cores, the store's share is what",
        "a faster client cannot take back.",
        "",
        "| workload | "
        + " | ".join(res.systems)
        + " | caiosfs loop | loop ceiling (GiB/s) | caiosfs/rclone CPU | store (caiosfs) |"
        + " store (rclone) | proxy |",
        "|---|" + "---|" * (len(res.systems) + 6),
        *rows,
        "",
    ]


def _own_cpu(v: dict[str, float]) -> float | None:
    """A system's own CPU per GiB: its daemon's, or the client's where there is no daemon."""
    return v.get("daemon_s", v.get("client_s"))


def _cpu_row(res: Results, name: str, per: dict[str, dict[str, float]]) -> str:
    cells = []
    for s in res.systems:
        x = _own_cpu(per.get(s, {}))
        cells.append("" if x is None else f"{x:.2f}")
    loop = per.get("caiosfs", {}).get("loop_s")
    cells.append("" if loop is None else f"{loop:.2f}")
    cells.append("" if not loop else f"{1 / loop:.2f}")
    d, r = _own_cpu(per.get("caiosfs", {})), _own_cpu(per.get("rclone", {}))
    cells.append(f"{d / r:.2f}×" if d is not None and r else "")
    for system in ("caiosfs", "rclone"):  # (what a system's requests cost the store differs)
        x = per.get(system, {}).get("server_s")
        cells.append("" if x is None else f"{x:.2f}")
    xs = [v["proxy_s"] for v in per.values() if "proxy_s" in v]
    cells.append(f"{statistics.median(xs):.2f}" if xs else "")
    return f"| {name} | " + " | ".join(cells) + " |"


# Issue 15's targets, judged on this run. (workload row, metric, a, b, op, bound): the
# median rate of a over that of b, or for "le_time" the time ratio a/b (= b/a on rates).
TARGETS: list[tuple[str, str, str, str, str, float, str]] = [
    ("seq_read_cold@wan", "read", "caiosfs", "boto3", "ge", 0.85, "cold 1 GiB read ≥ 0.85× raw"),
    ("seq_read_cold@wan", "read", "caiosfs", "s3fs", "ge", 1.3, "cold read ≥ 1.3× s3fs"),
    ("seq_read_cold@wan", "read", "caiosfs", "rclone", "ge", 2.0, "cold read ≥ 2× rclone"),
    ("ckpt_restore@wan", "read", "caiosfs", "boto3", "ge", 0.85, "restore ≥ 0.85× raw"),
    ("seq_write@wan", "durable", "caiosfs", "boto3", "le_time", 1.1, "write durable ≤ 1.1× raw"),
    ("ckpt_write@wan", "durable", "caiosfs", "boto3", "le_time", 1.2, "DCP durable ≤ 1.2× raw"),
    ("ckpt_hf@wan", "durable", "caiosfs", "boto3", "le_time", 1.2, "HF rename durable ≤ 1.2× raw"),
    ("rand_read_1m@wan", "ops", "caiosfs", "boto3", "ge", 1.0, "random 1 MiB ≥ 1.0× raw"),
    ("loader@wan", "files", "caiosfs", "boto3", "ge", 0.85, "16 readers of 100 KB ≥ 0.85× raw"),
]
CPU_TARGETS = [
    ("seq_read_cold", "cold read CPU/GiB ≤ 0.25× rclone's"),
    ("seq_read_warm", "warm read CPU/GiB ≤ 0.25× rclone's"),
    ("seq_write", "write CPU/GiB ≤ 0.25× rclone's"),
]


def targets(res: Results) -> list[dict[str, Any]]:
    """Every target of issue 15 that this run has the numbers for, met or not."""
    out: list[dict[str, Any]] = []
    for key, metric, a, b, op, bound, label in TARGETS:
        va, vb = res.median(key, a, metric), res.median(key, b, metric)
        if va is None or not vb:
            continue
        n = min(len(res.cells[key][x].values[metric]) for x in (a, b))
        ratio = vb / va if op == "le_time" else va / vb
        met = ratio <= bound if op == "le_time" else ratio >= bound
        out.append({"target": label, "row": key, "ratio": ratio, "met": met, "n": n})
    for w, label in CPU_TARGETS:
        for key in (w, f"{w}@wan"):
            cells = res.cells.get(key, {})
            if "caiosfs" not in cells or "rclone" not in cells:
                continue
            d = cells["caiosfs"].cpu_per_gib().get("daemon_s")
            r = cells["rclone"].cpu_per_gib().get("daemon_s")
            if d is None or not r:
                continue
            n = min(len(cells["caiosfs"].cpu), len(cells["rclone"].cpu))
            out.append({"target": label, "row": key, "ratio": d / r, "met": d / r <= 0.25, "n": n})
    for key in ("seq_read_cold", "seq_read_cold@wan"):
        c = res.cells.get(key, {}).get("caiosfs")
        loop = c.cpu_per_gib().get("loop_s") if c else None
        if loop:
            out.append(
                {
                    "target": "loop ceiling ≥ 2 GiB/s of cold streaming",
                    "row": key,
                    "ratio": 1 / loop,
                    "met": 1 / loop >= 2,
                    "n": len(c.cpu) if c else 0,
                    "unit": "GiB/s",
                }
            )
    return out


def readme_block(res: Results, meta: dict[str, Any], report_name: str) -> str:
    """What the project README shows of a run (between ``<!-- BENCH-RUN:START -->`` and
    ``<!-- BENCH-RUN:END -->``, written there by ``python -m bench.readme``): the exact
    command, where and when it ran, the tables, and the targets judged on this same run."""
    L = [
        f"Run {meta['date']}, git {meta.get('git', '?')}, {meta['machine']}; "
        f"{meta['scale']['reps']} repetition(s), interleaved"
        + (
            f"; load average median {meta['loadavg_1min']['median']:.1f}"
            if meta.get("loadavg_1min")
            else ""
        )
        + ". The exact command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
    ]
    nets = meta.get("nets") or ["loopback"]
    for net in nets:
        if not any(n == net for _, _, n in res.rows):
            continue
        title = NET_TITLES.get(net, net)
        if net == "wan" and meta.get("wan"):
            title += f" ({meta['wan']})"
        L += [f"**{title}**", "", *_main_table(res, net), ""]
    tg = targets(res)
    if tg:
        L += ["**Issue 15's targets, judged on this run**", "", "| target | row | measured | |"]
        L.append("|---|---|---|---|")
        for t in tg:
            few = "" if t["n"] >= 3 else f" (n={t['n']}, indicative)"
            L.append(
                f"| {t['target']} | {t['row']} | {t['ratio']:.2f}{t.get('unit', '×')} | "
                f"{'met' if t['met'] else 'missed'}{few} |"
            )
        L.append("")
    L += [x.replace("## ", "**", 1) + "**" if x.startswith("## ") else x for x in _cpu_table(res)]
    L.append(f"Full report: [bench/results/{report_name}.md](bench/results/{report_name}.md).")
    return "\n".join(L)


def markdown(res: Results, meta: dict[str, Any]) -> str:
    """The report: how it was made, the main tables, ratios, CPU, memory, targets, failures."""
    L: list[str] = []
    L.append(f"# caiosfs benchmark — {meta['date']}")
    L.append("")
    L.append(f"- Command: `{meta['command']}` (git {meta.get('git', '?')})")
    L.append(f"- Machine: {meta['machine']}")
    if meta.get("loadavg_1min"):
        la = meta["loadavg_1min"]
        L.append(
            f"- Load average (1 min) at the start of each measurement: median {la['median']:.1f},"
            f" min {la['min']:.1f}, max {la['max']:.1f} (on {meta['machine'].split()[0]} cores;"
            " anything well above the benchmark's own ~2 means other work was running)"
        )
    nets = meta.get("nets") or ["loopback"]
    L.append(
        f"- Store: {meta.get('store', '?')}; networks: "
        + ", ".join(
            f"{n} ({meta['wan']} per connection)" if n == "wan" and meta.get("wan") else n
            for n in nets
        )
    )
    L.append(
        f"- Repetitions: {meta['scale']['reps']}, interleaved (systems rotate order every "
        "round); page cache dropped before every cold measurement, raw boto3 included"
        + ("" if meta.get("drop_caches") else " — **NOT dropped: not root**")
    )
    if meta.get("durable"):
        L.append(f"- Durable: {meta['durable']}")
    L.append(
        "- Read data: every read workload hashes what it read (xxh3) and compares it with "
        "the source, raw boto3 included; wrong data fails the measurement"
    )
    for name, v in meta.get("versions", {}).items():
        L.append(f"- {name}: {v}")
    L.append("")
    L.append(
        "Each cell: median rate (min–max over repetitions) · median seconds. Rates are "
        "higher-is-better; a ratio a/b > 1 means a is faster. Blank: not applicable."
    )
    L.append("")
    for net in nets:
        if not any(n == net for _, _, n in res.rows):
            continue
        title = NET_TITLES.get(net, net)
        if net == "wan" and meta.get("wan"):
            title += f" ({meta['wan']})"
        L.append(f"## {title}")
        L.append("")
        L.extend(_main_table(res, net))
        L.append("")
    tg = targets(res)
    if tg:
        L.append("## Issue 15's targets, judged on this run")
        L.append("")
        L.append("| target | row | measured | |")
        L.append("|---|---|---|---|")
        for t in tg:
            unit = t.get("unit", "×")
            few = "" if t["n"] >= 3 else f" (n={t['n']}: < 3 repetitions, indicative only)"
            L.append(
                f"| {t['target']} | {t['row']} | {t['ratio']:.2f}{unit} | "
                f"{'met' if t['met'] else 'missed'}{few} |"
            )
        L.append("")
    L.extend(_cpu_table(res))
    L.append("## Peak RSS of the mount daemon (MiB, max over repetitions)")
    L.append("")
    fs = [s for s in res.systems if s != "boto3"]
    L.append("| workload | " + " | ".join(fs) + " |")
    L.append("|---|" + "---|" * len(fs))
    overall: dict[str, float] = {}
    for key, _w, _n in res.rows:
        row = [key]
        for s in fs:
            c = res.cells[key].get(s)
            if c is None or not c.rss_mib:
                row.append("")
            else:
                row.append(f"{max(c.rss_mib):.0f}")
                overall[s] = max(overall.get(s, 0.0), max(c.rss_mib))
        L.append("| " + " | ".join(row) + " |")
    L.append(
        "| **all** | "
        + " | ".join(f"**{overall[s]:.0f}**" if s in overall else "" for s in fs)
        + " |"
    )
    L.append("")
    L.extend(_traffic_table(res))
    L.append("## Workloads")
    L.append("")
    seen = set()
    for _key, w, _n in res.rows:
        if w.name not in seen:
            seen.add(w.name)
            L.append(f"- `{w.name}`: {w.title}")
    L.append("")
    L.append("## Configuration of each system")
    L.append("")
    for s, d in meta.get("configs", {}).items():
        L.append(f"- {s}: `{d}`")
    L.append("")
    fails = res.failures()
    if fails:
        L.append("## Failures")
        L.append("")
        for w, s, e in fails:
            L.append(f"- {s} / {w}: {e}")
        L.append("")
    notes = [(w, s, n) for w, row in res.cells.items() for s, c in row.items() for n in c.notes]
    if notes:
        L.append("## Notes")
        L.append("")
        for w, s, n in notes:
            L.append(f"- {s} / {w}: {n}")
        L.append("")
    return "\n".join(L)


def _traffic_table(res: Results) -> list[str]:
    """caiosfs's own counters per workload (median over repetitions): how many requests and
    bytes a workload cost, and any errors the daemon counted."""
    rows = []
    for key, _w, _n in res.rows:
        c = res.cells[key].get("caiosfs")
        if c is None or not c.counters:
            continue

        def med(key: str, c: Cell = c) -> float:
            return statistics.median(x.get(key, 0) for x in c.counters)

        def worst(key: str, c: Cell = c) -> float:
            return max(x.get(key, 0) for x in c.counters)

        rows.append(
            f"| {key} | {med('s3_requests'):,.0f} | {med('s3_get_requests'):,.0f} | "
            f"{med('bytes_in') / 2**20:,.1f} | {med('bytes_out') / 2**20:,.1f} | "
            f"{worst('s3_errors'):,.0f} | {worst('fuse_errors'):,.0f} | "
            f"{worst('checksum_failures') + worst('uploads_failed'):,.0f} |"
        )
    if not rows:
        return []
    return [
        "## caiosfs's own counters per measurement (median; from `caiosfs status --json`)",
        "",
        "Errors are the worst repetition. caiosfs counts every FUSE reply with an errno, so the",
        "ENOENT of looking up a name before creating it shows up under FUSE errors; S3 errors",
        "are requests whose status was not ok (a 404 on a HEAD included).",
        "",
        (
            "| workload | S3 requests | GETs | MiB in | MiB out | S3 errors | FUSE errors |"
            " checksum + upload failures |"
        ),
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def chart(res: Results, meta: dict[str, Any], path: Path) -> None:
    """One small bar chart per (workload, metric): median with a min–max whisker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, m, u) for key, _w, _n in res.rows for m, u in res.metrics(key)]
    if not panels:
        return
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, metric, unit) in zip(axes.flat, panels):
        names, med, lo, hi = [], [], [], []
        for s in res.systems:
            c = res.cells[key].get(s)
            if c is None or not c.values.get(metric):
                continue
            sm = summarize(c.values[metric])
            names.append(s)
            med.append(sm["median"])
            lo.append(sm["median"] - sm["min"])
            hi.append(sm["max"] - sm["median"])
        ax.bar(
            names, med, yerr=[lo, hi], capsize=3, color=[COLORS.get(n, "#999999") for n in names]
        )
        ax.set_title(f"{key}: {metric}", fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        for i, v in enumerate(med):
            ax.annotate(_fmt(v), (i, v), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"caiosfs benchmark {meta['date']} — {meta['machine']}"
        + (f" — WAN {meta['wan']}" if meta.get("wan") else ""),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(res: Results, meta: dict[str, Any], out_dir: Path, names: list[str]) -> list[Path]:
    """Write <name>.json/.md/.png for every name (e.g. the dated run and ``latest``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = res.to_json(meta)
    md = markdown(res, meta)
    written = []
    for name in names:
        j = out_dir / f"{name}.json"
        j.write_text(json.dumps(doc, indent=1, sort_keys=False))
        m = out_dir / f"{name}.md"
        m.write_text(md)
        (out_dir / f"{name}.readme.md").write_text(readme_block(res, meta, name))
        written.append(out_dir / f"{name}.readme.md")
        p = out_dir / f"{name}.png"
        try:
            chart(res, meta, p)
        except Exception as e:  # noqa: BLE001 - a missing chart must not lose the numbers
            print(f"bench: chart failed: {e}")
        written += [j, m, p]
    return written
