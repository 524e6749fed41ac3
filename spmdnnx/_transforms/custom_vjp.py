"""`custom_vjp` whose arguments may be graph objects (Modules, Variables, States).

The user's `fun`, `fwd` and `bwd` see objects; JAX sees arrays. Outside,
`lift.extract` splits the arguments' graph nodes jointly; the function JAX
wraps in `jax.custom_vjp` takes every state leaf and every dynamic plain
leaf, rebuilds the objects, runs the user's function and returns its output
(graph nodes marked) together with the arguments' new state, which is
written back into the originals after the call. Residuals are packed the same
way, so `fwd` may return objects in them.

Two behaviours, as Flax NNX 0.12:

- graph mode with updates (the default): the output's cotangent reaches
  `bwd` as ``(inputs_g, out_g)``; ``inputs_g`` has one entry per
  differentiated argument: a `State` of cotangent Variables for a graph
  object (all of its Variables), None for a plain leaf. `bwd` returns one
  tangent per differentiated argument, a State (or the object) for a graph
  object. ``nnx.DiffState(argnum, filter)`` in `nondiff_argnums` restricts
  which Variables of that argument are differentiated; an integer there may
  not name a graph object.
- ``graph=False`` or ``graph_updates=False``: as `jax.custom_vjp`; `bwd`
  gets the output's cotangent and returns tangents shaped like the arguments
  (an object of the argument's type for a graph object). A `bwd` that takes
  an ``updates_g`` parameter also gets the cotangents of the Variables the
  function mutated (objects whose other Variables are None). Objects may not
  be shared between arguments; only Variable values flow back.

Variables keep their metadata (logical axes, sharding) across the call. A
Variable the call leaves unchanged keeps its input value outside (only
changed ones take the call's output), so a later use of it in the same loss
gets its exact gradient even when `bwd` ignores ``inputs_g``.

>>> import jax, jax.numpy as jnp
>>> import spmdnnx as nnx
>>> class Foo(nnx.Module):
...   def __init__(self):
...     self.w = nnx.Param(jnp.array(1.0), logical_axes=())
>>> @nnx.custom_vjp
... def f(m, x):
...   return m.w * x
>>> def f_fwd(m, x):
...   return f(m, x), (m.w[...], x)
>>> def f_bwd(res, g):
...   (m_g, _), out_g = g          # m_g: a State shaped like the Module's
...   w, x = res
...   m_g["w"][...] = 10.0 * out_g * x
...   return m_g, out_g * w
>>> f.defvjp(f_fwd, f_bwd)
>>> m = Foo()
>>> grads = nnx.grad(f)(m, jnp.array(3.0))
>>> float(grads["w"][...]), grads["w"].logical_axes
(30.0, ())
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import numpy as np

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graphlib
from spmdnnx import _tracectx as tracectx
from spmdnnx._state import State
from spmdnnx._transforms import axes as axeslib
from spmdnnx._transforms import guards
from spmdnnx._transforms import lift
from spmdnnx._transforms.grad import DiffState
from spmdnnx._variables import Variable, detach, new_variable


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or \
      isinstance(x, jax.core.Tracer)


class _Packed:
  """A pytree of arrays standing for a value that may hold graph objects.

  Children: the graph nodes' state leaves and the dynamic plain leaves.
  Static (aux): the joint GraphDef, the argument structure and the static
  plain leaves (compared by identity).
  """

  __slots__ = ("vals", "dyn", "static")

  def __init__(self, vals, dyn, static):
    self.vals, self.dyn, self.static = vals, dyn, static


class _Static:
  """Static half of a `_Packed` (identity equality: it is never a cache key)."""

  __slots__ = ("graphdef", "treedef", "arg_leaves")

  def __init__(self, graphdef, treedef, arg_leaves):
    self.graphdef, self.treedef, self.arg_leaves = graphdef, treedef, arg_leaves


jax.tree_util.register_pytree_node(
    _Packed, lambda p: ((p.vals, p.dyn), p.static),
    lambda static, ch: _Packed(ch[0], ch[1], static))


def _pack(tree: Any) -> _Packed:
  """`tree` (objects allowed, shared references kept) as a `_Packed`."""
  ex = lift.extract(tree, aliasing=True, who="custom_vjp")
  dyn = [x for x in lift.plain_leaves(ex) if _is_dynamic(x)]
  static_leaves = [None if not isinstance(x, lift.NodeSlot) and _is_dynamic(x) else x
                   for x in ex.arg_leaves]
  return _Packed([lift._raw(v) for v in ex.leaves], dyn,
                 _Static(ex.graphdef, ex.treedef, static_leaves))


def _unpack(p: _Packed) -> Any:
  """Fresh objects (and the plain values) from a `_Packed`."""
  it = iter(p.dyn)
  st = p.static
  leaves = [next(it) if x is None else x for x in st.arg_leaves]
  tree, _ = lift.rebuild(st.graphdef, list(p.vals), st.treedef, leaves)
  return tree


class _Plan:
  """What one call learned about its arguments (static across the traces)."""

  def __init__(self, ex: lift.Extraction, args: tuple, diff_pos: set, filters: dict):
    self.ex = ex
    self.nargs = len(args)
    node_arg = axeslib.node_arg_index(args)
    self.leaf_arg = [node_arg[p[0]] for p in ex.paths]
    # Which state leaves get a cotangent.
    self.leaf_diff = []
    for i, p in enumerate(ex.paths):
      pos = self.leaf_arg[i]
      ok = pos in diff_pos and _inexact(ex.leaves[i])
      if ok and pos in filters:
        ok = filterlib.to_predicate(filters[pos])(p[1:], ex.leaves[i])
      self.leaf_diff.append(ok)
    # Per argument: its treedef and ``(keypath, root index or None)`` per leaf.
    self.layout = []
    flat_pos = []
    at = 0
    for pos, arg in enumerate(args):
      keyed, treedef = jax.tree_util.tree_flatten_with_path(
          arg, is_leaf=graphlib.is_graph_node)
      slots = ex.arg_leaves[at:at + len(keyed)]
      at += len(keyed)
      self.layout.append((treedef, [
          (kp, x.index if isinstance(x, lift.NodeSlot) else None)
          for (kp, _), x in zip(keyed, slots)]))
      flat_pos += [pos] * len(keyed)
    self.plain_arg, self.plain_dyn, self.static_plain, self.plain_inexact = [], [], [], []
    for pos, x in zip(flat_pos, ex.arg_leaves):
      if isinstance(x, lift.NodeSlot):
        continue
      dyn = pos in diff_pos or _is_dynamic(x)
      self.plain_arg.append(pos)
      self.plain_dyn.append(dyn)
      self.plain_inexact.append(dyn and _inexact_value(x))
      self.static_plain.append(None if dyn else x)
    self.diff_pos = diff_pos

  def dyn_plain(self) -> list:
    plain = lift.plain_leaves(self.ex)
    return [x for x, d in zip(plain, self.plain_dyn) if d]

  def args(self, vals: list, dyn: list) -> tuple[tuple, lift.Rebuilt]:
    """Fresh argument objects from the traced leaves."""
    it = iter(dyn)
    plain = [next(it) if d else s for d, s in zip(self.plain_dyn, self.static_plain)]
    args, rebuilt = lift.rebuild(self.ex.graphdef, list(vals), self.ex.treedef,
                                 lift.fill_plain(self.ex, plain))
    return tuple(args), rebuilt


def _inexact_value(x: Any) -> bool:
  """Whether a plain argument leaf gets a cotangent (Python floats do, as in JAX)."""
  if isinstance(x, (float, complex)):
    return True
  return hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)


def _inexact(leaf: Any) -> bool:
  value = lift._raw(leaf)
  return hasattr(value, "dtype") and jax.numpy.issubdtype(value.dtype, jax.numpy.inexact)


def _outputs_as_objects(out: Any) -> Any:
  """Cotangents of marked outputs as objects: NodeOut merged, InputRef None."""

  def conv(x):
    if isinstance(x, lift.NodeOut):
      return graphlib.merge(x.graphdef, x.state, copy=True)
    if isinstance(x, lift.InputRef):
      return None
    return x

  return jax.tree.map(conv, out, is_leaf=lambda x: isinstance(x, (lift.InputRef, lift.NodeOut)))


class CustomVjp:
  """`custom_vjp`'s result: call it; give its rule with ``defvjp(fwd, bwd)``."""

  def __init__(self, fun: Callable, nondiff_argnums: tuple, graph_mode: bool,
               graph_updates: bool):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.nondiff_argnums = nondiff_argnums
    self.updates = graph_mode and graph_updates
    self.int_nondiff = tuple(sorted(a for a in nondiff_argnums if isinstance(a, int)))
    self.filters = {a.argnum: a.filter for a in nondiff_argnums if isinstance(a, DiffState)}
    self.fwd: Callable | None = None
    self.bwd: Callable | None = None
    self.name = lift.fun_name(fun)

  def defvjp(self, fwd: Callable, bwd: Callable, symbolic_zeros: bool = False) -> None:
    """Sets the forward and backward rules (see the module docstring for their shapes).

    Raises:
      TransformError: ``symbolic_zeros=True`` (not supported over objects).
    """
    if symbolic_zeros:
      raise errors.TransformError(
          f"custom_vjp({self.name}).defvjp: symbolic_zeros=True is not supported by "
          "spmdnnx's custom_vjp; leave it False (cotangents arrive as dense zeros).")
    self.fwd, self.bwd = fwd, bwd

  # --- the call ------------------------------------------------------------------

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if kwargs:
      args = self._positional(args, kwargs)
    if self.fwd is None or self.bwd is None:
      raise errors.TransformError(
          f"custom_vjp({self.name}) was called before its rule was set: call "
          f"{self.name}.defvjp(fwd, bwd) first.")
    for a in (*self.int_nondiff, *self.filters):
      if a >= len(args):
        raise errors.TransformError(
            f"custom_vjp({self.name}): nondiff_argnums names argument {a}, but the "
            f"call has {len(args)} positional argument(s).", positions=[a])
    ex = lift.extract(tuple(args), aliasing=self.updates, who="custom_vjp")
    if self.updates:
      bad = [i for i in self.int_nondiff if any(
          graphlib.is_graph_node(x) for x in
          jax.tree_util.tree_leaves(args[i], is_leaf=graphlib.is_graph_node))]
      if bad:
        raise errors.ArgumentError(
            f"custom_vjp({self.name}): nondiff_argnums {bad} hold graph objects. "
            "Passing integers to nondiff_argnums for graph nodes arguments in "
            "custom_vjp is not supported: to differentiate only part of an object "
            "give nnx.DiffState(argnum, filter) (nnx.DiffState(argnum, False) "
            "for none of it), or use graph_updates=False.", positions=bad)
    diff_pos = {i for i in range(len(args)) if i not in self.int_nondiff}
    plan = _Plan(ex, tuple(args), diff_pos, self.filters)
    cell: dict = {}
    core = jax.custom_vjp(_named(self._core(plan, cell), self.fun))
    core.defvjp(_named(self._fwd_rule(plan, cell), self.fwd),
                _named(self._bwd_rule(plan, cell), self.bwd))
    vals = [lift._raw(x) for x in ex.leaves]
    out, new_state = core(vals, plan.dyn_plain())
    new_state = [new if i is None else _unchanged(new, ex.leaves[i])
                 for i, new in zip(cell["source"], new_state)]
    lift.apply_updates(ex, new_state, cell.get("restructure") if self.updates else None)
    if cell.get("has_nodes"):
      out = lift.unmark_outputs(ex.nodes, out)
    return out

  def _positional(self, args: tuple, kwargs: dict) -> tuple:
    """Keyword arguments bound to their positions (custom_vjp is positional, as JAX)."""
    try:
      bound = inspect.signature(self.fun).bind(*args, **kwargs)
    except TypeError as e:
      raise errors.ArgumentError(f"custom_vjp({self.name}): {e}.") from None
    if bound.kwargs:
      raise errors.ArgumentError(
          f"custom_vjp({self.name}): keyword-only argument(s) {sorted(bound.kwargs)} "
          "cannot be passed; make them positional, or close over them with "
          "functools.partial.", names=sorted(bound.kwargs))
    return tuple(bound.args)

  # --- inside the transform --------------------------------------------------------

  def _run(self, user: Callable, plan: _Plan, cell: dict, vals: list, dyn: list,
           what: str) -> tuple:
    """Rebuilds the arguments, runs `user`, returns (its output, new state leaves)."""
    with tracectx.frame(f"custom_vjp({self.name}).{what}"):
      args, rebuilt = plan.args(vals, dyn)
      result = user(*args)
      graphdef, w = graphlib.flatten(rebuilt.nodes)
    new_leaves = [v for _, v in w.pairs]
    paths = [p for p, _ in w.pairs]
    restructure = None
    if graphdef != rebuilt.graphdef:
      reuse = {i: rebuilt.origin[id(n)] for i, n in enumerate(w.nodes)
               if id(n) in rebuilt.origin}
      restructure = lift.Restructure(graphdef, reuse, paths)
    return result, (rebuilt, w, new_leaves, paths, restructure)

  def _state_out(self, plan: _Plan, cell: dict, vals: list, run: tuple) -> list:
    """The arguments' new state (same structure in `fun` and `fwd`, as JAX asks).

    Records in `cell`, per new leaf, the input leaf it still holds unchanged
    (or None): outside, such a leaf keeps its input value rather than the
    call's output, so gradients through its later uses stay exact whatever
    `bwd` does with their cotangents.
    """
    _, _, new_leaves, paths, restructure = run
    where = {id(v): i for i, v in enumerate(vals)}
    cell["source"] = [where.get(id(lift._raw(new))) for new in new_leaves]
    if self.updates:
      cell["restructure"] = restructure
      cell["new_paths"] = paths
      return new_leaves
    if restructure is not None and paths != plan.ex.paths:
      guards.check_kept_structure(restructure, "custom_vjp", self.name)
    # Only Variable values flow back: a changed static attribute is dropped, as
    # Flax's tree mode does.
    return new_leaves

  def _out(self, out: Any, plan: _Plan, cell: dict, run: tuple) -> Any:
    rebuilt, w = run[0], run[1]
    out, has_nodes = lift.mark_outputs(rebuilt.nodes, w, out)
    if has_nodes and not self.updates:
      guards.check_no_returned_inputs(out, "custom_vjp", self.name)
    cell["has_nodes"] = has_nodes
    return out

  def _core(self, plan: _Plan, cell: dict) -> Callable:
    def core(vals, dyn):
      out, run = self._run(self.fun, plan, cell, vals, dyn, "fun")
      return self._out(out, plan, cell, run), self._state_out(plan, cell, vals, run)
    return core

  def _fwd_rule(self, plan: _Plan, cell: dict) -> Callable:
    def fwd(vals, dyn):
      result, run = self._run(self.fwd, plan, cell, vals, dyn, "fwd")
      if not (isinstance(result, tuple) and len(result) == 2):
        raise errors.TransformError(
            f"custom_vjp({self.name}): fwd must return an (output, residuals) pair, "
            f"got a {type(result).__name__}.")
      out, res = result
      out = self._out(out, plan, cell, run)
      state = self._state_out(plan, cell, vals, run)
      packed = _pack(res)
      # bwd rebuilds the arguments only to hand it the nondiff ones.
      keep = (list(vals), list(dyn)) if self.int_nondiff else ([], [])
      return (out, state), (packed, *keep)
    return fwd

  def _bwd_rule(self, plan: _Plan, cell: dict) -> Callable:
    def bwd(residual, cts):
      packed, vals, dyn = residual
      out_ct, state_ct = cts
      with tracectx.frame(f"custom_vjp({self.name}).bwd"):
        res = _unpack(packed)
        nondiff = []
        if self.int_nondiff:
          args, _ = plan.args(vals, dyn)
          nondiff = [args[i] for i in self.int_nondiff]
        out_g = _outputs_as_objects(out_ct)
        if self.updates:
          g = (self._inputs_g(plan, cell, state_ct), out_g)
          tangents = self.bwd(*nondiff, res, g)
        else:
          kwargs = {}
          if _takes_updates_g(self.bwd):
            kwargs["updates_g"] = self._updates_g(plan, [
                None if i == j else ct for j, (ct, i) in enumerate(zip(state_ct, cell["source"]))])
          tangents = self.bwd(*nondiff, res, out_g, **kwargs)
        return self._to_cts(plan, tangents)
    return bwd

  # --- cotangents ---------------------------------------------------------------------

  def _inputs_g(self, plan: _Plan, cell: dict, state_ct: list) -> tuple:
    """Graph mode: per differentiated argument, its objects as States of cotangents."""
    paths = cell.get("new_paths", plan.ex.paths)
    per_root: dict = {}
    for path, ct in zip(paths, state_ct):
      # A copy made in bwd's frame, so that bwd may write into it.
      ct = detach(ct) if isinstance(ct, Variable) else ct
      per_root.setdefault(path[0], []).append((path[1:], ct))

    def root_g(root):
      pairs = per_root.get(root, [])
      if len(pairs) == 1 and pairs[0][0] == ():
        return pairs[0][1]   # a Variable argument: its cotangent Variable
      return State.from_flat_path(pairs)

    out = []
    for pos in sorted(plan.diff_pos):
      treedef, slots = plan.layout[pos]
      out.append(jax.tree_util.tree_unflatten(
          treedef, [None if root is None else root_g(root) for _, root in slots]))
    return tuple(out)

  def _updates_g(self, plan: _Plan, state_ct: list) -> tuple:
    """No-updates mode: the arguments with each mutated Variable's cotangent, else None."""
    it = iter(state_ct)

    def take(path, spec):
      ct = next(it)
      if isinstance(ct, Variable):
        return detach(ct)
      if ct is None or type(spec) is not graphlib.VariableSpec:
        return ct
      return new_variable(spec.type, ct, frozen=spec.metadata)

    nodes = graphlib.Builder(take).build(plan.ex.graphdef.spec, ())
    filled = [nodes[x.index] if isinstance(x, lift.NodeSlot) else None
              for x in plan.ex.arg_leaves]
    return tuple(jax.tree_util.tree_unflatten(plan.ex.treedef, filled))

  def _to_cts(self, plan: _Plan, tangents: Any) -> tuple:
    """The user's tangents (one per differentiated argument) as cotangents of the core."""
    positions = sorted(plan.diff_pos)
    if not isinstance(tangents, (tuple, list)) or len(tangents) != len(positions):
      raise errors.TransformError(
          f"custom_vjp({self.name}): bwd must return a tuple with one tangent per "
          f"differentiated argument ({len(positions)}: positions {positions}), got "
          f"{_describe(tangents)}.")
    ex = plan.ex
    vals_ct: list = [None] * len(ex.paths)
    by_root: dict = {}
    for i, p in enumerate(ex.paths):
      by_root.setdefault(p[0], []).append(i)
    plain_ct: list = []
    k = 0
    problems: list = []
    for pos in range(plan.nargs):
      t_flat: dict = {}
      diff = pos in plan.diff_pos
      if diff:
        t = tangents[positions.index(pos)]
        for kp, leaf in jax.tree_util.tree_flatten_with_path(
            t, is_leaf=lambda x: x is None or graphlib.is_graph_node(x))[0]:
          t_flat[kp] = leaf
      for kp, root in plan.layout[pos][1]:
        if root is None:
          if plan.plain_dyn[k]:
            plain_ct.append(t_flat.get(kp) if diff and plan.plain_inexact[k] else None)
          k += 1
          continue
        if not diff:
          continue
        known = {ex.paths[i][1:]: i for i in by_root.get(root, [])}
        for sub, value in _node_tangent(t_flat, kp, () in known):
          i = known.get(sub)
          if i is None:
            problems.append(f"arg{pos}{jax.tree_util.keystr(kp)}/{errors.path_str(sub)}")
          elif plan.leaf_diff[i] and value is not None:
            vals_ct[i] = lift._raw(value)
    if problems:
      raise errors.TransformError(
          f"custom_vjp({self.name}): bwd returned tangents at paths the arguments do "
          f"not have: {errors.format_paths(problems)}. Return, for each graph object, "
          "a State (or object) with the object's own paths.", paths=problems)
    return vals_ct, plain_ct


def _node_tangent(t_flat: dict, kp: tuple, is_variable: bool) -> list:
  """``[(path inside the object, value)]`` from the tangent entries at or below `kp`."""
  if kp in t_flat:
    t = t_flat[kp]
    if t is None:
      return []
    if isinstance(t, Variable) or (is_variable and hasattr(t, "dtype")):
      return [((), t)]
    if graphlib.is_graph_node(t):
      _, w = graphlib.flatten(t)
      return [(p, v) for p, v in w.pairs]
    if isinstance(t, State):
      return list(t.flat_state())
    raise errors.TransformError(
        f"custom_vjp: the tangent for the graph object at {jax.tree_util.keystr(kp) or 'the argument'} "
        f"is a {type(t).__name__}; give a State (or an object of the argument's type).")
  n = len(kp)
  return [(tuple(graphlib._key_name(k) for k in path[n:]), v)
          for path, v in t_flat.items() if path[:n] == kp and len(path) > n]


def _unchanged(new: Any, old: Any) -> Any:
  """An output leaf that still held an input leaf: the input's value (new metadata kept)."""
  if isinstance(new, Variable):
    return detach(new, lift._raw(old))
  return old


def _named(inner: Callable, user: Callable) -> Callable:
  """`inner` named after the user's function (JAX's messages show the name)."""
  name = getattr(user, "__name__", None)
  if isinstance(name, str):
    inner.__name__ = name
    inner.__qualname__ = getattr(user, "__qualname__", name)
  return inner


def _takes_updates_g(f: Callable) -> bool:
  try:
    params = inspect.signature(f).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind is p.VAR_KEYWORD or (p.name == "updates_g" and p.kind in (
      p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) for p in params)


def _describe(x: Any) -> str:
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of length {len(x)}"
  return f"a {type(x).__name__}"


def custom_vjp(fun: Callable | None = None, *, nondiff_argnums: tuple = (),
               graph: bool | None = None, graph_updates: bool | None = None) -> Any:
  """`jax.custom_vjp` over functions of graph objects (see the module docstring).

  Args:
    fun: the primal function.
    nondiff_argnums: integers (arguments not differentiated; in graph mode
      with updates they may not hold graph objects) and, in graph mode with
      updates only, ``nnx.DiffState(argnum, filter)`` selecting the
      differentiated Variables of an object argument.
    graph, graph_updates: the mode (None: the setting in force).

  >>> import jax, jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> @nnx.custom_vjp(graph=False)
  ... def f(x):
  ...   return jnp.sin(x)
  >>> f.defvjp(lambda x: (f(x), jnp.cos(x)), lambda c, g: (2 * c * g,))
  >>> float(jax.grad(f)(0.0))
  2.0

  Raises:
    TransformError: `fun` is bound; an argnum repeated; a DiffState without
      graph mode and updates.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if fun is None:
    return functools.partial(custom_vjp, nondiff_argnums=nondiff_argnums, graph=graph,
                             graph_updates=graph_updates)
  guards.check_unbound(fun, "custom_vjp")
  nondiff_argnums = tuple(nondiff_argnums)
  seen: set = set()
  for a in nondiff_argnums:
    if isinstance(a, DiffState):
      if not (graph and graph_updates):
        raise errors.TransformError(
            f"custom_vjp({lift.fun_name(fun)}): `nondiff_argnums` cannot contain "
            f"`DiffState` objects when graph=False or graph_updates=False (got "
            f"{a!r}). Pass the differentiated part as its own argument (split the "
            "object with nnx.split), or use graph=True, graph_updates=True.")
      index = a.argnum
    elif isinstance(a, int) and not isinstance(a, bool):
      index = a
    else:
      raise errors.TransformError(
          f"custom_vjp({lift.fun_name(fun)}): nondiff_argnums entries must be ints or "
          f"nnx.DiffState, got {a!r}.")
    if index in seen:
      raise errors.TransformError(
          f"custom_vjp({lift.fun_name(fun)}): argnum {index} is repeated in "
          "nondiff_argnums; give each argument once.", positions=[index])
    seen.add(index)
  return CustomVjp(fun, nondiff_argnums, graph, graph_updates)
