"""Crash loop (issue 7): a mixed workload, the daemon SIGKILLed at random points, ≥30 rounds.

Each round: mount (remounting the same cache_dir), run a workload in a subprocess — writes
(new files and overwrites, some fsynced, a few multipart-sized), renames of files and of
small directories, deletes, and reads of seeded objects that fill the block cache — and
SIGKILL the daemon after a random delay. Then:

1. ``caiosfs fsck --cache-dir`` on the dead mount's cache: every indexed chunk verifies and
   every journal entry has its data (orphan block files, written but not yet indexed when
   the daemon died, are allowed and removed with ``--repair``; then fsck must be clean);
2. remount, flush (journal replay), and compare with a reference model built from the
   workload's log of *completed* operations:
   - a file whose last completed operation was a write followed by fsync (or a close, or a
     rename of such a file) holds exactly those bytes, in the store (s3.get_object) and
     through the mount;
   - a deleted or renamed-away file stays gone (no resurrection);
   - paths touched by an operation in flight at the kill are not judged, and are re-read
     from the store to continue the model;
   - the mount and the store list the same files, and no .conflict- copy appears.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from conftest import data, xxh
from mounting import record_figures, run_cli

ROUNDS = int(os.environ.get("CAIOSFS_CRASH_ROUNDS", "30"))
MiB = 1 << 20

WORKER = textwrap.dedent('''
    import errno, hashlib, json, os, random, sys, time
    import xxhash
    def data(size, seed):  # the same bytes as conftest.data (imported there with boto3: slow)
        return b"".join(hashlib.shake_128(f"caiosfs:{seed}:{i // 2**20}".encode()).digest(
            min(2**20, size - i)) for i in range(0, size, 2**20))
    def xxh(b):
        return xxhash.xxh3_64(b).hexdigest()
    root, seed, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seeded = json.loads(sys.argv[5])  # read-only objects: path -> size
    rng = random.Random(seed)
    log = open(log_path, "a", buffering=1)
    def note(*a):
        log.write(json.dumps([time.time()] + list(a)) + "\\n")
    DIRS = [f"w/d{k}" for k in range(4)]
    def files():
        out = []
        for d in DIRS:
            try:
                out += [f"{d}/{n}" for n in os.listdir(os.path.join(root, d))]
            except FileNotFoundError:
                pass
        return out
    n = 0
    cache = {}
    while True:
        n += 1
        op = rng.random()
        try:
            # (inside the try: a listing the kill cuts off is an error noted after the
            # kill, like any other operation's, not a traceback)
            have = files()
            if op < 0.45 or not have:
                d = rng.choice(DIRS)
                p = f"{d}/f{rng.randrange(6)}" if rng.random() < 0.7 or not have else rng.choice(have)
                big = rng.random() < 0.04
                size = rng.randrange(10 * 2**20, 13 * 2**20) if big else rng.choice(
                    [0, 1, rng.randrange(2, 4096), rng.randrange(4096, 400_000)])
                body = data(size, f"{seed}-{n}")
                sync = rng.random() < 0.5
                note("B", p)
                os.makedirs(os.path.join(root, d), exist_ok=True)
                with open(os.path.join(root, p), "wb") as fh:
                    for off in range(0, len(body), 1 << 20):
                        fh.write(body[off:off + (1 << 20)])
                    if sync:
                        fh.flush()
                        os.fsync(fh.fileno())
                        note("S", p, xxh(body), size)
                note("C", p, xxh(body), size)
            elif op < 0.60:
                src = rng.choice(have)
                dst = f"{rng.choice(DIRS)}/f{rng.randrange(6)}"
                if dst == src:
                    continue
                note("BR", src, dst)
                os.makedirs(os.path.dirname(os.path.join(root, dst)), exist_ok=True)
                os.rename(os.path.join(root, src), os.path.join(root, dst))
                note("R", src, dst)
            elif op < 0.70:
                p = rng.choice(have)
                note("BD", p)
                os.unlink(os.path.join(root, p))
                note("D", p)
            elif op < 0.75:
                src = rng.choice(DIRS)
                dst = rng.choice([d for d in DIRS if d != src])
                if not os.path.isdir(os.path.join(root, src)) or os.path.exists(
                        os.path.join(root, dst)):
                    continue
                note("BRD", src, dst)
                os.rename(os.path.join(root, src), os.path.join(root, dst))
                note("RD", src, dst)
            else:
                p = rng.choice(sorted(seeded))
                with open(os.path.join(root, p), "rb") as fh:
                    size = seeded[p]
                    off = rng.randrange(size)
                    fh.seek(off)
                    got = fh.read(rng.choice([4096, 1 << 20, 3 << 20]))
                if p not in cache:
                    cache[p] = data(size, p)
                want = cache[p][off:off + len(got)]
                note("V" if got == want else "X", p, off, len(got))
        except OSError as exc:
            note("E", errno.errorcode.get(exc.errno, str(exc.errno)), str(exc))
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                break
''')


class Model:
    """What the store must hold: path -> (xxh, size, level) with level 'synced' (written and
    fsynced this round), 'closed' (written and closed this round) or 'kept' (as found in the
    store after an earlier round); absent paths are simply missing. ``unknown`` paths are not
    judged this round."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, int, str]] = {}
        self.unknown: set[str] = set()
        self.gone: set[str] = set()  # deleted / renamed away: must not come back

    def apply(self, events: list[list[Any]]) -> None:
        pending: dict[str, bool] = {}  # rename source -> was it undetermined already
        for ev in events:
            kind = ev[1]
            if kind == "B":
                self.unknown.add(ev[2])
            elif kind == "S":
                self.files[ev[2]] = (ev[3], ev[4], "synced")
                self.unknown.discard(ev[2])
                self.gone.discard(ev[2])
            elif kind == "C":
                prev = self.files.get(ev[2])
                level = "synced" if prev == (ev[3], ev[4], "synced") else "closed"
                self.files[ev[2]] = (ev[3], ev[4], level)
                self.unknown.discard(ev[2])
                self.gone.discard(ev[2])
            elif kind == "BR":
                pending[ev[2]] = self.undetermined(ev[2])
                self.unknown |= {ev[2], ev[3]}
            elif kind == "R":
                src, dst = ev[2], ev[3]
                was_unknown = pending.pop(src, True)
                self.unknown -= {src, dst}
                if src in self.files and not was_unknown:
                    self.files[dst] = self.files.pop(src)
                    self.gone.discard(dst)
                else:  # the source itself was undetermined
                    self.files.pop(src, None)
                    self.files.pop(dst, None)
                    self.unknown.add(dst)
                self.gone.add(src)
            elif kind == "BD":
                self.unknown.add(ev[2])
            elif kind == "D":
                self.files.pop(ev[2], None)
                self.unknown.discard(ev[2])
                self.gone.add(ev[2])
            elif kind == "BRD":
                src, dst = ev[2], ev[3]
                for p in list(self.files) + list(self.unknown):
                    if p.startswith((src + "/", dst + "/")):
                        self.unknown.add(p)
                self.unknown |= {src + "/*", dst + "/*"}
            elif kind == "RD":
                src, dst = ev[2], ev[3]
                self.unknown -= {src + "/*", dst + "/*"}
                for p in list(self.files):
                    if p.startswith(src + "/"):
                        q = dst + p[len(src):]
                        self.files[q] = self.files.pop(p)
                        self.unknown.discard(q)
                        self.gone.add(p)
                        self.gone.discard(q)
                for p in list(self.unknown):
                    if p.startswith(src + "/"):
                        self.unknown.add(dst + p[len(src):])

    def undetermined(self, path: str) -> bool:
        if path in self.unknown:
            return True
        d = path.rpartition("/")[0]
        return d + "/*" in self.unknown


def store_files(s3: Any, bucket: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="w/"):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def mount_files(root: Path) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root / "w"):
        for n in names:
            p = Path(d) / n
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def daemon_pid(mountpoint: Path) -> int:
    """The mount daemon's pid, from the registry ``caiosfs status`` reads (no subprocess)."""
    from caiosfs import control
    return int(next(i for i in control.registered()
                    if i.get("mountpoint") == str(mountpoint))["pid"])


def kill(pid: int, mountpoint: Path) -> None:
    """SIGKILL the daemon, wait until it is gone, detach its dead mount."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(500):
        try:
            os.kill(pid, 0)
            time.sleep(0.01)
        except ProcessLookupError:
            break
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                   check=False)


def fsck(cache_dir: Path, repair: bool = False) -> tuple[int, dict[str, int]]:
    args = ["fsck", "--cache-dir", str(cache_dir), "--json"] + (["--repair"] if repair else [])
    r = run_cli(*args, timeout=60)
    assert r.stdout.strip(), f"fsck printed nothing: {r.stderr}"
    return r.returncode, json.loads(r.stdout)


def test_crash_loop(s3: Any, bucket: str, mounter: Any, tmp_path: Path) -> None:
    seeded = {f"ro/obj{i}": i * 3 * MiB + 12345 for i in range(1, 4)}
    for k, size in seeded.items():
        s3.put_object(Bucket=bucket, Key=k, Body=data(size, k))
    m = mounter(bucket, options="part_size=5M,upload_delay=0.2,block_size=4M,"
                "list_ttl=1,entry_ttl=1,negative_ttl=0")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    tests_dir = str(Path(__file__).parent)
    model = Model()
    rng = random.Random(2024)
    t_start = time.monotonic()
    # *_checked: files compared with the store after a round, by what the workload had
    # done to them that round: fsynced, closed (not fsynced), or nothing (kept from before).
    figures = {"rounds": 0, "ops_completed": 0, "synced_checked": 0, "closed_checked": 0,
               "kept_checked": 0, "deleted_checked": 0, "orphan_block_files": 0,
               "in_flight_at_kill": 0,
               "kills_during_replay": 0,
               "kills_during": {}}
    phase = dict.fromkeys(("fsck", "mount", "flush", "verify"), 0.0)
    seeded_x = json.dumps(seeded)
    assert data(3 * MiB + 5, "x") == subprocess.run(
        [sys.executable, "-c", WORKER.split("root, seed")[0] +
         "sys.stdout.buffer.write(data(3 * 2**20 + 5, 'x'))"], capture_output=True,
        check=True).stdout
    for rnd in range(ROUNDS):
        pid = daemon_pid(m.path)
        log = tmp_path / f"log{rnd}"
        proc = subprocess.Popen([sys.executable, str(worker), str(m.path), str(rnd), str(log),
                                 tests_dir, seeded_x], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 2.2))
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        proc.kill()
        _, err = proc.communicate(timeout=30)
        kill(pid, m.path)
        assert proc.returncode is not None
        events = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        assert not err.strip() or b"Killed" in err or b"Traceback" not in err, err.decode()
        bad_reads = [e for e in events if e[1] == "X"]
        assert not bad_reads, f"round {rnd}: wrong bytes read from seeded objects: {bad_reads}"
        early = [e for e in events if e[1] == "E" and e[0] < killed_at - 0.05]
        assert not early, f"round {rnd}: errors before the kill: {early}"
        figures["ops_completed"] += sum(1 for e in events if e[1] in ("C", "R", "D", "RD", "V"))
        last = next((e for e in reversed(events) if e[1] != "E"), None)
        if last and last[1] in ("B", "BR", "BD", "BRD"):
            figures["in_flight_at_kill"] += 1
            figures["kills_during"][last[1]] = figures["kills_during"].get(last[1], 0) + 1
        model.apply(events)

        # 1. the dead mount's cache directory
        tp = time.monotonic()
        code, stats = fsck(m.cache_dir)
        assert stats["chunks_bad"] == 0, f"round {rnd}: {stats}"
        assert stats["journal_missing_data"] == 0, f"round {rnd}: {stats}"
        if code != 0:
            figures["orphan_block_files"] += stats["orphan_files"]
            fsck(m.cache_dir, repair=True)
            code, stats = fsck(m.cache_dir)
            assert code == 0, f"round {rnd}: fsck after --repair: {stats}"

        # 2. remount, drain the journal, compare with the model
        phase["fsck"] += time.monotonic() - tp
        tp = time.monotonic()
        m.mount()
        if rng.random() < 0.2:  # killed again while replaying the journal
            time.sleep(rng.uniform(0.0, 0.3))
            kill(daemon_pid(m.path), m.path)
            figures["kills_during_replay"] += 1
            code, stats = fsck(m.cache_dir)
            assert stats["chunks_bad"] == 0 and stats["journal_missing_data"] == 0, stats
            m.mount()
        phase["mount"] += time.monotonic() - tp
        tp = time.monotonic()
        m.flush(timeout=120)
        phase["flush"] += time.monotonic() - tp
        tp = time.monotonic()
        store = store_files(s3, bucket)
        for p, (h, size, level) in model.files.items():
            if model.undetermined(p):
                continue
            assert p in store, f"round {rnd}: {level} file {p} lost"
            assert len(store[p]) == size and xxh(store[p]) == h, \
                f"round {rnd}: {level} file {p} has other bytes in the store"
            figures[level + "_checked"] += 1
        for p in model.gone:
            if model.undetermined(p) or p in model.files:
                continue
            assert p not in store, f"round {rnd}: {p} was deleted/renamed away, came back"
            figures["deleted_checked"] += 1
        assert not [k for k in store if ".conflict-" in k], f"round {rnd}: conflict copies"
        seen = mount_files(m.path)
        assert set(seen) == set(store), f"round {rnd}: mount {sorted(set(seen) ^ set(store))}"
        for p, b in store.items():
            assert xxh(seen[p]) == xxh(b), f"round {rnd}: {p} differs mount vs store"
        phase["verify"] += time.monotonic() - tp
        # continue from what is now known for sure
        model.files = {p: (xxh(b), len(b), "kept") for p, b in store.items()}
        model.unknown.clear()
        model.gone = {p for p in model.gone if p not in store}
        figures["rounds"] += 1
        # the next round starts with the daemon killed: leave it mounted for m.pid
    elapsed = time.monotonic() - t_start
    figures["seconds"] = round(elapsed, 1)
    figures["phase_seconds"] = {k: round(v, 1) for k, v in phase.items()}
    assert figures["rounds"] >= ROUNDS
    assert figures["synced_checked"] >= ROUNDS  # fsynced files, checked in the round they were
    record_figures("crash_loop.json", "crash_loop", figures)
