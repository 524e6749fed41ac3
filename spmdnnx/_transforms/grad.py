"""`grad` and `value_and_grad` over graph objects.

For an argument that is a graph node (a Module, say), the gradient is a
State of the node's Variables selected by a filter (`Param` by default; pick
another per argument with ``DiffState(argnum, filter)`` or for all with
``wrt=``). Plain array arguments get plain gradients. Mutations made inside
(BatchNorm statistics, Rngs counters) propagate to the originals.

>>> import jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Param
>>> class Lin(Module):
...   def __init__(self):
...     self.w = Param(jnp.array([2.0]))
>>> g = grad(lambda m, x: (m.w.value * x).sum())(Lin(), jnp.array([3.0]))
>>> g["w"].value
Array([3.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx._state import State
from spmdnnx._transforms import axes as axeslib
from spmdnnx._transforms import lift
from spmdnnx._variables import Param


@dataclasses.dataclass(frozen=True)
class DiffState:
  """Differentiate argument `argnum` with respect to Variables matching `filter`."""
  argnum: int
  filter: Any = Param


def _normalize_argnums(argnums, wrt) -> tuple[tuple[DiffState, ...], bool]:
  single = isinstance(argnums, (int, DiffState))
  items = (argnums,) if single else tuple(argnums)
  out = []
  for a in items:
    if isinstance(a, DiffState):
      out.append(a)
    elif isinstance(a, int):
      out.append(DiffState(a, wrt))
    else:
      raise errors.TransformError(
          f"grad: argnums entries must be ints or DiffState, got {a!r}.")
  return tuple(out), single


def _grad_transform(f: Callable, argnums, has_aux: bool, wrt, return_value: bool,
                    holomorphic: bool = False, allow_int: bool = False) -> Callable:
  diffs, single = _normalize_argnums(argnums, wrt)

  name = lift.fun_name(f)

  @functools.wraps(f)
  def wrapper(*args):
    for d in diffs:
      if d.argnum >= len(args):
        raise errors.TransformError(
            f"grad({name}): argnum {d.argnum} is out of range for "
            f"{len(args)} positional argument(s).")
    ex = lift.extract(tuple(args))
    node_arg = axeslib.node_arg_index(args)
    selections = []  # per diff entry: ("node", leaf indices) or ("plain", None)
    for d in diffs:
      arg = args[d.argnum]
      if graph.is_graph_node(arg):
        pred = filterlib.to_predicate(d.filter)
        idx = [i for i, p in enumerate(ex.paths)
               if node_arg[p[0]] == d.argnum and pred(p[1:], ex.leaves[i])]
        selections.append(("node", idx))
      else:
        if any(graph.is_graph_node(x) for x in
               jax.tree_util.tree_leaves(arg, is_leaf=graph.is_graph_node)):
          raise errors.TransformError(
              f"grad({name}): argument {d.argnum} is a {type(arg).__name__} "
              "holding graph objects; differentiate with respect to each Module "
              "by passing it as its own positional argument.")
        selections.append(("plain", None))

    slot_pos = {}
    for k, d in enumerate(diffs):
      if selections[k][0] == "plain":
        slot_pos[d.argnum] = k

    cell: dict = {}

    def inner(*diff_inputs):
      leaves = list(ex.leaves)
      for (kind, idx), inp in zip(selections, diff_inputs):
        if kind == "node":
          for i, leaf in zip(idx, inp):
            leaves[i] = leaf

      def call(call_args):
        call_args = list(call_args)
        for argnum, k in slot_pos.items():
          call_args[argnum] = diff_inputs[k]
        out = f(*call_args)
        if not has_aux:
          return out, None
        if not (isinstance(out, tuple) and len(out) == 2):
          raise errors.TransformError(
              f"grad({name}, has_aux=True): the function must return a "
              f"(loss, aux) pair, got {_describe(out)}.")
        return out

      new_leaves, restructure, (loss, aux), has_nodes = lift.run_inside(
          ex.graphdef, ex.treedef, leaves, list(ex.arg_leaves), call, f"grad({name})")
      cell["restructure"], cell["has_nodes"] = restructure, has_nodes
      return loss, (aux, new_leaves)

    diff_inputs = []
    for (kind, idx), d in zip(selections, diffs):
      diff_inputs.append([ex.leaves[i] for i in idx] if kind == "node" else args[d.argnum])
    vg = jax.value_and_grad(inner, argnums=tuple(range(len(diffs))), has_aux=True,
                            holomorphic=holomorphic, allow_int=allow_int)
    (loss, (aux, new_leaves)), grads = vg(*diff_inputs)
    lift.apply_updates(ex, new_leaves, cell["restructure"])
    if cell["has_nodes"]:
      aux = lift.unmark_outputs(ex.nodes, aux)
    out_grads = []
    for (kind, idx), g in zip(selections, grads):
      if kind == "node":
        out_grads.append(State.from_flat_path(
            [(ex.paths[i][1:], gi) for i, gi in zip(idx, g)]))
      else:
        out_grads.append(g)
    grads_out = out_grads[0] if single else tuple(out_grads)
    if return_value:
      return ((loss, aux) if has_aux else loss), grads_out
    return (grads_out, aux) if has_aux else grads_out

  return wrapper


def _describe(out) -> str:
  if isinstance(out, jax.core.Tracer) or hasattr(out, "shape"):
    return f"a single array of shape {tuple(getattr(out, 'shape', ()))}"
  if isinstance(out, tuple):
    return f"a tuple of length {len(out)}"
  return f"a {type(out).__name__}"


def grad(f: Callable | None = None, argnums: int | DiffState | Sequence = 0,
         has_aux: bool = False, *, wrt: Any = Param, holomorphic: bool = False,
         allow_int: bool = False) -> Callable:
  """Gradient of `f` with respect to argument(s) `argnums`.

  Graph-node arguments get a State of the Variables matching `wrt` (or the
  DiffState's filter); other arguments get plain gradients.
  """
  if f is None:
    return lambda fn: grad(fn, argnums, has_aux, wrt=wrt, holomorphic=holomorphic,
                           allow_int=allow_int)
  return _grad_transform(f, argnums, has_aux, wrt, False, holomorphic, allow_int)


def value_and_grad(f: Callable | None = None, argnums: int | DiffState | Sequence = 0,
                   has_aux: bool = False, *, wrt: Any = Param, holomorphic: bool = False,
                   allow_int: bool = False) -> Callable:
  """Like `grad`, returning ``(value, grads)`` (value is ``(loss, aux)`` with has_aux)."""
  if f is None:
    return lambda fn: value_and_grad(fn, argnums, has_aux, wrt=wrt,
                                     holomorphic=holomorphic, allow_int=allow_int)
  return _grad_transform(f, argnums, has_aux, wrt, True, holomorphic, allow_int)
