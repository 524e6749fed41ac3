"""`lm_loss`: masked next-token cross-entropy with an optional z-loss.

>>> import jax.numpy as jnp
>>> logits = jnp.zeros((1, 2, 4))                   # uniform over 4 tokens
>>> loss, aux = lm_loss(logits, jnp.array([[1, 3]]))
>>> round(float(loss), 4), round(float(aux["nll"]), 4)   # log(4)
(1.3863, 1.3863)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx.spmd._constrain import constrain, explicit_out_sharding


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
            z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of ``targets`` under ``logits`` over the masked positions.

  ``targets[b, t]`` is the token that should follow position ``t`` (the
  caller shifts: ``logits = model(seq[:, :-1])``, ``targets = seq[:, 1:]``).
  Computed in float32.

  Args:
    logits: ``[B, T, V]`` scores.
    targets: ``int[B, T]`` token ids in ``[0, V)``.
    mask: ``[B, T]`` weights (bool or 0/1); None counts every position. The
      mean divides by ``max(sum(mask), 1)``, so an all-zero mask gives 0.
    z_loss: weight of ``mean(logsumexp(logits) ** 2)`` (PaLM's z-loss, keeps
      the softmax normaliser near 1).

  Returns:
    ``(loss, aux)``: ``loss = nll + z`` and ``aux = {"nll": nll, "z_loss": z}``
    where ``z = z_loss * mean(logsumexp ** 2)``; all float32 scalars.

  Raises:
    ShapeError: if the shapes do not line up or targets are not integers.
  """
  lshape, tshape = tuple(jnp.shape(logits)), tuple(jnp.shape(targets))
  if len(lshape) < 2 or tshape != lshape[:-1]:
    raise errors.ShapeError(
        f"lm_loss: targets must have the logits' shape without the vocab axis: logits "
        f"{list(lshape)} needs targets {list(lshape[:-1])}, got {list(tshape)}.",
        shapes=[lshape, tshape])
  if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
    raise errors.ShapeError(
        f"lm_loss: targets must be integer token ids, got {jnp.result_type(targets)}.",
        shapes=[tshape])
  if mask is not None and tuple(jnp.shape(mask)) != tshape:
    raise errors.ShapeError(
        f"lm_loss: mask must have the targets' shape {list(tshape)}, got "
        f"{list(jnp.shape(mask))}.", shapes=[tshape, tuple(jnp.shape(mask))])
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = _pick(logits, targets)
  weights = jnp.ones(tshape, jnp.float32) if mask is None else _weights(mask)
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  nll = jnp.sum((lse - picked) * weights) / denom
  z = jnp.float32(z_loss) * (jnp.sum(jnp.square(lse) * weights) / denom)
  return nll + z, {"nll": nll, "z_loss": z}


def _pick(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``logits[..., targets]``: a gather, or on an Explicit mesh a one-hot sum.

  On `AxisType.Explicit` meshes a gather over the (sharded) vocab axis has no
  unambiguous output layout (``ShardingTypeError``); multiplying by a one-hot
  laid out like the logits and summing over the vocab gives the same values.
  """
  names = ("activation_batch", "activation_length", "activation_vocab")
  if logits.ndim != 3 or explicit_out_sharding(names, logits.shape) is None:
    return jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  hot = constrain(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), names)
  return jnp.sum(logits * hot, axis=-1)


def _weights(mask: Any) -> jax.Array:
  return jnp.asarray(mask).astype(jnp.float32)
