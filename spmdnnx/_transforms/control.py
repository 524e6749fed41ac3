"""Control flow over graph objects: `cond`, `switch`, `fori_loop`, `while_loop`.

Operands may hold Modules (any graph nodes). Every branch / iteration sees
fresh copies; state it changes (counters, statistics, Rngs) comes back to the
originals. Branches must leave the graph's structure unchanged (no new
Variables), since both sides of a conditional must produce the same state.

>>> import jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Variable
>>> class C(Module):
...   def __init__(self):
...     self.n = Variable(jnp.array(0))
>>> c = C()
>>> def inc(c): c.n += 1
>>> cond(True, inc, lambda c: None, c); int(c.n.value)
1
>>> fori_loop(0, 5, lambda i, c: (inc(c), c)[1], c) is c
True
>>> int(c.n.value)
6
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax

from spmdnnx import errors
from spmdnnx import _graph as graphlib
from spmdnnx import _tracectx as tracectx
from spmdnnx._transforms import iteration_modes as modes
from spmdnnx._transforms import lift


def _branch(ex: lift.Extraction, f: Callable, what: str, cell: dict,
            simple: bool = False) -> Callable:
  """Wraps a branch function to take (state leaves, plain leaves)."""

  name = lift.fun_name(f)

  def inner(leaves, plain):
    new_leaves, restructure, out, has_nodes = modes.run_inside(
        simple, ex.graphdef, ex.treedef, leaves, lift.fill_plain(ex, plain),
        lambda args: f(*args), what, identity="moved")
    lift.require_kept_structure(
        restructure, what, name,
        "branches and loop bodies must keep the graph's structure.")
    lift.require_no_new_nodes(out, has_nodes, what, name,
                              "return arrays or the objects it was given.")
    cell["has_nodes"] = cell.get("has_nodes", False) or has_nodes
    return [lift._raw(x) for x in new_leaves], out

  return inner


def _what_obj(leaf: Any, nodes: tuple) -> str:
  for i, node in enumerate(nodes):
    if leaf is node:
      return f"{type(leaf).__name__} #{i}"
  return f"a different {type(leaf).__name__}" if graphlib.is_graph_node(leaf) else \
      f"a {type(leaf).__name__}"


@contextlib.contextmanager
def _same_structure(what: str):
  """Turns JAX's branch-structure mismatch about our markers into a clear error."""
  try:
    yield
  except TypeError as e:
    if "InputRef" in str(e) or "NodeOut" in str(e):
      raise errors.TransformError(
          f"{what}: the branches return different graph objects (or parts of "
          "them); every branch must return the same objects in the same positions. "
          "Return arrays, or select the object outside the conditional.") from e
    raise


def _split_operands(operands: Sequence, graph_mode: bool = True,
                    who: str = "cond") -> tuple[lift.Extraction, list, list]:
  ex = modes.extract(tuple(operands), graph_mode, who)
  plain = lift.plain_leaves(ex)
  return ex, [lift._raw(x) for x in ex.leaves], plain


def _finish(ex: lift.Extraction, new_vals: list, out: Any, cell: dict) -> Any:
  lift.apply_updates(ex, new_vals, None)
  if cell.get("has_nodes"):
    out = lift.unmark_outputs(ex.nodes, out)
  return out


def cond(pred: Any, true_fun: Callable, false_fun: Callable, *operands: Any,
         graph: bool | None = None, graph_updates: bool | None = None) -> Any:
  """`jax.lax.cond` whose operands may contain graph objects.

  ``graph`` / ``graph_updates``: graph mode (both True, the default) or simple
  mode (no shared references, only Variable values flow back); None: the
  setting in force.
  """
  what = "cond"
  graph_mode, _, simple = modes.resolve_modes(graph, graph_updates)
  ex, vals, plain = _split_operands(operands, graph_mode, "cond")
  cell: dict = {}
  with _same_structure(what):
    new_vals, out = jax.lax.cond(pred, _branch(ex, true_fun, what, cell, simple),
                                 _branch(ex, false_fun, what, cell, simple), vals, plain)
  return _finish(ex, new_vals, out, cell)


def switch(index: Any, branches: Sequence[Callable], *operands: Any,
           graph: bool | None = None, graph_updates: bool | None = None) -> Any:
  """`jax.lax.switch` whose operands may contain graph objects.

  ``graph`` / ``graph_updates``: as for `cond`.
  """
  what = "switch"
  if not branches:
    raise errors.TransformError("switch: needs at least one branch function.")
  graph_mode, _, simple = modes.resolve_modes(graph, graph_updates)
  ex, vals, plain = _split_operands(operands, graph_mode, "switch")
  cell: dict = {}
  wrapped = [_branch(ex, b, what, cell, simple) for b in branches]
  with _same_structure(what):
    new_vals, out = jax.lax.switch(index, wrapped, vals, plain)
  return _finish(ex, new_vals, out, cell)


def _loop_carry(ex: lift.Extraction, val_out: Any, rebuilt_nodes: tuple, what: str) -> list:
  """Checks a loop body returned the same graph objects; returns plain leaves."""
  leaves = jax.tree_util.tree_leaves(val_out, is_leaf=graphlib.is_graph_node)
  expected_slots = [x for x in ex.arg_leaves]
  if len(leaves) != len(expected_slots):
    raise errors.TransformError(
        f"{what}: the body returned a value with {len(leaves)} leaves but the loop "
        f"value has {len(expected_slots)}; return a value of the same structure.")
  plain = []
  for leaf, slot in zip(leaves, expected_slots):
    if isinstance(slot, lift.NodeSlot):
      if leaf is not rebuilt_nodes[slot.index]:
        raise errors.TransformError(
            f"{what}: the body must return the same graph objects it received "
            f"(got {_what_obj(leaf, rebuilt_nodes)} where the loop value holds its "
            f"{type(rebuilt_nodes[slot.index]).__name__} #{slot.index}); mutate the "
            "objects in place and return them in the same positions.")
    else:
      plain.append(leaf)
  return plain


def _loop_fns(ex: lift.Extraction, what: str, simple: bool = False):
  """Builds rebuild/run helpers sharing one Extraction for loop bodies.

  In simple mode `leave` reads back the values of the Variables `enter`
  built (structure changes made by the body stay inside).
  """
  fresh: list = []

  def enter(carry):
    vals, plain = carry
    arg_leaves = lift.fill_plain(ex, plain)
    (val,), rebuilt = lift.rebuild(ex.graphdef, vals, ex.treedef, arg_leaves)
    fresh[:] = graphlib.flatten(rebuilt.nodes, detach_variables=False)[1].pairs
    return val, rebuilt

  def leave(rebuilt, val_out):
    if simple:
      new_leaves = [lift._raw(v) for _, v in fresh]
    else:
      new_leaves, restructure, _, _ = lift.collect(rebuilt, None)
      lift.require_kept_structure(
          restructure, what, "the body",
          "loop bodies must keep the graph's structure. Create the state before the loop.")
    # Same structure but a Variable replaced: its new value would silently be
    # written into the old Variable, so it is an error (as in Flax).
    modes.check_same_variables(fresh, rebuilt.nodes, what.split("(")[0])
    plain = _loop_carry(ex, val_out, rebuilt.nodes, what)
    return [lift._raw(x) for x in new_leaves], plain

  return enter, leave


def _start(init_val: Any, graph_mode: bool = True, who: str = "fori_loop"):
  ex = modes.extract((init_val,), graph_mode, who)
  plain = lift.plain_leaves(ex)
  return ex, ([lift._raw(x) for x in ex.leaves], plain)


def _result(ex: lift.Extraction, carry) -> Any:
  vals, plain = carry
  lift.apply_updates(ex, vals, None)
  it = iter(plain)
  filled = [ex.nodes[x.index] if isinstance(x, lift.NodeSlot) else next(it)
            for x in ex.arg_leaves]
  (val,) = jax.tree_util.tree_unflatten(ex.treedef, filled)
  return val


def fori_loop(lower: Any, upper: Any, body_fun: Callable, init_val: Any, *,
              unroll: int | bool | None = None, graph: bool | None = None,
              graph_updates: bool | None = None) -> Any:
  """`jax.lax.fori_loop` whose loop value may contain graph objects.

  ``graph`` / ``graph_updates``: as for `cond`.
  """
  what = f"fori_loop({lift.fun_name(body_fun)})"
  graph_mode, _, simple = modes.resolve_modes(graph, graph_updates)
  ex, carry = _start(init_val, graph_mode, "fori_loop")
  enter, leave = _loop_fns(ex, what, simple)

  def body(i, carry):
    with tracectx.frame(what):
      val, rebuilt = enter(carry)
      return leave(rebuilt, body_fun(i, val))

  kwargs = {} if unroll is None else {"unroll": unroll}
  return _result(ex, jax.lax.fori_loop(lower, upper, body, carry, **kwargs))


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any, *,
               graph: bool | None = None, graph_updates: bool | None = None) -> Any:
  """`jax.lax.while_loop` whose loop value may contain graph objects.

  ``graph`` / ``graph_updates``: as for `cond`.
  """
  what = f"while_loop({lift.fun_name(body_fun)})"
  graph_mode, _, simple = modes.resolve_modes(graph, graph_updates)
  ex, carry = _start(init_val, graph_mode, "while_loop")
  enter, leave = _loop_fns(ex, what, simple)

  def cond_inner(carry):
    with tracectx.frame(what):
      val, _ = enter(carry)
      return cond_fun(val)

  def body(carry):
    with tracectx.frame(what):
      val, rebuilt = enter(carry)
      return leave(rebuilt, body_fun(val))

  return _result(ex, jax.lax.while_loop(cond_inner, body, carry))
