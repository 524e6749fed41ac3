"""`vmap` over graph objects, with stacked-axis metadata kept right.

``in_axes`` gives one spec per positional argument: an int, None, or for
graph nodes ``StateAxes({filter: axis_or_None})`` or a per-Variable prefix
tree: what ``nnx.prefix(obj, {filter: axis})`` builds (a `TreeState` in graph
mode, an object of the same shape in tree mode) or a `State` of the object's
paths; a Variable no prefix covers is an error, never a silent broadcast. The state of a node comes
out along the same axes it went in. New Variables created inside (vmap over a
constructor or over ``__init__``) come out stacked along their owner's axis,
with the stack's logical name (``"layers"`` by default, ``stack_axis=None`` to
opt out) inserted into their ``logical_axes``.

>>> import jax, jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Param
>>> class Lin(Module):
...   def __init__(self, key):
...     self.w = Param(jax.random.normal(key, (2, 3)), logical_axes=("embed", "mlp"))
>>> stack = vmap(Lin)(jax.random.split(jax.random.key(0), 4))
>>> stack.w.shape, stack.w.logical_axes
((4, 2, 3), ('layers', 'embed', 'mlp'))
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx import _graph as graphlib
from spmdnnx import _stacked as stacked
from spmdnnx._stacked import LAYERS_AXIS
from spmdnnx._transforms import axes as axeslib
from spmdnnx._transforms import guards
from spmdnnx._transforms import iteration_modes as modes
from spmdnnx._transforms import lift
from spmdnnx._state import State
from spmdnnx._variables import Variable, detach


class _Retry(Exception):
  """Raised at trace time when the body changed the graph's structure."""

  def __init__(self, restructure, leaves):
    super().__init__("structure changed")
    self.restructure, self.leaves = restructure, leaves


class _Cell:
  __slots__ = ("has_nodes", "restructure", "out_specs")

  def __init__(self):
    self.has_nodes = False
    self.restructure = None
    self.out_specs = None


def _prefix_axes(out_axes: Any, out: Any) -> list:
  """One out-axis per leaf of `out` (markers count as one leaf each)."""
  result = []

  def walk(spec, sub):
    if isinstance(spec, (list, tuple)) and isinstance(sub, (list, tuple)) \
        and len(spec) == len(sub) and not hasattr(sub, "_fields"):
      for s, x in zip(spec, sub):
        walk(s, x)
    elif isinstance(spec, Mapping) and isinstance(sub, Mapping):
      for k in sub:
        walk(spec.get(k), sub[k])
    else:
      n = len(jax.tree_util.tree_leaves(sub, is_leaf=lift._is_marker))
      result.extend([spec] * n)

  walk(out_axes, out)
  return result


def vmap(f: Callable | None = None, *, in_axes: Any = 0, out_axes: Any = 0,
         axis_name: Any = None, axis_size: int | None = None,
         spmd_axis_name: Any = None, stack_axis: str | None = LAYERS_AXIS,
         transform_metadata: Mapping | None = None, graph: bool | None = None,
         graph_updates: bool | None = None) -> Callable:
  """Vectorises `f` over mapped axes of its arguments (graph objects included).

  Args:
    f: the function (or a Module class / method, e.g. ``__init__``).
    in_axes: per-argument specs: int, None, or for graph objects StateAxes
      or an `nnx.prefix` tree (any mode).
    out_axes: specs for the outputs (graph objects returned get theirs; a
      new object may take an `nnx.prefix` tree, e.g. of ``nnx.eval_shape``).
    axis_name, axis_size, spmd_axis_name: as in `jax.vmap`.
    stack_axis: logical name recorded for the mapped axis of Variables
      (default ``"layers"``; None leaves metadata unchanged). Flax's
      ``transform_metadata={"partition_name": ...}`` is accepted too.
    graph, graph_updates: graph mode with structure updates (both True, the
      default), or simple mode (see `iteration_modes`): no shared
      references, only Variable values flow back, no StateAxes. None: the
      setting in force (`set_graph_mode`, `set_graph_updates`).

  Raises:
    TransformError: `f` is a method bound to a Module (pass the unbound
      method and the instance), a StateAxes in simple mode, a graph object or Variable
      used as an axis spec, aliasing in simple mode, mapped state lacking the
      axis, mapped sizes that disagree.
  """
  graph_mode, graph_updates, simple = modes.resolve_modes(graph, graph_updates)
  if f is None:
    return functools.partial(vmap, in_axes=in_axes, out_axes=out_axes,
                             axis_name=axis_name, axis_size=axis_size,
                             spmd_axis_name=spmd_axis_name, stack_axis=stack_axis,
                             transform_metadata=transform_metadata, graph=graph_mode,
                             graph_updates=graph_updates)
  guards.check_unbound(f, "vmap")
  modes.check_prefix(in_axes, "in_axes", "vmap", graph_mode, graph_updates)
  modes.check_prefix(out_axes, "out_axes", "vmap", graph_mode, graph_updates)
  name = stacked.stack_axis_name(modes.partition_of(f) or stack_axis, transform_metadata)
  what = f"vmap({getattr(f, '__qualname__', getattr(f, '__name__', 'fun'))})"

  @functools.wraps(f)
  def wrapper(*args, **kwargs):
    args = axeslib.resolve_kwargs(f, args, kwargs, what)
    specs = axeslib.broadcast_arg_specs(in_axes, len(args), what)
    if any(s is axeslib.Carry for s in specs):
      raise errors.TransformError(f"{what}: Carry is only meaningful for scan.")
    ex = modes.extract(tuple(args), graph_mode, "vmap")
    node_spec, occ_spec = modes.node_prefixes(args, specs, ex)
    if graph_mode:
      modes.check_consistent(ex, specs, "vmap", axis_of=lambda arg, path, var: (
          modes.prefix_axis(occ_spec.get((arg, path[0]), node_spec[path[0]]),
                            path[1:], var)))
    node_arg = axeslib.node_arg_index(args)
    leaf_ax = modes.prefix_leaf_axes(ex, node_spec, what)
    arg_specs = axeslib.arg_leaf_specs(args, specs, what)
    plain = lift.plain_leaves(ex)
    plain_axes = [s for x, s in zip(ex.arg_leaves, arg_specs)
                  if not isinstance(x, lift.NodeSlot)]
    size = axeslib.check_mapped(ex.paths, ex.leaves, leaf_ax, axis_size, what)
    size = _check_plain_sizes(plain, plain_axes, size, what)
    in_leaves = [stacked.remove_axis_name(l, a, name) for l, a in zip(ex.leaves, leaf_ax)]

    def owner_axis(path, leaf):
      axis = modes.prefix_axis(node_spec[path[0]], path[1:], leaf)
      return None if axis is axeslib.UNMATCHED else axis

    per_state_out = _has_state_axes(out_axes)

    def run(state_axes, paths, first):
      cell = _Cell()

      def inner(leaves, plain_leaves):
        new_leaves, restructure, out, has_nodes = modes.run_inside(
            simple, ex.graphdef, ex.treedef, leaves, lift.fill_plain(ex, plain_leaves),
            lambda call_args: f(*call_args), what, regraph=True, identity="moved")
        if restructure is not None and first:
          raise _Retry(restructure, [_abstract(v) for v in new_leaves])
        cell.has_nodes, cell.restructure = has_nodes, restructure
        if has_nodes and simple:
          # Returning an input aliases it: refused before JAX checks out_axes.
          modes.check_returned_inputs(ex, out, [None] * len(jax.tree_util.tree_leaves(
              out, is_leaf=lift._is_marker)), specs, node_arg, False, "vmap")
        if per_state_out:
          cell.out_specs = _prefix_axes(out_axes, out)
        return new_leaves, out

      vm = jax.vmap(inner, in_axes=(list(leaf_ax), plain_axes),
                    out_axes=(list(state_axes), 0 if per_state_out else out_axes),
                    axis_name=axis_name,
                    axis_size=axis_size,
                    spmd_axis_name=spmd_axis_name)
      try:
        return vm(in_leaves, plain), cell
      except ValueError as e:
        _raise_batched_broadcast(e, paths, what)
        raise

    try:
      (new_leaves, out), cell = run(leaf_ax, ex.paths, True)
      out_state_axes = leaf_ax
    except _Retry as retry:
      out_state_axes = [owner_axis(p, l) for p, l in zip(retry.restructure.paths, retry.leaves)]
      (new_leaves, out), cell = run(out_state_axes, retry.restructure.paths, False)
    # Restore the stacked-axis name on mapped state, and on returned new nodes.
    new_leaves = [stacked.insert_axis_name(l, a, name)
                  for l, a in zip(new_leaves, out_state_axes)]
    if cell.has_nodes:
      modes.check_returned_inputs(ex, out, _prefix_axes(out_axes, out), specs, node_arg,
                                  graph_updates and graph_mode, "vmap")
    lift.apply_updates(ex, new_leaves, cell.restructure)
    if per_state_out:
      out = _place_outputs(out, cell.out_specs, name, what)
    elif cell.has_nodes:
      out = _stack_node_outputs(out, out_axes, name)
    if cell.has_nodes:
      out = lift.unmark_outputs(ex.nodes, out)
    return out

  return wrapper


def _has_state_axes(out_axes: Any) -> bool:
  """Whether out_axes gives per-Variable axes (StateAxes, nnx.prefix trees)."""
  return any(modes.is_object_prefix(x) for x in jax.tree_util.tree_leaves(
      out_axes, is_leaf=lambda x: x is None or modes.is_object_prefix(x)))


def _place(value: Any, axis: Any) -> Any:
  """Moves the mapped axis (at 0) of one output array to `axis` (None: drop it)."""
  if axis is None:
    return value[0]
  return jnp.moveaxis(value, 0, axis) if axis != 0 else value


def _place_outputs(out: Any, specs: list, name: str | None, what: str) -> Any:
  """Places outputs vmapped along axis 0 per their specs (StateAxes in out_axes).

  A new graph object's state is placed per Variable: a StateAxes spec picks
  the axis of each by its filters; mapped Variables get the stack name.

  Raises:
    TransformError: a StateAxes given for an output that is not a new graph
      object.
  """
  leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=lift._is_marker)
  placed = []
  for leaf, spec in zip(leaves, specs):
    if isinstance(leaf, lift.NodeOut):
      pairs = []
      flat = leaf.state.flat_state() if isinstance(leaf.state, State) else [((), leaf.state)]
      for path, var in flat:
        axis = modes.prefix_axis(spec, path, var)
        if axis is axeslib.UNMATCHED:
          raise errors.TransformError(
              f"{what}: out_axes gives no axis for {errors.path_str(path)} of the returned "
              f"{type(var).__name__}'s object; build out_axes with nnx.prefix(obj, "
              "{filter: axis, ...: None}) of an object of the same structure (e.g. from "
              "nnx.eval_shape), or add a catch-all entry.", paths=[path])
        if isinstance(var, Variable):
          var = stacked.insert_axis_name(detach(var, _place(var.raw_value, axis)), axis, name)
        else:
          var = _place(var, axis)
        pairs.append((path, var))
      leaf = lift.NodeOut(leaf.graphdef, State.from_flat_path(pairs), leaf.key)
    elif modes.is_object_prefix(spec) and not isinstance(leaf, lift.InputRef):
      raise errors.TransformError(
          f"{what}: out_axes gives a {type(spec).__name__} (per-Variable axes) for an "
          f"output that is not a graph object created inside ({type(leaf).__name__}); "
          "use an int or None.")
    elif not isinstance(leaf, lift.InputRef):
      leaf = _place(leaf, spec)
    placed.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, placed)


def _raise_batched_broadcast(e: ValueError, paths: list, what: str) -> None:
  """Turns JAX's error for a batched update of broadcast state into a TransformError."""
  m = re.search(r"out_axes\[0\]\[(\d+)\].*got axis spec None but output was batched "
                r"on axis (\d+)", str(e))
  if m is None or int(m.group(1)) >= len(paths):
    return
  keys = paths[int(m.group(1))][1:]
  path = errors.path_str(keys)
  raise errors.TransformError(
      f"{what}: at vmap state {''.join(f'[{k!r}]' for k in keys)}, got axis spec None "
      f"but output was batched on axis {m.group(2)}: state {path} is broadcast "
      "(in_axes None) but the function wrote a "
      "per-example value into it, which cannot be stored back in one array. Map "
      "that state (an int axis, or StateAxes({filter: 0, ...})), or keep its "
      "update independent of the mapped inputs. Variables created inside follow "
      "their owner's axis: to create stacked weights with vmap on __init__, map "
      "`self` too, e.g. in_axes=(0, 0).", paths=[path]) from e


def _check_plain_sizes(plain: list, axes: list, size: int | None, what: str) -> int | None:
  """Checks mapped array arguments agree with each other and with mapped state.

  Raises:
    TransformError: listing each mapped size and what has it.
  """
  sizes: dict[int, list] = {} if size is None else {size: ["mapped state or axis_size"]}
  for i, (leaf, axis) in enumerate(zip(plain, axes)):
    if not isinstance(axis, int) or not hasattr(leaf, "shape"):
      continue
    shape = leaf.shape
    if not -len(shape) <= axis < len(shape):
      raise errors.TransformError(
          f"{what}: in_axes asks to map argument leaf {i} (shape {tuple(shape)}) "
          f"along axis {axis}, which it lacks; use None to broadcast it.")
    sizes.setdefault(shape[axis], []).append(f"argument leaf {i} {tuple(shape)}")
  axeslib.raise_size_mismatch(sizes, what)
  return next(iter(sizes)) if sizes else size


def _abstract(leaf: Any) -> Any:
  if isinstance(leaf, Variable):
    v = leaf.raw_value
    return detach(leaf, jax.ShapeDtypeStruct(v.shape, v.dtype))
  return leaf


def _stack_node_outputs(out: Any, out_axes: Any, name: str | None) -> Any:
  """Inserts the stack name into Variables of new nodes returned from vmap."""
  leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=lift._is_marker)
  axes = _prefix_axes(out_axes, out)
  fixed = []
  for leaf, axis in zip(leaves, axes):
    if isinstance(leaf, lift.NodeOut):
      state = jax.tree.map(lambda v: stacked.insert_axis_name(v, axis, name), leaf.state,
                           is_leaf=lambda x: isinstance(x, Variable))
      leaf = lift.NodeOut(leaf.graphdef, state, leaf.key)
    fixed.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, fixed)
