"""The rule presets ship as package data: they load from a wheel installed elsewhere."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from spmdnnx.spmd._rules import AxisRules

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHECK = """
import pathlib, sys
import spmdnnx
from spmdnnx.spmd import AxisRules
site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(spmdnnx.__file__).resolve().is_relative_to(site), spmdnnx.__file__
rules = AxisRules.load("fsdp_tp")
assert rules.name == "fsdp_tp" and rules.lookup("mlp") == ("tensor", "fsdp"), rules
print(",".join(AxisRules.presets()))
"""


def _pip(*args, cwd):
  return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=600)


def _build_wheel(src, out):
  # An isolated build gets setuptools/wheel from the configured index; without
  # one (offline), the environment's own build backend is the fallback.
  result = _pip("wheel", "--no-deps", "-q", "-w", str(out), str(src), cwd=src)
  if result.returncode:
    fallback = _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src), cwd=src)
    assert fallback.returncode == 0, result.stderr[-3000:] + fallback.stderr[-3000:]
  wheels = list(out.glob("spmdnnx-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


@pytest.mark.slow
def test_presets_load_from_an_installed_wheel(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "spmdnnx", src / "spmdnnx",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  wheel = _build_wheel(src, tmp_path / "dist")
  site = tmp_path / "site"
  result = _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel),
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in (site / "spmdnnx" / "spmd" / "presets").glob("*.json")) == [
      "dp.json", "fsdp.json", "fsdp_tp.json", "fsdp_tp_sp.json"]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPMDNNX_RULES_DIR")}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip() == "dp,fsdp,fsdp_tp,fsdp_tp_sp"


def test_rules_dir_env_adds_and_overrides_presets(tmp_path, monkeypatch):
  (tmp_path / "mine.json").write_text('{"rules": [["embed", "fsdp"]]}')
  (tmp_path / "dp.json").write_text('{"rules": [["embed", null]], "allow_unknown": true}')
  monkeypatch.setenv("SPMDNNX_RULES_DIR", str(tmp_path))
  assert AxisRules.presets() == ("dp", "fsdp", "fsdp_tp", "fsdp_tp_sp", "mine")
  assert AxisRules.load("mine").rules == (("embed", "fsdp"),)
  assert AxisRules.load("mine").name == "mine"
  assert AxisRules.load("dp").allow_unknown
  monkeypatch.delenv("SPMDNNX_RULES_DIR")
  assert not AxisRules.load("dp").allow_unknown
