"""TLS in front of the test SeaweedFS: a throwaway CA and server certificate, and a
TLS-terminating proxy on 127.0.0.1, so tests run caiosfs over https as users do.

``make_ca(dir, name)`` and ``make_server_cert(ca, dir)`` call Debian's ``openssl`` (no new
Python dependency): an EC P-256 CA (basicConstraints CA:TRUE, keyCertSign) and a leaf for
``IP:127.0.0.1`` (serverAuth, with subject/authority key identifiers, which OpenSSL 3's
strict verification wants). Valid for one day.

``TlsProxy(upstream, cert, key)`` accepts TLS on 127.0.0.1 (port chosen by the kernel) and
pipes bytes both ways to the plain http ``upstream`` ("http://127.0.0.1:PORT"): one thread
per connection and direction, so keep-alive connections simply carry on. Every socket
operation has a timeout; ``stop()`` closes the listener and every connection and joins the
threads, and the proxy also stops by itself after ``lifetime`` seconds.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
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
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"https://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._spawn(self._accept_loop, "tls-accept")
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, fn: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _track(self, s: socket.socket) -> bool:
        with self._lock:
            if self._stopped.is_set():
                return False
            self._socks.add(s)
            return True

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stopped.is_set():
            if time.monotonic() > deadline:
                self._stopped.set()  # (stop by itself: nothing left running after a test)
                self._close_all()
                break
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if not self._track(raw):
                raw.close()
                break
            self.stats["accepted"] += 1
            self._spawn(self._serve, "tls-conn", raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)  # handshake here, in this thread
        except (ssl.SSLError, OSError):
            self.stats["handshake_failed"] += 1
            raw.close()
            return
        self.stats["handshakes"] += 1
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            tls.close()
            return
        up.settimeout(IO_TIMEOUT)
        if not (self._track(tls) and self._track(up)):
            tls.close()
            up.close()
            return
        t = threading.Thread(target=self._pump, args=(tls, up), name="tls-up", daemon=True)
        t.start()
        self._pump(up, tls)
        t.join(IO_TIMEOUT)
        with self._lock:
            self._socks.discard(tls)
            self._socks.discard(up)
        tls.close()
        up.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Bytes from src to dst until src ends; then end dst's side too."""
        try:
            while True:
                b = src.recv(PIECE)
                if not b:
                    break
                dst.sendall(b)
        except (OSError, ValueError):
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass

    def _close_all(self) -> None:
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
            try:
                s.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass
        self._close_all()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
