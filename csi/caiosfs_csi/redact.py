"""Render CSI messages for logs with every secret field replaced.

The spec marks sensitive fields with the `csi_secret` field option (NodePublishVolumeRequest
.secrets and friends). Walking the descriptor instead of naming fields by hand keeps this
correct for every message, including ones added by a later spec version.
"""

from __future__ import annotations

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from caiosfs_csi.stubs import load

csi_pb2, _ = load()

STRIPPED = "***stripped***"


def _is_secret(fd: FieldDescriptor) -> bool:
    opts = fd.GetOptions()
    return opts.HasExtension(csi_pb2.csi_secret) and opts.Extensions[csi_pb2.csi_secret]


def _is_map(fd: FieldDescriptor) -> bool:
    return (
        fd.type == FieldDescriptor.TYPE_MESSAGE
        and fd.message_type.GetOptions().map_entry
    )


def _strip(msg: Message) -> None:
    for fd, value in msg.ListFields():
        if _is_secret(fd):
            if _is_map(fd):
                for key in list(value.keys()):
                    if fd.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:
                        value[key] = STRIPPED
                    else:
                        del value[key]
            elif fd.type == FieldDescriptor.TYPE_STRING and not _is_repeated(fd):
                setattr(msg, fd.name, STRIPPED)
            else:
                msg.ClearField(fd.name)
            continue
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if _is_map(fd):
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value.values():
                    _strip(item)
        elif _is_repeated(fd):
            for item in value:
                _strip(item)
        else:
            _strip(value)


def _is_repeated(fd: FieldDescriptor) -> bool:
    # `label` is deprecated in newer protobuf runtimes; prefer `is_repeated` when present.
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return bool(rep)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def redacted(msg: Message) -> Message:
    """Return a copy of `msg` with every csi_secret field stripped (values replaced)."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    _strip(copy)
    return copy


def redact(msg: Message) -> str:
    """One-line text form of `msg` that is safe to log."""
    return text_format.MessageToString(redacted(msg), as_one_line=True)
