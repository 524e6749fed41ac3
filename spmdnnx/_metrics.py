"""Metrics as Modules: running averages, accuracy, Welford statistics.

A metric keeps its running totals in `MetricState` Variables, so it can be
split, passed to `nnx.jit` with the model and updated inside the step: the
totals come back like any other state. Each metric reads one keyword argument
of ``update`` (``values`` unless ``argname=`` says otherwise), so one
`MultiMetric` can forward the same keywords to all of its members.

>>> import jax.numpy as jnp
>>> from spmdnnx import metrics
>>> m = metrics.MultiMetric(loss=metrics.Average("loss"), acc=metrics.Accuracy())
>>> m.update(loss=jnp.array([1.0, 3.0]), logits=jnp.array([[0.1, 0.9], [0.8, 0.2]]),
...          labels=jnp.array([1, 1]))
>>> {k: float(v) for k, v in m.compute().items()}
{'loss': 2.0, 'acc': 0.5}
>>> m.reset(); int(m.loss.count.value)
0
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._object import Object
from spmdnnx._variables import Variable


class MetricState(Variable):
  """A Variable holding a metric's running total."""


class Metric(Object):
  """Base class of metrics: ``reset()``, ``update(**kwargs)``, ``compute()``."""

  def __init__(self):
    raise NotImplementedError(f"{type(self).__name__} must define __init__")

  def reset(self) -> None:
    """Sets the running totals back to their initial values."""
    raise NotImplementedError(f"{type(self).__name__} must define reset()")

  def update(self, **kwargs: Any) -> None:
    """Folds one batch of values into the running totals."""
    raise NotImplementedError(f"{type(self).__name__} must define update()")

  def compute(self) -> Any:
    """The metric's value over everything seen since the last reset."""
    raise NotImplementedError(f"{type(self).__name__} must define compute()")


def _take(metric: Metric, argname: str, kwargs: dict) -> Any:
  if argname not in kwargs:
    raise errors.ArgumentError(
        f"{type(metric).__name__}.update: expected keyword argument '{argname}' (got "
        f"{sorted(kwargs) or 'none'}); pass it, or build the metric with "
        f"argname=<the keyword your step passes>.", argument=argname)
  return kwargs[argname]


def _is_python_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


class Average(Metric):
  """The mean of every value passed as ``update(<argname>=...)``.

  Args:
    argname: the keyword `update` reads (default ``"values"``).

  ``update(mask=...)`` weights each value by the mask (broadcast to the
  values), so padded entries can be left out.

  >>> import jax.numpy as jnp
  >>> avg = Average()
  >>> avg.update(values=jnp.array([1.0, 2.0, 6.0]), mask=jnp.array([1, 1, 0]))
  >>> float(avg.compute())
  1.5
  """

  def __init__(self, argname: str = "values"):
    self.argname = argname
    self.total = MetricState(jnp.array(0, dtype=jnp.float32))
    self.count = MetricState(jnp.array(0, dtype=jnp.int32))

  def reset(self) -> None:
    self.total.value = jnp.zeros_like(self.total.value)
    self.count.value = jnp.zeros_like(self.count.value)

  def update(self, mask: Any = None, **kwargs: Any) -> None:
    values = _take(self, self.argname, kwargs)
    if _is_python_number(values):
      if mask is not None:
        raise errors.ConfigError(
            f"{type(self).__name__}.update: a mask needs '{self.argname}' as an array, "
            f"got the Python number {values!r}.", argument="mask")
      total, count = jnp.float32(values), jnp.int32(1)
    else:
      values = jnp.asarray(values)
      if mask is None:
        total, count = values.sum(), values.size
      else:
        mask = jnp.broadcast_to(jnp.asarray(mask), values.shape)
        total = (values * mask.astype(values.dtype)).sum()
        count = mask.astype(jnp.int32).sum()
    self.total.value = self.total.value + jnp.asarray(total, jnp.float32)
    self.count.value = self.count.value + jnp.asarray(count, jnp.int32)

  def compute(self) -> jax.Array:
    return self.total.value / self.count.value.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Statistics:
  """What `Welford.compute` returns."""
  mean: jax.Array
  standard_error_of_mean: jax.Array
  standard_deviation: jax.Array


class Welford(Metric):
  """Running mean and variance (Welford / Chan's parallel update).

  >>> import jax.numpy as jnp
  >>> w = Welford()
  >>> w.update(values=jnp.array([1.0, 2.0])); w.update(values=jnp.array([3.0, 4.0]))
  >>> s = w.compute(); float(s.mean), round(float(s.standard_deviation), 4)
  (2.5, 1.118)
  """

  def __init__(self, argname: str = "values"):
    self.argname = argname
    self.count = MetricState(jnp.array(0, dtype=jnp.int32))
    self.mean = MetricState(jnp.array(0, dtype=jnp.float32))
    self.m2 = MetricState(jnp.array(0, dtype=jnp.float32))

  def reset(self) -> None:
    for var in (self.count, self.mean, self.m2):
      var.value = jnp.zeros_like(var.value)

  def update(self, **kwargs: Any) -> None:
    values = _take(self, self.argname, kwargs)
    if _is_python_number(values):
      n, batch_mean, batch_m2 = 1, jnp.float32(values), jnp.float32(0)
    else:
      values = jnp.asarray(values, jnp.float32)
      n = values.size
      batch_mean = values.mean()
      batch_m2 = values.var() * n
    old = self.count.value.astype(jnp.float32)
    total = old + n
    delta = batch_mean - self.mean.value
    self.mean.value = self.mean.value + delta * n / total
    self.m2.value = self.m2.value + batch_m2 + delta * delta * old * n / total
    self.count.value = self.count.value + jnp.int32(n)

  def compute(self) -> Statistics:
    count = self.count.value.astype(jnp.float32)
    std = jnp.sqrt(self.m2.value / count)
    return Statistics(mean=self.mean.value, standard_error_of_mean=std / jnp.sqrt(count),
                      standard_deviation=std)


class Accuracy(Average):
  """The fraction of correct predictions.

  Multi-class: ``logits`` has one more dimension than ``labels`` and the
  prediction is its argmax. Binary (``threshold=`` given): ``logits`` and
  ``labels`` have the same shape and a logit ``>= threshold`` predicts a
  positive label.

  >>> import jax.numpy as jnp
  >>> acc = Accuracy(threshold=0.5)
  >>> acc.update(logits=jnp.array([0.7, 0.2, 0.9]), labels=jnp.array([1, 0, 0]))
  >>> round(float(acc.compute()), 4)
  0.6667
  """

  def __init__(self, threshold: float | None = None, *args: Any, **kwargs: Any):
    if threshold is not None and not isinstance(threshold, float):
      raise errors.ArgumentError(
          f"Accuracy: threshold must be a float, got {type(threshold).__name__} "
          f"{threshold!r}.", argument="threshold")
    self.threshold = threshold
    super().__init__(*args, **kwargs)

  def update(self, *, logits: Any, labels: Any, mask: Any = None,  # type: ignore[override]
             **_: Any) -> None:
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    binary = self.threshold is not None
    want = labels.ndim if binary else labels.ndim + 1
    if logits.ndim != want:
      kind = "binary (threshold given)" if binary else "multi-class"
      raise errors.ShapeError(
          f"Accuracy.update: for {kind} classification logits need {want} dims for labels "
          f"of shape {labels.shape}, got logits of shape {logits.shape}.",
          shapes=[logits.shape, labels.shape])
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise errors.ConfigError(
          f"Accuracy.update: labels must be integers, got {labels.dtype}.",
          argument="labels")
    if binary:
      correct = (logits >= self.threshold) == (labels > 0)
    else:
      correct = jnp.argmax(logits, axis=-1) == labels.astype(jnp.int32)
    super().update(values=correct.astype(jnp.float32), mask=mask)


class MultiMetric(Metric):
  """Several named metrics updated together.

  ``update(**kwargs)`` passes every keyword to every member (each reads its
  own); ``mask=`` is passed to all of them, or per member as a dict
  ``{name: mask}``. ``compute()`` returns ``{name: value}``.
  """

  _RESERVED = ("reset", "update", "compute", "split")

  def __init__(self, **metrics: Metric):
    bad = [n for n in metrics if n in self._RESERVED or n.startswith("_")]
    if bad:
      raise errors.ConfigError(
          f"MultiMetric: {bad} cannot name a metric (reserved: {self._RESERVED} and names "
          "starting with '_'); choose other keywords.", keys=bad)
    self._metric_names = tuple(metrics)
    for name, metric in metrics.items():
      setattr(self, name, metric)

  def reset(self) -> None:
    for name in self._metric_names:
      getattr(self, name).reset()

  def update(self, **updates: Any) -> None:
    mask = updates.pop("mask", None)
    for name in self._metric_names:
      m = mask.get(name) if isinstance(mask, dict) else mask
      extra = {} if m is None else {"mask": m}
      getattr(self, name).update(**updates, **extra)

  def compute(self) -> dict[str, Any]:
    return {name: getattr(self, name).compute() for name in self._metric_names}


__all__ = ["Metric", "MetricState", "Average", "Accuracy", "Welford", "Statistics",
           "MultiMetric"]
