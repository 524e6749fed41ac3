"""`jit` over graph objects, at the cost of a plain `jax.jit` call.

Modules, Optimizers, Rngs, Variables (any graph node) may be passed in any
argument: positionally, as keywords, or inside lists, tuples, dicts and
pytrees. Their state goes in, every mutation made inside comes back out,
graph objects returned (or created) inside come out as objects. Under
`use_sharding`, all of their state is laid out by the Variables' logical axes
and donated, whatever the position.

There is one planning path (`jit_plan`): the first call with some arguments
classifies them, splits their graphs jointly and compiles a `jax.jit` of an
inner function specialised to that layout. The plan is then cached, per
*anchor* (the first graph node among the positional arguments: ``self`` for a
method) in a weak map, plus the last plan used. A later call reuses a plan
while it is valid: the structure epoch has not moved (no attribute set or
deleted, no tracked list/dict mutated, no Variable metadata changed on a
watched object), the sharding context is equal, and the same node objects
sit in the same positions. Reusing reads the Variables' values into a list,
calls the compiled function and writes the new values back.

>>> import jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Variable
>>> class Counter(Module):
...   def __init__(self):
...     self.n = Variable(jnp.array(0))
>>> @jit
... def step(c):
...   c.n += 1
>>> c = Counter(); step(c); step(c)
>>> int(c.n.value)
2
"""

from __future__ import annotations

import collections
import functools
import inspect
import weakref
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._object import Dict, List, Object
from spmdnnx._state import State
from spmdnnx.spmd import _context as context_lib
from spmdnnx._transforms import guards
from spmdnnx._transforms import jit_inflight as inflight
from spmdnnx._transforms import jit_plan as plan_lib
from spmdnnx._transforms import lift
from spmdnnx._transforms import prefixes
from spmdnnx._variables import EPOCH, Variable, watch_variable

_RAW_SET = Variable.raw_value.__set__
_RAW_GET = Variable.raw_value.__get__
_consume = collections.deque(maxlen=0).extend
_NODE_TYPES = plan_lib.NODE_TYPES
_is_root = plan_lib.is_root
_LEAF_TYPES = plan_lib.LEAF_TYPES
_UNSPECIFIED = object()
_CTX_STACK = context_lib._STACK
_INFLIGHT = inflight.STATE
NODE, TREE, PLAIN, STATIC = plan_lib.NODE, plan_lib.TREE, plan_lib.PLAIN, plan_lib.STATIC


def _as_tuple(x: int | Sequence[int] | None) -> tuple:
  if x is None:
    return ()
  if isinstance(x, int):
    return (x,)
  return tuple(x)


def _names(x: str | Sequence[str] | None) -> tuple:
  return (x,) if isinstance(x, str) else tuple(x or ())


def watch(nodes: list) -> None:
  """Marks nodes so that structural changes to them bump the epoch."""
  for node in nodes:
    if isinstance(node, Variable):
      watch_variable(node)
    elif isinstance(node, Object):
      object.__setattr__(node, "_object__watched", True)
    elif isinstance(node, (List, Dict)):
      node._object__watched = True


class _PlanMap:
  """Plans keyed by their anchor object, weakly (entries go with the object).

  Keyed by ``id`` with a weak reference, so the anchor's ``__eq__`` and
  ``__hash__`` (a Variable compares elementwise) are never called.
  """

  __slots__ = ("entries", "owner")

  def __init__(self, owner: "JitWrapped"):
    self.entries: dict[int, tuple] = {}
    self.owner = weakref.ref(owner)

  def get(self, anchor: Any):
    entry = self.entries.get(id(anchor))
    if entry is not None and entry[0]() is anchor:
      return entry[1]
    return None

  def put(self, anchor: Any, plan: plan_lib.Plan) -> None:
    key = id(anchor)
    entries, owner = self.entries, self.owner

    def drop(_, key=key):
      entry = entries.pop(key, None)
      jw = owner()
      if entry is not None and jw is not None and jw._plan is entry[1]:
        jw._plan = None

    try:
      self.entries[key] = (weakref.ref(anchor, drop), plan)
    except TypeError:  # not weakly referenceable: keep only as the last plan
      pass

  def __len__(self):
    return len(self.entries)


class JitWrapped:
  """The callable returned by `jit`."""

  def __init__(self, fun: Callable, *, in_shardings: Any = _UNSPECIFIED,
               out_shardings: Any = _UNSPECIFIED, static_argnums=None,
               static_argnames=None, donate_argnums=None, donate_argnames=None,
               donate_state: bool | None = None, max_in_flight: int | None = None,
               graph: bool = True, graph_updates: bool = True, **jit_kwargs: Any):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = graph
    self.graph_updates = graph and graph_updates
    self._trace_fun = fun
    if out_shardings is not _UNSPECIFIED and prefixes.has_state_prefix(out_shardings):
      # Prefixes of graph objects returned: pinned inside the trace instead.
      self._trace_fun = _constrain_outputs(fun, out_shardings)
      out_shardings = _UNSPECIFIED
    self.in_shardings = in_shardings
    self.out_shardings = out_shardings
    self.static_argnames = _names(static_argnames)
    self.donate_argnames = _names(donate_argnames)
    self.donate_state = donate_state
    self.max_in_flight = (None if max_in_flight is None
                          else inflight._parse(max_in_flight, "max_in_flight"))
    self.jit_kwargs = jit_kwargs
    self._static_raw = _as_tuple(static_argnums) + _positions_of(fun, self.static_argnames)
    self._donate_raw = _as_tuple(donate_argnums) + _positions_of(fun, self.donate_argnames)
    self._plan: plan_lib.Plan | None = None      # the last plan used
    self._plans = _PlanMap(self)                   # anchor -> plan
    self._inner: dict = {}                         # layout key -> (jitted, cell)

  # --- method decorator ------------------------------------------------------
  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  # --- call ------------------------------------------------------------------
  def __call__(self, *args, **kwargs):
    plan = self._plan
    positions = None if plan is None else _positions(plan, args, kwargs)
    if positions is None:
      plan, positions = self._find_plan(args, kwargs)
    return self._run(plan, positions)

  def _find_plan(self, args: tuple, kwargs: dict) -> tuple:
    """A cached plan for this anchor if still valid, else a new one."""
    if args and isinstance(args[0], Object):   # the common case (and `self` of a method)
      anchor = args[0]
    else:
      anchor = next((a for a in args if isinstance(a, Object)), None)
    if anchor is not None:
      plan = self._plans.get(anchor)
      if plan is not None:
        positions = _positions(plan, args, kwargs)
        if positions is not None:
          self._plan = plan
          return plan, positions
    plan = self._make_plan(args, kwargs)
    if plan.reusable:
      if anchor is not None:
        self._plans.put(anchor, plan)
      self._plan = plan
    positions = _positions(plan, args, kwargs, fresh=True)
    return plan, positions

  def _run(self, plan: plan_lib.Plan, positions, exe: Any = None):
    if exe is not None:   # a Compiled from `lower`: no donation, static positions dropped
      raw = plan.raw or [None] * len(plan.live)
      vals = [r.get() if v is None else v.raw_value for v, r in zip(plan.live, raw)]
      dyn = [p for p, k in zip(positions, plan.kinds) if k != STATIC]
      new_vals, out = exe((), vals, *dyn)
      return self._finish(plan, new_vals, out, positions)
    if plan.raw is None:
      vals_d = list(map(_RAW_GET, plan.live_d)) if plan.live_d else ()
      vals_k = list(map(_RAW_GET, plan.live_k))
    else:
      vals = [r.get() if v is None else v.raw_value for v, r in zip(plan.live, plan.raw)]
      vals_d = [x for x, m in zip(vals, plan.mask) if m] or ()
      vals_k = [x for x, m in zip(vals, plan.mask) if not m]
    if _MULTI_DEVICE[0] is not False and _multi_device():
      # XLA:CPU crashes (no Python error) when a compiled multi-device program
      # gets a deleted buffer, so deleted inputs are looked for before the call.
      if _any_deleted(vals_d) or _any_deleted(vals_k) or _any_deleted(positions):
        _raise_deleted(None, plan, positions, self.fun)
    try:
      new_vals, out = plan.jitted(vals_d, vals_k, *positions)
    except (ValueError, TypeError) as e:
      _reraise_deleted(e, plan, positions, self.fun)
      _reraise_static(e, self.fun)
      if plan.cell.restructure is None or plan.compile_key[6] is None:
        raise
      # The function changed the structure: the state's out_shardings do not
      # fit the new leaves. Compile the variant that pins them in the trace.
      plan.jitted, plan.cell = self._compiled(*plan.compile_key, free=True)
      new_vals, out = plan.jitted(vals_d, vals_k, *positions)
    except RuntimeError as e:
      _reraise_deleted(e, plan, positions, self.fun)
      raise
    return self._finish(plan, new_vals, out, positions)

  def _finish(self, plan: plan_lib.Plan, new_vals: list, out: Any, positions) -> Any:
    """Writes the new state back and turns output markers into objects."""
    cell = plan.cell
    moved = plan.ex_check and (cell.restructure is not None or cell.has_nodes) and \
        self._check_functional(cell, out, plan)
    if moved:
      plan_lib.write_moved(lift.extract(_roots(plan), is_node=_is_root).all_nodes, new_vals,
                           cell.restructure)
    elif cell.restructure is not None or not plan.reusable:
      ex = plan.ex if not plan.reusable else lift.extract(_roots(plan), is_node=_is_root)
      lift.apply_updates(ex, new_vals, cell.restructure)
      if cell.restructure is not None:
        plan_lib.fill_static_roots(cell.restructure, ex.nodes)
    elif plan.raw is None:
      _consume(map(_RAW_SET, plan.live, new_vals))
    else:
      for v, r, x in zip(plan.live, plan.raw, new_vals):
        if v is None:
          r.set(x)
        else:
          _RAW_SET(v, x)
    if cell.has_refs:
      out = plan_lib.unmark_refs(out, positions)
    if cell.has_nodes:
      if plan.sharded_ctx is not None:
        out = plan_lib.place_new_nodes(out, plan.sharded_ctx)
      out = lift.unmark_outputs(_roots(plan), out)
    limit = self.max_in_flight
    if limit is None:
      limit = _INFLIGHT.limit
    if limit and (_INFLIGHT.active or (_INFLIGHT.active is None and inflight.bounded_backend())):
      _track(out, new_vals, limit)
    return out

  # --- planning ----------------------------------------------------------------
  def _resolve_argnums(self, nargs: int, seq: tuple) -> frozenset:
    return frozenset(i + nargs if i < 0 else i for i in seq)

  def _make_plan(self, args: tuple, kwargs: dict) -> plan_lib.Plan:
    """Classifies the arguments, splits their graphs, derives shardings and donation."""
    nargs = len(args)
    static = self._resolve_argnums(nargs, self._static_raw)
    donate = self._resolve_argnums(nargs, self._donate_raw)
    for i in sorted(static):
      if i < nargs:
        _check_hashable(args[i], f"positional argument {i}", self.fun)
    for k in self.static_argnames:
      if k in kwargs:
        _check_hashable(kwargs[k], f"argument {k!r}", self.fun)
    values, kinds, details, roots = plan_lib.classify(args, kwargs, static,
                                                      self.static_argnames)
    kw_names = tuple(kwargs)
    if not self.graph:
      _check_passed_once(kinds, details, roots)
    ex = lift.extract(roots, aliasing=self.graph, who="jit", is_node=_is_root)
    names = plan_lib.root_names(values, kinds, details, nargs, kw_names)
    plan_lib.check_not_deleted(lift.fun_name(self.fun), ex, values, kinds, names, nargs,
                               kw_names)
    watch(ex.all_nodes)
    watch(ex.static_containers)
    raw, reusable = None, True
    if ex.has_raw:
      raw = [None if v is not None else plan_lib.raw_slot(roots, p, leaf)
             for v, p, leaf in zip(ex.live, ex.paths, ex.leaves)]
      reusable = not any(isinstance(r, plan_lib.FixedValue) for r in raw)
    ctx = context_lib.current_context()
    sharded = (ctx is not None and isinstance(ctx.mesh, Mesh)
               and not plan_lib.is_nested(ex, values, kinds))
    shardings = plan_lib.state_shardings(ex, raw, ctx) if sharded else None
    user_leaf = self._node_in_shardings(ex, kinds, details, nargs, static)
    if user_leaf is not None:
      if shardings is not None:
        raise errors.TransformError(
            f"jit({lift.fun_name(self.fun)}): in_shardings gives a sharding for argument(s) "
            f"{user_leaf[1]}, which hold graph objects, inside a use_sharding context that "
            "already lays out their state from the Variables' logical axes. Use one or "
            "the other: pass None at those positions, or call outside `nnx.use_sharding`.",
            positions=user_leaf[1])
      shardings = user_leaf[0]
    donated = [j for j in range(len(values))
               if (j < nargs and j in donate)
               or (j >= nargs and kw_names[j - nargs] in self.donate_argnames)]
    if self.donate_state or (sharded and self.donate_state is not False):
      donated_roots = set(range(len(roots)))
    else:
      donated_roots = set()
      for j in donated:
        if kinds[j] == NODE:
          donated_roots.add(details[j].index)
        elif kinds[j] == TREE:
          donated_roots.update(x.index for x in details[j][1] if isinstance(x, lift.NodeSlot))
    mask = tuple(p[0] in donated_roots for p in ex.paths)

    layout = []
    for kind, detail in zip(kinds, details):
      if kind == NODE:
        layout.append((NODE, detail.index))
      elif kind == TREE:
        treedef, leaves = detail
        slots = tuple((k, x.index) for k, x in enumerate(leaves)
                      if isinstance(x, lift.NodeSlot))
        plain_idx = tuple(k for k, x in enumerate(leaves) if not isinstance(x, lift.NodeSlot))
        layout.append((TREE, (treedef, slots, plain_idx)))
      else:
        layout.append((kind, None))
    layout = tuple(layout)
    plain_donated = tuple(j + 2 for j in donated if kinds[j] in (PLAIN, TREE))
    compile_key = (ex.graphdef, layout, kw_names, nargs, mask, len(roots), shardings,
                   ctx if sharded else None, plain_donated)
    jitted, cell = self._compiled(*compile_key, free=False)

    plan = plan_lib.Plan()
    plan.ex_check = not self.graph_updates
    plan.ctx = ctx
    plan.nargs = nargs
    plan.kw_names = kw_names
    plan.kinds = tuple(kinds)
    plan.node_checks = tuple((j, plan_lib.ref_to(roots[details[j].index]))
                             for j, k in enumerate(kinds) if k == NODE)
    plan.plain_pos = tuple(j for j, k in enumerate(kinds) if k == PLAIN)
    plan.tree_pos = tuple(
        (j, layout[j][1][0], tuple((k, plan_lib.ref_to(roots[r])) for k, r in layout[j][1][1]),
         layout[j][1][2]) for j, k in enumerate(kinds) if k == TREE)
    plan.roots = tuple(plan_lib.ref_to(r) for r in roots)
    plan.live = ex.live
    plan.raw = raw
    plan.mask = mask
    plan.paths = ex.paths
    plan.live_d = [v for v, m in zip(ex.live, mask) if m]
    plan.live_k = [v for v, m in zip(ex.live, mask) if not m]
    plan.reusable = reusable
    plan.ex = None if reusable else ex   # a reusable plan holds no strong ref to the roots
    node_pos = [j for j, k in enumerate(kinds) if k == NODE]
    plan.prefix = len(node_pos)
    plan.simple = (not kw_names and not plan.tree_pos and node_pos == list(range(len(node_pos))))
    plan.nones = (None,) * len(node_pos)
    plan.jitted, plan.cell = jitted, cell
    plan.compile_key = compile_key
    plan.sharded_ctx = ctx if sharded else None
    plan.root_names = names
    plan.epoch = EPOCH[0]
    return plan

  def _compiled(self, graphdef, layout, kw_names, nargs, mask, n_roots, shardings, ctx,
                plain_donated, *, free: bool) -> tuple:
    """The `jax.jit` of the inner function for one layout (cached).

    Under a sharding context the state's out_shardings are the rules'
    shardings, unless `free`: then the trace pins the state itself (used when
    the function changes the graph's structure, so the new state has other
    leaves than the shardings name).
    """
    key = (graphdef, layout, kw_names, nargs, mask, shardings, ctx, plain_donated, free)
    hit = self._inner.get(key)
    if hit is not None:
      return hit
    cell = plan_lib.Cell()
    inner = plan_lib.make_inner(self._trace_fun, graphdef, layout, kw_names, mask, n_roots,
                                shardings, ctx, cell, constrain_state=free)
    donate_inner = ((0,) if any(mask) else ()) + plain_donated
    jitted = jax.jit(
        inner,
        static_argnums=tuple(j + 2 for j, (k, _) in enumerate(layout) if k == STATIC) or None,
        donate_argnums=donate_inner or None,
        **self._shardings(layout, nargs, mask, shardings, free),
        **self.jit_kwargs)
    self._inner[key] = (jitted, cell)
    return jitted, cell

  def _shardings(self, layout: tuple, nargs: int, mask: tuple, shardings, free: bool) -> dict:
    out: dict = {}
    user_in = self.in_shardings
    if user_in is not _UNSPECIFIED or shardings is not None:
      per_arg = self._per_position(user_in, nargs, [k for k, _ in layout])
      given = [j for j, (kind, _) in enumerate(layout)
               if kind == TREE and per_arg.get(j) is not None]
      if given:
        raise errors.TransformError(
            f"jit({lift.fun_name(self.fun)}): in_shardings gives a sharding for argument(s) "
            f"{given}, which hold graph objects inside containers. Pass each graph "
            "object as its own argument (its in_shardings entry then applies to all "
            "of its state, or use nnx.StateSharding / nnx.prefix per Variable), or "
            "annotate logical axes and call inside `with nnx.use_sharding(mesh, rules)`.",
            positions=given)
      dyn = [None if kind in (NODE, TREE) or j >= nargs else per_arg.get(j)
             for j, (kind, _) in enumerate(layout) if kind != STATIC]
      state_d = state_k = None
      if shardings is not None:
        state_d = [s for s, m in zip(shardings, mask) if m] or ()
        state_k = [s for s, m in zip(shardings, mask) if not m]
      out["in_shardings"] = (state_d, state_k, *dyn)
    if self.out_shardings is not _UNSPECIFIED or (shardings is not None and not free):
      user_out = None if self.out_shardings is _UNSPECIFIED else self.out_shardings
      out["out_shardings"] = (None if shardings is None or free else list(shardings), user_out)
    return out

  def _check_functional(self, cell: plan_lib.Cell, out: Any, plan: plan_lib.Plan) -> bool:
    """graph_updates=False / tree mode: no structure changes, no input returned.

    Returns True when objects or Variables only moved (same GraphDef): their
    values then flow back by identity (the moves themselves are dropped).
    """
    name = lift.fun_name(self.fun)
    moved = plan_lib.only_moved(cell.restructure, plan.compile_key[0])
    if cell.restructure is not None and not moved:
      raise errors.TransformError(
          f"jit({name}) with graph_updates=False changed the structure of its graph "
          f"arguments (added, removed or replaced attributes; state paths now "
          f"{errors.format_paths(map(errors.path_str, cell.restructure.paths))}). Only "
          "Variable values flow back in this mode: update values with "
          "`v[...] = x` / `v.set_value(x)`, or use nnx.jit(..., graph=True, "
          "graph_updates=True).", paths=list(cell.restructure.paths))
    if not self.graph:
      refs = [m for m in jax.tree_util.tree_leaves(out, is_leaf=_is_marker)
              if isinstance(m, lift.InputRef)]
      if refs:
        raise errors.TransformError(
            f"jit({name}) with graph=False returned an input object (argument node "
            f"#{refs[0].index}{'/' + errors.path_str(refs[0].path) if refs[0].path else ''}"
            "): tree mode does not support Variable aliasing (an input returned as "
            "an output). Return its values or a copy (nnx.clone), or use "
            "nnx.jit(..., graph=True).", paths=[refs[0].path])
    return moved

  def _per_position(self, user_in: Any, nargs: int, kinds: Sequence) -> dict:
    """Position -> user in_shardings entry (entries skip static positions, as in jax.jit)."""
    if user_in is _UNSPECIFIED:
      return {}
    dyn = [j for j in range(nargs) if kinds[j] != STATIC]
    if isinstance(user_in, (tuple, list)):
      return dict(zip(dyn, user_in))
    return {j: user_in for j in dyn}

  def _node_in_shardings(self, ex, kinds, details, nargs, static) -> tuple | None:
    """Per state leaf shardings from in_shardings entries at graph-object positions.

    Returns ``(leaf_shardings, positions)`` or None when no such entry is given.

    Raises:
      TransformError: one object gets two different entries ("Inconsistent aliasing").
    """
    per_arg = self._per_position(self.in_shardings, nargs, kinds)
    by_root: dict = {}
    where: dict = {}
    for j, value in per_arg.items():
      if kinds[j] != NODE or value is None:
        continue
      root = details[j].index
      if root in by_root and by_root[root] is not value and by_root[root] != value and \
          not prefixes.equivalent(by_root[root], value, [
              (p[1:], x) for p, x in zip(ex.paths, ex.leaves) if p[0] == root], "jit"):
        raise errors.TransformError(
            f"jit({lift.fun_name(self.fun)}): Inconsistent aliasing: arguments "
            f"{where[root]} and {j} are the same {type(ex.nodes[root]).__name__} but "
            f"in_shardings gives them different shardings ({by_root[root]!r} and "
            f"{value!r}). Give both positions the same entry, or None at one of them.",
            positions=[where[root], j])
      by_root[root] = value
      where.setdefault(root, j)
    if not by_root:
      return None
    who = f"jit({lift.fun_name(self.fun)})"
    leaf = tuple(
        prefixes.leaf_value(by_root[p[0]], p[1:], x, who) if p[0] in by_root else None
        for p, x in zip(ex.paths, ex.leaves))
    return leaf, sorted(where.values())

  # --- introspection -----------------------------------------------------------
  def lower(self, *args, **kwargs):
    """Lowers like `jax.jit(...).lower`, through the same plan as a call.

    Same layout and shardings as the call, but without donation, so that
    ``.compile().memory_analysis()`` reports the new state as outputs (as for
    a `jax.jit` without ``donate_argnums``) rather than as temporaries.
    """
    plan, positions = self._find_plan(args, kwargs)
    key = list(plan.compile_key)
    key[4], key[8] = (False,) * len(plan.mask), ()   # mask, plain_donated
    jitted, _ = self._compiled(*key, free=False)
    raw = plan.raw or [None] * len(plan.live)
    vals = [r.get() if v is None else v.raw_value for v, r in zip(plan.live, raw)]
    return Lowered(self, jitted.lower((), vals, *positions), args, kwargs)


class Lowered:
  """`JitWrapped.lower`'s result: a `jax.stages.Lowered` whose `compile` is callable
  with the original arguments (graph objects included; their updates flow back).

  Other attributes (``as_text``, ``cost_analysis``, ...) are the jax object's.
  """

  def __init__(self, wrapped: JitWrapped, lowered: Any, args: tuple, kwargs: dict):
    self._wrapped, self._lowered = wrapped, lowered

  def compile(self, *a, **k) -> "Compiled":
    return Compiled(self._wrapped, self._lowered.compile(*a, **k))

  def __getattr__(self, name):
    return getattr(self._lowered, name)


class Compiled:
  """A compiled `jit` step called like the function (no donation).

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  >>> f = nnx.jit(lambda m, x: m(x))
  >>> f.lower(m, jnp.ones((1, 2))).compile()(m, jnp.ones((1, 2))).shape
  (1, 2)
  """

  def __init__(self, wrapped: JitWrapped, compiled: Any):
    self._wrapped, self._compiled = wrapped, compiled

  def __call__(self, *args, **kwargs):
    plan, positions = self._wrapped._find_plan(args, kwargs)
    return self._wrapped._run(plan, positions, exe=self._compiled)

  def __getattr__(self, name):
    return getattr(self._compiled, name)


def _positions(plan: plan_lib.Plan, args: tuple, kwargs: dict, fresh: bool = False):
  """The inner function's position arguments if `plan` fits this call, else None."""
  if not fresh:
    if plan.epoch != EPOCH[0] or len(args) != plan.nargs:
      return None
    ctx_items = _CTX_STACK.items
    ctx = ctx_items[-1] if ctx_items else None
    if plan.ctx is not ctx and not _same_context(plan, ctx):
      return None
  if kwargs or plan.kw_names:
    if tuple(kwargs) != plan.kw_names:
      return None
    values = args + tuple(kwargs.values())
  else:
    values = args
  for j, ref in plan.node_checks:
    if values[j] is not ref():
      return None
  for j in plan.plain_pos:
    v = values[j]
    if type(v) not in _LEAF_TYPES and not _plain_ok(v):
      return None
  if plan.simple:
    return plan.nones + args[plan.prefix:] if plan.prefix else args
  trees = {}
  for j, treedef, slots, plain_idx in plan.tree_pos:
    leaves, td = jax.tree_util.tree_flatten(values[j], is_leaf=_is_node)
    if td != treedef:
      return None
    for k, ref in slots:
      if leaves[k] is not ref():
        return None
    plain = tuple(leaves[k] for k in plain_idx)
    if any(isinstance(x, _NODE_TYPES) for x in plain):
      return None
    trees[j] = plain
  kinds = plan.kinds
  return tuple(None if kinds[j] == NODE else trees[j] if kinds[j] == TREE else v
               for j, v in enumerate(values))


def _plain_ok(value: Any) -> bool:
  """A plain (non-leaf-type) argument holds no graph node and no deleted array.

  Failing sends the call to planning, which lifts the nodes or raises
  DonatedArrayError for the deleted array.
  """
  if isinstance(value, jax.Array):
    _LEAF_TYPES.add(type(value))
    return True
  leaves = jax.tree_util.tree_leaves(value, is_leaf=_is_node)
  if any(isinstance(x, _NODE_TYPES) for x in leaves):
    return False
  return not (_MULTI_DEVICE[0] and any(map(plan_lib.is_deleted, leaves)))


def _positions_of(fun: Callable, names: tuple) -> tuple:
  """Positions of the parameters `names` that can be passed positionally (as jax.jit)."""
  if not names:
    return ()
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):
    return ()
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return tuple(i for i, p in enumerate(params) if p.name in names and p.kind in kinds)


def _check_passed_once(kinds: list, details: list, roots: list) -> None:
  """Tree mode: an object at two argument positions is aliasing (jit dedups them)."""
  seen: dict = {}
  for j, (kind, detail) in enumerate(zip(kinds, details)):
    slots = [detail] if kind == NODE else (
        [x for x in detail[1] if isinstance(x, lift.NodeSlot)] if kind == TREE else [])
    for slot in slots:
      if slot.index in seen:
        lift.raise_alias("jit", f"argument {seen[slot.index]}", f"argument {j}",
                         roots[slot.index])
      seen[slot.index] = j


def _is_marker(x: Any) -> bool:
  return isinstance(x, (lift.InputRef, lift.NodeOut))


def _constrain_outputs(fun: Callable, out_prefix: Any) -> Callable:
  """`fun` with its outputs pinned to a prefix holding `State` / `StateSharding` entries."""

  def pin(value, sharding, path=()):
    if sharding is None:
      return value
    if isinstance(value, Variable):
      value.raw_value = jax.lax.with_sharding_constraint(value.raw_value, sharding)
      return value
    return jax.lax.with_sharding_constraint(value, sharding)

  def apply(spec, value):
    if spec is None:
      return value
    if isinstance(spec, (State, prefixes.StateSharding)) or \
        graph.is_graph_node(value):
      _, w = graph.flatten(value)
      for (path, leaf), var in zip(w.pairs, w.variables):
        if var is not None:
          pin(var, prefixes.leaf_value(spec, path, leaf, f"jit({lift.fun_name(fun)})"))
      return value
    return jax.tree_util.tree_map(pin, value, spec)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    out = fun(*args, **kwargs)
    return jax.tree_util.tree_map(
        apply, out_prefix, out,
        is_leaf=lambda x: x is None or isinstance(x, (State, prefixes.StateSharding))
        or not isinstance(x, (tuple, list, dict)))

  return wrapped


def _is_node(x: Any) -> bool:
  return isinstance(x, _NODE_TYPES)


def _roots(plan: plan_lib.Plan) -> tuple:
  return tuple(r() for r in plan.roots)


def _track(out: Any, new_vals: list, limit: int) -> None:
  """Hands one output array of this execution to the in-flight bound."""
  sample = out if isinstance(out, jax.Array) else None
  if sample is None:
    # Graph objects are pytrees too, possibly cyclic: never flatten into them.
    leaves = [x for x in jax.tree_util.tree_leaves(out, is_leaf=_is_node)
              if isinstance(x, jax.Array)]
    sample = leaves[0] if leaves else (new_vals[0] if new_vals else None)
  if isinstance(sample, jax.Array) and not isinstance(sample, jax.core.Tracer):
    inflight.track(sample, limit)


def _same_context(plan: plan_lib.Plan, ctx) -> bool:
  """A new `use_sharding` block with an equal mesh and rules keeps the plan."""
  if plan.ctx is None or ctx is None or plan.ctx != ctx:  # ShardingContext: value equality
    return False
  plan.ctx = ctx
  return True


def _check_hashable(value, what: str, fun) -> None:
  try:
    hash(value)
  except TypeError:
    raise errors.TransformError(
        f"jit({lift.fun_name(fun)}): static {what} is a {type(value).__name__}, which is "
        "not hashable, so it cannot key the compilation cache. Pass a hashable "
        "value (e.g. a tuple instead of a list, a frozen dataclass) or make the "
        "argument non-static.") from None


def _reraise_static(e: Exception, fun) -> None:
  if "hashable" in str(e).lower() and "static" in str(e).lower():
    raise errors.TransformError(
        f"jit({lift.fun_name(fun)}): a static argument is not hashable ({e}). Pass a "
        "hashable value (a tuple instead of a list, ...) or make it non-static."
    ) from e


_MULTI_DEVICE = [None]   # whether this process sees more than one device (set lazily)
_ARRAY_IS_DELETED = [None]   # the concrete jax.Array class's is_deleted (set lazily)


def _multi_device() -> bool:
  multi = _MULTI_DEVICE[0]
  if multi is None:
    _ARRAY_IS_DELETED[0] = type(jax.numpy.zeros(())).is_deleted
    multi = _MULTI_DEVICE[0] = jax.device_count() > 1
  return multi


def _any_deleted(values) -> bool:
  """Whether any value (a TREE position's plain leaves included) is a deleted array."""
  try:
    return any(map(_ARRAY_IS_DELETED[0], values))  # all plain jax arrays: one C loop
  except TypeError:  # other leaves (keys, None for node positions, scalars)
    pass
  for x in values:
    if type(x) is tuple:
      if _any_deleted(x):
        return True
    elif plan_lib.is_deleted(x):
      return True
  return False


def _reraise_deleted(e: Exception, plan: plan_lib.Plan, positions, fun) -> None:
  """Explains JAX's "Array has been deleted" in terms of nnx.jit's donation."""
  if "has been deleted" not in str(e) and "deleted or donated" not in str(e):
    return
  _raise_deleted(e, plan, positions, fun)


def _raise_deleted(e: Exception | None, plan: plan_lib.Plan, positions, fun) -> None:
  """Raises DonatedArrayError naming the Variables and arguments that hold deleted arrays."""
  raw = plan.raw or [None] * len(plan.live)
  labels = [plan_lib.leaf_label(p, plan.root_names)
            for v, r, p in zip(plan.live, raw, plan.paths)
            if plan_lib.is_deleted(r.get() if v is None else v.raw_value)]
  args = [plan_lib.arg_name(j, plan.nargs, plan.kw_names) for j, value in enumerate(positions)
          if any(map(plan_lib.is_deleted, jax.tree_util.tree_leaves(value)))]
  raise plan_lib.deleted_error(lift.fun_name(fun), labels, args, e)


def jit(fun: Callable | None = None, *, in_shardings: Any = _UNSPECIFIED,
        out_shardings: Any = _UNSPECIFIED, static_argnums=None, static_argnames=None,
        donate_argnums=None, donate_argnames=None, donate_state: bool | None = None,
        max_in_flight: int | None = None, graph: bool | None = None,
        graph_updates: bool | None = None, **jit_kwargs: Any):
  """Compiles `fun`; graph objects anywhere in its arguments are lifted (module doc).

  Works as ``@jit``, ``@jit(static_argnums=...)`` and on methods (a plan is
  kept per instance).

  Args:
    fun: the function to compile.
    in_shardings / out_shardings: as `jax.jit`; positions holding graph
      objects take their shardings from metadata (see the SPMD guide).
    static_argnums / static_argnames: hashable arguments baked into the trace.
    donate_argnums / donate_argnames: donate these arguments' buffers; for a
      graph object this donates its state (the object gets the new buffers).
    donate_state: donate the state of every graph-object argument. Default:
      on inside a `use_sharding` context (a step must not hold two copies of
      sharded state), off otherwise; pass False to opt out.
    max_in_flight: on the CPU backend with more than one device, the most
      executions pending before a call waits for the oldest (default: the
      global bound, see `set_max_in_flight`); 0 for no bound.
    graph: graph mode (True: shared references and structure changes are
      supported) or tree mode (False: an object or Variable reachable twice,
      or an input returned, is an error). None: `set_graph_mode`'s setting.
    graph_updates: in graph mode, whether structure changes made inside
      (new attributes, swapped sub-modules) are written back (True) or are an
      error (False: only Variable values flow back). None: the setting.
    **jit_kwargs: passed to `jax.jit` (e.g. ``keep_unused``, ``compiler_options``).

  Raises:
    TransformError: `fun` is a bound method; a prefix is invalid for the mode;
      a static argument is not hashable; in_shardings gives a sharding to a
      container of graph objects, or two shardings to one object; the function
      broke the mode's rules (see `graph`, `graph_updates`).
    DonatedArrayError: an input array was deleted by an earlier donating step.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  kw = dict(in_shardings=in_shardings, out_shardings=out_shardings,
            static_argnums=static_argnums, static_argnames=static_argnames,
            donate_argnums=donate_argnums, donate_argnames=donate_argnames,
            donate_state=donate_state, max_in_flight=max_in_flight, graph=graph,
            graph_updates=graph_updates, **jit_kwargs)
  for value, name in ((in_shardings, "in_shardings"), (out_shardings, "out_shardings")):
    if value is not _UNSPECIFIED:
      guards.check_prefix(value, name, "jit", graph, graph_updates)
  if fun is None:
    return lambda f: _make(f, kw)
  return _make(fun, kw)


def _make(fun: Callable, kw: dict) -> JitWrapped:
  guards.check_unbound(fun, "jit")
  return JitWrapped(fun, **kw)
