"""`vjp` and `jvp` over graph objects (tree-mode semantics).

A graph-object argument is differentiated with respect to all of its
Variables; its cotangent (or tangent) is an object of the same type whose
Variables hold the gradients, as Flax's tree mode returns. Mutations made
inside flow back to the arguments (Variable values only).

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> m = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
>>> y, pullback = nnx.vjp(lambda m, x: m(x).sum(), m, jnp.ones((1, 2)))
>>> m_grad, x_grad = pullback(jnp.ones(()))
>>> type(m_grad).__name__, m_grad.kernel.value.shape
('Linear', (2, 1))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from spmdnnx import errors
from spmdnnx import _graph as graphlib
from spmdnnx._state import State
from spmdnnx._transforms import guards
from spmdnnx._transforms import lift


def _objects_from(ex: lift.Extraction, values: list, plain: list) -> tuple:
  """Per argument: graph objects rebuilt with `values` as their leaves, plain leaves kept."""
  built = []
  for root, node in enumerate(ex.nodes):
    graphdef, _ = graphlib.split(node)
    pairs = [(p[1:], v) for p, v in zip(ex.paths, values) if p[0] == root]
    built.append(graphlib.merge(graphdef, State.from_flat_path(pairs)))
  it = iter(plain)
  leaves = [built[x.index] if isinstance(x, lift.NodeSlot) else next(it)
            for x in ex.arg_leaves]
  return jax.tree_util.tree_unflatten(ex.treedef, leaves)


def _run(f: Callable, ex: lift.Extraction, who: str, has_aux: bool):
  """The function of (state values, plain leaves) that jax differentiates."""
  name = lift.fun_name(f)
  cell: dict = {}

  def inner(vals, plain):
    def call(args):
      out = f(*args)
      if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
          raise errors.TransformError(
              f"{who}({name}, has_aux=True): the function must return an (output, aux) "
              f"pair, got a {type(out).__name__}.")
        return out
      return out, None

    new_leaves, restructure, (out, aux), has_nodes = lift.run_inside(
        ex.graphdef, ex.treedef, vals, lift.fill_plain(ex, plain), call, f"{who}({name})")
    guards.check_kept_structure(restructure, who, name)
    if has_nodes:
      guards.check_no_returned_inputs((out, aux), who, name)
    cell["has_nodes"] = has_nodes
    return out, ([lift._raw(x) for x in new_leaves], aux)

  return inner, cell


def _finish(ex: lift.Extraction, new_vals: list, aux: Any, cell: dict) -> Any:
  lift.apply_updates(ex, new_vals, None)
  if cell.get("has_nodes"):
    aux = lift.unmark_outputs(ex.nodes, aux)
  return aux


def vjp(f: Callable | None = None, *primals: Any, has_aux: bool = False,
        reduce_axes: Sequence = (), graph: bool | None = None,
        graph_updates: bool | None = None) -> Any:
  """`jax.vjp` whose primals may be graph objects.

  Returns ``(out, vjp_fn)`` (plus ``aux`` with has_aux); ``vjp_fn(ct)`` gives
  one cotangent per primal: an object of the primal's type for a graph object.

  Raises:
    TransformError: `f` is bound; a Variable reachable twice; the function
      changed the structure or returned an input (only values flow back).
  """
  del reduce_axes
  if f is None:   # decorator form: the decorated function returns what vjp returns
    return lambda fn: functools.partial(vjp, fn, has_aux=has_aux, graph=graph,
                                        graph_updates=graph_updates)
  guards.resolve_modes(graph, graph_updates)
  guards.check_unbound(f, "vjp")
  ex = lift.extract(tuple(primals), aliasing=False, who="vjp")
  inner, cell = _run(f, ex, "vjp", has_aux)
  vals = [lift._raw(x) for x in ex.leaves]
  plain = lift.plain_leaves(ex)
  out, pullback, (new_vals, aux) = jax.vjp(inner, vals, plain, has_aux=True)
  aux = _finish(ex, new_vals, aux, cell)

  def vjp_fn(ct):
    g_vals, g_plain = pullback(ct)
    return _objects_from(ex, g_vals, g_plain)

  return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def jvp(f: Callable | None = None, primals: Sequence = (), tangents: Sequence = (), *,
        has_aux: bool = False, graph: bool | None = None,
        graph_updates: bool | None = None) -> Any:
  """`jax.jvp` whose primals (and tangents, of the same types) may be graph objects.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> y, t = nnx.jvp(lambda x: x * 2.0, (jnp.ones(2),), (jnp.ones(2),))
  >>> t
  Array([2., 2.], dtype=float32)

  Raises:
    TransformError: `f` is bound, the tangents' structure differs from the
      primals', or the mode's rules are broken (see `vjp`).
  """
  if f is None:   # decorator form: the decorated function takes (primals, tangents)
    return lambda fn: functools.partial(jvp, fn, has_aux=has_aux, graph=graph,
                                        graph_updates=graph_updates)
  guards.resolve_modes(graph, graph_updates)
  guards.check_unbound(f, "jvp")
  primals, tangents = tuple(primals), tuple(tangents)
  ex = lift.extract(primals, aliasing=False, who="jvp")
  ex_t = lift.extract(tangents, aliasing=False, who="jvp")
  if ex.treedef != ex_t.treedef or ex.graphdef != ex_t.graphdef:
    raise errors.TransformError(
        f"jvp({lift.fun_name(f)}): tangents must have the structure of the primals "
        "(the same graph objects' types and attributes, the same pytrees).")
  inner, cell = _run(f, ex, "jvp", has_aux)
  vals = [lift._raw(x) for x in ex.leaves]
  # Integer state (counters) has no tangent: float0 zeros, whatever was given.
  t_vals = [_float0_like(p) if not _inexact(p) else lift._raw(t)
            for p, t in zip(vals, ex_t.leaves)]
  (out, (new_vals, aux)), (t_out, _) = jax.jvp(
      inner, (vals, lift.plain_leaves(ex)), (t_vals, lift.plain_leaves(ex_t)))
  aux = _finish(ex, new_vals, aux, cell)
  return (out, t_out, aux) if has_aux else (out, t_out)


def _inexact(x: Any) -> bool:
  return jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact)


def _float0_like(x: Any) -> Any:
  return np.zeros(np.shape(x), dtype=jax.dtypes.float0)
