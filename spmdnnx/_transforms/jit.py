"""`jit` over graph objects, at the cost of a plain `jax.jit` call.

Modules, Optimizers, Rngs (any graph node) may be passed in any argument;
their state goes in, every mutation made inside comes back out.

How it stays cheap: the first call walks the arguments' graphs once and keeps
a *plan*: the GraphDef, the live Variables in walk order, and a `jax.jit` of
an inner function specialised to that GraphDef. The graph's objects are then
*watched*: any structural change to them (attribute set/deleted, list or dict
mutated, Variable metadata changed) bumps a global epoch. A later call with
the same objects and an unchanged epoch skips the walk: it reads the
Variables' values into a list, calls the compiled function, and writes the
new values back. Anything else (other objects, changed structure, nodes
nested inside containers) takes the general path, which re-walks the graph.

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
import weakref
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._object import Dict, List, Object
from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _resolve as resolve_lib
from spmdnnx._transforms import lift
from spmdnnx._variables import EPOCH, Variable, watch_variable

_RAW_SET = Variable.raw_value.__set__
_RAW_GET = Variable.raw_value.__get__
_consume = collections.deque(maxlen=0).extend
_NODE_TYPES = (Object, Variable)
_UNSPECIFIED = object()
_CTX_STACK = context_lib._STACK


def _as_tuple(x: int | Sequence[int] | None) -> tuple:
  if x is None:
    return ()
  if isinstance(x, int):
    return (x,)
  return tuple(x)


def watch(nodes: list) -> None:
  """Marks nodes so that structural changes to them bump the epoch."""
  for node in nodes:
    if isinstance(node, Variable):
      watch_variable(node)
    elif isinstance(node, Object):
      object.__setattr__(node, "_object__watched", True)
    elif isinstance(node, (List, Dict)):
      node._object__watched = True


class _Plan:
  """A cached traversal for one set of argument objects (see module doc)."""

  __slots__ = ("epoch", "ctx", "nargs", "node_pos", "node_refs", "other_pos", "live",
               "live_d", "live_k", "jitted", "cell", "prefix", "nones", "ex")


class _Cell:
  """Trace-time facts about the inner function (set while tracing)."""
  __slots__ = ("has_nodes", "restructure")

  def __init__(self):
    self.has_nodes = False
    self.restructure = None


class JitWrapped:
  """The callable returned by `jit`."""

  def __init__(self, fun: Callable, *, in_shardings: Any = _UNSPECIFIED,
               out_shardings: Any = _UNSPECIFIED, static_argnums=None,
               static_argnames=None, donate_argnums=None, donate_argnames=None,
               **jit_kwargs: Any):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.in_shardings = in_shardings
    self.out_shardings = out_shardings
    self.static_argnames = tuple(
        (static_argnames,) if isinstance(static_argnames, str) else static_argnames or ())
    self.donate_argnames = tuple(
        (donate_argnames,) if isinstance(donate_argnames, str) else donate_argnames or ())
    self.donate_state = jit_kwargs.pop("donate_state", None)
    self.jit_kwargs = jit_kwargs
    self._static_raw = _as_tuple(static_argnums)
    self._donate_raw = _as_tuple(donate_argnums)
    self._plan: _Plan | None = None
    self._inner: dict = {}

  # --- method decorator ------------------------------------------------------
  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  # --- call ------------------------------------------------------------------
  def __call__(self, *args, **kwargs):
    plan = self._plan
    ctx_items = _CTX_STACK.items
    ctx = ctx_items[-1] if ctx_items else None
    if (plan is not None and plan.epoch == EPOCH[0] and len(args) == plan.nargs
        and (plan.ctx is ctx or _same_context(plan, ctx))):
      for i, ref in plan.node_refs:
        if args[i] is not ref():
          break
      else:
        for i in plan.other_pos:
          if isinstance(args[i], _NODE_TYPES):
            break
        else:
          if not kwargs or not any(isinstance(v, _NODE_TYPES) for v in kwargs.values()):
            return self._fast_call(plan, args, kwargs)
    return self._slow_call(args, kwargs)

  def _fast_call(self, plan: _Plan, args: tuple, kwargs: dict):
    vals_d = list(map(_RAW_GET, plan.live_d)) if plan.live_d else ()
    vals_k = list(map(_RAW_GET, plan.live_k))
    if plan.prefix >= 0:  # graph nodes are the first `prefix` arguments
      call_args = plan.nones + args[plan.prefix:]
    else:
      node_pos = plan.node_pos
      call_args = [None if i in node_pos else a for i, a in enumerate(args)]
    try:
      new_vals, out = plan.jitted(vals_d, vals_k, *call_args, **kwargs)
    except (ValueError, TypeError) as e:
      _reraise_static(e, self.fun)
      raise
    cell = plan.cell
    if cell.restructure is None:
      _consume(map(_RAW_SET, plan.live, new_vals))
    else:
      lift.apply_updates(plan.ex, new_vals, cell.restructure)
    if cell.has_nodes:
      out = lift.unmark_outputs(plan.ex.nodes, out)
    return out

  def _resolve(self, nargs: int, seq: tuple) -> frozenset:
    return frozenset(i + nargs if i < 0 else i for i in seq)

  def _slow_call(self, args: tuple, kwargs: dict):
    nargs = len(args)
    static = self._resolve(nargs, self._static_raw)
    donate = self._resolve(nargs, self._donate_raw)
    for i in static:
      if i < nargs:
        _check_hashable(args[i], f"positional argument {i}", self.fun)
    for k in self.static_argnames:
      if k in kwargs:
        _check_hashable(kwargs[k], f"argument {k!r}", self.fun)
    node_pos = tuple(i for i, a in enumerate(args)
                     if i not in static and isinstance(a, _NODE_TYPES))
    other_pos = tuple(i for i in range(nargs) if i not in static and i not in node_pos)
    dyn_kwargs = [v for k, v in kwargs.items() if k not in self.static_argnames]
    if (any(_has_nested_nodes(args[i]) for i in other_pos)
        or any(_has_nested_nodes(v) for v in dyn_kwargs)):
      return self._general_call(args, kwargs, static)
    ex = lift.extract(tuple(args[i] for i in node_pos))
    if ex.has_raw:
      return self._general_call(args, kwargs, static)
    watch(ex.all_nodes)
    watch(ex.static_containers)
    ctx = context_lib.current_context()
    shardings = self._state_shardings(ex, ctx)
    owner = [p[0] for p in ex.paths]
    donated_nodes = {j for j, i in enumerate(node_pos) if i in donate}
    if shardings is not None and self.donate_state is not False:
      donated_nodes = set(range(len(node_pos)))
    elif self.donate_state:
      donated_nodes = set(range(len(node_pos)))
    mask = tuple(o in donated_nodes for o in owner)
    plan = _Plan()
    plan.ctx = ctx
    plan.ex = ex
    plan.nargs = nargs
    plan.node_pos = frozenset(node_pos)
    plan.node_refs = tuple((i, weakref.ref(args[i])) for i in node_pos)
    plan.other_pos = other_pos
    plan.live = ex.live
    plan.live_d = [v for v, m in zip(ex.live, mask) if m]
    plan.live_k = [v for v, m in zip(ex.live, mask) if not m]
    plan.prefix = len(node_pos) if node_pos == tuple(range(len(node_pos))) else -1
    plan.nones = (None,) * len(node_pos)
    plan.jitted, plan.cell = self._inner_for(ex.graphdef, nargs, node_pos, mask,
                                             static, donate, shardings,
                                             tuple(ex.arg_leaves))
    plan.epoch = EPOCH[0]
    self._plan = plan
    return self._fast_call(plan, args, kwargs)

  def _state_shardings(self, ex: lift.Extraction, ctx) -> tuple | None:
    """NamedShardings of the state from metadata + rules + mesh, if a context is active.

    Values not yet in their sharding are moved there (once, when the plan is
    built), so state stays sharded across steps.
    """
    if ctx is None or not isinstance(ctx.mesh, Mesh):
      return None
    if any(isinstance(lift._raw(v), jax.core.Tracer) for v in ex.leaves):
      return None  # inside another transform: shardings are the outer jit's job
    paths = [p[1:] for p in ex.paths]
    shardings = tuple(resolve_lib.leaf_shardings(paths, ex.leaves, ctx.mesh, ctx.rules))
    for var, sharding in zip(ex.live, shardings):
      value = var.raw_value
      if getattr(value, "sharding", None) != sharding:
        _RAW_SET(var, jax.device_put(value, sharding))
    return shardings

  def _inner_for(self, graphdef, nargs, node_pos, mask, static, donate, shardings=None,
                 slots=None):
    # `slots`: for each node position, a NodeSlot into the unique nodes (the
    # same object passed twice is one node).
    slots = slots if slots is not None else tuple(lift.NodeSlot(j) for j in range(len(node_pos)))
    key = (graphdef, nargs, node_pos, mask, static, donate, shardings, slots)
    hit = self._inner.get(key)
    if hit is not None:
      return hit
    cell = _Cell()
    fun = self.fun
    node_pos_l = list(node_pos)
    name = f"jit({lift.fun_name(fun)})"

    def inner(vals_d, vals_k, *args, **kwargs):
      it_d, it_k = iter(vals_d), iter(vals_k)
      vals = [next(it_d) if m else next(it_k) for m in mask]

      def call(nodes_t):
        full = list(args)
        for j, i in enumerate(node_pos_l):
          full[i] = nodes_t[j]
        return fun(*full, **kwargs)

      new_leaves, restructure, out, has_nodes = lift.run_inside(
          graphdef, _TUPLE_TREEDEF[len(node_pos_l)], vals, list(slots), call, name)
      cell.has_nodes = cell.has_nodes or has_nodes
      cell.restructure = restructure
      return [lift._raw(x) for x in new_leaves], out

    donate_inner = tuple(i + 2 for i in donate if i not in node_pos)
    if any(mask):
      donate_inner = (0,) + donate_inner
    jitted = jax.jit(
        inner,
        static_argnums=tuple(i + 2 for i in static),
        static_argnames=self.static_argnames or None,
        donate_argnums=donate_inner or None,
        donate_argnames=self.donate_argnames or None,
        **self._shardings(nargs, node_pos, static, mask, shardings),
        **self.jit_kwargs)
    self._inner[key] = (jitted, cell)
    return jitted, cell

  def _shardings(self, nargs, node_pos, static, mask, shardings) -> dict:
    out: dict = {}
    dyn_pos = [i for i in range(nargs) if i not in static]
    user_in = self.in_shardings
    if user_in is _UNSPECIFIED and shardings is None:
      pass
    else:
      if isinstance(user_in, (tuple, list)):
        per_arg = {i: s for i, s in enumerate(user_in)}
      elif user_in is _UNSPECIFIED:
        per_arg = {}
      else:
        per_arg = {i: user_in for i in range(nargs)}
      # Graph-node positions get their shardings from the state (or none).
      given = [i for i in node_pos if isinstance(user_in, (tuple, list))
               and per_arg.get(i) is not None]
      if given:
        raise errors.TransformError(
            f"jit({lift.fun_name(self.fun)}): in_shardings gives a sharding for argument(s) "
            f"{given}, which hold graph objects. Their state is sharded from the "
            "Variables' logical axes: annotate them and call inside "
            "`with nnx.use_sharding(mesh, rules)`, and pass None at those positions.")
      dyn = [None if i in node_pos else per_arg.get(i) for i in dyn_pos]
      state_d = state_k = None
      if shardings is not None:
        state_d = [s for s, m in zip(shardings, mask) if m] or ()
        state_k = [s for s, m in zip(shardings, mask) if not m]
      out["in_shardings"] = (state_d, state_k, *dyn)
    if self.out_shardings is not _UNSPECIFIED or shardings is not None:
      user_out = None if self.out_shardings is _UNSPECIFIED else self.out_shardings
      out["out_shardings"] = (None if shardings is None else list(shardings), user_out)
    return out

  def _general_call(self, args: tuple, kwargs: dict, static: frozenset):
    """Graph nodes nested in containers, in kwargs, or raw arrays: re-walk every call."""
    dyn_idx = [i for i in range(len(args)) if i not in static]
    dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
    ex = lift.extract(([args[i] for i in dyn_idx], dyn_kwargs))
    slots = tuple(i for i, x in enumerate(ex.arg_leaves) if isinstance(x, lift.NodeSlot))
    key = ("general", ex.graphdef, ex.treedef, slots,
           tuple(ex.arg_leaves[i] for i in slots), tuple(dyn_idx), static)
    hit = self._inner.get(key)
    if hit is None:
      cell = _Cell()
      fun, graphdef, treedef = self.fun, ex.graphdef, ex.treedef
      arg_slots = [ex.arg_leaves[i] for i in slots]
      nargs = len(args)
      name = f"jit({lift.fun_name(fun)})"

      def inner(vals, arg_leaves, static_args, static_kw):
        arg_leaves = list(arg_leaves)
        for i, s in zip(slots, arg_slots):
          arg_leaves[i] = s

        def call(rebuilt_args):
          dyn_args, dkw = rebuilt_args
          full, it = [], iter(dyn_args)
          for i in range(nargs):
            full.append(static_args[i] if i in static else next(it))
          return fun(*full, **dkw, **dict(static_kw))

        new_leaves, restructure, out, has_nodes = lift.run_inside(
            graphdef, treedef, vals, arg_leaves, call, name)
        cell.has_nodes = cell.has_nodes or has_nodes
        cell.restructure = restructure
        return [lift._raw(x) for x in new_leaves], out

      hit = (jax.jit(inner, static_argnums=(2, 3), **self.jit_kwargs), cell)
      self._inner[key] = hit
    jitted, cell = hit
    leaves = [None if isinstance(x, lift.NodeSlot) else x for x in ex.arg_leaves]
    static_args = _StaticArgs({i: args[i] for i in static if i < len(args)})
    static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames))
    new_vals, out = jitted([lift._raw(x) for x in ex.leaves], leaves, static_args, static_kw)
    lift.apply_updates(ex, new_vals, cell.restructure)
    if cell.has_nodes:
      out = lift.unmark_outputs(ex.nodes, out)
    return out

  # --- introspection -----------------------------------------------------------
  def lower(self, *args, **kwargs):
    """Lowers like `jax.jit(...).lower` (graph nodes allowed as positional args)."""
    nargs = len(args)
    static = self._resolve(nargs, self._static_raw)
    node_pos = tuple(i for i, a in enumerate(args)
                     if i not in static and isinstance(a, _NODE_TYPES))
    ex = lift.extract(tuple(args[i] for i in node_pos))
    mask = tuple(False for _ in ex.leaves)
    jitted, _ = self._inner_for(ex.graphdef, nargs, node_pos, mask, static, frozenset(),
                                None, tuple(ex.arg_leaves))
    call_args = [None if i in node_pos else a for i, a in enumerate(args)]
    return jitted.lower((), [lift._raw(v) for v in ex.leaves], *call_args, **kwargs)


class _TupleTreedefs(dict):
  """treedef of a flat tuple of n leaves, cached by n."""

  def __missing__(self, n):
    treedef = jax.tree_util.tree_structure(tuple(range(n)))
    self[n] = treedef
    return treedef


_TUPLE_TREEDEF = _TupleTreedefs()


class _StaticArgs:
  """Hashable holder of static positional arguments (by position)."""
  __slots__ = ("items",)

  def __init__(self, items: dict):
    self.items = tuple(sorted(items.items()))

  def __getitem__(self, i):
    return dict(self.items)[i]

  def __hash__(self):
    return hash(self.items)

  def __eq__(self, other):
    return isinstance(other, _StaticArgs) and other.items == self.items


def _same_context(plan: _Plan, ctx) -> bool:
  """A new `use_sharding` block with an equal mesh and rules keeps the plan."""
  if plan.ctx is None or ctx is None or plan.ctx != ctx:  # ShardingContext: value equality
    return False
  plan.ctx = ctx
  return True


def _has_nested_nodes(x: Any) -> bool:
  if isinstance(x, (jax.Array, int, float, bool, str, type(None))):
    return False
  leaves = jax.tree_util.tree_leaves(x, is_leaf=graph.is_graph_node)
  return any(isinstance(v, _NODE_TYPES) for v in leaves)


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


def jit(fun: Callable | None = None, *, in_shardings: Any = _UNSPECIFIED,
        out_shardings: Any = _UNSPECIFIED, static_argnums=None, static_argnames=None,
        donate_argnums=None, donate_argnames=None, **jit_kwargs: Any):
  """Compiles `fun`; graph objects in its arguments are lifted (see module doc).

  Works as ``@jit``, ``@jit(static_argnums=...)`` and on methods.

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
    **jit_kwargs: passed to `jax.jit` (e.g. ``keep_unused``, ``compiler_options``).
  """
  kw = dict(in_shardings=in_shardings, out_shardings=out_shardings,
            static_argnums=static_argnums, static_argnames=static_argnames,
            donate_argnums=donate_argnums, donate_argnames=donate_argnames, **jit_kwargs)
  if fun is None:
    return lambda f: JitWrapped(f, **kw)
  return JitWrapped(fun, **kw)
