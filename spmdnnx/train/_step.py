"""The jitted train and eval steps of a decoder LM.

The train step accumulates gradients over ``microbatches`` with `lax.scan`
(memory flat in their number): the global batch ``[B, T]`` is viewed as
``[B / m, m, T]`` and swapped to ``[m, B / m, T]``, so each microbatch takes
one row of every device's block and stays spread over all batch devices. The
mean of the microbatch losses (and gradients) equals the full-batch mean,
since every microbatch has the same number of tokens. The step then takes the
global gradient norm (before clipping, which the optimizer's transformation
does) and applies the optimizer.

>>> import optax
>>> tx = make_optimizer(learning_rate=1e-3, warmup_steps=2, total_steps=10,
...                     min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
...                     eps=1e-8, grad_clip=1.0)[1]
>>> round(float(tx(0)), 6), round(float(tx(2)), 6)
(0.0, 0.001)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from spmdnnx import _graph as graph
from spmdnnx import models
from spmdnnx._transforms.jit import jit
from spmdnnx._variables import Param
from spmdnnx.spmd._constrain import constrain


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float, weight_decay: float, b1: float, b2: float,
                   eps: float, grad_clip: float
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """AdamW with global-norm clipping and a linear-warmup + cosine schedule.

  Weight decay applies to parameters with two or more dimensions (matrices,
  embeddings), not to norm scales or biases.

  Returns:
    ``(transformation, schedule)``; ``schedule(step)`` is the learning rate
    of update ``step + 1`` (optax counts from 0).
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=learning_rate * min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule


def _microbatched(x: jax.Array, m: int) -> jax.Array:
  b = x.shape[0]
  x = x.reshape((b // m, m) + x.shape[1:]).swapaxes(0, 1)
  return constrain(x, (None, "batch", "length"))


def make_train_step(*, microbatches: int, z_loss: float) -> Callable:
  """Builds ``step(model, optimizer, batch) -> {"loss", "grad_norm"}`` (jitted).

  Args:
    microbatches: gradient-accumulation steps per update (divides the batch).
    z_loss: weight of the log-partition penalty passed to `models.lm_loss`.
  """

  def train_step(model, optimizer, batch):
    graphdef, params, rest = graph.split(model, Param, ...)

    def loss_of(p, inputs, targets):
      logits = graph.merge(graphdef, p, rest)(inputs)
      loss, _ = models.lm_loss(logits, targets, z_loss=z_loss)
      return loss

    grad_fn = jax.value_and_grad(loss_of)
    if microbatches == 1:
      loss, grads = grad_fn(params, batch["inputs"], batch["targets"])
    else:
      xs = _microbatched(batch["inputs"], microbatches)
      ys = _microbatched(batch["targets"], microbatches)

      def body(carry, xy):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, *xy)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (xs, ys))
      loss = loss / microbatches
      grads = jax.tree.map(lambda g: g / microbatches, grads)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": grad_norm}

  return jit(train_step)


def make_eval_step() -> Callable:
  """Builds ``step(model, batch) -> mean cross-entropy (nats/token)`` (jitted)."""

  def eval_step(model, batch):
    logits = model(batch["inputs"])
    loss, _ = models.lm_loss(logits, batch["targets"], z_loss=0.0)
    return loss

  return jit(eval_step)
