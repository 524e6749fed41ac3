"""Runs the Python blocks of docs/checkpointing.md and the package's docstring examples."""

import doctest
import importlib
import os
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "checkpointing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
MODULES = ["spmdnnx.checkpointing._convert", "spmdnnx.checkpointing._manager",
           "spmdnnx.checkpointing._oneshot"]


def test_doc_has_runnable_blocks():
  assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block_runs(index, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)  # the Flax example reads the test fixtures
  exec(compile(BLOCKS[index], f"checkpointing.md block {index}", "exec"), {})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
