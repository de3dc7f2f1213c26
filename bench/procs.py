"""Process plumbing for the benchmark: bounded child runs, cache drops, unmounts, RSS sampling.

Everything here is bounded in time: a FUSE daemon that hangs must cost one failed measurement,
never the whole run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A measurement failed; the message is what the report shows."""


@dataclass
class Completed:
    """The outcome of `run_bounded`: exit status, output and wall time around the child."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cpu_s: float = 0.0  # user + system of the child and what it waited for (rusage)


def _tail(text: str, n: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def run_bounded(
    argv: list[str],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
    on_timeout: Any = None,
    stdout_to_devnull: bool = False,
) -> Completed:
    """Run a child with a hard time limit; raise BenchError on timeout or (with check) failure.

    The child gets its own session so that on timeout its whole group can be killed. A child
    stuck in a FUSE request may not die from SIGKILL until the request is answered, so the
    caller passes ``on_timeout(pid)`` (typically: note where the child is stuck, then kill the
    daemon / abort the FUSE connection), which runs before the kill and the wait.
    """
    t0 = time.monotonic()
    # (RUSAGE_CHILDREN grows by what each child this process reaps has used: the bench
    # runs one command at a time, so the difference is this child's own)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if stdout_to_devnull else subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            try:
                # Before the kill: on_timeout may want to record where the child is stuck.
                on_timeout(proc.pid)
            except Exception as e:  # noqa: BLE001 - best effort; the timeout is the real error
                print(f"bench: cleanup after timeout failed: {e}", file=sys.stderr)
        _killpg(proc.pid)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "(child did not die)"
        raise BenchError(
            f"timed out after {timeout:.0f} s: {' '.join(argv[:4])}... {_tail(err or '')}"
        ) from None
    seconds = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    res = Completed(proc.returncode, out or "", err or "", seconds, round(cpu, 3))
    if check and proc.returncode != 0:
        raise BenchError(
            f"{Path(argv[0]).name} exited {proc.returncode}: {_tail(res.stderr or res.stdout)}"
        )
    return res


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_worker(
    op: str,
    args: dict[str, Any],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    on_timeout: Any = None,
) -> dict[str, Any]:
    """Run ``python -m bench.worker OP`` with JSON args on stdin-less argv; return its JSON."""
    argv = [sys.executable, "-m", "bench.worker", op, json.dumps(args)]
    res = run_bounded(argv, timeout, env=env, cwd=REPO, on_timeout=on_timeout, check=False)
    if res.returncode != 0:
        raise BenchError(f"{op}: {_tail(res.stderr or res.stdout)}")
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"{op}: worker printed no result: {_tail(res.stdout + res.stderr)}")
    if "error" in out:
        raise BenchError(f"{op}: {out['error']}")
    return out


# ---- page cache ----------------------------------------------------------------------------


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


_OWN_DROPS = [0]  # drop_caches() calls of this process that reached the kernel


def page_cache_drops() -> tuple[int, int] | None:
    """(times the page cache was dropped since boot, by anyone; of those, by this
    process), or None where /proc/vmstat does not say. Other work on a shared machine drops
    it too (other benchmarks), and with it the dentries a measurement relied on."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1]), _OWN_DROPS[0]
    except OSError:
        pass
    return None


def drop_caches(sync_path: str | Path | None = "/var/tmp") -> bool:
    """Write back dirty pages of ``sync_path``'s filesystem, then drop the page cache,
    dentries and inodes; False if not root.

    drop_caches only drops clean pages, hence the write-back first. Not a global sync(): that
    also writes back every FUSE mount on the machine (other people's, hung ones included) and
    could block forever; ``sync -f`` syncs the one local filesystem our caches live on, and
    runs in a bounded child.
    """
    if not can_drop_caches():
        return False
    if sync_path is not None:
        try:
            subprocess.run(["sync", "-f", str(sync_path)], timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    _OWN_DROPS[0] += 1
    return True


def kernel_stacks(pid: int, limit: int = 8) -> str:
    """Where the threads of a (stuck) process wait in the kernel: the syscall and the top of
    /proc/TID/stack, for reports of hangs."""
    out = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)[:limit]
    except OSError:
        return ""
    for tid in tids:
        try:
            stack = Path(f"/proc/{pid}/task/{tid}/stack").read_text().split("\n")
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue
        frames = [f.split()[-1] for f in stack if f.strip()][:4]
        out.append(f"tid {tid} wchan={wchan} " + "<".join(frames))
    return "; ".join(out)


# ---- mounts ----------------------------------------------------------------------------------


def mount_entry(mountpoint: Path) -> dict[str, str] | None:
    """The /proc/self/mountinfo entry of a mountpoint (keys: id, dev, fstype, source)."""
    from caiosfs import mountinfo  # bench's helpers import caiosfs only where they use it

    target = str(mountpoint.resolve()) if mountpoint.exists() else str(mountpoint)
    try:
        m = mountinfo.find(target)
    except OSError:
        return None
    if m is None:
        return None
    return {"id": str(m.mount_id), "dev": m.device, "fstype": m.fstype, "source": m.source}


def is_fuse_mounted(mountpoint: Path) -> bool:
    e = mount_entry(mountpoint)
    return e is not None and e["fstype"].startswith("fuse")


def abort_fuse(mountpoint: Path) -> None:
    """Abort the FUSE connection of a mount: every pending and future request fails at once.

    This is what frees a process stuck in a request to a hung daemon.
    """
    e = mount_entry(mountpoint)
    if e is None or not e["fstype"].startswith("fuse"):
        return
    major, minor = e["dev"].split(":")
    if major != "0":
        return
    abort = Path(f"/sys/fs/fuse/connections/{minor}/abort")
    try:
        abort.write_text("1")
    except OSError:
        pass


def force_unmount(mountpoint: Path) -> None:
    """Get rid of a mount whatever state its daemon is in (abort, then lazy unmount)."""
    if mount_entry(mountpoint) is None:
        return
    abort_fuse(mountpoint)
    for argv in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            subprocess.run(argv, capture_output=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if mount_entry(mountpoint) is None:
            return


def wait_for(pred: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``pred()`` until true or ``timeout`` seconds passed; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---- processes and memory -------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/PID/task/*/children (no full /proc scan)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.extend(int(x) for x in text.split())
    return out


def process_tree(pid: int, limit: int = 256) -> list[int]:
    """pid and all its descendants (bounded, in case of a fork storm)."""
    seen = [pid]
    i = 0
    while i < len(seen) and len(seen) < limit:
        seen.extend(c for c in children(seen[i]) if c not in seen)
        i += 1
    return seen


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def find_pids_by_arg(needle: str, must_contain: str) -> list[int]:
    """Processes whose argv has an argument equal to needle and any argument containing
    must_contain (e.g. the mountpoint and "caiosfs"); ourselves excluded."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        argv = cmdline(int(name))
        if needle in argv and any(must_contain in a for a in argv[:3]):
            out.append(int(name))
    return sorted(out)


class RssSampler:
    """Samples the summed VmRSS of a few process trees in a background thread.

    ``peak_mib`` is the larger of the highest sampled sum and the kernel's own per-process high
    water mark (VmHWM, read at ``stop``), so a spike between two samples is not missed for the
    main process.
    """

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        self.roots = list(pids)
        self.interval = interval
        self.peak_kib = 0
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        if self.roots:
            self._thread.start()
        return self

    def _sample(self) -> None:
        total = 0
        for root in self.roots:
            for pid in process_tree(root):
                total += status_kib(pid, "VmRSS")
                self.hwm_kib = max(self.hwm_kib, status_kib(pid, "VmHWM"))
        self.peak_kib = max(self.peak_kib, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> float | None:
        """Stop sampling; return the peak in MiB (None if there was nothing to watch)."""
        if not self.roots:
            return None
        self._sample()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return max(self.peak_kib, self.hwm_kib) / 1024


# ---- CPU time ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu(path: str, with_children: bool) -> float:
    """utime + stime (and, with_children, cutime + cstime) of a /proc .../stat file, in
    seconds; 0 if it is gone. The fields after the command name, which may hold spaces."""
    try:
        text = Path(path).read_text()
    except OSError:
        return 0.0
    f = text[text.rfind(")") + 2 :].split()
    try:
        # f[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
        ticks = int(f[11]) + int(f[12])
        if with_children:
            ticks += int(f[13]) + int(f[14])
    except (IndexError, ValueError):
        return 0.0
    return ticks / _TICK


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread, reaped children included) of pid and all its
    descendants: what a daemon has cost the machine so far."""
    return sum(_stat_cpu(f"/proc/{p}/stat", True) for p in process_tree(pid))


def thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds (user + system) of one thread (/proc/PID/task/TID/stat)."""
    return _stat_cpu(f"/proc/{pid}/task/{tid}/stat", False)
