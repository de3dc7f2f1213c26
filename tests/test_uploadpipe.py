"""UploadPipe, how many multipart parts ``caiosfs cp`` keeps in flight: driven by hand
against simulated stores of both shapes (a rate per connection, a shared limit), and the
copy pool's gate that applies it."""

from __future__ import annotations

import threading
import time

from caiosfs.copypool import Pool
from caiosfs.uploadpipe import HOLD, INTERVAL, LEFT, UploadPipe

MB = 1_000_000


def drive(pipe: UploadPipe, per_conn: float,
          shared: float, seconds: float, parts_left: int = 10**6,
          start: float = 0.0) -> list[int]:
    """Tick the pipe every INTERVAL for ``seconds``: parts are kept in flight up to its limit
    (while ``parts_left``), each interval sends min(n x per_conn, shared) bytes per second.
    The limit after every tick (the clock runs from ``start``)."""
    now, seen = start, []
    pipe.tick(now, parts_left)
    while now < start + seconds:
        while parts_left and pipe.try_take():
            parts_left -= 1
        while pipe.in_flight > pipe.limit:  # (a part ends; no new one in its place)
            pipe.give()
        pipe.sent(int(min(pipe.in_flight * per_conn, shared) * INTERVAL))
        now += INTERVAL
        pipe.tick(now, parts_left)
        seen.append(pipe.limit)
    return seen


def test_climbs_while_each_connection_is_the_limit() -> None:
    # 10 MB/s per connection, nothing shared in the way: every raise pays (by 1.25, one
    # every two intervals), up to the ceiling.
    pipe = UploadPipe(8, 32)
    seen = drive(pipe, 10 * MB, 10**12, 20)
    assert seen[:7] == [10, 10, 13, 13, 17, 17, 22] and seen[-1] == 32
    assert pipe.peak == 32


def test_steps_back_and_holds_when_the_store_is_the_limit() -> None:
    # 150 MB/s in all (the server's CPU), 8 connections already carry it: the raise to 10
    # does not pay, the pipe goes back to 8 and does not probe again for HOLD seconds.
    pipe = UploadPipe(8, 32)
    seen = drive(pipe, 50 * MB, 150 * MB, HOLD - 4)
    assert seen[:3] == [10, 10, 8] and seen[-1] == 8 and max(seen) == 10
    assert seen.count(10) == 2  # (one raise, judged, taken back)
    # (the same clock, on: it probes again once HOLD has passed)
    again = drive(pipe, 50 * MB, 150 * MB, 8, start=HOLD - 4 + INTERVAL)
    assert max(again) == 10 and again[-1] == 8 and again.count(10) == 2


def test_no_raise_while_nothing_waits_or_below_the_limit() -> None:
    pipe = UploadPipe(8, 32)
    assert max(drive(pipe, 10 * MB, 10**12, 10, parts_left=6)) == 8  # pipe not full
    pipe = UploadPipe(4, 4)
    assert max(drive(pipe, 10 * MB, 10**12, 10)) == 4  # floor == ceiling


def test_a_short_upload_keeps_its_floor() -> None:
    # Each connection the limit, where every raise would pay: 16 parts with 8 in flight
    # (8 x 128 MiB) leave too few waiting for a raise to be judged before they all run.
    assert max(drive(UploadPipe(8, 32), 10 * MB, 10**12, 10, parts_left=16)) == 8
    # 24 parts: 16 wait behind the first 8, one raise; then too few wait for another.
    seen = drive(UploadPipe(8, 32), 10 * MB, 10**12, 10, parts_left=3 * 8)
    assert max(seen) == 10 and LEFT == 2


def test_pool_gate_bounds_parts_in_flight_and_wake_lets_more_run() -> None:
    pipe = UploadPipe(2, 6)
    lock = threading.Lock()
    now = [0]
    most = [0]
    release = threading.Event()

    def part() -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        release.wait(10)
        time.sleep(0.01)
        with lock:
            now[0] -= 1
    smalls: list[int] = []
    pool = Pool(2, 2, small_takes_large=False, gate=pipe, n_large_only=4)
    pool.start()
    pool.add([part] * 12, [lambda: smalls.append(1)] * 50)
    deadline = time.monotonic() + 10
    while len(smalls) < 50 and time.monotonic() < deadline:  # small files do not wait
        time.sleep(0.01)
    assert len(smalls) == 50 and most[0] == 2 and pipe.in_flight == 2
    pipe.limit = 5  # (what a raise does) ...
    pool.wake()
    while most[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert most[0] == 5 and pipe.in_flight == 5
    release.set()
    pool.close()
    pool.join()
    assert now[0] == 0 and pipe.in_flight == 0 and most[0] == 5 and pipe.peak == 5
