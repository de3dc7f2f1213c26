"""The README's test-figure tables, made from tests/figures/*.json (which the tests write
with CAIOSFS_RECORD_FIGURES=1, for tests that passed).

    .venv/bin/python tests/figures/render_readme.py          # rewrite README.md's blocks
    .venv/bin/python tests/figures/render_readme.py --check  # exit 1 if they differ

tests/test_readme_figures.py runs the check with the suite, so the README cannot drift from
the recorded figures. Claims that are not figures (0 bytes lost, 0 wrong bytes, ...) are
written only where the test asserts them; each row names the day it was measured.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- FIGURES:(\w+):START[^\n]*-->\n)(.*?)(<!-- FIGURES:\2:END -->)",
                   re.DOTALL)


def load(name: str) -> dict[str, Any]:
    return json.loads((HERE / name).read_text())


def n(x: float) -> str:
    return f"{x:,}"


def reliability() -> str:
    f, c, h = load("faults.json"), load("crash_loop.json")["crash_loop"], load("hard_keys.json")
    w, r, d = f["writes_under_faults"], f["reads_under_faults"], f["store_down_while_writing"]
    e = f["read_eio_within_read_timeout"]
    eio = [v["eio_after_s"] for v in e["by_failure"].values()]
    kills = sum(c["kills_during"].values())
    big = h["big_directory"]
    mib = 1 << 20
    rows = [
        (("writes under faults (30% of requests: 500, 503 SlowDown, resets, stalls, truncated "
         "bodies, wrong Content-Length)"),
         f"{w['requests_faulted']} of {w['requests']} requests faulted",
         (f"{w['files_written']} files ({w['files_fsynced']} fsynced), "
         f"{w['bytes_written'] / 1e6:.0f} MB written in {w['seconds_writing']} s, "
         f"**{w['bytes_lost']} bytes lost**, {w['spurious_conflict_copies']} conflict copies; "
         f"all durable {w['durable_s_after_last_write']} s after the last write"),
         w["measured"]),
        (f"reads under faults ({r['fault_rate']:.0%})",
         f"{r['requests_faulted']} of {r['requests']} requests faulted",
         (f"{r['read_ops_ok']} reads, {r['read_ops_failed']} failed, "
         f"**{r['wrong_bytes']} wrong bytes**"),
         r["measured"]),
        ((f"store down (every connection reset) for {d['outage_s']:.0f} s while writing "
         f"{d['files_written']} files, {d['bytes_written'] / mib:.0f} MiB"),
         f"{n(d['connections_refused'])} connections reset",
         (f"back-pressure: the writer held with {d['dirty_bytes_during_outage'] / mib:.2f} MiB "
         f"dirty at the {d['dirty_limit'] / mib:.0f} MiB limit, never above it "
         f"({d['dirty_samples']} samples; one write waited {d['max_close_latency_s']} s), "
         f"{d['write_errors']} write errors, **{d['bytes_lost']} bytes lost**, durable "
         f"{d['seconds_to_durable_after_heal']} s after the store came back"),
         d["measured"]),
        (("reads against a dead store (500, 503, reset, refused, black hole, stalled "
         "headers/body)"),
         "every request",
         (f"EIO after {min(eio):.2f}–{max(eio):.2f} s with "
         f"`read_timeout={e['read_timeout_s']:g}`: never a hang"),
         e["measured"]),
        (("crash loop: a mixed workload (writes, fsyncs, renames of files and directories, "
         f"deletes) with the daemon SIGKILLed at random points, {c['rounds']} rounds "
         f"({c['kills_during_replay']} kills during journal replay)"),
         (f"{c['rounds'] + c['kills_during_replay']} SIGKILLs ({kills} in the middle of an "
         "operation)"),
         ("after each remount and flush, every file fsynced "
         f"({c['synced_checked']}) or closed ({c['closed_checked']}) in that round, and every "
         f"file kept from earlier rounds ({c['kept_checked']}), matched the store byte for "
         f"byte; deleted ones ({c['deleted_checked']}) stayed deleted, no conflict copy "
         "appeared, `caiosfs fsck` found every indexed chunk intact; block files not yet "
         f"indexed at the kill (allowed, removed by `fsck --repair`): "
         f"{c['orphan_block_files']}"),
         c["measured"]),
        (f"{n(big['entries'])} entries in one directory", "none",
         (f"`ls` in {big['listdir_s']:.0f} s with {big['s3_requests']} requests (one "
         f"ListObjectsV2 page per 1,000), `stat` of all in {big['stat_all_s']:.1f} s"),
         big["measured"]),
    ]
    return table(("test", "faults", "outcome", "measured"), rows)


def load_table() -> str:
    f = load("load.json")
    p, d, s = f["python_workload"], f["dbench"], f["stress_ng"]
    roles = p["roles"]
    errnos = ", ".join(f"{k} {n(v)}" for k, v in sorted(s["fuse_errors_by_op"].items()))
    rows = [
        (f"{p['processes']} Python processes on one mount, {p['workload_seconds']:.0f} s",
         (f"{roles['shared_reader']} read the same two large objects, {roles['own_reader']} "
         f"read their own, {roles['writer']} write their own files (write, append, fsync, "
         f"rename, delete, read back), {roles['shared']} publish and read files in one "
         "shared directory"),
         (f"{n(p['operations'])} operations, {p['bytes_read'] / 1e9:.1f} GB read (mostly "
         f"re-reads) and {p['bytes_written'] / 1e6:.0f} MB written, **{p['errors']} errors, "
         f"{p['wrong_reads']} wrong bytes, 0 failed uploads**; after `flush` the store held "
         f"exactly the expected {p['files_verified_in_store']} files and a fresh mount with "
         f"an empty cache the same {p['files_verified_fresh_mount']} entries; daemon peak "
         f"RSS {p['daemon_peak_rss_mib']:.0f} MiB (**under {p['rss_limit_mib']} MiB**, "
         f"memory_limit={p['memory_limit']})"),
         p["measured"]),
        (f"`{d['command']}`", f"{d['clients']} clients",
         (f"{d['throughput_mb_s']:.1f} MB/s, {n(d['operations'])} operations, max latency "
         f"{d['max_latency_ms']:.0f} ms, {d['errors']} errors; peak RSS "
         f"{d['daemon_peak_rss_mib']:.0f} MiB"),
         d["measured"]),
        ((f"`stress-ng --timeout 25s --verify` with {s['stressors']} file-system stressors at "
         f"once ({', '.join(sorted(s['bogo_ops']))})"), f"{s['stressors']} stressors",
         (f"{n(s['bogo_ops_total'])} bogo-ops, {s['errors']} failures; errnos answered: "
         f"{errnos} (all expected: names over 255 bytes, hard links unsupported); no multipart "
         "upload left behind; the mount answered afterwards, flush and umount succeeded; "
         f"peak RSS {s['daemon_peak_rss_mib']:.0f} MiB"),
         s["measured"]),
    ]
    return table(("workload", "what ran", "outcome", "measured"), rows)


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


BLOCKS = {"reliability": reliability, "load": load_table}


def render(text: str) -> str:
    """``text`` (the README) with every FIGURES block made anew from the JSON."""
    found = set()

    def one(m: re.Match[str]) -> str:
        found.add(m.group(2))
        return m.group(1) + BLOCKS[m.group(2)]() + m.group(4)
    out = BLOCK.sub(one, text)
    missing = set(BLOCKS) - found
    if missing:
        raise SystemExit(f"README.md has no FIGURES block for {sorted(missing)}")
    return out


def main() -> int:
    text = README.read_text()
    new = render(text)
    if "--check" in sys.argv[1:]:
        if new != text:
            print("README.md's figure tables differ from tests/figures/*.json; run "
                  ".venv/bin/python tests/figures/render_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
