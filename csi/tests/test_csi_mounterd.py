"""caiosfs-mounter's protocol and the node metrics page, without FUSE or a store.

The real thing (descriptors of real mounts, real daemons) is in test_csi_survive.py; this
file checks what a bad or hostile peer gets: one-line errors, no stray descriptors, and a
metrics page that merges several daemons' families correctly.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CSI = Path(__file__).resolve().parents[1]
if str(CSI) not in sys.path:
    sys.path.insert(0, str(CSI))

from caiosfs_csi import fdpass
from caiosfs_csi.mounterd import MounterServer, parse_size
from caiosfs_csi.nodemetrics import Page, add_labels


@pytest.fixture
def server() -> Iterator[MounterServer]:
    d = tempfile.mkdtemp(prefix="mtr-", dir="/tmp")
    srv = MounterServer(f"{d}/m.sock", "/bin/false", out=open(os.devnull, "w"))  # noqa: SIM115
    srv.bind()
    stop = threading.Event()
    t = threading.Thread(target=srv.serve_forever, args=(stop,), daemon=True)
    t.start()
    try:
        yield srv
    finally:
        stop.set()
        t.join(timeout=5)
        os.unlink(srv.socket_path)
        os.rmdir(d)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bad_requests_get_one_line_errors(server: MounterServer) -> None:
    path = server.socket_path
    assert fdpass.call(path, {"cmd": "ping"})["ok"] is True
    assert fdpass.call(path, {"cmd": "nope"}) == {"error": "unknown command 'nope'"}
    assert "exactly one /dev/fuse descriptor" in fdpass.call(path, {"cmd": "start"})["error"]
    assert fdpass.call(path, {"cmd": "flush", "target": "/x"})["unknown"] is True
    assert fdpass.call(path, {"cmd": "wait", "target": "/x"}) == {"ok": True, "exited": True}
    assert fdpass.call(path, {"cmd": "list"}) == {"ok": True, "daemons": []}
    with socket.socket(socket.AF_UNIX) as s:  # not JSON
        s.connect(path)
        s.sendall(b"{not json\n")
        reply, _ = fdpass.receive(s)
    assert reply["error"].startswith("bad request")


def test_a_descriptor_that_is_not_dev_fuse_is_refused_and_closed(server: MounterServer) -> None:
    before = open_fds()
    with open(__file__, "rb") as f:
        reply = fdpass.call(server.socket_path, {"cmd": "start", "target": "/t",
                                                 "source": "s3://b/p"}, [f.fileno()])
    assert reply == {"error": "the descriptor is not /dev/fuse"}
    r, w = os.pipe()
    try:  # two descriptors where one is expected: both are closed by the mounter
        reply = fdpass.call(server.socket_path, {"cmd": "start", "target": "/t",
                                                 "source": "s3://b/p"}, [r, w])
    finally:
        os.close(r)
        os.close(w)
    assert "exactly one" in reply["error"]
    # This process is also the mounter: nothing leaked (once its connection thread has
    # closed its end of the socket, just after replying).
    deadline = time.monotonic() + 5
    while open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds() == before
    reply = fdpass.call(server.socket_path, {"cmd": "start", "target": "relative",
                                             "source": "s3://b/p"}, [0])
    assert reply["error"] == "start needs an absolute target and an s3:// source"


def test_sizes() -> None:
    assert parse_size("2G") == 2 << 30 and parse_size("512Mi") == 512 << 20
    assert parse_size("1048576") == 1 << 20
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_metrics_families_from_several_daemons_stay_together() -> None:
    one = ('# HELP caiosfs_s3_bytes_in_total Bytes downloaded\n'
           '# TYPE caiosfs_s3_bytes_in_total counter\n'
           'caiosfs_s3_bytes_in_total 5.0\n'
           '# HELP caiosfs_fuse_ops_total FUSE operations\n'
           '# TYPE caiosfs_fuse_ops_total counter\n'
           'caiosfs_fuse_ops_total{op="read"} 3.0\n')
    page = Page()
    page.merge(one, {"daemon": "v1", "pod_name": 'we"ird\\pod'})
    page.merge(one, {"daemon": "v2"})
    lines = page.render().splitlines()
    assert lines.count("# TYPE caiosfs_s3_bytes_in_total counter") == 1
    i = lines.index("# TYPE caiosfs_s3_bytes_in_total counter")
    assert lines[i + 1:i + 3] == [
        'caiosfs_s3_bytes_in_total{daemon="v1",pod_name="we\\"ird\\\\pod"} 5.0',
        'caiosfs_s3_bytes_in_total{daemon="v2"} 5.0']
    assert 'caiosfs_fuse_ops_total{op="read",daemon="v2"} 3.0' in lines
    assert add_labels('m{a="x}y"} 1', {"b": "2"}) == 'm{a="x}y",b="2"} 1'
