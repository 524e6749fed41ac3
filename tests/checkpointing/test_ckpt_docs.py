"""Runs the Python blocks of docs/checkpointing.md and the package's docstring examples."""

import doctest
import importlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import spmdnnx as nnx

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


def test_describe_command_line(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "spmdnnx.checkpointing", str(tmp_path / "c")],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "kernel: Param float32[2, 3]" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "spmdnnx.checkpointing", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 1 and "no checkpoint at" in bad.stderr
