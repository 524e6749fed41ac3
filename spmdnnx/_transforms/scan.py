"""`scan` over graph objects: loop a function over stacked state and inputs.

``in_axes`` gives one spec per positional argument: ``Carry`` (at most one
argument: threaded from step to step), an int (scanned along that axis), None
(broadcast), or for graph nodes ``StateAxes({filter: Carry | int | None})``.
``out_axes`` mirrors the function's output: ``Carry`` where it returns the
new carry, ints for per-step outputs stacked along that axis.

Graph state follows its spec: scanned Variables are sliced per step (their
stacked logical axis name is removed inside, restored outside) and updates
are stacked back; carried and broadcast Variables are threaded through the
loop, so updates made in one step (BatchNorm statistics, Rngs counters) are
seen by the next step and by the caller. A `State` of axes from `nnx.prefix`
gives each Variable of a graph argument its own spec.

The step is traced once per layout (graph structure, specs, shapes and
dtypes): later calls with the same layout reuse that trace, as
`jax.lax.scan` does for a function it has seen. A step whose closure or
the module globals it names hold arrays, Variables or graph objects (or a
bound method, or a partial over them) is traced on every call instead, so it
always reads current values. State reached in other ways (through a
function it calls, more than three closures deep) is not detected: as with
`jax.lax.scan`, the first trace's values would be reused, so pass such state
as an argument.

>>> import jax.numpy as jnp
>>> def step(total, x):
...   return total + x, total
>>> total, partials = scan(step)(jnp.array(0.0), jnp.arange(4.0))
>>> float(total), partials.tolist()
(6.0, [0.0, 0.0, 1.0, 3.0])
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from spmdnnx import errors
from spmdnnx import _graph as graphlib
from spmdnnx import _stacked as stacked
from spmdnnx._stacked import LAYERS_AXIS
from spmdnnx._state import State
from spmdnnx._transforms import axes as axeslib
from spmdnnx._transforms import guards
from spmdnnx._transforms import iteration_modes as modes
from spmdnnx._transforms import lift
from spmdnnx._transforms.axes import Carry
from spmdnnx._variables import Variable, detach


_CACHE_SIZE = 16


class _Dyn:
  """Marks a dynamic slot (carried, scanned or broadcast array) in a layout."""

  __slots__ = ()

  def __repr__(self) -> str:
    return "_DYN"


_DYN = _Dyn()


class _Layout(NamedTuple):
  """What a scan step closes over for one call: static and hashable."""
  graphdef: Any
  treedef: Any
  arg_leaves: tuple
  carry_state: tuple
  scan_state: tuple
  carry_plain: tuple
  scan_plain: tuple
  dyn_bcast: tuple
  carry_treedef: Any
  node_arg: tuple


class _Entry:
  """A traced step: jax caches its trace on the step's identity."""

  __slots__ = ("trace_state", "body", "info")

  def __init__(self, trace_state: Any, body: Callable, info: dict):
    self.trace_state = trace_state
    self.body = body
    self.info = info


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _captures_state(f: Any, depth: int = 3) -> bool:
  """Whether `f` can read arrays, Variables or graph objects besides its arguments.

  Looked for in closure cells, the module globals its code names, partial
  arguments, a bound method's object and, `depth` levels down, the functions
  found there. A trace of such a step would bake in the values it read, so it is not
  reused: each call traces afresh, seeing the current values.
  """
  objs: list = []
  fn = f
  while isinstance(fn, functools.partial):
    objs += [*fn.args, *fn.keywords.values()]
    fn = fn.func
  if getattr(fn, "__self__", None) is not None:
    objs.append(fn.__self__)
  fn = getattr(fn, "__func__", fn)
  fn = getattr(fn, "__wrapped__", fn) if not getattr(fn, "__closure__", None) else fn
  for cell in getattr(fn, "__closure__", None) or ():
    try:
      objs.append(cell.cell_contents)
    except ValueError:  # an empty cell
      pass
  # Module globals the code names (attribute names looked up too: harmless).
  code, env = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
  if code is not None and env is not None:
    objs += [env[n] for n in code.co_names if n in env and not isinstance(env[n], type)
             and not inspect.ismodule(env[n])]
  is_state = lambda x: isinstance(x, (Variable, jax.Array, np.ndarray)) or graphlib.is_graph_node(x)
  for obj in objs:
    if callable(obj) and not is_state(obj):
      if depth > 0 and obj is not f and _captures_state(obj, depth - 1):
        return True
      continue
    if any(is_state(x) for x in jax.tree.leaves(obj, is_leaf=is_state)):
      return True
  return False


def _cache_key(layout: _Layout, operands: Any) -> Any:
  """``(layout, operand structure, avals)``, or None when not hashable."""
  try:
    leaves, treedef = jax.tree_util.tree_flatten(operands)
    key = (layout, treedef, tuple(jax.typeof(x) for x in leaves))
    hash(key)
  except TypeError:
    return None
  return key


def _moveaxis(leaf: Any, src: int, dst: int) -> Any:
  if src == dst:
    return leaf
  move = lambda a: jnp.moveaxis(a, src, dst)
  if isinstance(leaf, Variable):
    # A Variable may hold a pytree (a capture's dict of sown values).
    return detach(leaf, jax.tree.map(move, leaf.raw_value))
  return move(leaf)


def _tree_copy(node: Any) -> Any:
  """Tree mode: a carried object comes back as a new object sharing its Variables.

  Objects are pytrees there, so the returned carry is a fresh pytree (its
  Variables are the caller's, updated in place), as `jax.lax.scan` returns.
  """
  return jax.tree.map(lambda x: x, node, is_leaf=lambda x: isinstance(x, Variable))


def _state_specs(specs: tuple, args: tuple) -> tuple:
  """Turns a `State` of axes given for a graph-node argument (`nnx.prefix`) into StateAxes."""
  return tuple(axeslib.StateAxes(s) if isinstance(s, State) and graphlib.is_graph_node(a)
               else s for s, a in zip(specs, args))


def _avals(tree: Any) -> list:
  return [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def _split_out(out: Any, out_axes: Any, what: str) -> tuple[Any, list]:
  """Splits f's output into (carry or None, [(position, value, axis), ...])."""
  if out_axes is Carry:
    return out, []
  if isinstance(out_axes, tuple):
    if not isinstance(out, tuple) or len(out) != len(out_axes):
      raise errors.TransformError(
          f"{what}: out_axes has {len(out_axes)} entries, so the function must "
          f"return a tuple of that length; it returned {type(out).__name__}"
          f"{'' if not isinstance(out, tuple) else ' of length ' + str(len(out))}.")
    carry, ys = None, []
    for i, (value, axis) in enumerate(zip(out, out_axes)):
      if axis is Carry:
        carry = value
      else:
        ys.append((i, value, axis))
    return carry, ys
  return None, [(None, out, out_axes)]


def _stack_node_outputs(y: Any, axis: int, name: str | None) -> Any:
  """Inserts the stack name into the Variables of new nodes a step returned."""

  def fix(leaf):
    if not isinstance(leaf, lift.NodeOut):
      return leaf
    state = jax.tree.map(lambda v: stacked.insert_axis_name(v, axis, name), leaf.state,
                         is_leaf=lambda x: isinstance(x, Variable))
    return lift.NodeOut(leaf.graphdef, state)

  return jax.tree.map(fix, y, is_leaf=lift._is_marker)


def _validate_axes(in_axes: Any, out_axes: Any, what: str) -> None:
  """Checks Carry placement and broadcast outputs when scan is applied.

  Raises:
    TransformError: a nested Carry, several Carry, a Carry on one side only,
      None (or a StateAxes with None/Carry) in out_axes.
  """
  def carries(axes, name):
    is_leaf = lambda x: x is None or x is Carry or isinstance(x, axeslib.StateAxes)
    count = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_leaf):
      where = f"{name}{jax.tree_util.keystr(path)}"
      if leaf is Carry:
        count += 1
        if len(path) > 1:
          raise errors.TransformError(
              f"{what}: Carry must be a top-level argument, it cannot be nested "
              f"(found at {where}); pass the whole carry as one argument.", paths=[where])
      if name == "out_axes" and leaf is None:
        raise errors.TransformError(
            f"{what}: Cannot broadcast output state: {where} is None; per-step "
            "outputs are stacked, so give an int axis (or Carry for the carry).",
            paths=[where])
      if name == "out_axes" and isinstance(leaf, axeslib.StateAxes):
        for filt, axis in leaf.items():
          if axis is None or axis is Carry:
            kind = "broadcast" if axis is None else "carry"
            raise errors.TransformError(
                f"{what}: Cannot {kind} output state. Got StateAxes({{{filt!r}: "
                f"{axis!r}}}) at {where}; out_axes StateAxes need int axes.",
                paths=[where])
    if count > 1:
      raise errors.TransformError(
          f"{what}: Found multiple Carry definitions in {name}; at most one argument "
          "can be the carry (bundle several values in a tuple).")
    return count

  if carries(in_axes, "in_axes") != carries(out_axes, "out_axes"):
    raise errors.TransformError(
        f"{what}: If one of in_axes or out_axes has Carry, the other must also have "
        f"Carry (got in_axes={in_axes!r}, out_axes={out_axes!r}): return the new carry "
        "and mark its position in both, e.g. in_axes=(nnx.Carry, 0), "
        "out_axes=(nnx.Carry, 0).")


def scan(f: Callable | None = None, *, length: int | None = None, reverse: bool = False,
         unroll: int | bool = 1, in_axes: Any = (Carry, 0), out_axes: Any = (Carry, 0),
         stack_axis: str | None = LAYERS_AXIS,
         transform_metadata: Mapping | None = None, graph: bool | None = None,
         graph_updates: bool | None = None, _split_transpose: bool = False) -> Callable:
  """Scans `f` over the leading (or given) axis of its scanned arguments.

  Args:
    f: the step function.
    length: number of steps (needed when nothing is scanned).
    reverse, unroll: as in `jax.lax.scan`.
    in_axes / out_axes: see the module doc.
    stack_axis: logical name of the scanned axis in Variables' metadata.
    graph, graph_updates: graph mode with structure updates (both True, the
      default), or simple mode (see `iteration_modes`). None: the setting in
      force.
    _split_transpose: as in `jax.lax.scan` (experimental).

  Raises:
    TransformError: several Carry arguments; a Carry in in_axes but not in
      out_axes (or the reverse); a carry whose shapes change between steps;
      state that lacks the scanned axis.
  """
  if f is None:
    return functools.partial(scan, length=length, reverse=reverse, unroll=unroll,
                             in_axes=in_axes, out_axes=out_axes, stack_axis=stack_axis,
                             transform_metadata=transform_metadata, graph=graph,
                             graph_updates=graph_updates,
                             _split_transpose=_split_transpose)
  graph_mode, graph_updates, simple = modes.resolve_modes(graph, graph_updates)
  guards.check_unbound(f, "scan")
  modes.check_prefix(in_axes, "in_axes", "scan", graph_mode, graph_updates)
  modes.check_prefix(out_axes, "out_axes", "scan", graph_mode, graph_updates)
  name = stacked.stack_axis_name(modes.partition_of(f) or stack_axis, transform_metadata)
  what = f"scan({getattr(f, '__qualname__', getattr(f, '__name__', 'fun'))})"
  _validate_axes(in_axes, out_axes, what)

  def make_body(lay: _Layout, n_leaves: int) -> tuple:
    """A step function for one call layout, and the facts its trace records."""
    carry_state, scan_state = lay.carry_state, lay.scan_state
    carry_plain, scan_plain, dyn_bcast = lay.carry_plain, lay.scan_plain, lay.dyn_bcast
    carry_treedef, node_arg = lay.carry_treedef, lay.node_arg
    carry_args = carry_treedef is not None
    info: dict = {"ys_axes": [], "has_nodes": False, "nodes": None}

    def body(carry, x):
      c_state, c_plain, bcast = carry
      x_state, x_plain = x
      leaves = [None] * n_leaves
      for i, v in zip(carry_state, c_state):
        leaves[i] = v
      for i, v in zip(scan_state, x_state):
        leaves[i] = v
      arg_leaves = list(lay.arg_leaves)
      for group, values in ((carry_plain, c_plain), (scan_plain, x_plain),
                            (dyn_bcast, bcast)):
        for i, v in zip(group, values):
          arg_leaves[i] = v
      new_leaves, restructure, out, has_nodes = modes.run_inside(
          simple, lay.graphdef, lay.treedef, leaves, arg_leaves,
          lambda call_args: f(*call_args), what, regraph=True, identity="moved")
      lift.require_kept_structure(
          restructure, what, "the step function",
          "a scan body must keep the graph's structure. Create the state before "
          "the scan (e.g. with vmap over the constructor).")
      info["has_nodes"] = info["has_nodes"] or has_nodes
      carry_out, ys = _split_out(out, out_axes, what)
      if simple and has_nodes:
        refs = [m for _, y, _ in ys for m in
                jax.tree_util.tree_leaves(y, is_leaf=lift._is_marker)
                if isinstance(m, lift.InputRef)]
        if refs:
          node = info["nodes"][refs[0].index]
          for key in refs[0].path:
            node = graphlib.child(node, key)
          modes.raise_duplicate("scan", node, (node_arg[refs[0].index],) + refs[0].path,
                                ("output",))
      if has_nodes and carry_args and any(
          isinstance(m, lift.NodeOut)
          for m in jax.tree_util.tree_leaves(carry_out, is_leaf=lift._is_marker)):
        rule = ("scan Variable identity must be preserved across iterations" if simple
                else "Carry references must be the same between iterations")
        raise errors.TransformError(
            f"{what}: {rule}: the step returned, in its carry, graph objects or "
            "Variables it created; a carry cannot hold graph objects created inside "
            "the step. Update the carried objects in place and return them, or return "
            "new objects as per-step outputs (out_axes int) to get them stacked.")
      new_c_plain = []
      if carry_args:
        c_leaves, c_treedef = jax.tree_util.tree_flatten(carry_out, is_leaf=lift._is_marker)
        expected = [arg_leaves[i] for i in carry_plain]
        new_c_plain = [v for v in c_leaves if not lift._is_marker(v)]
        if len(new_c_plain) != len(expected):
          raise errors.TransformError(
              f"{what}: the carry returned by the step has structure {c_treedef}, "
              f"but the carry passed in has {carry_treedef}; return a carry with "
              "the same structure, shapes and dtypes.")
        if _avals(new_c_plain) != _avals(expected):
          raise errors.TransformError(
              f"{what}: the carry changes shape or dtype across steps: in "
              f"{_avals(expected)}, out {_avals(new_c_plain)}. A scan carry must keep "
              "its shapes and dtypes (cast or pad inside the step).")
      new_c_state = [new_leaves[i] for i in carry_state]
      if _avals(new_c_state) != _avals([leaves[i] for i in carry_state]):
        raise errors.TransformError(
            f"{what}: carried Module state changes shape or dtype across steps.")
      new_x_state = [new_leaves[i] for i in scan_state]
      info["ys_axes"] = [axis for _, _, axis in ys]
      return (new_c_state, new_c_plain, bcast), (new_x_state, [v for _, v, _ in ys])

    return body, info

  cache: dict = {}

  @functools.wraps(f)
  def wrapper(*args, **kwargs):
    args = axeslib.resolve_kwargs(f, args, kwargs, what)
    if in_axes is Carry and len(args) != 1:
      raise errors.TransformError(
          f"{what}: When in_axes=Carry, the function must take exactly one argument "
          f"(the carry), got {len(args)}. Give one spec per argument, e.g. "
          "in_axes=(nnx.Carry, 0).")
    specs = _state_specs(axeslib.broadcast_arg_specs(in_axes, len(args), what), args)
    carry_args = [i for i, s in enumerate(specs) if s is Carry]
    ex = modes.extract(tuple(args), graph_mode, "scan")
    if graph_mode:
      modes.check_consistent(ex, specs, "scan")
    node_arg = axeslib.node_arg_index(args)
    leaf_ax = axeslib.leaf_axes(ex.paths, ex.leaves, node_arg, specs, what)
    n = axeslib.check_mapped(ex.paths, ex.leaves, leaf_ax, None, what)

    # Plain (non-graph) argument leaves, each with its spec (prefix trees expanded).
    plain_specs = axeslib.arg_leaf_specs(args, specs, what)
    plain_idx = [i for i, x in enumerate(ex.arg_leaves) if not isinstance(x, lift.NodeSlot)]
    for i in plain_idx:
      spec = plain_specs[i]
      if isinstance(spec, int) and spec is not Carry:
        size = jnp.shape(ex.arg_leaves[i])[spec]
        if n is not None and size != n:
          raise errors.TransformError(
              f"{what}: scanned inputs have different lengths ({n} and {size}).")
        n = size
    steps = length if length is not None else n
    if steps is None:
      raise errors.TransformError(
          f"{what}: nothing is scanned, so the number of steps is unknown; pass length=.")

    carry_state = [i for i, a in enumerate(leaf_ax) if not isinstance(a, int) or a is Carry]
    scan_state = [i for i, a in enumerate(leaf_ax) if isinstance(a, int) and a is not Carry]
    carry_plain = [i for i in plain_idx if plain_specs[i] is Carry]
    scan_plain = [i for i in plain_idx if isinstance(plain_specs[i], int)
                  and plain_specs[i] is not Carry]
    bcast_plain = [i for i in plain_idx if plain_specs[i] is None]

    dyn_bcast = [i for i in bcast_plain if _is_array(ex.arg_leaves[i])]
    init_state = [ex.leaves[i] for i in carry_state]
    xs_state = [_moveaxis(stacked.remove_axis_name(ex.leaves[i], leaf_ax[i], name),
                          leaf_ax[i], 0) for i in scan_state]
    init_plain = [ex.arg_leaves[i] for i in carry_plain]
    xs_plain = [jnp.moveaxis(ex.arg_leaves[i], plain_specs[i], 0) for i in scan_plain]
    bcast = [ex.arg_leaves[i] for i in dyn_bcast]
    carry_treedef = None
    if carry_args:
      carry_treedef = jax.tree_util.tree_structure(args[carry_args[0]],
                                                   is_leaf=graphlib.is_graph_node)
    # Everything the step closes over that depends on this call; dynamic
    # values (carried, scanned, broadcast arrays) are replaced by _DYN.
    template = list(ex.arg_leaves)
    for i in (*carry_plain, *scan_plain, *dyn_bcast):
      template[i] = _DYN
    layout = _Layout(ex.graphdef, ex.treedef, tuple(template), tuple(carry_state),
                     tuple(scan_state), tuple(carry_plain), tuple(scan_plain),
                     tuple(dyn_bcast), carry_treedef, tuple(node_arg))
    operands = ((init_state, init_plain, bcast), (xs_state, xs_plain))
    key = None if _captures_state(f) else _cache_key(layout, operands)
    entry = cache.get(key) if key is not None else None
    trace_state = jax_core.get_opaque_trace_state()
    if entry is None or not entry.trace_state == trace_state:
      body, info = make_body(layout, len(ex.leaves))
      entry = _Entry(trace_state, body, info)
    # The nodes of this call, for error messages raised while tracing.
    entry.info["nodes"] = ex.nodes
    try:
      (c_state, c_plain, _), (y_state, ys) = jax.lax.scan(
          entry.body, operands[0], operands[1], length=steps,
          reverse=reverse, unroll=unroll, _split_transpose=_split_transpose)
    finally:
      entry.info["nodes"] = None
    if key is not None:
      cache.pop(key, None)
      cache[key] = entry
      while len(cache) > _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    ys_axes, has_nodes = entry.info["ys_axes"], entry.info["has_nodes"]

    new_leaves = list(ex.leaves)
    for i, v in zip(carry_state, c_state):
      new_leaves[i] = v
    for i, v in zip(scan_state, y_state):
      new_leaves[i] = stacked.insert_axis_name(_moveaxis(v, 0, leaf_ax[i]), leaf_ax[i], name)
    lift.apply_updates(ex, new_leaves, None)

    ys = [jax.tree.map(lambda y, a=axis: jnp.moveaxis(y, 0, a), y)
          for y, axis in zip(ys, ys_axes)]
    if has_nodes:
      ys = [lift.unmark_outputs(ex.nodes, _stack_node_outputs(y, axis, name))
            for y, axis in zip(ys, ys_axes)]
    carry_value = None
    if carry_args:
      carry_in = args[carry_args[0]]
      c_leaves = jax.tree_util.tree_leaves(carry_in, is_leaf=graphlib.is_graph_node)
      it = iter(c_plain)
      filled = [(leaf if graph_mode else _tree_copy(leaf)) if graphlib.is_graph_node(leaf)
                else next(it) for leaf in c_leaves]
      carry_value = jax.tree_util.tree_unflatten(carry_treedef, filled)
    if out_axes is Carry:
      return carry_value
    if isinstance(out_axes, tuple):
      result, it = [], iter(ys)
      for axis in out_axes:
        result.append(carry_value if axis is Carry else next(it))
      return tuple(result)
    return ys[0]

  return wrapper
