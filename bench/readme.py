"""``python -m bench.readme [bench/results/latest.readme.md] [--readme README.md]``

Put a run's README block (written by every run as ``<name>.readme.md``: the exact command,
the tables, issue 15's targets judged on that same run, CPU per GiB) into the project README
between ``<!-- BENCH-RUN:START -->`` and ``<!-- BENCH-RUN:END -->``, so the figures shown
there are never copied by hand from one run and judged on another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- BENCH-RUN:START -->", "<!-- BENCH-RUN:END -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n")[2])
    ap.add_argument(
        "block", nargs="?", default=str(REPO / "bench" / "results" / "latest.readme.md")
    )
    ap.add_argument("--readme", default=str(REPO / "README.md"))
    a = ap.parse_args(argv)
    try:
        block = Path(a.block).read_text().strip()
        text = Path(a.readme).read_text()
    except OSError as e:
        print(f"bench.readme: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        print(f"bench.readme: {a.readme} needs one {START} ... {END} pair", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    Path(a.readme).write_text(f"{head}{START}\n{block}\n{END}{tail}")
    print(f"bench.readme: {a.readme} now shows {a.block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
