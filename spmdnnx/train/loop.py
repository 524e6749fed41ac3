"""A minimal sharded training loop over nnx.jit."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable

import jax

from spmdnnx.spmd._batch import shard_batch
from spmdnnx.spmd._context import current_context
from spmdnnx._transforms.grad import value_and_grad
from spmdnnx._transforms.jit import jit


@dataclasses.dataclass
class TrainResult:
  """Losses logged by `train` (step, loss) and the wall time per step."""
  history: list
  seconds_per_step: float

  @property
  def first_loss(self) -> float:
    return self.history[0][1]

  @property
  def last_loss(self) -> float:
    return self.history[-1][1]


def make_train_step(loss_fn: Callable[[Any, Any, Any], jax.Array]) -> Callable:
  """Builds ``step(model, optimizer, x, y) -> loss`` (one optimizer update)."""

  @jit
  def train_step(model, optimizer, x, y):
    loss, grads = value_and_grad(lambda m: loss_fn(m, x, y))(model)
    optimizer.update(model, grads)
    return loss

  return train_step


def train(model: Any, optimizer: Any, batches: Iterable, *, steps: int,
          loss_fn: Callable, log_every: int = 10,
          log: Callable[[str], None] = print) -> TrainResult:
  """Runs `steps` updates; batches are sharded over the mesh's batch axes."""
  step_fn = make_train_step(loss_fn)
  history = []
  it = iter(batches)
  start = None
  for step in range(1, steps + 1):
    if step == 2:
      start = time.perf_counter()  # step 1 includes compilation
    x, y = next(it)
    if current_context() is not None:
      x, y = shard_batch((x, y))
    loss = step_fn(model, optimizer, x, y)
    if step == 1 or step % log_every == 0 or step == steps:
      value = float(loss)
      history.append((step, value))
      log(f"step {step:5d}  loss {value:.5f}")
  elapsed = 0.0 if start is None else time.perf_counter() - start
  return TrainResult(history, elapsed / max(steps - 1, 1))
