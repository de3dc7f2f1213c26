"""Results: collecting samples, summarising them, and writing JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workloads import Outcome, Workload

SYSTEM_ORDER = ("caiosfs", "rclone", "s3fs", "boto3")
COLORS = {"caiosfs": "#1f77b4", "rclone": "#ff7f0e", "s3fs": "#2ca02c", "boto3": "#7f7f7f"}


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
        }


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


class Results:
    def __init__(self, workloads: list[Workload], systems: list[str]) -> None:
        self.workloads = workloads
        self.systems = [s for s in SYSTEM_ORDER if s in systems]
        self.cells: dict[str, dict[str, Cell]] = {
            w.name: {s: Cell() for s in self.systems if w.applies(s)} for w in workloads
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
        pairs += [("rclone", "boto3"), ("s3fs", "boto3")]
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
                w.name: {
                    "title": w.title,
                    "systems": {s: c.to_json() for s, c in self.cells[w.name].items()},
                    "ratios": {m: self.ratios(w.name, m) for m, _ in self.metrics(w.name)},
                }
                for w in self.workloads
            },
        }


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s >= 10 else (f"{s:.2f} s" if s >= 0.1 else f"{s * 1000:.0f} ms")


def markdown(res: Results, meta: dict[str, Any]) -> str:
    """The report: how it was made, the main table, ratios, memory, failures."""
    L: list[str] = []
    L.append(f"# caiosfs benchmark — {meta['date']}")
    L.append("")
    L.append(f"- Machine: {meta['machine']}")
    if meta.get("loadavg_1min"):
        la = meta["loadavg_1min"]
        L.append(
            f"- Load average (1 min) at the start of each measurement: median {la['median']:.1f},"
            f" min {la['min']:.1f}, max {la['max']:.1f} (on {meta['machine'].split()[0]} cores;"
            " anything well above the benchmark's own ~2 means other work was running)"
        )
    L.append(f"- Command: `{meta['command']}`")
    L.append(
        f"- Store: {meta['store']}"
        + (
            f"; WAN simulation: {meta['wan']}"
            if meta.get("wan")
            else "; no WAN simulation (loopback speed)"
        )
    )
    L.append(
        f"- Repetitions: {meta['scale']['reps']}, interleaved (systems rotate order every "
        "round); page cache dropped before every cold measurement"
        + ("" if meta.get("drop_caches") else " — **NOT dropped: not root**")
    )
    for name, v in meta.get("versions", {}).items():
        L.append(f"- {name}: {v}")
    L.append("")
    L.append(
        "Each cell: median rate (min–max over repetitions) · median seconds. Rates are "
        "higher-is-better; a ratio a/b > 1 means a is faster. Blank: not applicable."
    )
    L.append("")
    head = ["workload", "metric"] + res.systems
    ratio_cols = ["caiosfs/boto3", "caiosfs/rclone", "caiosfs/s3fs", "rclone/boto3", "s3fs/boto3"]
    L.append("| " + " | ".join(head + ratio_cols) + " |")
    L.append("|" + "---|" * (len(head) + len(ratio_cols)))
    for w in res.workloads:
        for metric, unit in res.metrics(w.name):
            row = [f"{w.name}", f"{metric} ({unit})"]
            for s in res.systems:
                c = res.cells[w.name].get(s)
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
            ratios = res.ratios(w.name, metric)
            row += [f"{ratios[k]:.2f}×" if k in ratios else "" for k in ratio_cols]
            L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("## Peak RSS of the mount daemon (MiB, max over repetitions)")
    L.append("")
    fs = [s for s in res.systems if s != "boto3"]
    L.append("| workload | " + " | ".join(fs) + " |")
    L.append("|---|" + "---|" * len(fs))
    overall: dict[str, float] = {}
    for w in res.workloads:
        row = [w.name]
        for s in fs:
            c = res.cells[w.name].get(s)
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
    for w in res.workloads:
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
    for w in res.workloads:
        c = res.cells[w.name].get("caiosfs")
        if c is None or not c.counters:
            continue

        def med(key: str, c: Cell = c) -> float:
            return statistics.median(x.get(key, 0) for x in c.counters)

        def worst(key: str, c: Cell = c) -> float:
            return max(x.get(key, 0) for x in c.counters)

        rows.append(
            f"| {w.name} | {med('s3_requests'):,.0f} | {med('s3_get_requests'):,.0f} | "
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

    panels = [(w, m, u) for w in res.workloads for m, u in res.metrics(w.name)]
    if not panels:
        return
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (w, metric, unit) in zip(axes.flat, panels):
        names, med, lo, hi = [], [], [], []
        for s in res.systems:
            c = res.cells[w.name].get(s)
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
        ax.set_title(f"{w.name}: {metric}", fontsize=9)
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
        p = out_dir / f"{name}.png"
        try:
            chart(res, meta, p)
        except Exception as e:  # noqa: BLE001 - a missing chart must not lose the numbers
            print(f"bench: chart failed: {e}")
        written += [j, m, p]
    return written
