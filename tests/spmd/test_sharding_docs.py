"""Runs the code blocks of docs/sharding.md that are complete programs."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "sharding.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
# Blocks that are fragments (they use names defined elsewhere) are skipped.
RUNNABLE = [b for b in BLOCKS if "import" in b]


def test_doc_has_runnable_blocks():
  assert len(RUNNABLE) >= 4


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_doc_block_runs(index, capsys):
  exec(compile(RUNNABLE[index], f"sharding.md block {index}", "exec"), {})
