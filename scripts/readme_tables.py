"""Render the README's generated tables and figures from the benchmarks' JSON files (``bench/tables.py``).

    python scripts/readme_tables.py           # rewrite every generated block of README.md and docs/memory.md
    python scripts/readme_tables.py --check   # exit 1, naming each block that differs from its file

A block is the text between ``<!-- generated: NAME from FILE by scripts/readme_tables.py -->`` and
``<!-- end generated -->``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import tables  # noqa: E402

BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) from \S+ by scripts/readme_tables.py -->\n)(?P<body>.*?)"
                   r"\n?<!-- end generated -->", re.S)
FILES = ("README.md", "docs/memory.md")


def regenerate(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every generated block rendered again, and the names of the blocks that changed."""
    changed = []

    def sub(m):
        new = tables.render(m.group("name"), root)
        if new != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + new + "\n<!-- end generated -->"

    return BLOCK.sub(sub, text), changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    status = 0
    for name in FILES:
        path = ROOT / name
        new, changed = regenerate(path.read_text())
        if args.check:
            if changed:
                print(f"{name}: generated blocks differ from their files: {', '.join(changed)} "
                      "(run python scripts/readme_tables.py)", file=sys.stderr)
                status = 1
            continue
        if changed:
            path.write_text(new)
        print(f"{name}: {len(changed)} block(s) rewritten: {', '.join(changed) or 'none'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
