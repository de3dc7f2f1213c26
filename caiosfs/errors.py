"""One error type for the whole filesystem, and the one table from S3 errors to errno.

Every layer raises :class:`FsError` (or lets a store error through); the FUSE adapter
(`fs.py`) is the single place that turns it into ``pyfuse3.FUSEError``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: config imports this module
    from .config import MountConfig


class CaiosfsError(Exception):
    """Base of caiosfs's own errors. ``str()`` is a one-line, secret-free message."""


class UserError(CaiosfsError):
    """Bad input from the user (option, URL, mountpoint ...): the CLI prints it and exits 2."""

    exit_code = 2


class FsError(CaiosfsError):
    """A filesystem operation failed with ``errno``; the message is for the log."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


class StoreError(CaiosfsError):
    """An object-store request failed.

    ``code`` is the S3 error code (``NoSuchKey``, ``SlowDown``...) or a transport class
    (``ConnectionError``, ``Timeout``); ``status`` is the HTTP status when there was one.
    ``retryable`` says whether trying again may help.
    """

    def __init__(self, code: str, message: str = "", status: int | None = None,
                 retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.status = status
        self.retryable = retryable

    @property
    def errno(self) -> int:
        return s3_errno(self.code, self.status)


class PreconditionFailed(StoreError):
    """A conditional write lost: the object changed since we read it (or now exists)."""

    def __init__(self, message: str = "") -> None:
        super().__init__("PreconditionFailed", message, 412, retryable=False)


# S3 error code -> errno. Unknown codes are EIO; the original error stays as __cause__.
S3_ERRNO: dict[str, int] = {
    "NoSuchKey": errno.ENOENT,
    "NotFound": errno.ENOENT,
    "404": errno.ENOENT,
    "NoSuchUpload": errno.ENOENT,
    "NoSuchBucket": errno.ENXIO,
    "AccessDenied": errno.EACCES,
    "403": errno.EACCES,
    "AllAccessDisabled": errno.EACCES,
    "InvalidAccessKeyId": errno.EACCES,
    "SignatureDoesNotMatch": errno.EACCES,
    "ExpiredToken": errno.EACCES,
    "InvalidToken": errno.EACCES,
    "InvalidRange": errno.EINVAL,
    "416": errno.EINVAL,
    "EntityTooLarge": errno.EFBIG,
    "KeyTooLongError": errno.ENAMETOOLONG,
    "PreconditionFailed": errno.EAGAIN,
    "412": errno.EAGAIN,
    "SlowDown": errno.EAGAIN,
    "503": errno.EAGAIN,
    "RequestTimeout": errno.ETIMEDOUT,
    "Timeout": errno.ETIMEDOUT,
    "ConnectionError": errno.EIO,
    "QuotaExceeded": errno.EDQUOT,
    "NotImplemented": errno.ENOTSUP,
    "501": errno.ENOTSUP,
}

# Codes worth retrying: throttling, server faults, transport faults.
RETRYABLE_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
    "Timeout", "ConnectionError", "IncompleteBody", "BadDigest", "OperationAborted",
    "500", "502", "503", "504", "Throttling", "ThrottlingException", "TooManyRequests", "429",
})


def s3_errno(code: str, status: int | None = None) -> int:
    """Map an S3 error code (or HTTP status) to an errno; unknown → EIO."""
    if code in S3_ERRNO:
        return S3_ERRNO[code]
    if status is not None and str(status) in S3_ERRNO:
        return S3_ERRNO[str(status)]
    return errno.EIO


def is_retryable(code: str, status: int | None) -> bool:
    return code in RETRYABLE_CODES or (status is not None and status >= 500)


def certificate_error(exc: BaseException) -> StoreError | None:
    """The store's TLS certificate refused by this client (not trusted by the CA bundle,
    or not for this host), found anywhere in ``exc``'s chain (botocore and urllib3 wrap
    it), as a StoreError that is not retried: another attempt gets the same certificate."""
    import ssl
    todo: list[object] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return StoreError("CertificateError", e.verify_message or str(e), retryable=False)
        kwargs = getattr(e, "kwargs", None)  # (botocore's SSLError(error=...))
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args,
                 kwargs.get("error") if isinstance(kwargs, dict) else None]
    return None


def describe_store_error(cfg: MountConfig, exc: StoreError) -> str:
    """The one line a user reads when the bucket of ``cfg`` cannot be used."""
    b = cfg.source.bucket
    if exc.code in ("NoSuchBucket", "404", "NotFound"):
        return f"bucket {b!r} does not exist at {cfg.endpoint}"
    if exc.code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access to bucket {b!r} at {cfg.endpoint} denied: check the credentials"
    if exc.code == "NoCredentials":
        return "no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or credentials_file="
    if exc.code == "CertificateError":
        return (f"the TLS certificate of {cfg.endpoint} is not trusted "
                f"({str(exc).partition(': ')[2]}): set AWS_CA_BUNDLE to the CA bundle "
                "that signed it")
    if exc.code in ("ConnectionError", "Timeout"):
        return f"cannot reach the endpoint {cfg.endpoint} ({exc})"
    return f"cannot open bucket {b!r} at {cfg.endpoint}: {exc}"
