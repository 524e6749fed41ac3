"""The training loop end to end on 8 fake devices: math, resume, failure, hooks."""

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import checkpointing
from spmdnnx import errors
from spmdnnx import train
from spmdnnx.train import _step

from train_helpers import tiny_config

_METRIC_KEYS = set(train.TRAIN_KEYS)


def _losses(result):
  return [result.losses[s] for s in sorted(result.losses)]


def test_run_writes_metrics_config_tensorboard_and_checkpoints(tmp_path):
  lines = []
  cfg = tiny_config(steps=4, log_every=2, eval_every=4, checkpoint_every=2)
  result = train.run(cfg, workdir=str(tmp_path), log=lines.append)
  assert result.start_step == 0 and result.final_step == 4 and not result.stopped
  assert sorted(result.losses) == [1, 2, 3, 4]
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    assert _METRIC_KEYS <= set(r), set(r)
    assert r["mfu"] is None  # CPU: no known peak
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time_s"])
    assert r["loss"] == pytest.approx(result.losses[r["step"]])
  assert "eval_loss" not in records[0]
  assert records[1]["eval_bits_per_byte"] == pytest.approx(records[1]["eval_loss"] / math.log(2))
  assert records[1]["learning_rate"] == pytest.approx(float(
      _step.make_optimizer(learning_rate=cfg.learning_rate, warmup_steps=2, total_steps=4,
                           min_lr_ratio=cfg.min_lr_ratio, weight_decay=0.1, b1=0.9, b2=0.95,
                           eps=1e-8, grad_clip=1.0)[1](3)))
  assert train.load_config(str(tmp_path)).to_dict() == cfg.to_dict()
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  manager = checkpointing.CheckpointManager(str(tmp_path / train.CHECKPOINT_DIR))
  assert manager.all_steps() == [2, 4]
  manager.close()
  assert any(line.startswith("step 4/4 |") and "eval loss" in line for line in lines)


def test_rerun_in_a_finished_workdir_does_nothing_more(tmp_path):
  cfg = tiny_config(steps=2)
  train.run(cfg, workdir=str(tmp_path), log=lambda s: None)
  again = train.run(cfg, workdir=str(tmp_path), log=lambda s: None)
  assert again.start_step == 2 and again.losses == {}


def test_stop_and_resume_equals_uninterrupted_bit_for_bit(tmp_path):
  cfg = tiny_config(steps=6, checkpoint_every=0)
  full = train.run(cfg, workdir=str(tmp_path / "full"), log=lambda s: None)
  seen = []
  hooks = train.Hooks(on_step_end=[seen.append], should_stop=[lambda: len(seen) >= 3])
  first = train.run(cfg, workdir=str(tmp_path / "split"), hooks=hooks, log=lambda s: None)
  assert first.stopped and first.final_step == 3 and seen == [1, 2, 3]
  second = train.run(cfg, workdir=str(tmp_path / "split"), log=lambda s: None)
  assert second.start_step == 3
  resumed = {**first.losses, **second.losses}
  assert [resumed[s] for s in range(1, 7)] == _losses(full)  # exact, not approximate


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  real = _step.make_train_step

  def poisoned(**kw):
    step_fn = real(**kw)
    calls = []

    def wrapped(model, optimizer, batch):
      out = step_fn(model, optimizer, batch)
      calls.append(1)
      if len(calls) == 3:
        out = dict(out, loss=jnp.float32(jnp.nan))
      return out
    return wrapped

  monkeypatch.setattr(_step, "make_train_step", poisoned)
  cfg = tiny_config(steps=5, checkpoint_every=1)
  with pytest.raises(errors.TrainingError, match=r"Non-finite loss at step 3 .*last good "
                     r"checkpoint \(step 2\)") as info:
    train.run(cfg, workdir=str(tmp_path), log=lambda s: None)
  assert info.value.step == 3 and info.value.last_checkpoint == 2
  manager = checkpointing.CheckpointManager(str(tmp_path / train.CHECKPOINT_DIR))
  assert manager.latest_step() == 2  # the diverged step was never saved
  manager.close()


@pytest.mark.slow
def test_sharding_never_changes_the_math(tmp_path):
  results = {}
  for mesh in ("fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"):
    cfg = tiny_config(steps=4, mesh=mesh, rules="fsdp_tp")
    results[mesh] = _losses(train.run(cfg, workdir=str(tmp_path / mesh), log=lambda s: None))
  base = results["fsdp=8"]
  assert base[-1] < base[0]
  for mesh, losses in results.items():
    np.testing.assert_allclose(losses, base, rtol=2e-5, err_msg=mesh)


@pytest.mark.slow
def test_microbatches_equal_one_big_batch(tmp_path):
  out = {}
  for mb in (1, 4):
    cfg = tiny_config(steps=3, batch_size=32, microbatches=mb, mesh="fsdp=8")
    out[mb] = _losses(train.run(cfg, workdir=str(tmp_path / str(mb)), log=lambda s: None))
  np.testing.assert_allclose(out[4], out[1], rtol=2e-5)


def _unigram_bits_per_byte(train_windows, eval_targets):
  counts = np.bincount(train_windows[:, 1:].ravel(), minlength=256).astype(np.float64) + 1.0
  logp = np.log2(counts / counts.sum())
  return float(-logp[eval_targets.ravel()].mean())


@pytest.mark.slow
def test_lm_tiny_learns_and_beats_a_unigram_byte_model(tmp_path):
  cfg = tiny_config(steps=120, batch_size=16, seq_len=64, learning_rate=3e-3,
                    warmup_steps=10, log_every=20, eval_batches=4, **{"data.path": ""})
  cfg.model = train.model_config("lm_tiny", max_seq_len=64)
  result = train.run(cfg, workdir=str(tmp_path), log=lambda s: None)
  losses = _losses(result)
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
  corpus = train.Corpus.load("", cfg.seq_len, cfg.data.eval_fraction)
  targets = np.concatenate([b["targets"] for b in train.eval_batches(
      corpus.eval, global_batch=16, num_batches=4)])
  unigram = _unigram_bits_per_byte(corpus.train, targets)
  assert result.eval["eval_bits_per_byte"] < unigram - 0.5, (result.eval, unigram)


@pytest.mark.slow
def test_long_loop_on_8_devices_never_aborts(tmp_path):
  cfg = tiny_config(steps=400, batch_size=8, seq_len=16, log_every=100, mesh="fsdp=8",
                    rules="fsdp", max_in_flight=2)
  cfg.model = train.model_config("mlp_quick", embed_dim=16, mlp_dim=32, max_seq_len=16)
  result = train.run(cfg, workdir=str(tmp_path), log=lambda s: None)
  assert result.final_step == 400 and len(result.losses) == 400


@pytest.mark.slow
def test_profile_steps_writes_a_trace(tmp_path):
  cfg = tiny_config(steps=3, profile_steps="2,3")
  train.run(cfg, workdir=str(tmp_path), log=lambda s: None)
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


@pytest.mark.slow
def test_sample_from_a_trained_workdir(tmp_path):
  train.run(tiny_config(steps=2), workdir=str(tmp_path), log=lambda s: None)
  loaded = train.load_model(str(tmp_path))
  assert loaded.step == 2
  text = train.sample(loaded, "def ", max_new_tokens=10, temperature=0.0)
  assert isinstance(text, str) and len(text.encode("utf-8", "replace")) >= 1
  # greedy decoding is deterministic
  assert text == train.sample(loaded, "def ", max_new_tokens=10, temperature=0.0)
  with pytest.raises(errors.ConfigError, match="exceeds the model's max_seq_len=64"):
    train.sample(loaded, "def ", max_new_tokens=100)
  # decoding with the KV cache picks what recomputing the full forward pass picks
  expected = list(train.encode("def "))
  with nnx.use_sharding(loaded.mesh, loaded.rules):
    for _ in range(10):
      logits = loaded.model(jnp.asarray([expected], jnp.int32))
      expected.append(int(jnp.argmax(logits[0, -1])))
  assert train.decode(expected[4:]) == text


def test_sample_without_checkpoint_is_an_error(tmp_path):
  train.save_config(tiny_config(), str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="holds no checkpoint"):
    train.load_model(str(tmp_path))
