"""Per-leaf axis specs for vmap/scan: `Carry`, `StateAxes`.

`in_axes` of a lifted vmap or scan gives one spec per argument. For a graph
node the spec is an int (map every Variable along that axis), None
(broadcast), `Carry` (scan only) or ``StateAxes({filter: spec, ...})`` to
choose per filter. `leaf_axes` turns those into one spec per state leaf.

The stacked-axis name that vmap/scan move in and out of mapped Variables'
``logical_axes`` lives in `spmdnnx._stacked`.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import jax

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx._state import State
from spmdnnx._variables import Variable

class _CarryType:
  """Marks the carry in scan's in_axes / out_axes (and in StateAxes)."""

  _instance = None

  def __new__(cls):
    if cls._instance is None:
      cls._instance = super().__new__(cls)
    return cls._instance

  def __repr__(self):
    return "Carry"

  def __reduce__(self):
    return (_CarryType, ())


Carry = _CarryType()


class _ExactPath:
  """Filter matching one exact state path (StateAxes built from a State)."""

  __slots__ = ("path",)

  def __init__(self, path: tuple):
    self.path = path

  def __call__(self, path, _value) -> bool:
    return tuple(path) == self.path

  def __eq__(self, other):
    return isinstance(other, _ExactPath) and other.path == self.path

  def __hash__(self):
    return hash((_ExactPath, self.path))

  def __repr__(self):
    return f"path {errors.path_str(self.path)!r}"


class StateAxes:
  """Per-filter axis specs for the state of a graph-node argument.

  >>> from spmdnnx._variables import Param, BatchStat
  >>> StateAxes({Param: 0, BatchStat: None})
  StateAxes({Param: 0, BatchStat: None})

  A `State` whose leaves are axes (e.g. ``nnx.state(model)`` with every
  leaf replaced) gives one entry per path:

  >>> from spmdnnx._state import State
  >>> StateAxes(State({"w": 0, "b": None})).map_prefix(("b",), None) is None
  True
  """

  def __init__(self, axes: Mapping[Any, Any]):
    if isinstance(axes, State):
      # One exact-path filter per leaf of a State whose leaves are the axes.
      pairs = list(axes.flat_state())
      axes = {_ExactPath(tuple(path)): axis for path, axis in pairs}
    self.filters = tuple(axes.keys())
    self.axes = tuple(axes.values())
    for a in self.axes:
      if not (a is None or a is Carry or isinstance(a, int)):
        raise errors.TransformError(
            f"StateAxes values must be an int axis, None or Carry, got {a!r}.")
    self.predicates = filterlib.filters_to_predicates(self.filters)

  def items(self):
    return zip(self.filters, self.axes)

  def map_prefix(self, path: tuple, variable: Any) -> Any:
    """The axis spec of the state leaf at `path` (first matching filter).

    Raises:
      TransformError: no filter matches.
    """
    for pred, axis in zip(self.predicates, self.axes):
      if pred(tuple(path), variable):
        return axis
    raise errors.TransformError(
        f"StateAxes: no filter matches the state at {errors.path_str(path)}; add a "
        "catch-all entry such as `...: None`.", paths=[errors.path_str(path)])

  def __repr__(self):
    inner = ", ".join(f"{getattr(f, '__name__', repr(f))}: {a!r}" for f, a in self.items())
    return f"StateAxes({{{inner}}})"

  def __eq__(self, other):
    return isinstance(other, StateAxes) and (self.filters, self.axes) == (other.filters, other.axes)

  def __hash__(self):
    return hash((self.filters, self.axes))


def broadcast_arg_specs(specs: Any, nargs: int, what: str) -> tuple:
  """Expands an in_axes spec (single value or per-argument sequence) to nargs."""
  if isinstance(specs, (list, tuple)):
    if len(specs) != nargs:
      raise errors.TransformError(
          f"{what}: in_axes has {len(specs)} entries but the function got {nargs} "
          "positional argument(s); give one spec per argument (int, None, "
          "Carry or StateAxes).")
    return tuple(specs)
  return (specs,) * nargs


def node_arg_index(args: Sequence) -> list[int]:
  """For each unique graph node (order of appearance), the argument holding it."""
  out: list[int] = []
  seen: set = set()
  for i, arg in enumerate(args):
    for leaf in jax.tree_util.tree_leaves(arg, is_leaf=graph.is_graph_node):
      if graph.is_graph_node(leaf) and id(leaf) not in seen:
        seen.add(id(leaf))
        out.append(i)
  return out


UNMATCHED = object()


def axis_for(spec: Any, path: tuple, leaf: Any) -> Any:
  """The axis spec of one state leaf (path starts with its node's index).

  For a StateAxes the first matching filter decides; no match gives the
  `UNMATCHED` marker.
  """
  if not isinstance(spec, StateAxes):
    return spec
  for pred, axis in zip(spec.predicates, spec.axes):
    if pred(path[1:], leaf):
      return axis
  return UNMATCHED


def raise_size_mismatch(sizes: dict, what: str) -> None:
  """Raises when mapped things disagree on the mapped size ({size: [what, ...]})."""
  if len(sizes) > 1:
    listed = "; ".join(f"size {s}: {errors.format_paths(p, 3)}" for s, p in sizes.items())
    raise errors.TransformError(
        f"{what}: mapped axes have different sizes ({listed}); every mapped "
        "Variable and argument must have the same length along its axis.")


def leaf_axes(paths: list, leaves: list, node_arg: list[int], arg_specs: tuple,
              what: str) -> list:
  """One axis spec (int, None or Carry) per state leaf.

  Raises:
    TransformError: a StateAxes that leaves some state unassigned.
  """
  out = []
  unmatched = []
  for path, leaf in zip(paths, leaves):
    axis = axis_for(arg_specs[node_arg[path[0]]], path, leaf)
    if axis is UNMATCHED:
      unmatched.append(path)
      axis = None
    out.append(axis)
  if unmatched:
    raise errors.TransformError(
        f"{what}: StateAxes filters do not cover {len(unmatched)} state leaves: "
        f"{errors.format_paths(errors.path_str(p[1:]) for p in unmatched)}. Add a "
        "catch-all entry such as `...: None`.", paths=[p[1:] for p in unmatched])
  return out


def check_mapped(paths: list, leaves: list, axes: list, size: int | None,
                 what: str) -> int | None:
  """Checks mapped leaves have the axis and agree on its size; returns the size.

  A Variable holding a pytree (``capture``'s dict of sown values) is checked
  leaf by leaf; an empty one (nothing sown yet) has nothing to check.
  """
  flat: list = []
  for path, leaf, axis in zip(paths, leaves, axes):
    value = leaf.raw_value if isinstance(leaf, Variable) else leaf
    if hasattr(value, "shape") or not isinstance(axis, int):
      flat.append((path, value, axis))
    else:
      flat.extend((path, sub, axis) for sub in jax.tree.leaves(value))
  problems = []
  bad_paths: list = []
  bad_shapes: list = []
  sizes: dict[int, list] = {}
  for path, value, axis in flat:
    if not isinstance(axis, int) or axis is Carry:
      continue
    shape = getattr(value, "shape", ())
    ndim = len(shape)
    if not -ndim <= axis < max(ndim, 1) or ndim == 0:
      problems.append(f"{errors.path_str(path[1:])} (shape {tuple(shape)}, axis {axis})")
      bad_paths.append(path[1:])
      bad_shapes.append(tuple(shape))
      continue
    sizes.setdefault(shape[axis], []).append(errors.path_str(path[1:]))
  if problems:
    raise errors.TransformError(
        f"{what}: cannot map these Variables along the requested axis because "
        f"their arrays lack it: {errors.format_paths(problems)}. Map that state "
        "with None (broadcast) via StateAxes({filter: None, ...}), or create it "
        "stacked (e.g. with vmap over the constructor).", paths=bad_paths,
        shapes=bad_shapes)
  if size is not None:
    sizes.setdefault(size, [])
  raise_size_mismatch(sizes, what)
  return next(iter(sizes)) if sizes else None


def arg_leaf_specs(args: tuple, specs: tuple, what: str) -> list:
  """Expands per-argument specs to one spec per non-node argument leaf."""
  out = []

  def expand(spec, sub):
    if isinstance(spec, (list, tuple, dict)):
      # A pytree prefix of the argument, as jax.vmap accepts.
      treedef = jax.tree_util.tree_structure(spec, is_leaf=lambda x: x is None)
      try:
        subs = treedef.flatten_up_to(sub)
      except (ValueError, TypeError) as e:
        raise errors.TransformError(
            f"{what}: in_axes entry {spec!r} is not a pytree prefix of the argument "
            f"({type(sub).__name__}): {e}") from e
      for s, x in zip(jax.tree_util.tree_leaves(spec, is_leaf=lambda x: x is None), subs):
        expand(s, x)
      return
    for leaf in jax.tree_util.tree_leaves(sub, is_leaf=graph.is_graph_node):
      if graph.is_graph_node(leaf):
        out.append(None)  # replaced by a NodeSlot; not passed through
      elif isinstance(spec, StateAxes):
        raise errors.TransformError(
            f"{what}: StateAxes given for an argument that is not a graph object "
            f"({type(sub).__name__}); use an int or None for plain arrays.")
      else:
        out.append(spec)

  for arg, spec in zip(args, specs):
    expand(spec, arg)
  return out


def resolve_kwargs(f: Any, args: tuple, kwargs: dict, what: str) -> tuple:
  """Binds keyword arguments to positions (mapped transforms take positions).

  Raises:
    TransformError: a keyword that has no position (``**kwargs`` parameters).
  """
  if not kwargs:
    return args
  try:
    bound = inspect.signature(f).bind(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise errors.TransformError(f"{what}: cannot bind the arguments: {e}") from e
  bound.apply_defaults()
  if bound.kwargs:
    raise errors.TransformError(
        f"{what}: keyword arguments {sorted(bound.kwargs)} have no position in the "
        "function's signature; pass them positionally (in_axes is per position).")
  return tuple(bound.args)
