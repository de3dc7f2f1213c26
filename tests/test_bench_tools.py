"""The benchmark's own instruments: the WAN proxy delays, paces and forwards bytes intact; the
content generator's ranges are the bytes of the stream; the report judges targets from the
run's medians. (The benchmark itself runs in CI as `bench/run --quick --strict`.)"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import data
from bench.wanproxy import parse_spec

REPO = Path(__file__).resolve().parent.parent


class Server:
    """A tiny line protocol on 127.0.0.1: "GET N SEED\\n" answers N bytes of sha256-chained
    content; "PUT N\\n" + N bytes answers the sha256 of what arrived."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for _ in range(1000):
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        f = c.makefile("rb")
        try:
            for _ in range(1000):
                line = f.readline()
                if not line:
                    break
                op, n, *rest = line.split()
                if op == b"GET":
                    c.sendall(content(int(n), rest[0]))
                else:
                    c.sendall(hashlib.sha256(f.read(int(n))).hexdigest().encode() + b"\n")
        except OSError:
            pass
        finally:
            c.close()


def content(n: int, seed: bytes) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def recv_exact(s: socket.socket, n: int) -> tuple[bytes, float]:
    """n bytes from s, and the seconds until the first of them arrived."""
    t0 = time.monotonic()
    first = None
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(1 << 20)
        if not b:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        if first is None:
            first = time.monotonic() - t0
        buf += b
    return bytes(buf), first or 0.0


@pytest.fixture
def proxy(tmp_path: Path):
    """Start bench.wanproxy with a spec in front of a Server; yield (port, server)."""
    procs = []

    def start(spec: str) -> int:
        srv = Server()
        port_file = tmp_path / f"port{len(procs)}"
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.wanproxy",
                "--target",
                f"127.0.0.1:{srv.port}",
                "--spec",
                spec,
                "--port-file",
                str(port_file),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        procs.append(p)
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise AssertionError("wanproxy did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_proxy_holds_each_response_for_the_delay(proxy) -> None:
    port = proxy("100ms,0")
    s = socket.create_connection(("127.0.0.1", port))
    for i in range(3):  # every response on a kept-alive connection pays the delay
        s.sendall(f"GET 1000 s{i}\n".encode())
        body, first = recv_exact(s, 1000)
        assert body == content(1000, f"s{i}".encode())
        assert 0.095 <= first < 1.0, first
    s.close()


def test_proxy_paces_each_connection_and_parallel_ones_add_up(proxy) -> None:
    port = proxy("1ms,20MB/s")
    n = 10_000_000

    def one(seed: str, out: list[float]) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        s.sendall(f"GET {n} {seed}\n".encode())
        body, _ = recv_exact(s, n)
        out.append(time.monotonic() - t0)
        assert hashlib.sha256(body).digest() == hashlib.sha256(content(n, seed.encode())).digest()
        s.close()

    single: list[float] = []
    one("a", single)
    # 10 MB at 20 MB/s: 0.5 s at the very least; the pacer may run a few ms ahead, not more.
    assert single[0] >= 0.45, single
    par: list[float] = []
    ts = [threading.Thread(target=one, args=(f"p{i}", par)) for i in range(4)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    wall = time.monotonic() - t0
    assert len(par) == 4 and min(par) >= 0.45
    # Four connections together are paced each on its own, not as one: well under 4 x 0.5 s.
    assert wall < 1.8, wall


def test_proxy_forwards_uploads_intact(proxy) -> None:
    port = proxy("5ms,0")
    payload = os.urandom(3_000_000)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"PUT {len(payload)}\n".encode() + payload)
    answer, _ = recv_exact(s, 65)
    assert answer.decode().strip() == hashlib.sha256(payload).hexdigest()
    s.close()


def test_proxy_rejects_bad_spec_and_remote_target(tmp_path: Path) -> None:
    for argv, msg in (
        (["--target", "127.0.0.1:1", "--spec", "20xs,1MB/s"], "bad delay"),
        (["--target", "10.0.0.1:80", "--spec", "20ms,1MB/s"], "loopback"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "bench.wanproxy", *argv, "--port-file", str(tmp_path / "p")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_parse_spec() -> None:
    assert parse_spec("20ms,50MB/s") == (0.02, 50e6)
    assert parse_spec("1s,1GiB/s") == (1.0, float(1 << 30))
    assert parse_spec("0ms,0") == (0.0, 0.0)


def test_range_bytes_are_the_stream() -> None:
    size = 3 * data.MiB + 12_345
    whole = data.make_bytes("seq", size)
    for off, n in (
        (0, size),
        (1, 10),
        (data.MiB - 3, 7),
        (2 * data.MiB + 5, size - 2 * data.MiB - 5),
    ):
        assert data.range_bytes("seq", off, n) == whole[off : off + n]
    # A read from the wrong place has a different digest.
    assert data.range_digest("seq", 4096, 4096) != data.range_digest("seq", 8192, 4096)


def test_report_judges_targets_and_cpu_on_its_own_run() -> None:
    from bench import report
    from bench.workloads import WORKLOADS, Outcome, Sample

    wl = {w.name: w for w in WORKLOADS}
    rows = [
        ("seq_read_cold", wl["seq_read_cold"], "loopback"),
        ("seq_read_cold@wan", wl["seq_read_cold"], "wan"),
        ("seq_write@wan", wl["seq_write"], "wan"),
    ]
    res = report.Results(rows, ["caiosfs", "rclone", "s3fs", "boto3"])
    gib = float(1 << 30)
    for rate, secs in ((90.0, 1.0), (100.0, 1.0), (110.0, 1.0)):  # median 100
        cpu = {"bytes": gib, "daemon_s": 0.5, "loop_s": 0.25}
        res.add("seq_read_cold@wan", "caiosfs", Outcome([Sample("read", "MB/s", rate, secs)]))
        res.add("seq_read_cold", "caiosfs", Outcome([Sample("read", "MB/s", rate, secs)], cpu=cpu))
        res.add(
            "seq_read_cold",
            "rclone",
            Outcome([Sample("read", "MB/s", 50, 2)], cpu=dict(cpu, daemon_s=4.0)),
        )
    for _ in range(3):
        res.add("seq_read_cold@wan", "boto3", Outcome([Sample("read", "MB/s", 125.0, 0.8)]))
        res.add("seq_read_cold@wan", "rclone", Outcome([Sample("read", "MB/s", 40.0, 2.5)]))
        res.add("seq_write@wan", "caiosfs", Outcome([Sample("durable", "MB/s", 100.0, 10.0)]))
        res.add("seq_write@wan", "boto3", Outcome([Sample("durable", "MB/s", 105.0, 9.5)]))
    got = {(t["target"], t["row"]): t for t in report.targets(res)}
    raw = got[("cold 1 GiB read ≥ 0.85× raw", "seq_read_cold@wan")]
    assert abs(raw["ratio"] - 0.8) < 1e-9 and not raw["met"] and raw["n"] == 3
    assert got[("cold read ≥ 2× rclone", "seq_read_cold@wan")]["met"]  # 100 / 40
    w = got[("write durable ≤ 1.1× raw", "seq_write@wan")]
    assert abs(w["ratio"] - 1.05) < 1e-9 and w["met"]  # time ratio = rate of boto3 / caiosfs
    c = got[("cold read CPU/GiB ≤ 0.25× rclone's", "seq_read_cold")]
    assert abs(c["ratio"] - 0.125) < 1e-9 and c["met"]
    loop = got[("loop ceiling ≥ 2 GiB/s of cold streaming", "seq_read_cold")]
    assert abs(loop["ratio"] - 4.0) < 1e-9 and loop["met"]
    meta = {
        "date": "d",
        "machine": "2 cores",
        "command": "bench/run --only seq_read_cold",
        "git": "abc",
        "scale": {"reps": 3},
        "nets": ["loopback", "wan"],
        "wan": "20ms,50MB/s",
    }
    block = report.readme_block(res, meta, "run-x")
    assert "bench/run --only seq_read_cold" in block and "| missed |" in block
    md = report.markdown(res, meta)
    assert "## Behind the WAN proxy (20ms,50MB/s)" in md and "| seq_read_cold | 0.50 | 4.00 |" in md


def test_store_seeds_only_what_is_read_and_durable_waits_for_temporaries(seaweed, tmp_path) -> None:
    """Against a real server: seeding the 'seq' part makes only the sequential object (with
    the content the workloads compare against); a second seed reuses it and adds 'stat';
    wait_durable(gone=...) returns only once a temporary object is deleted, and names it
    when it never is."""
    import dataclasses

    from bench.procs import BenchError
    from bench.scale import MiB, make_scale
    from bench.store import PREFIX, Store

    scale = dataclasses.replace(
        make_scale(True, None, None), seq_bytes=2 * MiB, stat_objects=20, loader_objects=20
    )
    store = Store(tmp_path, seaweed.endpoint, seaweed.access_key, seaweed.secret_key)
    store.start()
    logs: list[str] = []
    ds = store.seed(scale, logs.append, {"seq"})
    assert store.object_digest(ds.seq_key) == ds.seq_digest == data.digest("seq", 2 * MiB)
    assert store.list_sizes("stat/") == {} and store.list_sizes("loader/") == {}
    logs.clear()
    ds = store.seed(scale, logs.append, {"seq", "stat"})
    assert any("reusing seq" in x for x in logs), logs
    assert len(store.list_sizes("stat/")) == 20 and ds.stat_count == 20

    c = store.client
    c.put_object(Bucket="caiosfs-bench", Key=f"{PREFIX}/d/final", Body=b"x" * 10)
    c.put_object(Bucket="caiosfs-bench", Key=f"{PREFIX}/d/final.tmp", Body=b"x")
    t_del: list[float] = []

    def delete_later() -> None:
        time.sleep(0.6)
        c.delete_object(Bucket="caiosfs-bench", Key=f"{PREFIX}/d/final.tmp")
        t_del.append(time.monotonic())

    th = threading.Thread(target=delete_later)
    th.start()
    t = store.wait_durable("d/", {"d/final": 10}, 20, gone=lambda k: k.endswith(".tmp"))
    th.join()
    assert t >= t_del[0] - 0.01
    c.put_object(Bucket="caiosfs-bench", Key=f"{PREFIX}/d/stuck.tmp", Body=b"x")
    with pytest.raises(BenchError, match=r"temporary object.*d/stuck\.tmp"):
        store.wait_durable("d/", {"d/final": 10}, 1, gone=lambda k: k.endswith(".tmp"))
    store.delete_prefix("")


def test_devtree_settle_leaves_no_index_entry_racily_clean(tmp_path: Path) -> None:
    """dev_git's cold git status and tar c split the tree's reads between them by how many
    index entries are racily clean (file mtime not older than the index's, in seconds): the
    bench settles the clone's index first. Here every entry starts racy (the files and the
    index given one time), and none may be left."""
    import types

    import bench.workloads  # noqa: F401  (bench.devtree is registered from it)
    from bench import devtree

    def git(cwd: Path, *args: str) -> str:
        return subprocess.run([*devtree.GIT, *args], cwd=cwd, check=True, capture_output=True,
                              text=True).stdout

    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q", "-b", "main")
    for i in range(20):
        (origin / f"m{i}.py").write_text(f"x = {i}\n")
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "one")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-local", str(origin), str(clone))
    files = git(clone, "ls-files").split()
    now = time.time_ns()
    for p in [*(clone / f for f in files), clone / ".git" / "index"]:
        os.utime(p, ns=(now, now))

    def racy() -> list[str]:
        idx = os.stat(clone / ".git" / "index").st_mtime_ns // 10**9
        return [f for f in files if os.stat(clone / f).st_mtime_ns // 10**9 >= idx]
    assert len(racy()) == len(files)
    ctx = types.SimpleNamespace(scale=types.SimpleNamespace(op_timeout=60.0))
    devtree._settle_index(ctx, clone, None)
    assert racy() == []
    assert git(clone, "status", "--porcelain") == ""


def test_page_cache_drops_tell_this_process_from_others() -> None:
    """A measurement notes drops of the page cache by other processes: the kernel's count
    takes in every drop, the bench's own are counted apart."""
    from bench import procs

    before = procs.page_cache_drops()
    assert before is not None
    dropped = procs.drop_caches(None)  # False (and no drop) when not root
    after = procs.page_cache_drops()
    assert after is not None
    assert after[1] - before[1] == int(dropped)
    assert after[0] - before[0] >= int(dropped)


def test_rm_waits_while_objects_go_and_fails_once_they_stop(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """dev_git's `rm -rf` is timed until the store holds nothing under the tree; a peer that
    keeps objects for good (rclone's write-back) fails after GONE_STALL, not after the
    whole timeout."""
    from types import SimpleNamespace

    import bench.workloads  # noqa: F401 - the registry first: it imports devtree itself
    from bench import devtree
    from bench.procs import BenchError
    monkeypatch.setattr(devtree, "GONE_STALL", 0.5)

    class Store:
        def __init__(self, counts: list[int]) -> None:
            self.counts = counts

        def list_sizes(self, prefix: str) -> dict[str, int]:
            n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
            return {f"{prefix}k{i}": 1 for i in range(n)}

    # going one by one, slower than GONE_STALL in all but not between two listings: waited for
    draining = SimpleNamespace(store=Store([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]))
    t0 = time.monotonic()
    assert devtree._wait_gone(draining, "t", 30) >= t0 + 0.8
    # three left for good: fails in about GONE_STALL, naming what is left
    stuck = SimpleNamespace(store=Store([5, 3]))
    t0 = time.monotonic()
    with pytest.raises(BenchError, match="3 objects still in the store"):
        devtree._wait_gone(stuck, "t", 30)
    assert 0.5 <= time.monotonic() - t0 < 5


def test_copy_rows_show_each_data_set_s_cpu_and_the_store_s() -> None:
    """`caiosfs cp` measures three data sets in one outcome: the CPU table has a row per
    set, the client's CPU where a system has no daemon, and the store's column."""
    from bench import report
    from bench.workloads import WORKLOADS, Outcome, Sample

    wl = {w.name: w for w in WORKLOADS}
    res = report.Results([("cp_down", wl["cp_down"], "loopback")], ["caiosfs", "rclone", "boto3"])
    gib = float(1 << 30)
    for system, client in (("caiosfs", 0.5), ("rclone", 2.0), ("boto3", 0.4)):
        cpu = {"tree:bytes": gib / 64, "tree:client_s": client / 8, "tree:server_s": 0.25,
               "big:bytes": gib, "big:client_s": client, "big:server_s": 6 * client}
        res.add("cp_down", system, Outcome([Sample("big", "MB/s", 100.0, 10.0)], cpu=cpu))
    assert report.cpu_parts({"bytes": 1.0, "a:bytes": 2.0}) == {"": {"bytes": 1.0},
                                                                "a": {"bytes": 2.0}}
    md = report.markdown(res, {"date": "d", "machine": "m", "command": "c", "git": "g",
                               "scale": {"reps": 1}, "nets": ["loopback"], "wan": ""})
    rows = {line.split(" | ")[0]: line for line in md.splitlines()
            if line.startswith("| cp_down (")}
    # (columns: caiosfs, rclone, boto3, loop, ceiling, caiosfs/rclone, the store while
    # caiosfs and while rclone worked, proxy)
    assert (rows["| cp_down (big)"]
            == "| cp_down (big) | 0.50 | 2.00 | 0.40 |  |  | 0.25× | 3.00 | 12.00 |  |")
    assert rows["| cp_down (tree)"].startswith("| cp_down (tree) | 4.00 | 16.00 | 3.20 |")
    assert "| 16.00 | 16.00 |" in rows["| cp_down (tree)"]  # the store: 0.25 s for 1/64 GiB


def test_run_bounded_counts_the_child_s_cpu() -> None:
    from bench import procs

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    res = procs.run_bounded([sys.executable, "-c", busy], 30)
    assert 0.25 <= res.cpu_s < 5, res.cpu_s
    idle = procs.run_bounded([sys.executable, "-c", "import time; time.sleep(0.3)"], 30)
    assert idle.cpu_s < 0.25, idle.cpu_s
