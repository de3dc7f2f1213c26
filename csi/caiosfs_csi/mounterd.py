"""caiosfs-mounter: the long-lived process that owns the FUSE daemons of a node.

    python -m caiosfs_csi.mounterd --socket /run/caiosfs-csi/mounter/mounter.sock

The node plugin (privileged, restarted and upgraded at will) opens /dev/fuse, mounts the
target itself and hands the descriptor to this process over a unix socket (SCM_RIGHTS). The
mounter runs `caiosfs mount SOURCE /dev/fd/N --target TARGET -f -o ...` as its own child, so
the daemon lives in the mounter's container (cgroup, PID namespace), not the plugin's: killing
the plugin's whole container leaves every volume serving. See docs/csi.md, "Process model".

Requests (one JSON line each, see fdpass.py):

    {"cmd": "start", "target", "source", "options", "volume_id", "strip_credential_env",
     "timeout"} + one /dev/fuse descriptor -> {"ok", "pid"} once the daemon is ready
    {"cmd": "list"}                       -> {"ok", "daemons": [{target, source, pid, state}]}
    {"cmd": "flush", "target", "timeout"} -> {"ok"} once every dirty byte is in the store
    {"cmd": "wait", "target", "timeout"}  -> {"ok", "exited"} after the daemon exits
    {"cmd": "ping"}                       -> {"ok", "version"}

Each daemon's output (its log lines) goes to this process's stdout, one line per event,
prefixed with the volume id and target: `kubectl logs` shows them.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from caiosfs_csi import __version__, fdpass
from caiosfs_csi.mounter import CREDENTIAL_ENV, find_caiosfs

log = logging.getLogger("caiosfs_csi.mounterd")

STARTING, SERVING, EXITED = "starting", "serving", "exited"


@dataclass
class Daemon:
    """One `caiosfs mount` child serving one target."""

    target: str
    source: str
    volume_id: str
    proc: subprocess.Popen[bytes]
    state: str = STARTING
    metrics_port: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    killed_for: str = ""  # why the mounter killed it (memory limit), for the exit line
    started: float = field(default_factory=time.monotonic)
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    changed: threading.Condition = field(default_factory=threading.Condition)

    def info(self) -> dict[str, Any]:
        rss, cpu = proc_usage(self.proc.pid)
        return {"target": self.target, "source": self.source, "volume_id": self.volume_id,
                "pid": self.proc.pid, "state": self.state, "metrics_port": self.metrics_port,
                "rss_bytes": rss, "cpu_seconds": cpu, "labels": self.labels,
                "age": round(time.monotonic() - self.started, 3)}

    def error_line(self) -> str:
        if self.killed_for:
            return self.killed_for
        # caiosfs ends a failed mount with one line "caiosfs: ...": that is the reason.
        for line in reversed(self.lines):
            if line.startswith("caiosfs: "):
                return line[len("caiosfs: "):]
        return self.lines[-1] if self.lines else f"exit status {self.proc.returncode}"


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_usage(pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds user+system) of a process; (0, 0.0) if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return rss, (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0, 0.0


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a daemon's own metrics endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`512M`, `2G`, `2Gi`, `1073741824` -> bytes (ValueError otherwise)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    number = t[: len(t) - len(unit)]
    value = float(number) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(text)
    return int(value)


class MounterServer:
    """Accepts requests on a unix socket; starts, tracks and reaps the FUSE daemons."""

    def __init__(self, socket_path: str, caiosfs_bin: str | None = None,
                 out: Any = None, memory_max: int = 0) -> None:
        self.socket_path = socket_path
        self.memory_max = memory_max  # per daemon, bytes of RSS; 0 = none
        self.memory_kills = 0
        self.caiosfs_bin = find_caiosfs(caiosfs_bin)
        self.out = out if out is not None else sys.stdout
        self._out_lock = threading.Lock()
        self._lock = threading.Lock()
        self.daemons: dict[str, Daemon] = {}
        self._sock: socket.socket | None = None

    # -- daemon output ----------------------------------------------------------------------

    def _emit(self, d: Daemon, line: str) -> None:
        with self._out_lock:
            try:
                self.out.write(f"volume={d.volume_id or '-'} target={d.target} {line}\n")
                self.out.flush()
            except (OSError, ValueError):
                pass

    def _pump(self, d: Daemon) -> None:
        """Read the daemon's output until it exits; notice "ready"; reap it."""
        assert d.proc.stdout is not None
        for raw in d.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line == "ready" and d.state == STARTING:
                with d.changed:
                    d.state = SERVING
                    d.changed.notify_all()
                self._emit(d, "ready")
                continue
            d.lines.append(line)
            self._emit(d, line)
        code = d.proc.wait()
        with d.changed:
            d.state = EXITED
            d.changed.notify_all()
        self._emit(d, f"daemon exited with status {code}")
        with self._lock:
            if self.daemons.get(d.target) is d:
                del self.daemons[d.target]

    # -- requests ---------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        cmd = msg.get("cmd")
        if cmd == "start":
            if len(fds) != 1:
                return {"error": "start needs exactly one /dev/fuse descriptor"}
            fd = fds.pop()
            try:
                return self.start(msg, fd)
            finally:
                os.close(fd)  # the daemon has its own copy now
        if cmd == "list":
            with self._lock:
                return {"ok": True, "daemons": [d.info() for d in self.daemons.values()]}
        if cmd == "flush":
            return self.flush(str(msg.get("target", "")), float(msg.get("timeout", 90)))
        if cmd == "wait":
            return self.wait(str(msg.get("target", "")), float(msg.get("timeout", 30)))
        if cmd == "ping":
            return {"ok": True, "version": __version__, "memory_max": self.memory_max,
                    "memory_kills": self.memory_kills}
        return {"error": f"unknown command {cmd!r}"}

    def start(self, msg: dict[str, Any], fd: int) -> dict[str, Any]:
        target = os.path.normpath(str(msg.get("target", "")))
        source = str(msg.get("source", ""))
        options = [str(o) for o in msg.get("options", [])]
        timeout = float(msg.get("timeout", 300))
        if not os.path.isabs(target) or not source.startswith("s3://"):
            return {"error": "start needs an absolute target and an s3:// source"}
        try:
            st = os.fstat(fd)
        except OSError as e:
            return {"error": f"bad descriptor: {e.strerror}"}
        if not stat.S_ISCHR(st.st_mode):
            return {"error": "the descriptor is not /dev/fuse"}
        with self._lock:
            old = self.daemons.get(target)
            if old is not None and old.state != EXITED:
                return {"error": f"a daemon (pid {old.proc.pid}) still serves {target}"}
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if msg.get("strip_credential_env"):
                for name in CREDENTIAL_ENV:
                    env.pop(name, None)
            # Each daemon serves its metrics on a loopback port of its own; the plugin's node
            # endpoint reads them there and labels them with the volume and pod.
            port = free_loopback_port()
            options = [o for o in options if not o.startswith("metrics=")]
            options.append(f"metrics=127.0.0.1:{port}")
            argv = [self.caiosfs_bin, "mount", source, f"/dev/fd/{fd}", "--target", target,
                    "--foreground", "-o", ",".join(options)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, pass_fds=(fd,),
                                    start_new_session=True)
            labels = msg.get("labels") if isinstance(msg.get("labels"), dict) else {}
            d = Daemon(target=target, source=source, volume_id=str(msg.get("volume_id", "")),
                       proc=proc, metrics_port=port,
                       labels={str(k): str(v) for k, v in labels.items()})
            self.daemons[target] = d
        self._emit(d, f"starting pid {proc.pid}: {' '.join(argv)}")  # argv holds no secret
        threading.Thread(target=self._pump, args=(d,), daemon=True,
                         name=f"daemon-{proc.pid}").start()
        with d.changed:
            d.changed.wait_for(lambda: d.state != STARTING, timeout=timeout)
        if d.state == SERVING:
            return {"ok": True, "pid": proc.pid}
        if d.state == STARTING:
            self._kill(d)
            return {"error": f"caiosfs mount did not become ready within {timeout:.0f}s",
                    "timeout": True}
        return {"error": d.error_line()}

    @staticmethod
    def _kill(d: Daemon) -> None:
        try:
            os.killpg(d.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _find(self, target: str) -> Daemon | None:
        with self._lock:
            return self.daemons.get(os.path.normpath(target))

    def flush(self, target: str, timeout: float) -> dict[str, Any]:
        d = self._find(target)
        if d is None or d.state != SERVING:
            return {"error": f"no daemon serves {target}", "unknown": True}
        argv = [self.caiosfs_bin, "flush", d.target, "--timeout", f"{timeout:g}", "-q"]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout + 30, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"flush of {target} did not finish within {timeout:.0f}s"}
        if r.returncode != 0:
            lines = r.stderr.decode(errors="replace").strip().splitlines()
            return {"error": (lines[-1] if lines else f"exit status {r.returncode}")
                    .removeprefix("caiosfs: ")}
        return {"ok": True}

    def wait(self, target: str, timeout: float) -> dict[str, Any]:
        d = self._find(target)
        if d is None:
            return {"ok": True, "exited": True}
        with d.changed:
            d.changed.wait_for(lambda: d.state == EXITED, timeout=timeout)
        return {"ok": True, "exited": d.state == EXITED}

    # -- socket -----------------------------------------------------------------------------

    def stop_daemons(self, timeout: float) -> int:
        """SIGTERM every daemon (each uploads its dirty data, then exits) and wait for them,
        at most `timeout` seconds. Returns how many were still running at the end."""
        with self._lock:
            daemons = list(self.daemons.values())
        for d in daemons:
            self._emit(d, "mounter stopping: asking the daemon to upload and exit")
            try:
                d.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for d in daemons:
            with d.changed:
                d.changed.wait_for(lambda d=d: d.state == EXITED,
                                   timeout=max(0.0, deadline - time.monotonic()))
        return sum(1 for d in daemons if d.state != EXITED)

    def watch_memory(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Kill any daemon whose resident memory exceeds `memory_max`: that daemon's volume
        ends (its journal keeps what it had not uploaded), the node's other volumes do not,
        as they would if the kernel OOM-killed in a shared container cgroup."""
        while not stop.wait(interval):
            with self._lock:
                daemons = [d for d in self.daemons.values() if d.state != EXITED]
            for d in daemons:
                rss, _ = proc_usage(d.proc.pid)
                if rss > self.memory_max and not d.killed_for:
                    d.killed_for = (f"memory limit exceeded: resident {rss >> 20} MiB > "
                                    f"{self.memory_max >> 20} MiB; killed")
                    self.memory_kills += 1
                    self._emit(d, d.killed_for)
                    self._kill(d)

    def bind(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)  # whoever may hand us a mount may run a daemon
        s.listen(64)
        self._sock = s

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            fds: list[int] = []
            try:
                conn.settimeout(30)
                msg, fds = fdpass.receive(conn)
                conn.settimeout(None)
                reply = self.handle(msg, fds)
            except (fdpass.ProtocolError, OSError) as e:
                reply = {"error": f"bad request: {e}"}
            except Exception as e:  # one bad request never ends the mounter
                log.exception("request failed")
                reply = {"error": f"internal error: {e.__class__.__name__}"}
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                fdpass.send(conn, reply)
            except OSError:
                pass  # the plugin went away meanwhile; the daemon (if any) serves on

    def serve_forever(self, stop: threading.Event) -> None:
        assert self._sock is not None
        self._sock.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    break
                raise
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m caiosfs_csi.mounterd` and `caiosfs-mounter`."""
    p = argparse.ArgumentParser(prog="caiosfs-mounter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", default=os.environ.get(
        "CAIOSFS_MOUNTER_SOCKET", "/run/caiosfs-csi/mounter/mounter.sock"),
        help="unix socket the plugin hands mounts to (env CAIOSFS_MOUNTER_SOCKET)")
    p.add_argument("--caiosfs-bin", default=os.environ.get("CAIOSFS_BIN") or None)
    p.add_argument("--stop-daemons", action="store_true",
                   default=os.environ.get("CAIOSFS_MOUNTER_STOP_DAEMONS") in ("1", "true"),
                   help="on SIGTERM, make every daemon upload its dirty data and exit before "
                        "the mounter does; in a container they would be killed with it anyway "
                        "(env CAIOSFS_MOUNTER_STOP_DAEMONS)")
    p.add_argument("--stop-timeout", type=float,
                   default=float(os.environ.get("CAIOSFS_MOUNTER_STOP_TIMEOUT", "540")),
                   help="seconds to wait for the daemons with --stop-daemons (keep it below "
                        "the pod's terminationGracePeriodSeconds)")
    p.add_argument("--daemon-memory-max", metavar="SIZE",
                   default=os.environ.get("CAIOSFS_MOUNTER_DAEMON_MEMORY_MAX", ""),
                   help="kill a daemon whose resident memory exceeds SIZE (e.g. 2G), checked "
                        "every second (env CAIOSFS_MOUNTER_DAEMON_MEMORY_MAX; empty: no limit)")
    p.add_argument("--log-level", default=os.environ.get("CAIOSFS_CSI_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        memory_max = parse_size(a.daemon_memory_max) if a.daemon_memory_max else 0
    except ValueError:
        print(f"caiosfs-mounter: --daemon-memory-max {a.daemon_memory_max!r} is not a size "
              "such as 2G", file=sys.stderr)
        return 2
    server = MounterServer(a.socket, a.caiosfs_bin, memory_max=memory_max)
    try:
        server.bind()
    except OSError as e:
        print(f"caiosfs-mounter: cannot listen on {a.socket}: {e.strerror}", file=sys.stderr)
        return 1
    stop = threading.Event()
    if memory_max:
        threading.Thread(target=server.watch_memory, args=(stop,), daemon=True,
                         name="memory").start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("caiosfs-mounter %s listening on %s (caiosfs: %s)", __version__, a.socket,
             server.caiosfs_bin)
    server.serve_forever(stop)
    if a.stop_daemons:
        left = server.stop_daemons(a.stop_timeout)
        log.info("stopped; %d daemon(s) still running after %.0fs", left, a.stop_timeout)
        return 0
    # Otherwise the daemons, in sessions of their own, keep serving (outside a container;
    # in one, they end with it: see docs/csi.md on upgrading the mounter).
    log.info("stopping; %d daemon(s) left running", len(server.daemons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
