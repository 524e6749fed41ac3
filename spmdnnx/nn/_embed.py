"""`Embed`: a lookup table from integer ids to feature vectors.

The table's dimensions have a fixed role, so it is annotated by default with
logical axes ``("vocab", "embed")``. `Embed.attend` reuses the table as the
output projection (tied embeddings).

Under `use_sharding`, the lookup is laid out by activation names: the table
is first constrained to ``("activation_vocab", "activation_embed")`` (with the
shipped presets: its FSDP split gathered, a tensor split over the vocabulary
kept), so XLA partitions the gather by the ids' batch instead of fighting the
table's parameter layout, and the output is constrained to
``("activation_batch", "activation_length", "activation_embed")`` (for ids of
rank 2; ``("activation_batch", "activation_embed")`` for rank 1). Pass
``activation_axes=None`` to switch this off, or other output names.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> emb = Embed(10, 4, rngs=Rngs(0))
>>> emb(jnp.array([[1, 2, 3]])).shape, emb.embedding.logical_axes
((1, 3, 4), ('vocab', 'embed'))
>>> emb.attend(jnp.ones((1, 3, 4))).shape
(1, 3, 10)
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx._rngs import Rngs
from spmdnnx.spmd._constrain import constrain, layout_activation
from spmdnnx.spmd._context import current_context

DEFAULT_EMBEDDING_AXES = ("vocab", "embed")
#: The table's layout while it is looked up (activation names, see module doc).
LOOKUP_TABLE_AXES = ("activation_vocab", "activation_embed")


class Embed(Module):
  """An embedding table of shape ``(num_embeddings, features)``.

  Args:
    num_embeddings: vocabulary size.
    features: embedding width.
    dtype: dtype of the returned embeddings (None: param_dtype).
    param_dtype: storage dtype of the table.
    embedding_init: table initializer (may carry `with_partitioning` axes).
    embedding_axes: logical axes of the table; default ``("vocab", "embed")``.
      Pass ``(None, None)`` for an unannotated table.
    activation_axes: logical names the output is constrained to under
      `use_sharding`: ``"default"`` (by the ids' rank, see the module doc),
      a tuple (one name per output dimension), or None for no constraints.
    promote_dtype: ``f(arrays, dtype=..., inexact=...) -> tuple`` casting the
      table (and the query of `attend`) to ``dtype``.
    rngs: random streams.
    embedding_metadata: extra Param metadata (Flax's spelling).

  Ids outside ``[0, num_embeddings)`` give NaN rows (for float tables), as in
  Flax (``jnp.take``'s fill mode): a silent clip would hide a data bug.

  Raises:
    ConfigError: for non-positive sizes.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               embedding_init: Callable = initializers.default_embed_init(),
               promote_dtype: Callable = _common.promote_dtypes,
               embedding_axes: Sequence[str | None] | None = None,
               activation_axes: Any = "default", rngs: Rngs,
               embedding_metadata: Mapping[str, Any] = MappingProxyType({})):
    _common.check_positive("Embed", num_embeddings=num_embeddings, features=features)
    self.embedding = _common.make_param(
        "Embed", "embedding", embedding_init, rngs.params(), (num_embeddings, features),
        param_dtype, embedding_axes, DEFAULT_EMBEDDING_AXES, metadata=embedding_metadata)
    _common.set_attrs(self, num_embeddings=num_embeddings, features=features,
                      dtype=dtype or self.embedding.value.dtype, param_dtype=param_dtype,
                      promote_dtype=promote_dtype,
                      activation_axes=_common.check_activation_axes("Embed", activation_axes))

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Looks up ``inputs`` (integer ids of any shape) -> ``inputs.shape + (features,)``.

    ``out_sharding`` (a `PartitionSpec`, explicit-axes meshes) chooses the
    output's sharding; the gather itself then runs in auto mode.
    """
    if not jnp.issubdtype(jnp.result_type(inputs), jnp.integer):
      raise errors.ShapeError(
          f"{_common.layer_name(self)}: expected integer ids, got an input of "
          f"dtype {jnp.result_type(inputs)} and shape {tuple(jnp.shape(inputs))}; "
          "cast the ids with .astype(jnp.int32).")
    (table,) = self.promote_dtype((self.embedding.value,), dtype=self.dtype, inexact=False)
    if self.num_embeddings == 1:
      return jnp.broadcast_to(table, jnp.shape(inputs) + (self.features,))
    if out_sharding is not None:
      take = jax.sharding.auto_axes(lambda t, i: jnp.take(t, i, axis=0),
                                    out_sharding=out_sharding)
      return take(table, inputs)
    if _explicit_sharded(table) or _explicit_sharded(inputs):
      return _explicit_take(table, inputs)
    if self.activation_axes is None or current_context() is None:
      return jnp.take(table, inputs, axis=0)
    table = layout_activation(table, LOOKUP_TABLE_AXES)
    out = jnp.take(table, inputs, axis=0)
    if isinstance(self.activation_axes, tuple):  # the user's names: checked like constrain
      return constrain(out, self.activation_axes, name=_common.layer_name(self))
    return layout_activation(out, _common.output_axes(
        self.activation_axes, out.ndim, "activation_embed"))

  def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Scores ``query`` (``(..., features)``) against every embedding: ``query @ table.T``.

    ``out_sharding`` chooses the output's sharding on explicit-axes meshes.
    """
    _common.check_features(self, query, -1, self.features, "features")
    query, table = self.promote_dtype((query, self.embedding.value), dtype=self.dtype)
    if out_sharding is not None:
      return jnp.dot(query, table.T, out_sharding=out_sharding)
    return jnp.dot(query, table.T)


def _explicit_sharded(x: Any) -> bool:
  """Whether x's sharding (as traced) names an explicit mesh axis."""
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return False
  mesh = getattr(sharding, "mesh", None)
  spec = getattr(sharding, "spec", None)
  if mesh is None or spec is None or getattr(mesh, "empty", True):
    return False
  return any(p is not None for p in spec)


def _explicit_take(table: jax.Array, ids: jax.Array) -> jax.Array:
  """The lookup on explicit-axes meshes: the output keeps the ids' sharding.

  A gather from a table sharded over an explicit axis has no rule to infer its
  output sharding (jax raises ShardingTypeError), so it runs in auto mode with
  the output laid out like the ids, features unsharded.
  """
  ids_spec = tuple(jax.typeof(ids).sharding.spec) if _explicit_sharded(ids) else ()
  spec = jax.sharding.PartitionSpec(*(ids_spec + (None,) * (jnp.ndim(ids) - len(ids_spec))),
                                    None)
  take = jax.sharding.auto_axes(lambda t, i: jnp.take(t, i, axis=0), out_sharding=spec)
  return take(table, ids)
