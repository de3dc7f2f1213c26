"""A loopback TCP proxy that makes a local S3 server behave like a remote one.

``python -m bench.wanproxy --target 127.0.0.1:PORT --spec 20ms,100MB/s --port-file F``

Two effects, per connection, applied to every system alike:

- first-byte delay: the first byte of each response leaves no earlier than DELAY after the
  last byte of the request it answers. HTTP/1.1 on one connection is strictly turn-taking
  (request, response, request, ...), so "the server starts talking after the client talked"
  marks a response without parsing HTTP. (An ``Expect: 100-continue`` upload pays the delay
  twice, as it would over a real network: once for the 100, once for the final status.)
- bandwidth cap: each direction of each connection is paced to at most BANDWIDTH bytes/s, as
  a single TCP stream over a long path would be. Parallel connections add up, which is exactly
  what parallel range requests exploit.

It listens on 127.0.0.1 only and forwards only to a loopback target.

How it moves bytes: two threads per connection, one per direction, each moving data with
``splice(2)`` from the source socket into a pipe and from the pipe into the destination
socket, so the bytes never enter Python (no copy into a bytes object, no allocation, the GIL
released during each call). The first version was an asyncio proxy reading 1 MiB at a time;
on this 2-core machine it needed ~1.6 s of CPU per GiB and capped raw boto3 at a fraction
of what the server gives straight (see bench/README.md, "The proxy's own ceiling").
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

# Bytes moved per splice call at most (and the pipe's size). The pacing sleeps once per
# call, so at 50 MB/s a 1 MiB call is a 21 ms step: fine next to a 20 ms first-byte delay.
CHUNK = 1024 * 1024
BURST_S = 0.005
SPLICE_MOVE = getattr(os, "SPLICE_F_MOVE", 1)


def parse_spec(spec: str) -> tuple[float, float]:
    """ "20ms,100MB/s" -> (0.020 s, 100e6 bytes/s). Bandwidth 0 or "inf" means no cap."""
    try:
        delay_s, bw_s = (x.strip() for x in spec.split(","))
    except ValueError:
        raise ValueError(f"WAN spec {spec!r}: want DELAY,BANDWIDTH such as 20ms,100MB/s") from None
    m = re.fullmatch(r"([\d.]+)\s*(us|ms|s)?", delay_s)
    if not m:
        raise ValueError(f"bad delay {delay_s!r} (e.g. 20ms)")
    delay = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}[m.group(2)]
    if bw_s.lower() in ("0", "inf", "none"):
        return delay, 0.0
    m = re.fullmatch(r"([\d.]+)\s*([kKmMgG]i?)?B/s", bw_s)
    if not m:
        raise ValueError(f"bad bandwidth {bw_s!r} (e.g. 100MB/s, 1GiB/s)")
    unit = (m.group(2) or "").lower()
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1 << 20, "gi": 1 << 30}[unit]
    return delay, float(m.group(1)) * mult


class Pacer:
    """Paces one direction of one connection to ``bw`` bytes/s (0: unpaced)."""

    def __init__(self, bw: float) -> None:
        self.bw = bw
        self.t = 0.0  # when the bytes sent so far would have finished on a bw-wide link

    def send(self, n: int) -> None:
        if self.bw <= 0:
            return
        now = time.monotonic()
        # A link that fell behind (the proxy was busy elsewhere) may catch up by a little,
        # as a real path's buffers allow; without this, every scheduling hiccup is lost
        # and a connection paced to 50 MB/s carried ~35 MB/s.
        self.t = max(self.t, now - BURST_S) + n / self.bw
        if self.t > now:
            time.sleep(self.t - now)


class Conn:
    """One proxied connection: the client's socket, the server's, and the turn-taking state
    that tells a response's first bytes apart."""

    def __init__(self, client: socket.socket, server: socket.socket, delay: float, bw: float):
        self.client = client
        self.server = server
        self.delay = delay
        self.bw = bw
        self.last_request_byte = 0.0
        self.client_turn = True  # True until the server answers the current request
        self.done = 0
        self.lock = threading.Lock()

    def pump(self, up: bool) -> None:
        """Move one direction until EOF or an error; then half-close the other side."""
        src, dst = (self.client, self.server) if up else (self.server, self.client)
        pacer = Pacer(self.bw)
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
            sfd, dfd = src.fileno(), dst.fileno()
            for _ in range(1 << 62):
                n = os.splice(sfd, w, CHUNK, flags=SPLICE_MOVE)
                if n <= 0:
                    break
                if up:
                    self.client_turn = True
                    self.last_request_byte = time.monotonic()
                elif self.client_turn:
                    self.client_turn = False
                    wait = self.last_request_byte + self.delay - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                pacer.send(n)
                left = n
                for _ in range(1 << 40):
                    if left <= 0:
                        break
                    left -= os.splice(r, dfd, left, flags=SPLICE_MOVE)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            # A reset by either side: drop the whole connection.
            for s in (self.client, self.server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            os.close(r)
            os.close(w)
            with self.lock:
                self.done += 1
                last = self.done == 2
            if last:
                self.client.close()
                self.server.close()


def handle(client: socket.socket, target: tuple[str, int], delay: float, bw: float) -> None:
    try:
        server = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    server.settimeout(None)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Conn(client, server, delay, bw)
    for up in (True, False):
        threading.Thread(target=conn.pump, args=(up,), daemon=True).start()


def serve(target: tuple[str, int], delay: float, bw: float, port_file: Path) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    port = lsock.getsockname()[1]
    port_file.write_text(f"{port}\n")
    cap = f"{bw / 1e6:.0f} MB/s per connection" if bw else "no bandwidth cap"
    print(
        f"wanproxy 127.0.0.1:{port} -> {target[0]}:{target[1]}, first byte "
        f"+{delay * 1000:.1f} ms, {cap} (splice, a thread per direction)",
        flush=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        with contextlib.suppress(OSError):
            lsock.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lsock.settimeout(0.5)
    while not stop.is_set():
        try:
            client, _ = lsock.accept()
        except TimeoutError:
            continue
        except OSError:
            if stop.is_set():
                break
            time.sleep(0.01)  # e.g. EMFILE: let connections close, then go on
            continue
        client.settimeout(None)
        handle(client, target, delay, bw)
    lsock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.wanproxy", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--target", required=True, help="HOST:PORT of the server (loopback)")
    ap.add_argument("--spec", required=True, help="DELAY,BANDWIDTH e.g. 20ms,100MB/s")
    ap.add_argument("--port-file", required=True, help="where to write the listening port")
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not (host == "localhost" or host.startswith("127.")):
        print("wanproxy: the target must be on loopback", file=sys.stderr)
        return 2
    try:
        delay, bw = parse_spec(args.spec)
    except ValueError as e:
        print(f"wanproxy: {e}", file=sys.stderr)
        return 2
    serve((host, int(port)), delay, bw, Path(args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
