"""The README's tables and figures are the benchmarks' files, rendered (``scripts/readme_tables.py``).

Each generated block (``<!-- generated: NAME from FILE ... -->``) of README.md and docs/memory.md must equal what
``bench/tables.py`` renders from its JSON: a figure edited by hand, or a file rewritten without rendering again,
fails here."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import readme_tables  # noqa: E402
from bench import tables  # noqa: E402


def test_every_generated_block_equals_its_file():
    seen = set()
    for name in readme_tables.FILES:
        text = (ROOT / name).read_text()
        seen |= {m.group("name") for m in readme_tables.BLOCK.finditer(text)}
        _, changed = readme_tables.regenerate(text)
        assert not changed, f"{name}: {changed} differ from their files: run python scripts/readme_tables.py"
    assert seen == set(tables.SOURCES), seen


def test_a_changed_figure_fails_the_check(tmp_path):
    for rel in set(tables.SOURCES.values()):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    data = json.loads((tmp_path / "bench/memory_table.json").read_text())
    data["table"][0]["needs_bytes"] += 2 ** 30  # one figure of one row
    (tmp_path / "bench/memory_table.json").write_text(json.dumps(data))
    _, changed = readme_tables.regenerate((ROOT / "README.md").read_text(), root=tmp_path)
    assert changed == ["memory-table"], changed
