"""The control channel of a running mount: a unix socket speaking line-delimited JSON.

Requests: ``{"cmd": "status"}``, ``{"cmd": "flush"}`` (progress lines, then a final reply).
Each mount registers ``<runtime dir>/<id>.json`` (pid, source, mountpoint, cache_dir, socket)
so ``caiosfs status`` can find every mount without a metrics port.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

if TYPE_CHECKING:
    import trio

Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[dict[str, Any]]]


def runtime_dir() -> Path:
    base = Path("/run/caiosfs") if os.geteuid() == 0 else Path(
        os.environ.get("XDG_RUNTIME_DIR", f"/tmp/caiosfs-{os.getuid()}"))
    if base.name != "caiosfs":
        base = base / "caiosfs"
    return base


def mount_id(mountpoint: str | Path) -> str:
    # abspath, not realpath: resolving would stat the mount itself (and wait on us).
    return xxhash.xxh64_hexdigest(os.path.abspath(mountpoint).encode())


def socket_path(mountpoint: str | Path) -> Path:
    return runtime_dir() / f"{mount_id(mountpoint)}.sock"


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, it names one process,
    even after the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def register(mountpoint: str, info: dict[str, Any]) -> Path:
    d = runtime_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    p = d / f"{mount_id(mountpoint)}.json"
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**info, "started": _start_time(info["pid"])}))
    tmp.replace(p)
    return p


def unregister(mountpoint: str) -> None:
    """Remove this process's entry; one that a newer mount of the same mountpoint wrote
    (after a lazy unmount of ours) stays, with its socket."""
    p = runtime_dir() / f"{mount_id(mountpoint)}.json"
    try:
        if json.loads(p.read_text()).get("pid") != os.getpid():
            return
    except (OSError, ValueError):
        pass
    for suffix in (".json", ".sock"):
        p.with_suffix(suffix).unlink(missing_ok=True)


def registered() -> list[dict[str, Any]]:
    out = []
    d = runtime_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                info = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            # A stale entry (its daemon was killed) is skipped, not removed: the next mount
            # of that mountpoint replaces it, and removing it here could remove that new
            # entry, written between our read and the unlink.
            if _alive(info.get("pid", 0), info.get("started")):
                out.append(info)
    return out


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie) and, if ``started`` is given, is the one
    that started then (not a later process that got the same pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is not None and _start_time(pid) not in (started, None):
        return False
    try:  # a zombie has exited; its parent just has not reaped it yet
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


async def serve(path: Path, handle: Handler) -> None:
    """Serve requests until cancelled (runs in the filesystem's nursery)."""
    import trio  # here: the clients (`caiosfs status`, `flush`, `umount`) never need it
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            req = json.loads(buf.split(b"\n", 1)[0])

            async def progress(msg: dict[str, Any]) -> None:
                await stream.send_all(json.dumps({"progress": msg}).encode() + b"\n")
            try:
                reply = await handle(req, progress)
            except Exception as exc:  # noqa: BLE001 - reported to the client; the mount serves on
                reply = {"error": str(exc)}
            try:
                await stream.send_all(json.dumps({"result": reply}).encode() + b"\n")
            except trio.BrokenResourceError:
                pass
    await trio.serve_listeners(one, [listener])


def request(mountpoint: str | Path, req: dict[str, Any], timeout: float | None = None
            ) -> Iterator[dict[str, Any]]:
    """Send one request to a mount; yields progress messages, then the final result."""
    try:
        yield from request_socket(socket_path(mountpoint), req, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConnectionError(f"{mountpoint} is not a running caiosfs mount") from None


def request_socket(path: Path, req: dict[str, Any], timeout: float | None = None
                   ) -> Iterator[dict[str, Any]]:
    """The same over any control socket (``caiosfs warm`` serves one for other warms)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("the control connection was closed")
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "result" in msg:
                    yield {"result": msg["result"]}
                    return
                yield msg


def flush(mountpoint: str | Path, timeout: float | None,
          progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Have a mount upload every dirty byte (``caiosfs flush``, ``umount``). ``progress``
    gets the mount's progress at most once a second, however often uploads finish;
    TimeoutError once ``timeout`` has passed for the whole flush (the socket's timeout is
    per read, and progress arrives every second)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0.0
    for msg in request(mountpoint, {"cmd": "flush"}, timeout=timeout):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        if "progress" in msg and progress is not None and time.monotonic() - shown >= 1:
            shown = time.monotonic()
            progress(msg["progress"])
