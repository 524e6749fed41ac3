"""The launchers end to end: launch.train then launch.sample, and their errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SMALL_MODEL = ["--config.model.embed_dim=32", "--config.model.num_layers=2",
                "--config.model.head_dim=8", "--config.model.mlp_dim=64",
                "--config.model.max_seq_len=64"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # --fake_devices must do it
  env.pop("JAX_PLATFORMS", None)
  return env


def _run(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_then_sample(tmp_path):
  workdir = str(tmp_path / "run")
  out = _run("launch.train", "--config=configs/lm_tiny.py", f"--workdir={workdir}",
             "--fake_devices=8", "--config.steps=6", "--config.log_every=3",
             "--config.seq_len=32", "--config.batch_size=8", "--config.eval_every=6",
             "--config.mesh=data=2,fsdp=2,tensor=2", *_SMALL_MODEL)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "devices: 8 x cpu" in out.stdout and "'data': 2" in out.stdout
  assert "step 6/6 |" in out.stdout and "bits/byte" in out.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [3, 6] and "eval_loss" in records[-1]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["embed_dim"] == 32
  sample = _run("launch.sample", f"--workdir={workdir}", "--prompt=def ",
                "--max_new_tokens=20", "--fake_devices=8", "--temperature=0")
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "--- sample from step 6 of" in sample.stdout
  text = sample.stdout.split("---\n", 1)[1]
  assert text.startswith("def ") and len(text) > len("def ")


@pytest.mark.slow
def test_train_rejects_a_mesh_that_does_not_fit(tmp_path):
  out = _run("launch.train", "--config=configs/lm_tiny.py", f"--workdir={tmp_path}",
             "--fake_devices=8", "--config.mesh=fsdp=3,tensor=2")
  assert out.returncode == 1
  assert "error: MeshError" in out.stderr and "8 devices" in out.stderr


@pytest.mark.slow
def test_train_rejects_an_unknown_override(tmp_path):
  out = _run("launch.train", "--config=configs/lm_tiny.py", f"--workdir={tmp_path}",
             "--fake_devices=8", "--config.stepz=3")
  assert out.returncode != 0
  assert "stepz" in out.stderr and 'Did you mean "steps"' in out.stderr


@pytest.mark.slow
def test_train_rejects_a_glob_matching_nothing(tmp_path):
  out = _run("launch.train", "--config=configs/lm_tiny.py", f"--workdir={tmp_path / 'w'}",
             "--fake_devices=8", f"--config.data.path={tmp_path}/none/*.txt")
  assert out.returncode == 1
  assert "error: DataError" in out.stderr and "matches no file" in out.stderr


@pytest.mark.slow
def test_sample_of_a_non_run_directory(tmp_path):
  out = _run("launch.sample", f"--workdir={tmp_path}", "--fake_devices=8")
  assert out.returncode == 1 and "error: ConfigError" in out.stderr
