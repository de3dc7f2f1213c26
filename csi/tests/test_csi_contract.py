"""The plugin's and the mount helper's idea of caiosfs's -o options matches caiosfs itself.

Both keep their own copy of the option list (the plugin must not import caiosfs, the helper is
plain sh); this test catches the day caiosfs gains or renames an option.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CSI = Path(__file__).resolve().parents[1]
if str(CSI) not in sys.path:
    sys.path.insert(0, str(CSI))

from caiosfs_csi.options import CAIOSFS_OPTIONS

from caiosfs import config  # not importable: a failure, never a skip


def caiosfs_options() -> set[str]:
    return {o.name for o in config.OPTIONS}


def test_plugin_knows_every_caiosfs_option() -> None:
    assert set(CAIOSFS_OPTIONS) == caiosfs_options()


def test_mount_helper_knows_every_caiosfs_option() -> None:
    text = (CSI.parent / "mount-helpers" / "mount.caiosfs").read_text()
    words: set[str] = set()
    for m in re.finditer(r'^CAIOSFS_OPTIONS="(?:\$CAIOSFS_OPTIONS )?([^"]*)"', text, re.MULTILINE):
        words.update(m.group(1).split())
    assert words == caiosfs_options() - {"ro", "rw"}  # the helper handles these two itself
