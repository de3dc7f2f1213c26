"""Paths inside the mount: slash-separated, relative to the mounted prefix, "" the root.

What is "at or below" a directory is asked by many parts (a rename or rmdir moving or
dropping what lies below, the tree listings, the directory records): one definition here,
so the root ("") and a sibling sharing a prefix ("a/bc" is not below "a/b") are right
everywhere.
"""

from __future__ import annotations


def under(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or below it ("": the root, above everything)."""
    return path == top or top == "" or path.startswith(top + "/")
