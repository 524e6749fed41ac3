"""Metrics: values against numpy, masks, reset, jit, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import metrics


def test_average_matches_numpy_over_batches():
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(n,)).astype(np.float32) for n in (3, 5, 2)]
  avg = metrics.Average()
  for b in batches:
    avg.update(values=jnp.asarray(b))
  np.testing.assert_allclose(avg.compute(), np.concatenate(batches).mean(), rtol=1e-6)
  assert int(avg.count.value) == 10


def test_average_python_numbers_and_mask():
  avg = metrics.Average("loss")
  avg.update(loss=2.0)
  avg.update(loss=4.0)
  assert float(avg.compute()) == 3.0
  avg.reset()
  avg.update(loss=jnp.array([[1.0, 100.0], [3.0, 100.0]]), mask=jnp.array([1, 0]))
  assert float(avg.compute()) == 2.0 and int(avg.count.value) == 2


def test_welford_matches_numpy():
  rng = np.random.default_rng(1)
  parts = [rng.normal(size=(n,)).astype(np.float32) for n in (4, 7, 1)]
  w = metrics.Welford()
  for p in parts:
    w.update(values=jnp.asarray(p))
  allv = np.concatenate(parts)
  s = w.compute()
  np.testing.assert_allclose(s.mean, allv.mean(), rtol=1e-5)
  np.testing.assert_allclose(s.standard_deviation, allv.std(), rtol=1e-5)
  np.testing.assert_allclose(s.standard_error_of_mean, allv.std() / np.sqrt(allv.size),
                             rtol=1e-5)


def test_accuracy_multiclass_and_binary():
  acc = metrics.Accuracy()
  acc.update(logits=jnp.array([[0.1, 0.9], [0.9, 0.1], [0.2, 0.8]]), labels=jnp.array([1, 1, 1]))
  np.testing.assert_allclose(acc.compute(), 2 / 3, rtol=1e-6)
  binary = metrics.Accuracy(threshold=0.0)
  binary.update(logits=jnp.array([-1.0, 2.0]), labels=jnp.array([0, 0]))
  assert float(binary.compute()) == 0.5


def test_multimetric_updates_every_member_and_resets():
  mm = metrics.MultiMetric(acc=metrics.Accuracy(), loss=metrics.Average("loss"))
  mm.update(logits=jnp.array([[0.0, 1.0]]), labels=jnp.array([1]), loss=jnp.array(3.0))
  mm.update(logits=jnp.array([[1.0, 0.0]]), labels=jnp.array([1]), loss=jnp.array(1.0),
            mask={"acc": jnp.array([0])})
  out = mm.compute()
  assert float(out["acc"]) == 1.0 and float(out["loss"]) == 2.0
  mm.reset()
  assert int(mm.acc.count.value) == 0 and int(mm.loss.count.value) == 0


def test_metric_state_flows_through_jit():
  avg = metrics.Average()

  @nnx.jit
  def step(m, x):
    m.update(values=x)

  step(avg, jnp.array([1.0, 2.0]))
  step(avg, jnp.array([6.0]))
  assert float(avg.compute()) == 3.0
  assert all(isinstance(v, metrics.MetricState)
             for _, v in nnx.state(avg).flat_state())


def test_missing_keyword_is_a_type_error_naming_it():
  with pytest.raises(errors.ArgumentError, match="expected keyword argument 'loss'"):
    metrics.Average("loss").update(values=1.0)
  with pytest.raises(TypeError):
    metrics.Welford().update(loss=1.0)


def test_mask_with_python_number_is_refused():
  with pytest.raises(errors.ConfigError, match="a mask needs 'values' as an array"):
    metrics.Average().update(values=1.0, mask=jnp.array([1]))


def test_accuracy_errors():
  with pytest.raises(errors.ArgumentError, match="threshold must be a float, got int"):
    metrics.Accuracy(threshold=1)
  with pytest.raises(errors.ShapeError, match=r"multi-class classification logits need 2 dims"):
    metrics.Accuracy().update(logits=jnp.zeros((3,)), labels=jnp.zeros((3,), jnp.int32))
  with pytest.raises(errors.ConfigError, match="labels must be integers, got float32"):
    metrics.Accuracy().update(logits=jnp.zeros((3, 2)), labels=jnp.zeros((3,)))


def test_multimetric_reserved_names():
  with pytest.raises(errors.ConfigError, match=r"\['update'\] cannot name a metric"):
    metrics.MultiMetric(update=metrics.Average())


def test_base_metric_methods_must_be_overridden():
  with pytest.raises(NotImplementedError, match="must define __init__"):
    metrics.Metric()
