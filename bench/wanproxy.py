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
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time
from pathlib import Path

# Big reads keep the per-byte Python overhead low: the proxy, not the link, must not be the
# bottleneck (it still costs CPU, equally for every system).
CHUNK = 1024 * 1024


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

    async def send(self, n: int) -> None:
        if self.bw <= 0:
            return
        now = time.monotonic()
        self.t = max(self.t, now) + n / self.bw
        if self.t > now:
            await asyncio.sleep(self.t - now)


class Conn:
    def __init__(self, delay: float, bw: float) -> None:
        self.delay = delay
        self.up = Pacer(bw)
        self.down = Pacer(bw)
        self.last_request_byte = 0.0
        self.client_turn = True  # True until the server answers the current request


async def pump_up(conn: Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    for _ in range(1 << 62):
        data = await src.read(CHUNK)
        if not data:
            break
        await conn.up.send(len(data))
        conn.client_turn = True
        conn.last_request_byte = time.monotonic()
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        dst.write_eof()


async def pump_down(conn: Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    for _ in range(1 << 62):
        data = await src.read(CHUNK)
        if not data:
            break
        if conn.client_turn:
            conn.client_turn = False
            wait = conn.last_request_byte + conn.delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        await conn.down.send(len(data))
        dst.write(data)
        await dst.drain()
    dst.close()


async def serve(target: tuple[str, int], delay: float, bw: float, port_file: Path) -> None:
    # asyncio holds the task of each connection's callback only weakly: without a strong
    # reference a busy proxy's connections were garbage-collected mid-transfer ("Task was
    # destroyed but it is pending"), which clients saw as resets of their uploads.
    live: set[asyncio.Task[None]] = set()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            live.add(me)
            me.add_done_callback(live.discard)
        try:
            sr, sw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        conn = Conn(delay, bw)
        tasks = [
            asyncio.create_task(pump_up(conn, cr, sw)),
            asyncio.create_task(pump_down(conn, sr, cw)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError, asyncio.CancelledError):
            # A reset by either side, or the proxy shutting down: just drop the connection.
            pass
        finally:
            for t in tasks:
                t.cancel()
            for w in (cw, sw):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=CHUNK * 4)
    port = server.sockets[0].getsockname()[1]
    port_file.write_text(f"{port}\n")
    cap = f"{bw / 1e6:.0f} MB/s per connection" if bw else "no bandwidth cap"
    print(
        f"wanproxy 127.0.0.1:{port} -> {target[0]}:{target[1]}, first byte "
        f"+{delay * 1000:.1f} ms, {cap}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


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
    delay, bw = parse_spec(args.spec)
    asyncio.run(serve((host, int(port)), delay, bw, Path(args.port_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
