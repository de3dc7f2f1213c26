"""Server-side copies that keep what a listing shows of the copied object."""

from __future__ import annotations

from .errors import StoreError
from .namespace import Namespace
from .store import PartSource
from .store.client import StoreClient
from .storeview import tagged

MAX_TAGGED_COPY = 5 << 30  # one UploadPartCopy moves at most 5 GiB


async def copy_object(client: StoreClient, ns: Namespace, src: str, dst: str,
                      meta: dict[str, str] | None, size: int, src_etag: str,
                      patient: bool = False, known: dict[str, str] | None = None) -> str:
    """CopyObject ``src`` to ``dst`` (``meta``: new metadata, None: the source's, which is
    ``known`` if given), keeping what a listing shows: a copy of an object that needs the tag
    (see ``StoreView.needs_tag``) is made as a one-part multipart copy, whose ETag carries the
    mark (a CopyObject would make it a plain one). Returns the new ETag."""
    want = meta if meta is not None else known
    if tagged(src_etag) or (want is not None and ns.needs_tag(want)):
        if want is None:
            want = (await client.head(src)).metadata or {}
        if ns.needs_tag(want) and size <= MAX_TAGGED_COPY:
            return await _copy_tagged(client, src, dst, want, size)
    return await client.copy(src, dst, meta, size, patient=patient)


async def _copy_tagged(client: StoreClient, src: str, dst: str, meta: dict[str, str],
                       size: int) -> str:
    upload_id = await client.create_multipart(dst, meta)
    try:
        part = (PartSource(1, None, 0, size, copy_key=src) if size
                else PartSource(1, None, 0, 0, data=b""))
        etag = await client.upload_part(dst, upload_id, part)
        return await client.complete_multipart(dst, upload_id, [etag])
    except StoreError:
        try:
            await client.abort_multipart(dst, upload_id)
        except StoreError:
            pass
        raise
