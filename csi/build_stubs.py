#!/usr/bin/env python3
"""Generate the CSI gRPC stubs into csi/caiosfs_csi/ (run at image build time).

Usage: python csi/build_stubs.py [OUT_ROOT]
OUT_ROOT defaults to csi/; stubs land in OUT_ROOT/caiosfs_csi/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caiosfs_csi.stubs import generate

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    for path in generate(out):
        print(path)
