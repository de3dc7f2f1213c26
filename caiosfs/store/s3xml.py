"""S3's answers parsed without botocore: error bodies, XML documents (listings, multipart
uploads), ETags, x-amz-meta-* headers and timestamps.

botocore's parser and its dateutil timestamps cost ~110 us of CPU per listed object: most of
a data loader's listing, and of ``caiosfs cp``'s. ElementTree and ``fromisoformat`` do the
same for a tenth of it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import cast
from urllib.parse import unquote_plus

from ..errors import PreconditionFailed, StoreError, is_retryable
from ..iobuf import aligned
from . import ListPage, ObjectInfo

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def error_of(status: int, body: bytes) -> StoreError:
    """An S3 error response as StoreError (its XML Code and Message, else the status)."""
    code, message = str(status), ""
    if body:
        try:
            root = ET.fromstring(body)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or ""
        except ET.ParseError:
            pass
    if status == 412 or code == "PreconditionFailed":
        return PreconditionFailed(message)
    return StoreError(code, message[:200], status, retryable=is_retryable(code, status))


def etag(value: str | None) -> str:
    """An ETag as the store's ``"..."`` form, whatever quoting it came with."""
    return '"' + value.strip('"') + '"' if value else ""


def meta_of(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The x-amz-meta-* headers, names lower-case and without the prefix."""
    return {k[11:].lower(): v for k, v in headers if k[:11].lower() == "x-amz-meta-"}


def iso_time(text: str | None) -> float:
    """An XML timestamp (ISO 8601, e.g. 2026-12-07T00:02:55.000Z; UTC when it names no zone)
    as a POSIX time."""
    if not text:
        return 0.0
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        return parsedate_to_datetime(text).timestamp()
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def http_time(text: str | None) -> float:
    """An HTTP date header (Last-Modified) as a POSIX time."""
    return parsedate_to_datetime(text).timestamp() if text else 0.0


def check_range(status: int, content_range: str, start: int) -> None:
    """A ranged GET's answer must be the range asked for: a server that ignored the Range
    header would hand us the wrong bytes."""
    if status == 206:
        if not content_range.startswith(f"bytes {start}-"):
            raise StoreError("InvalidRange", f"asked for {start}, got {content_range!r}",
                             status, retryable=True)
    elif start != 0:
        raise StoreError("InvalidRange", "the server ignored the Range header", status)


def pump(read: Callable[[int], bytes], sink: Callable[[int, bytes], None], start: int,
         length: int, piece: int, timeouts: tuple[type[BaseException], ...],
         broken: tuple[type[BaseException], ...]) -> int:
    """Read a response body of ``length`` bytes in pieces into ``sink(offset, piece)``;
    the number of bytes that came (short if the body ended early). An exception of
    ``timeouts`` is a retryable Timeout, of ``broken`` a retryable ConnectionError."""
    got = 0
    while got < length:
        try:
            b = read(min(piece, length - got))
        except timeouts as exc:
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except broken as exc:
            raise StoreError("ConnectionError", type(exc).__name__, retryable=True) from exc
        if not b:
            break
        sink(start + got, b)
        got += len(b)
    return got


def pump_into(read_into: Callable[[memoryview], int], sink: Callable[[int, bytes], None],
              start: int, length: int, piece: int,
              timeouts: tuple[type[BaseException], ...],
              broken: tuple[type[BaseException], ...],
              new_buffer: Callable[[int], bytearray] = aligned) -> int:
    """:func:`pump` without a copy: each piece is received straight into a page-aligned
    buffer of its own (``new_buffer(n)``, by default ``iobuf.aligned``: the cache writes
    it with O_DIRECT), which is what the sink gets. ``read_into`` fills a view, fewer bytes
    only at the body's end."""
    got = 0
    while got < length:
        n = min(piece, length - got)
        buf = new_buffer(n)
        try:
            with memoryview(buf) as view:
                k = read_into(view)
        except timeouts as exc:
            raise StoreError("Timeout", type(exc).__name__, retryable=True) from exc
        except broken as exc:
            raise StoreError("ConnectionError", type(exc).__name__, retryable=True) from exc
        if k:
            # (typed as bytes: whoever gets a piece reads it as one - pwrite, xxh3,
            # slices, joins, FUSE's reply - and nothing writes to it after this; a piece
            # cut short is a copy, the buffer may be a pool's)
            sink(start + got, cast(bytes, buf if k == n else buf[:k]))
        got += k
        if k < n:
            break
    return got


def parse_xml(raw: bytes) -> ET.Element:
    """A 2xx answer's XML, namespace dropped (``findtext("Key")`` then works); an error
    document sent with 200 raises it."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise StoreError("MalformedResponse", "the store's answer is not XML",
                         retryable=True) from exc
    if root.tag.startswith(NS):
        for el in root.iter():
            el.tag = el.tag[len(NS):]
    if root.tag == "Error":
        raise error_of(500, raw)
    return root


def list_page(raw: bytes) -> ListPage:
    """A ListObjectsV2 answer (asked with ``encoding-type=url``: keys URL-encoded on the
    wire, decoded here)."""
    root = parse_xml(raw)
    dec = unquote_plus if root.findtext("EncodingType") == "url" else str
    objects = [ObjectInfo(dec(c.findtext("Key") or ""), int(c.findtext("Size") or 0),
                          etag(c.findtext("ETag")), iso_time(c.findtext("LastModified")))
               for c in root.iterfind("Contents")]
    prefixes = [dec(c.findtext("Prefix") or "") for c in root.iterfind("CommonPrefixes")]
    more = (root.findtext("IsTruncated") or "").strip().lower() == "true"
    return ListPage(objects, prefixes,
                    (root.findtext("NextContinuationToken") or None) if more else None)


def list_params(prefix: str, delimiter: str | None, token: str | None,
                max_keys: int) -> dict[str, str]:
    """The query of a ListObjectsV2 request that :func:`list_page` reads."""
    params = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys),
              "encoding-type": "url"}
    if delimiter:
        params["delimiter"] = delimiter
    if token:
        params["continuation-token"] = token
    return params
