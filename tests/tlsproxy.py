"""TLS in front of the test SeaweedFS: a throwaway CA and server certificate, and a
TLS-terminating proxy on 127.0.0.1, so tests run caiosfs over https as users do.

``make_ca(dir, name)`` and ``make_server_cert(ca, dir)`` call Debian's ``openssl`` (no new
Python dependency): an EC P-256 CA (basicConstraints CA:TRUE, keyCertSign) and a leaf for
``IP:127.0.0.1`` (serverAuth, with subject/authority key identifiers, which OpenSSL 3's
strict verification wants). Valid for one day.

``TlsProxy(upstream, cert)`` accepts TLS on 127.0.0.1 (port chosen by the kernel) and pipes
bytes both ways to the plain http ``upstream`` ("http://127.0.0.1:PORT"), so keep-alive
connections simply carry on. It is one thread running an asyncio loop, whose TLS works on
memory buffers from that one thread: an earlier version pumped each connection with two
threads, one in ``recv`` and one in ``sendall`` on the same ``ssl.SSLSocket``, and about one run
in four a response reached the mount short (OpenSSL's connection objects are not safe to use
from two threads at once). Every read has a timeout; ``stop()`` closes the listener and every
connection and joins the thread, and the proxy also stops by itself after ``lifetime`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

IO_TIMEOUT = 120.0
PIECE = 256 << 10


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCert:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def make_ca(directory: Path, name: str = "ca") -> CA:
    """A self-signed CA certificate and key in ``directory`` (``name``.pem, ``name``.key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
             "-subj", f"/CN=caiosfs test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash")
    return CA(cert, key)


def make_server_cert(ca: CA, directory: Path, ip: str = "127.0.0.1") -> ServerCert:
    """A server certificate for ``ip`` (IP SAN) signed by ``ca``."""
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=IP:{ip}\n"
                   "basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={ip}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-set_serial", str(int(time.time() * 1000)), "-out", str(cert), "-days", "1",
             "-extfile", str(ext))
    return ServerCert(cert, key)


class TlsProxy:
    def __init__(self, upstream: str, cert: ServerCert, lifetime: float = 900.0) -> None:
        u = urlsplit(upstream)
        assert u.scheme == "http" and u.hostname == "127.0.0.1" and u.port, upstream
        self.upstream = (u.hostname, u.port)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.lifetime = lifetime
        self.stats: Counter[str] = Counter()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> Self:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or self._loop is None:
            raise RuntimeError(f"TLS proxy did not start: {self._error!r}")
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        loop, ev = self._loop, self._stop
        if loop is not None and ev is not None:
            with contextlib.suppress(RuntimeError):  # (the loop has already ended)
                loop.call_soon_threadsafe(ev.set)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._listener.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 (reported by start(); ends the thread quietly)
            self._error = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        conns: set[asyncio.Task[None]] = set()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            conns.add(task)
            try:
                await self._serve(reader, writer)
            finally:
                conns.discard(task)

        server = await asyncio.start_server(serve, sock=self._listener)
        self._ready.set()
        with contextlib.suppress(TimeoutError):  # (stop by itself: nothing left after a test)
            await asyncio.wait_for(self._stop.wait(), self.lifetime)
        server.close()
        for t in list(conns):
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                     ) -> None:
        try:  # (the handshake here, not in start_server, so that a refused one is counted)
            await client_w.start_tls(self.ctx, ssl_handshake_timeout=IO_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError):
            self.stats["handshake_failed"] += 1
            client_w.close()
            return
        self.stats["handshakes"] += 1
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, TimeoutError):
            client_w.close()
            return
        pipes = [asyncio.ensure_future(self._pipe(client_r, up_w)),
                 asyncio.ensure_future(self._pipe(up_r, client_w))]
        try:
            # Either side ending ends the connection, as a plain TCP proxy would for HTTP.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pipes:
                p.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for w in (client_w, up_w):
                w.close()
            for w in (client_w, up_w):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.wait_closed(), 5)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Bytes from src to dst until src ends or fails."""
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            while b := await asyncio.wait_for(src.read(PIECE), IO_TIMEOUT):
                dst.write(b)
                await asyncio.wait_for(dst.drain(), IO_TIMEOUT)
