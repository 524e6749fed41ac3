"""`checkify`, `make_jaxpr` and `pmap` over graph objects.

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
>>> jaxpr = nnx.make_jaxpr(lambda m, x: m(x), graph_updates=False)(m, jnp.ones((1, 2)))
>>> "dot_general" in str(jaxpr)
True
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify as checkify_lib

from spmdnnx import errors
from spmdnnx._transforms import guards
from spmdnnx._transforms import lift
from spmdnnx._state import State
from spmdnnx._transforms import shmap as sm
from spmdnnx._transforms.axes import UNMATCHED, StateAxes, axis_for


def _run_lifted(f: Callable, args: tuple, kwargs: dict, who: str, updates: bool,
                transform: Callable) -> tuple:
  """Runs `f` under ``transform(inner)(state_vals, plain_leaves)``.

  ``inner`` returns ``(new_state_vals, out)``. Returns ``(ex, cell, result)``.
  """
  name = lift.fun_name(f)
  call_args = args + ((kwargs,) if kwargs else ())
  ex = lift.extract(call_args, aliasing=updates, who=who)
  cell: dict = {}

  def inner(vals, plain):
    new_leaves, restructure, out, has_nodes = lift.run_inside(
        ex.graphdef, ex.treedef, vals, lift.fill_plain(ex, plain),
        lambda a: f(*a[:-1], **a[-1]) if kwargs else f(*a), f"{who}({name})")
    guards.check_kept_structure(restructure, who, name)
    if has_nodes and not updates:
      guards.check_no_returned_inputs(out, who, name)
    cell["has_nodes"] = has_nodes
    return [lift._raw(x) for x in new_leaves], out

  result = transform(inner)([lift._raw(x) for x in ex.leaves], lift.plain_leaves(ex))
  return ex, cell, result


def checkify(f: Callable, errors: Any = checkify_lib.user_checks, *,  # noqa: F811
             graph: bool | None = None, graph_updates: bool | None = None) -> Callable:
  """`jax.experimental.checkify.checkify` whose arguments may be graph objects.

  Returns a function giving ``(error, out)``; Variable updates flow back.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> from jax.experimental import checkify
  >>> def f(x):
  ...   checkify.check(x > 0, "x must be positive")
  ...   return x
  >>> err, _ = nnx.checkify(f)(jnp.array(-1.0))
  >>> err.get().startswith("x must be positive")
  True

  Raises:
    TransformError: `f` is a bound method; the function changed the graph's
      structure (only Variable values flow back).
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  guards.check_unbound(f, "checkify")
  errs = errors

  @functools.wraps(f)
  def run(*args, **kwargs):
    ex, cell, (err, (new_vals, out)) = _run_lifted(
        f, args, kwargs, "checkify", graph and graph_updates,
        lambda inner: checkify_lib.checkify(inner, errors=errs))
    lift.apply_updates(ex, new_vals, None)
    if cell.get("has_nodes"):
      out = lift.unmark_outputs(ex.nodes, out)
    return err, out

  return run


def make_jaxpr(f: Callable, *, graph: bool | None = None, graph_updates: bool | None = None,
               return_shape: bool = False, **jaxpr_kwargs: Any) -> Callable:
  """`jax.make_jaxpr` whose arguments may be graph objects (not modified).

  As in Flax, it needs ``graph_updates=False`` or ``graph=False``.

  The jaxpr's inputs are the objects' state values, then the other leaves;
  its outputs are the new state values, then the function's outputs.

  Raises:
    TransformError: `f` is a bound method, or graph mode with updates.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  guards.check_unbound(f, "make_jaxpr")
  if graph and graph_updates:
    raise errors.TransformError(
        "nnx.make_jaxpr does not support graph_updates=True. The jaxpr shows only the "
        "state values flowing in and out; pass graph_updates=False (or graph=False): "
        "nnx.make_jaxpr(f, graph_updates=False).")

  @functools.wraps(f)
  def run(*args, **kwargs):
    return _run_lifted(
        f, args, kwargs, "make_jaxpr", graph and graph_updates,
        lambda inner: jax.make_jaxpr(inner, return_shape=return_shape, **jaxpr_kwargs))[2]

  return run


def _leaf_axis(spec: Any, path: tuple, leaf: Any, what: str) -> Any:
  """The pmap axis of one state leaf: an int/None for the whole object, or per
  Variable from a `StateAxes` or an `nnx.prefix` State."""
  if isinstance(spec, StateAxes):
    axis = axis_for(spec, path, leaf)
    if axis is UNMATCHED:
      raise errors.TransformError(
          f"pmap: the StateAxes for {errors.path_str(path[1:])} matches no filter; "
          "add a catch-all entry `...: None`.", paths=[path[1:]])
    spec = axis
  elif isinstance(spec, State):
    spec = sm.state_prefix_value(spec, path[1:], what, "in_axes")
  if spec is None or isinstance(spec, int):
    return spec
  raise errors.TransformError(
      f"pmap: in_axes for an argument holding graph objects must be an int, None, a "
      f"StateAxes or an nnx.prefix State; got {spec!r} for {errors.path_str(path[1:])}.",
      paths=[path[1:]])


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex))


def _place(x: Any, axis: Any) -> Any:
  """Moves pmap's mapped axis (0) of one output to `axis`; None keeps one copy."""
  if not _is_array_like(x):
    return x
  if axis is None:
    return x[0]
  return jnp.moveaxis(x, 0, axis) if axis != 0 else x


def _node_axis(spec: Any, path: tuple, var: Any, what: str) -> Any:
  if isinstance(spec, StateAxes):
    return spec.map_prefix(path, var)
  if isinstance(spec, State):
    return sm.state_prefix_value(spec, path, what, "out_axes")
  return spec


def _place_outputs(spec: Any, sub: Any, what: str, where: str = "output") -> Any:
  """Places outputs stacked along axis 0 as `out_axes` (a prefix of them) says.

  A graph object created inside (a `NodeOut` marker) may take a StateAxes or
  an `nnx.prefix` State: each Variable gets its own axis.

  Raises:
    TransformError: out_axes does not fit the output; a StateAxes for an
      output that is not a graph object.
  """
  if isinstance(sub, lift.NodeOut):
    pairs = [(p, jax.tree.map(functools.partial(_place, axis=_node_axis(spec, p, v, what)), v))
             for p, v in sub.state.flat_state()]
    return lift.NodeOut(sub.graphdef, State.from_flat_path(pairs))
  if isinstance(sub, lift.InputRef):
    return sub
  if spec is None or isinstance(spec, int):
    return jax.tree.map(functools.partial(_place, axis=spec), sub)
  if isinstance(spec, StateAxes):
    raise errors.TransformError(
        f"{what}: out_axes gives a StateAxes at {where}, an output that is not a "
        f"graph object created inside ({type(sub).__name__}); use an int or None.",
        paths=[where])
  spec_kids, spec_def = jax.tree_util.tree_flatten(spec, is_leaf=lambda x: x is not spec)
  sub_kids, sub_def = jax.tree_util.tree_flatten(sub, is_leaf=lambda x: x is not sub)
  if spec_def != sub_def:
    raise errors.TransformError(
        f"{what}: out_axes at {where} has structure {spec_def} but the output there "
        f"has structure {sub_def}; give one int/None for it or a matching pytree.",
        paths=[where])
  keys = [jax.tree_util.keystr(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(sub, is_leaf=lambda x: x is not sub)[0]]
  placed = [_place_outputs(s, x, what, where + k) for k, s, x in zip(keys, spec_kids, sub_kids)]
  return jax.tree_util.tree_unflatten(sub_def, placed)


def pmap(f: Callable | None = None, *, axis_name: Any = None, in_axes: Any = 0,
         out_axes: Any = 0, static_broadcasted_argnums: Any = (), axis_size: int | None = None,
         devices: Any = None, backend: str | None = None, donate_argnums: Any = (),
         graph: bool | None = None, graph_updates: bool | None = None) -> Callable:
  """`jax.pmap` whose arguments and results may be graph objects.

  A graph-object argument's in_axes (an int, None, a `StateAxes` or an
  `nnx.prefix` State) gives the axis of each of its Variables; their new
  values come out on the same axis (None: one copy). Graph objects created
  inside (``create_block`` patterns) are returned with their state placed
  by ``out_axes``, which may give them a StateAxes or a prefix State too.
  Other results that are not arrays (a GraphDef from `nnx.split`) come out
  as they are.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> make = nnx.pmap(lambda x: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), axis_size=1)
  >>> make(jnp.zeros(1)).kernel.shape
  (1, 2, 3)

  Raises:
    TransformError: `f` is bound; an object argument's in_axes is not an int,
      None, StateAxes or prefix State; out_axes does not fit the output; the
      function changed the graph's structure.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if f is None:
    return functools.partial(pmap, axis_name=axis_name, in_axes=in_axes, out_axes=out_axes,
                             static_broadcasted_argnums=static_broadcasted_argnums,
                             axis_size=axis_size, devices=devices, backend=backend,
                             donate_argnums=donate_argnums, graph=graph,
                             graph_updates=graph_updates)
  guards.check_unbound(f, "pmap")
  if static_broadcasted_argnums or donate_argnums:
    raise errors.TransformError(
        "pmap: static_broadcasted_argnums and donate_argnums are not supported for "
        "lifted pmap; close over static values with functools.partial.")
  updates = graph and graph_updates
  name = lift.fun_name(f)
  what = f"pmap({name})"

  @functools.wraps(f)
  def wrapper(*args):
    specs = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(specs) != len(args):
      raise errors.TransformError(
          f"{what}: in_axes has {len(specs)} entries for {len(args)} arguments.")
    all_axes, _ = sm.broadcast_specs(args, tuple(specs), what, "in_axes")
    ex = lift.extract(tuple(args), aliasing=updates, who="pmap")
    node_axes: dict = {}
    for x, spec in zip(ex.arg_leaves, all_axes):
      if isinstance(x, lift.NodeSlot):
        node_axes.setdefault(x.index, spec)
    leaf_axes = [_leaf_axis(node_axes[p[0]], p, leaf, what)
                 for p, leaf in zip(ex.paths, ex.leaves)]
    plain_axes = [s for x, s in zip(ex.arg_leaves, all_axes)
                  if not isinstance(x, lift.NodeSlot)]
    cell: dict = {}

    def inner(vals, plain):
      new_leaves, restructure, out, has_nodes = lift.run_inside(
          ex.graphdef, ex.treedef, vals, lift.fill_plain(ex, plain),
          lambda a: f(*a), what)
      guards.check_kept_structure(restructure, "pmap", name)
      if has_nodes and not updates:
        guards.check_no_returned_inputs(out, "pmap", name)
      # Results that are not arrays (a GraphDef) stay out of pmap.
      leaves, treedef = jax.tree_util.tree_flatten(out)
      cell["has_nodes"], cell["treedef"] = has_nodes, treedef
      cell["static"] = [None if _is_array_like(x) else x for x in leaves]
      return [lift._raw(x) for x in new_leaves], [x for x in leaves if _is_array_like(x)]

    mapped = jax.pmap(inner, axis_name=axis_name, in_axes=(leaf_axes, plain_axes),
                      out_axes=(leaf_axes, 0), axis_size=axis_size,
                      devices=devices, backend=backend)
    new_vals, dynamic = mapped([lift._raw(x) for x in ex.leaves], lift.plain_leaves(ex))
    lift.apply_updates(ex, new_vals, None)
    it = iter(dynamic)
    leaves = [next(it) if x is None else x for x in cell["static"]]
    out = jax.tree_util.tree_unflatten(cell["treedef"], leaves)
    out = _place_outputs(out_axes, out, what)
    if cell["has_nodes"]:
      out = lift.unmark_outputs(ex.nodes, out)
    return out

  return wrapper
