"""Regenerate the configuration table of docs/operations.md from the schema
(daemon/config/keys.py): the only way it is made.

Usage: python scripts/gen_config_docs.py [--check]
--check fails, changing nothing, if the committed table differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorferry.daemon.config.keys import markdown_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
BEGIN = "<!-- config table: generated from daemon/config/keys.py by scripts/gen_config_docs.py -->"
END = "<!-- end of config table -->"


def regenerated(text: str) -> str:
    """``text`` with the part between the markers replaced by the schema's table."""
    head, begin, rest = text.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    return head + begin + markdown_table() + end + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    check = parser.parse_args().check
    text = DOC.read_text()
    fresh = regenerated(text)
    if fresh == text:
        return 0
    if check:
        print(f"stale configuration table in {DOC}", file=sys.stderr)
        print("run: python scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
