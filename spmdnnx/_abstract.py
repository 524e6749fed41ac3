"""Abstract models with shardings: Flax's `get_abstract_model` and `as_abstract`.

Both build on `eval_shape` (no parameter is ever computed) and on
`spmd.get_named_sharding`, so the shardings follow the same conventions: the
rules of an active ``use_sharding`` block, else Flax's (``logical_axis_rules``
blocks, names taken as mesh axes). Use them to restore a checkpoint straight
into its target layout or to size a layout before any device holds it.

>>> import jax, spmdnnx as nnx
>>> mesh = jax.make_mesh((2, 4), ("data", "model"),
...                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
>>> graphdef, abstract = nnx.get_abstract_model(
...     lambda: nnx.Linear(4, 8, kernel_axes=(None, "model"), rngs=nnx.Rngs(0)), mesh)
>>> abstract["kernel"].value.sharding.spec
P(None, 'model')
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import NamedSharding

from spmdnnx import _eager as eager
from spmdnnx import _graph as graphlib
from spmdnnx import spmd
from spmdnnx._transforms import eval_shape
from spmdnnx._variables import Variable


def _graph_kwargs(graph_mode: bool | None) -> dict:
  # graph= is forwarded only when given, so this works with either signature.
  return {} if graph_mode is None else {"graph": graph_mode}


def get_abstract_model(init_fn: Callable[[], Any], mesh: Any, *,
                       graph: bool | None = None) -> tuple:
  """The GraphDef and abstract, sharded State of the model ``init_fn`` builds.

  ``init_fn`` runs under ``jax.set_mesh(mesh)`` inside `eval_shape`, so no
  parameter is computed; each State leaf holds a `jax.ShapeDtypeStruct`
  carrying the NamedSharding its metadata asks for (Flax's signature).

  Args:
    init_fn: builds the model, e.g. ``lambda: Model(rngs=nnx.Rngs(0))``.
    mesh: the mesh the shardings refer to.
    graph: graph mode (None: the mode in force), as `split`.

  Returns:
    ``(graphdef, abstract_state)``.

  Raises:
    ShardingError, AxisRulesError: when a Variable's axes cannot be placed
      on ``mesh`` (see `get_named_sharding`).
  """
  kwargs = _graph_kwargs(graph)
  with jax.set_mesh(mesh):
    abstract = eval_shape(init_fn, **kwargs)
    graphdef, state = graph_split(abstract, **kwargs)
    shardings = spmd.get_named_sharding(state, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  return graphdef, state


def graph_split(node: Any, **kwargs: Any) -> tuple:
  """`split` into one State (kept separate so `graph=` stays optional)."""
  return graphlib.split(node, **kwargs)


def as_abstract(tree: Any, graph: bool | None = None) -> Any:
  """Attaches NamedShardings to the abstract values of a model from `eval_shape`.

  Every Variable holding a `jax.ShapeDtypeStruct` without a sharding, whose
  metadata has logical axes or an ``out_sharding``, gets a
  ``ShapeDtypeStruct`` with the NamedSharding those name, on its ``mesh``
  metadata or else the current mesh (``jax.set_mesh``). Other Variables are
  kept. Returns a new model (Flax's semantics); the input is unchanged.

  Args:
    tree: a graph node (e.g. a Module from `eval_shape`).
    graph: graph mode (None: the mode in force), as `split`.

  Raises:
    ShardingError: when a Variable's names are not axes of its mesh and no
      rule maps them.

  >>> import jax, spmdnnx as nnx
  >>> mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  >>> with jax.set_mesh(mesh):
  ...   m = nnx.as_abstract(nnx.eval_shape(
  ...       lambda: nnx.Linear(4, 8, kernel_axes=("a", "b"), rngs=nnx.Rngs(0))))
  >>> m.kernel.value.sharding.spec
  P('a', 'b')
  """
  kwargs = _graph_kwargs(graph)
  graphdef, state = graph_split(tree, **kwargs)
  flat = state.flat_state()
  new = []
  for path, leaf in flat:
    new.append((path, _with_sharding(leaf)))
  return graphlib.merge(graphdef, type(state).from_flat_path(new), **kwargs)


def _with_sharding(leaf: Any) -> Any:
  if not isinstance(leaf, Variable):
    return leaf
  value = leaf.raw_value
  if not (isinstance(value, jax.ShapeDtypeStruct) and getattr(value, "sharding", None) is None):
    return leaf
  meta = leaf.get_metadata()
  if meta.get("logical_axes") is None and meta.get("out_sharding") is None:
    return leaf
  mesh = meta.get("mesh")
  mesh = eager.ambient_mesh() if mesh is None else mesh
  if mesh is None:
    return leaf
  sharding = spmd.get_named_sharding(leaf, mesh).raw_value
  if not isinstance(sharding, NamedSharding):
    return leaf
  return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))


#: Flax's older name for `as_abstract`.
abstract_with_sharding = as_abstract
