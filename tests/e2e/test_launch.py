"""The launcher trains the default model end to end on 8 fake devices."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_launch_train_reduces_loss():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "launch.train", "--steps=25", "--log_every=5",
       "--embed=32", "--mlp=64", "--num_layers=2", "--report=false"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh: {'data': 1, 'stage': 1, 'fsdp': 4" in out.stdout
  match = re.search(r"^loss ([0-9.]+) -> ([0-9.]+);", out.stdout, re.M)
  assert match, out.stdout[-2000:]
  first, final = float(match.group(1)), float(match.group(2))
  assert final < first


@pytest.mark.slow
def test_launch_rejects_bad_mesh():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "launch.train", "--mesh=fsdp=3,tensor=2",
                        "--steps=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0
  assert "MeshError" in out.stderr and "8" in out.stderr
