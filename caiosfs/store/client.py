"""StoreClient: the async face of an ObjectStore.

Runs each blocking call in a worker thread under a CapacityLimiter (the trio loop never
blocks), retries with exponential backoff and full jitter, and counts every request.

Two kinds of patience (docs/DESIGN.md, "Object store access: two kinds of patience"):
- ``deadline``: reads give up after ``read_timeout`` seconds in total (then EIO);
- ``deadline=None``: dirty data is retried forever — a store that fails for minutes delays
  the upload, never loses it.
"""

from __future__ import annotations

import builtins  # the class's own list() method hides the type name in its signatures
import errno
import hashlib
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import PreconditionFailed, StoreError
from ..metrics import Metrics
from . import Body, ListPage, MultipartUpload, ObjectInfo, ObjectStore, PartSource, Sink, file_md5
from .pipe import ReadPipe

if TYPE_CHECKING:
    import outcome

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
# Seconds a key whose read (HEAD or GET) just gave up fails at once. A lookup's HEAD and the
# read after it are two requests for one key, back to back: without this memory a dead
# store made open + read wait out read_timeout twice.
GAVE_UP_MEMORY = 1.0
COPY_PART = 64 << 20  # part of a server-side copy of a large object (copied in parallel)


def _what(args: tuple[Any, ...]) -> str:
    """The request's key (and range or part) for the debug log: never metadata or bodies."""
    out = [a for a in args[:3] if isinstance(a, (str, int)) and not isinstance(a, bool)]
    part = next((a for a in args if isinstance(a, PartSource)), None)
    if part is not None:
        out.append(f"part {part.number}" + (f" copy of {part.copy_key}" if part.copy_key else ""))
    return " ".join(str(a) for a in out)


async def in_thread(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter) -> T:
    """``fn(*args)`` in a worker thread under ``limiter``; a cancelled caller abandons the
    thread (whose limiter token is given back when it really ends), as
    ``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` does.

    Why not that function: for every call it renames the worker thread and renames it back
    (two ``pthread_setname_np`` calls through ctypes, each releasing and retaking the GIL
    while 16 GET threads and the loop contend for it), copies the context and formats a
    name on the loop. A data loader's 100 KB file is one store call; see
    docs/ARCHITECTURE.md ("What a small file costs") for the figures. The store's calls do
    not use ``trio.from_thread`` or context variables, so none of that is needed here."""
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    holder = object()  # (the limiter's borrower: the thread, not the task, which may leave)
    abandoned = False

    def back(result: outcome.Outcome[T]) -> None:  # on the loop, once the thread is done
        limiter.release_on_behalf_of(holder)
        if not abandoned:
            trio.lowlevel.reschedule(task, result)

    def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
        try:
            token.run_sync_soon(back, result)
        except trio.RunFinishedError:
            pass  # the loop is gone, and with it whoever waited

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal abandoned
        abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    await limiter.acquire_on_behalf_of(holder)
    try:
        # name=None: the worker keeps its name (no OS thread rename per call)
        trio.lowlevel.start_thread_soon(partial(fn, *args), deliver)
    except BaseException:
        limiter.release_on_behalf_of(holder)
        raise
    return await trio.lowlevel.wait_task_rescheduled(abort)


class GaveUp(StoreError):
    """A request with bounded patience (reads, metadata) that kept failing, or hung, until
    its deadline. It is EIO for the caller whatever the last error was: the last error's own
    errno would mislead — EAGAIN (SlowDown) makes buffered readers take a read() as "no data
    yet" (Python's read_bytes() returns None), ETIMEDOUT is not a read(2) error."""

    def __init__(self, op: str, attempts: int, elapsed: float,
                 last: StoreError | None) -> None:
        code = last.code if last is not None else "Timeout"
        why = str(last) if last is not None else "no answer"
        super().__init__(code, f"{op} gave up after {attempts} attempt(s) in {elapsed:.1f}s "
                         f"({why})", last.status if last is not None else None,
                         retryable=False)

    @property
    def errno(self) -> int:
        return errno.EIO


class StoreClient:
    def __init__(self, store: ObjectStore, metrics: Metrics, parallel: int = 16,
                 read_timeout: float = 60.0, parallel_max: int | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.read_timeout = read_timeout
        # Reads, metadata and uploads have a limiter each, so a big write-back cannot starve
        # `ls` and reads (and vice versa). Uploads get as many as reads start with: behind a
        # per-connection rate (50 MB/s) 8 parts of 64 MiB in flight carried at most
        # 400 MB/s, half of what 16 parallel requests give raw boto3.
        self.read_limiter = trio.CapacityLimiter(parallel)
        self.meta_limiter = trio.CapacityLimiter(max(8, parallel))
        self.write_limiter = trio.CapacityLimiter(max(4, parallel))
        # Ranged GETs: from ``parallel`` up to ``parallel_max`` in flight, as measured.
        self.pipe = ReadPipe(self.read_limiter, parallel, parallel_max or parallel, metrics)
        self.stopping = False
        # Where the cache gives back the buffers of chunks it let go of, for the store's
        # GETs to receive into again (S3Store's pool; None: the store has none).
        self.recycle: Callable[[bytearray], None] | None = getattr(store, "recycle", None)
        # ... and where others take such a buffer (None: the store has no pool).
        self.take_buffer: Callable[[], bytearray] | None = getattr(store, "take_buffer",
                                                                   None)
        self._gave_up: dict[str, tuple[float, GaveUp]] = {}  # key -> (when, error)

    async def _run(self, op: str, fn: Callable[..., T], *args: Any,
                   limiter: trio.CapacityLimiter, deadline: float | None,
                   nbytes_out: int = 0, failed: list[StoreError] | None = None,
                   what: tuple[Any, ...] | None = None) -> T:
        """Run ``fn`` with retries; ``failed`` (if given) collects the retried errors;
        ``what`` stands for ``args`` in the debug log."""
        if what is None:
            what = args
        attempt = 0
        start = time.monotonic()
        last: StoreError | None = None
        while True:
            t0 = time.monotonic()
            try:
                if not deadline:  # None: patient; 0: one attempt, bounded by the socket
                    result = await in_thread(fn, *args, limiter=limiter)
                else:
                    # The deadline bounds each attempt too: a store that accepts the
                    # connection and never answers would otherwise hold the caller for
                    # botocore's socket timeout. The abandoned thread ends on its own
                    # (socket timeout); whole chunks it still delivers are harmless.
                    with trio.move_on_after(max(0.0, start + deadline - t0)) as scope:
                        result = await in_thread(fn, *args, limiter=limiter)
                    if scope.cancelled_caught:
                        self.metrics.s3_requests.labels(op, "Timeout").inc()
                        elapsed = time.monotonic() - start
                        log.warning("%s gave up after %d attempts in %.1fs: no answer", op,
                                    attempt + 1, elapsed)
                        raise GaveUp(op, attempt + 1, elapsed, last)
            except GaveUp:
                raise
            except StoreError as exc:
                self.metrics.s3_requests.labels(op, exc.code).inc()
                self.metrics.s3_latency.labels(op).observe(time.monotonic() - t0)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s: %s", op, _what(what), exc.code)
                if not exc.retryable:
                    raise
                attempt += 1
                last = exc
                if failed is not None:
                    failed.append(exc)
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
                elapsed = time.monotonic() - start
                if deadline is not None and elapsed + delay > deadline:
                    if deadline <= 0:
                        raise
                    # Use what is left of the deadline for one or two more tries.
                    delay = (deadline - elapsed) / 2
                if deadline is not None and deadline - elapsed < 0.05:
                    log.warning("%s gave up after %d attempts in %.1fs: %s", op, attempt,
                                elapsed, exc)
                    raise GaveUp(op, attempt, elapsed, exc) from exc
                if attempt in (1, 5) or attempt % 20 == 0:
                    log.warning("%s failed (%s), retrying (attempt %d)", op, exc, attempt)
                self.metrics.s3_retries.labels(op).inc()
                await trio.sleep(delay)
                continue
            done, latency = self.metrics.store_op(op)
            done.inc()
            latency.observe(time.monotonic() - t0)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s: ok %.1f ms", op, _what(what), (time.monotonic() - t0) * 1e3)
            if nbytes_out:
                self.metrics.s3_bytes_out.inc(nbytes_out)
            return result

    # Metadata ------------------------------------------------------------------------
    async def check_bucket(self) -> None:
        await self._run("head_bucket", self.store.check_bucket, limiter=self.meta_limiter,
                        deadline=0)

    async def _read_of(self, key: str, op: str, fn: Callable[..., T], *args: Any,
                       limiter: trio.CapacityLimiter, what: tuple[Any, ...] | None = None
                       ) -> T:
        """A bounded read of one key (see GAVE_UP_MEMORY)."""
        if self._gave_up:
            now = trio.current_time()
            hit = self._gave_up.get(key)
            if hit is not None and now - hit[0] < GAVE_UP_MEMORY:
                raise hit[1]
            if len(self._gave_up) > 1000 or hit is not None:
                self._gave_up = {k: v for k, v in self._gave_up.items()
                                 if now - v[0] < GAVE_UP_MEMORY}
        try:
            return await self._run(op, fn, *args, limiter=limiter,
                                   deadline=self.read_timeout, what=what)
        except GaveUp as exc:
            self._gave_up[key] = (trio.current_time(), exc)
            raise

    def gave_up(self, key: str, exc: GaveUp) -> None:
        """A request about ``key`` that is not a read of it gave up (a probe's one-key LIST,
        whose HEAD beside it was cancelled rather than failed): reads of ``key`` fail at
        once too, for GAVE_UP_MEMORY."""
        self._gave_up[key] = (trio.current_time(), exc)

    async def head(self, key: str) -> ObjectInfo:
        return await self._read_of(key, "head", self.store.head, key,
                                   limiter=self.meta_limiter)

    async def get_small(self, key: str, limit: int) -> ObjectInfo | None:
        """A small object whole, or None (absent, or over ``limit``); counted as op
        ``get_small``, apart from the content GETs."""
        return await self._read_of(key, "get_small", self.store.get_small, key, limit,
                                   limiter=self.meta_limiter)

    async def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        return await self._run("list", self.store.list, prefix, delimiter, token, max_keys,
                               limiter=self.meta_limiter, deadline=self.read_timeout)

    # Data ----------------------------------------------------------------------------
    async def get_range(self, key: str, start: int, length: int, etag: str | None,
                        sink: Sink) -> None:
        pipe = self.pipe
        bytes_in = self.metrics.s3_bytes_in

        def timed(first: list[float]) -> float:
            # In the worker thread (each attempt): when the request left, and (through the
            # sink) when its first piece came in; the pipe learns latency and rate from them.
            first[0] = -1.0
            sent = time.monotonic()

            def counted(off: int, data: bytes) -> None:
                if first[0] < 0:
                    first[0] = time.monotonic()
                bytes_in.inc(len(data))
                pipe.bytes_in += len(data)
                sink(off, data)
            self.store.get_range(key, start, length, etag, counted)
            return sent
        first = [-1.0]
        sent = await self._read_of(key, "get", timed, first, limiter=self.read_limiter,
                                   what=(key, start, length))
        pipe.finished(length, sent, first[0], time.monotonic())

    async def put_file(self, key: str, path: Body, size: int, metadata: dict[str, str],
                       if_match: str | None = None, if_none_match: bool = False,
                       patient: bool = True) -> str:
        try:
            return await self._run("put", self.store.put_file, key, path, size, metadata,
                                   if_match, if_none_match, limiter=self.write_limiter,
                                   deadline=None if patient else self.read_timeout,
                                   nbytes_out=size)
        except PreconditionFailed:
            # The 'change' may be our own write: an earlier attempt applied with its response
            # lost (reset, truncated, timed out), or an upload that completed just before a
            # crash, replayed from the journal. Conflicts are rare: checking costs one HEAD.
            def md5() -> str:
                return '"' + file_md5(path, size).hex() + '"'
            etag = await self._ours(key, await trio.to_thread.run_sync(md5), size)
            if etag is None:
                raise
            return etag

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        return await self._run("create_multipart", self.store.create_multipart, key, metadata,
                               limiter=self.write_limiter, deadline=None)

    async def upload_part(self, key: str, upload_id: str, part: PartSource) -> str:
        return await self._run("upload_part", self.store.upload_part, key, upload_id, part,
                               limiter=self.write_limiter, deadline=None,
                               nbytes_out=0 if part.copy_key else part.length)

    async def complete_multipart(self, key: str, upload_id: str, etags: builtins.list[str],
                                 if_match: str | None = None,
                                 if_none_match: bool = False) -> str:
        failed: list[StoreError] = []
        try:
            return await self._run("complete_multipart", self.store.complete_multipart, key,
                                   upload_id, etags, if_match, if_none_match,
                                   limiter=self.write_limiter, deadline=None, failed=failed)
        except StoreError as exc:
            if not (isinstance(exc, PreconditionFailed)
                    or exc.code == "NoSuchUpload" and failed):
                raise
            # An earlier attempt (or, replayed after a crash, an earlier upload) completed
            # with our parts: the object in the store then has the ETag S3 gives a multipart
            # object made of them.
            digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in etags))
            etag = await self._ours(key, f'"{digest.hexdigest()}-{len(etags)}"', None)
            if etag is None:
                raise
            return etag

    async def _ours(self, key: str, expected_etag: str, size: int | None) -> str | None:
        """The object's ETag if the store holds exactly the write we expected, else None."""
        try:
            info = await self.head(key)
        except StoreError:
            return None
        if info.etag.strip('"') != expected_etag.strip('"') or (
                size is not None and info.size != size):
            log.info("%s: the store holds another version (ETag %s, %d bytes; ours %s, %s "
                     "bytes)", key, info.etag, info.size, expected_etag, size)
            return None
        log.info("%s: a retried write found its own earlier attempt applied (response "
                 "lost); not a conflict", key)
        return info.etag

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._run("abort_multipart", self.store.abort_multipart, key, upload_id,
                        limiter=self.write_limiter, deadline=self.read_timeout)

    async def list_multipart(self, prefix: str) -> builtins.list[MultipartUpload]:
        return await self._run("list_multipart", self.store.list_multipart, prefix,
                               limiter=self.meta_limiter, deadline=self.read_timeout)

    async def copy(self, src: str, dst: str, metadata: dict[str, str] | None, size: int,
                   patient: bool = True) -> str:
        """Server-side copy (``metadata`` None: the source's). A large object is copied as
        parts (UploadPartCopy) in parallel: one CopyObject copies it as one sequential
        stream inside the store - the rename of a 1 GiB checkpoint file that had already
        been uploaded (torch.save's tmp + os.replace, Hugging Face's directory rename)."""
        deadline = None if patient else self.read_timeout
        if size < 2 * COPY_PART:
            return await self._run("copy", self.store.copy, src, dst, metadata, size,
                                   limiter=self.write_limiter, deadline=deadline)
        info = await self._run("head", self.store.head, src, limiter=self.meta_limiter,
                               deadline=deadline)
        if metadata is None:
            metadata = info.metadata or {}
        part = max(COPY_PART, -(-info.size // 10_000))
        upload_id = await self._run("create_multipart", self.store.create_multipart, dst,
                                    metadata, limiter=self.write_limiter, deadline=deadline)
        etags: dict[int, str] = {}
        failed: list[StoreError] = []

        async def one(n: int, off: int) -> None:
            try:
                etags[n] = await self._run(
                    "upload_part", self.store.upload_part, dst, upload_id,
                    PartSource(n, None, off, min(part, info.size - off), copy_key=src,
                               copy_etag=info.etag),
                    limiter=self.write_limiter, deadline=deadline)
            except StoreError as exc:  # the caller gets a StoreError, not a group
                failed.append(exc)
        try:
            async with trio.open_nursery() as nursery:
                for i, off in enumerate(range(0, info.size, part)):
                    nursery.start_soon(one, i + 1, off)
            if failed:
                raise failed[0]
            return await self._run("complete_multipart", self.store.complete_multipart, dst,
                                   upload_id, [etags[n] for n in sorted(etags)], None, False,
                                   limiter=self.write_limiter, deadline=deadline)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.abort_multipart(dst, upload_id)
                except StoreError:
                    pass
            raise

    async def delete(self, key: str, patient: bool = True) -> None:
        await self._run("delete", self.store.delete, key, limiter=self.write_limiter,
                        deadline=None if patient else self.read_timeout)
