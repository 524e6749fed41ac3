"""Pipeline parallelism for a `Stack` over the ``stage`` mesh axis.

A `Stack` given a `PipelineConfig` runs its layers as a pipeline when it is
called inside ``use_sharding`` on a mesh whose ``stage`` axis has more than
one device (elsewhere it scans as usual: same result). The ``L`` layers form
``S * R`` chunks of ``K = L / (S * R)`` consecutive layers (``S`` stages,
``R`` repeats); chunk ``c`` runs on stage ``c % S``, so with ``R = 1`` stage
``s`` holds layers ``[s*K, (s+1)*K)`` and with ``R > 1`` the chunks go round
the stages ``R`` times (circular pipeline). The batch is split into ``M``
microbatches (microbatch ``m`` holds rows ``m, m + M, m + 2M, ...``, as in the
train step's gradient accumulation).

Formulation (see docs/pipeline.md): one `lax.scan` over ``R*M + S - 1``
iterations. The state ``[S, microbatch, ...]`` holds each stage's input; each
iteration applies every stage to its row at once (`jax.vmap` over the stage
dimension with ``spmd_axis_name="stage"``, so row ``s`` lives and computes on
stage ``s``), then shifts the rows by one stage (`jnp.roll`, which XLA
compiles to a collective permute). Stage 0 takes the next fresh microbatch or,
with repeats, the last stage's output of the previous round. Weights are
indexed per stage and never gathered across stages; the backward pass is
autodiff of the same scan. Iteration ``t`` gives stage ``s`` the work item
``i = t - s`` (microbatch ``i % M`` of round ``i // M``); items outside
``[0, R*M)`` are the bubble, whose state updates are discarded. The bubble is
``(S - 1) / (R*M + S - 1)`` of the step (`bubble_fraction`).

The stored layout does not change: every Variable keeps its ``[L, ...]``
stacked axis (``layers -> stage`` in the rules places layers ``[s*L/S,
(s+1)*L/S)`` on stage ``s``), so checkpoints move freely between pipelined
and non-pipelined models. With ``R > 1`` each step first moves every chunk to
its circular stage with collective permutes (one send of each device's own
share; the gradients go back the same way).

>>> bubble_fraction(stages=4, microbatches=8)
0.2727...
>>> stage_layers(8, stages=4, repeats=2)
((0, 4), (1, 5), (2, 6), (3, 7))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._stacked import remove_axis_name
from spmdnnx._state import State
from spmdnnx._variables import Param
from spmdnnx.spmd import _context as context_lib

#: The mesh axis whose devices are the pipeline stages.
STAGE_AXIS = "stage"


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How a `Stack` runs as a pipeline over the ``stage`` mesh axis.

  Args:
    microbatches: pieces the batch is split into (``>= stages``; more means
      a smaller bubble).
    repeats: rounds the layer chunks make over the stages (circular
      pipeline; ``num_layers`` must divide by ``stages * repeats``).
    batch_kwargs: names of keyword arguments of the stack's call that are
      per-example arrays (leading batch axis) and must be split into
      microbatches with the carry, e.g. ``("positions",)``. Other keyword
      arguments go unchanged to every layer and microbatch.

  Raises:
    ConfigError: for a non-positive count or names that are not strings.

  >>> PipelineConfig(microbatches=8, repeats=2).repeats
  2
  """

  microbatches: int
  repeats: int = 1
  batch_kwargs: tuple[str, ...] = ()

  def __post_init__(self):
    bad = [f"{n}={getattr(self, n)!r}" for n in ("microbatches", "repeats")
           if not _is_int(getattr(self, n)) or getattr(self, n) < 1]
    names = self.batch_kwargs
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) and n for n in names):
      bad.append(f"batch_kwargs={self.batch_kwargs!r} (keyword names)")
    if bad:
      raise errors.ConfigError(
          f"PipelineConfig: {', '.join(bad)}; microbatches and repeats must be "
          "integers >= 1 and batch_kwargs a tuple of keyword names.", keys=bad)
    object.__setattr__(self, "microbatches", int(self.microbatches))
    object.__setattr__(self, "repeats", int(self.repeats))
    object.__setattr__(self, "batch_kwargs", names)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle share of a pipelined step: ``(S - 1) / (R*M + S - 1)``.

  >>> bubble_fraction(4, 4), bubble_fraction(1, 8)
  (0.42857142857142855, 0.0)
  """
  return (stages - 1) / (repeats * microbatches + stages - 1)


def stage_layers(num_layers: int, stages: int, repeats: int = 1) -> tuple:
  """The layer indices each stage runs, in order (``stages`` tuples).

  Raises:
    ConfigError: if ``num_layers`` does not divide by ``stages * repeats``.

  >>> stage_layers(4, stages=2)
  ((0, 1), (2, 3))
  """
  problem = layout_problem(num_layers, stages, repeats)
  if problem:
    raise errors.ConfigError(f"pipeline: {problem}.", axes={"stage": stages})
  k = num_layers // (stages * repeats)
  return tuple(tuple(l for r in range(repeats) for l in range((r * stages + s) * k,
                                                               (r * stages + s + 1) * k))
               for s in range(stages))


def layout_problem(num_layers: int, stages: int, repeats: int, *,
                   names: tuple[str, str] = ("num_layers", "repeats")) -> str | None:
  """Why ``num_layers`` cannot be split into ``stages * repeats`` chunks (or None).

  ``names``: how the layer count and repeats are called in the message.
  """
  if num_layers % (stages * repeats):
    return (f"{names[0]}={num_layers} is not divisible by stages={stages} x "
            f"{names[1]}={repeats} = {stages * repeats}; use a layer count that is a "
            f"multiple of {stages * repeats} or change the stage degree or repeats")
  return None


def schedule_problem(stages: int, microbatches: int, *,
                     name: str = "microbatches") -> str | None:
  """Why ``microbatches`` cannot fill ``stages`` (or None)."""
  if microbatches < stages:
    return (f"{name}={microbatches} is fewer than stages={stages}; a pipeline "
            f"needs at least one microbatch per stage (use {name} >= {stages})")
  return None


def pipeline_stages(mesh: Any = None) -> int:
  """Stages a pipelined Stack uses now: the ``stage`` size of the ambient Mesh.

  1 outside ``use_sharding``, with an abstract mesh, or without a ``stage``
  axis; then a pipelined Stack runs as an ordinary scan.
  """
  if mesh is None:
    ctx = context_lib.current_context()
    mesh = None if ctx is None else ctx.mesh
  if not isinstance(mesh, Mesh) or STAGE_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[STAGE_AXIS])


# --- layouts -----------------------------------------------------------------------


def _constrain_stage(x: Any, mesh: Mesh) -> Any:
  """Pins dimension 0 of every leaf to the stage axis (other dims: XLA's choice)."""
  def one(a):
    spec = PartitionSpec(STAGE_AXIS, *([PartitionSpec.UNCONSTRAINED] * (a.ndim - 1)))
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))
  return jax.tree.map(one, x)


def _is_key(a: Any) -> bool:
  return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _circular_moves(stages: int, repeats: int) -> list:
  """(round r, source slot j, [(source stage, target stage), ...]) of the relayout.

  In storage order stage ``d`` holds chunks ``d*R + j`` (``j < R``); the
  circular pipeline wants chunk ``c`` on stage ``c % S`` in round ``c // S``.
  Each (r, j) pair is one partial permutation of the stages.
  """
  moves = []
  for r in range(repeats):
    for j in range(repeats):
      pairs = []
      for s in range(stages):
        d, jj = divmod(r * stages + s, repeats)
        if jj == j:
          pairs.append((d, s))
      if pairs:
        moves.append((r, j, pairs))
  return moves


def _relayout(a: jax.Array, stages: int, repeats: int, mesh: Mesh, inverse: bool) -> jax.Array:
  """``[L, ...]`` (storage order) <-> ``[S, R, K, ...]`` (stage s, round r, layer k).

  With one repeat this is a reshape that keeps every layer on its device.
  With more, chunks move between stages by collective permutes inside a
  `shard_map` over the stage axis (the other mesh axes stay automatic).
  """
  if _is_key(a):
    impl = jax.random.key_impl(a)
    out = _relayout(jax.random.key_data(a), stages, repeats, mesh, inverse)
    return jax.random.wrap_key_data(out, impl=impl)
  if not inverse:
    n = a.shape[0]
    k = n // (stages * repeats)
    a = a.reshape((stages, repeats, k) + a.shape[1:])
  if repeats > 1:
    moves = _circular_moves(stages, repeats)
    if inverse:
      moves = [(j, r, [(s, d) for d, s in pairs]) for r, j, pairs in moves]

    def body(block):
      mine = block[0]
      out = [jnp.zeros_like(mine[0]) for _ in range(repeats)]
      for r, j, pairs in moves:
        out[r] = out[r] + jax.lax.ppermute(mine[j], STAGE_AXIS, pairs)
      return jnp.stack(out)[None]

    a = jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(STAGE_AXIS),
                      out_specs=PartitionSpec(STAGE_AXIS), axis_names={STAGE_AXIS})(a)
  if inverse:
    return a.reshape((-1,) + a.shape[3:])
  return _constrain_stage(a, mesh)


def _split_batch(x: jax.Array, m: int) -> jax.Array:
  """``[B, ...] -> [M, B/M, ...]``; microbatch ``i`` holds rows ``i, i+M, ...``."""
  return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)


def _join_batch(x: jax.Array) -> jax.Array:
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _where(pred: Any, a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: jax.lax.select(jnp.broadcast_to(pred, x.shape), x, y)
                      if not _is_key(x) else jax.random.wrap_key_data(
                          jnp.where(pred, jax.random.key_data(x), jax.random.key_data(y)),
                          impl=jax.random.key_impl(x)), a, b)


# --- checks ------------------------------------------------------------------------


def check_call(num_layers: int, stages: int, config: PipelineConfig, carry: Any,
               broadcast: dict) -> int:
  """Validates a pipelined call; returns the batch size.

  Raises:
    ConfigError: layers not divisible by ``stages * repeats``, fewer
      microbatches than stages, a ``batch_kwargs`` name missing from the call.
    ShapeError: a batch (carry or batch keyword) not divisible by the
      microbatches, or batch sizes that differ.
  """
  problems = [p for p in (layout_problem(num_layers, stages, config.repeats),
                          schedule_problem(stages, config.microbatches)) if p]
  missing = [n for n in config.batch_kwargs if n not in broadcast]
  if missing:
    problems.append(f"batch_kwargs {missing} were not passed to the call (got keywords "
                    f"{sorted(broadcast)})")
  if problems:
    raise errors.ConfigError(f"pipelined Stack: {'; '.join(problems)}.",
                             axes={STAGE_AXIS: stages})
  named = [("carry" + jax.tree_util.keystr(p), x)
           for p, x in jax.tree_util.tree_flatten_with_path(carry)[0]]
  named += [(f"{n}{jax.tree_util.keystr(p)}", x) for n in config.batch_kwargs
            for p, x in jax.tree_util.tree_flatten_with_path(broadcast[n])[0]]
  shapes = [(n, tuple(jnp.shape(x))) for n, x in named]
  sizes = {s[0] if s else None for _, s in shapes}
  if len(sizes) != 1 or None in sizes:
    raise errors.ShapeError(
        "pipelined Stack: the carry and batch keyword arguments must all have the same "
        f"leading batch axis; got {errors.format_paths([f'{n} {s}' for n, s in shapes])}.",
        paths=[n for n, _ in shapes], shapes=[s for _, s in shapes])
  batch = sizes.pop()
  if batch % config.microbatches:
    raise errors.ShapeError(
        f"pipelined Stack: batch size {batch} is not divisible by microbatches="
        f"{config.microbatches}; use a batch that is a multiple of {config.microbatches} "
        "or change pipeline microbatches.", shapes=[s for _, s in shapes])
  return batch


# --- the pipeline ------------------------------------------------------------------


def run_pipeline(block: Any, carry: Any, broadcast: dict, *, config: PipelineConfig,
                 num_layers: int, stack_axis: str, policy: Any, mesh: Mesh) -> Any:
  """Applies the stacked ``block`` as a pipeline (see the module doc).

  Args:
    block: the Stack's block (Variables stacked ``[num_layers, ...]``); its
      non-Param state (BatchNorm statistics, Rng counters) is updated in
      place as if each layer had run on every microbatch in order.
    carry: pytree of arrays with a leading batch axis.
    broadcast: keyword arguments for every layer (``config.batch_kwargs``
      among them are split into microbatches).
    config: the `PipelineConfig`.
    num_layers, stack_axis: the Stack's.
    policy: a remat policy for each layer, or None.
    mesh: the concrete Mesh (its ``stage`` axis size is the stage count).

  Returns:
    The final carry, of the input's shapes.

  Raises:
    ConfigError, ShapeError: see `check_call`.
    TransformError: graph objects passed as keyword arguments, or a block
      that writes its parameters, changes its structure or its carry.
  """
  stages, repeats, micro = pipeline_stages(mesh), config.repeats, config.microbatches
  check_call(num_layers, stages, config, carry, broadcast)
  graph_kwargs = [k for k, v in broadcast.items()
                  if any(graph.is_graph_node(x) for x in
                         jax.tree.leaves(v, is_leaf=graph.is_graph_node))]
  if graph_kwargs:
    raise errors.TransformError(
        f"pipelined Stack: keyword argument(s) {graph_kwargs} hold graph objects (Modules, "
        "Rngs, Variables); a pipeline applies each layer to one microbatch at a time and "
        "cannot thread them. Keep Rngs inside the block (e.g. Dropout(rngs=...)).",
        paths=graph_kwargs)
  batch_kw = {k: jax.tree.map(lambda a: _split_batch(jnp.asarray(a), micro), broadcast[k])
              for k in config.batch_kwargs}
  other_kw = {k: v for k, v in broadcast.items() if k not in batch_kw}

  graphdef, params, rest = graph.split(block, Param, ...)
  per_layer = lambda s: jax.tree.structure(State.from_flat_path(
      [(p, remove_axis_name(v, 0, stack_axis)) for p, v in s.flat_state()]))
  p_def, r_def = per_layer(params), per_layer(rest)
  layout = lambda leaves, inverse=False: [
      _relayout(a, stages, repeats, mesh, inverse) for a in leaves]
  p_chunks = layout(jax.tree.leaves(params))
  r_chunks = layout(jax.tree.leaves(rest))
  carry_def = jax.tree.structure(carry)
  avals = [((jnp.shape(x)[0] // micro,) + jnp.shape(x)[1:], jnp.result_type(x))
           for x in jax.tree.leaves(carry)]

  def apply_layer(p_leaves, r_leaves, h, kw):
    p_state = jax.tree.unflatten(p_def, p_leaves)
    layer = graph.merge(graphdef, p_state, jax.tree.unflatten(r_def, r_leaves))
    out = layer(h, **kw, **other_kw)
    _check_out(out, carry_def, avals)
    _, p_new, r_new = graph.split(layer, Param, ...)
    _check_state(p_new, p_leaves, p_def, r_new, r_def)
    return out, jax.tree.leaves(r_new)

  if policy is not None:
    apply_layer = jax.checkpoint(apply_layer, policy=policy)

  def stage_step(p_c, r_c, h, s, t):
    i = t - s
    valid = (i >= 0) & (i < micro * repeats)
    r = jnp.clip(i // micro, 0, repeats - 1)
    m = jnp.mod(i, micro)
    if repeats == 1:
      # A static index keeps the weights loop-invariant, so the backward pass
      # saves them once instead of once per iteration.
      take = lambda a: a[0]
    else:
      take = lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False)
    p_r, r_r = [take(a) for a in p_c], [take(a) for a in r_c]
    kw = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, keepdims=False),
                      batch_kw)

    def layer_step(h, xs):
      return apply_layer(xs[0], xs[1], h, kw)

    h, r_new = jax.lax.scan(layer_step, h, (p_r, r_r))
    r_new = _where(valid, r_new, r_r)
    r_c = [jax.lax.dynamic_update_index_in_dim(a, u, r, 0) for a, u in zip(r_c, r_new)]
    return h, r_c

  vstages = jax.vmap(stage_step, in_axes=(0, 0, 0, 0, None), spmd_axis_name=STAGE_AXIS)
  sid = jnp.arange(stages, dtype=jnp.int32)
  is_first = lambda ndim: (sid == 0).reshape((stages,) + (1,) * (ndim - 1))
  xs = jax.tree.map(lambda a: _split_batch(a, micro), carry)
  row = lambda tree, m: jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, keepdims=False), tree)

  def body(state, t):
    cur, loop, r_c = state
    out, r_c = vstages(p_chunks, r_c, cur, sid, t)
    rot = _constrain_stage(jax.tree.map(lambda a: jnp.roll(a, 1, axis=0),
                                        _constrain_stage(out, mesh)), mesh)
    # the last stage's output (now in row 0) is kept for the next round / the result
    done = t - (stages - 1)
    keep = (done >= 0) & (done < micro * repeats)
    m_done = jnp.mod(done, micro)
    loop = jax.vmap(
        lambda buf, v, s: _where(keep & (s == 0),
                                 jax.tree.map(lambda b, x: jax.lax.dynamic_update_index_in_dim(
                                     b, x, m_done, 0), buf, v), buf),
        spmd_axis_name=STAGE_AXIS)(loop, rot, sid)
    nxt = t + 1
    m_next = jnp.mod(nxt, micro)
    back = jax.vmap(lambda buf: row(buf, m_next), spmd_axis_name=STAGE_AXIS)(loop)
    first = jax.tree.map(lambda f, b: jnp.where(nxt < micro, f[None], b), row(xs, m_next),
                         back)
    cur = jax.tree.map(lambda f, r: jnp.where(is_first(r.ndim), f, r), first, rot)
    return (_constrain_stage(cur, mesh), loop, r_c), None

  cur0 = jax.tree.map(lambda a: jnp.where(is_first(a.ndim), a[:1], jnp.zeros_like(a[:1])), xs)
  loop0 = jax.tree.map(lambda a: jnp.zeros((stages,) + a.shape, a.dtype), xs)
  steps = micro * repeats + stages - 1
  (_, loop, r_chunks), _ = jax.lax.scan(
      body, (_constrain_stage(cur0, mesh), _constrain_stage(loop0, mesh), r_chunks),
      jnp.arange(steps, dtype=jnp.int32))
  if r_chunks:
    new_rest = jax.tree.unflatten(jax.tree.structure(rest), layout(r_chunks, inverse=True))
    graph.update(block, new_rest)
  return jax.tree.map(lambda a: _join_batch(a[0]), loop)


def _check_out(out: Any, carry_def: Any, avals: list) -> None:
  if jax.tree.structure(out) != carry_def:
    raise errors.TransformError(
        f"pipelined Stack: the block must return only the next carry (structure "
        f"{carry_def}); it returned structure {jax.tree.structure(out)}. A pipelined "
        "stack takes no per-layer outputs.")
  got = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(out)]
  if got != avals:
    raise errors.TransformError(
        f"pipelined Stack: the block changes the carry's shape or dtype: it receives "
        f"{avals} and returns {got} (shapes per microbatch); every layer must return a "
        "carry shaped like its input.", shapes=[a[0] for a in got])


def _check_state(p_new: Any, p_leaves: list, p_def: Any, r_new: Any, r_def: Any) -> None:
  if jax.tree.structure(p_new) != p_def or jax.tree.structure(r_new) != r_def:
    raise errors.TransformError(
        "pipelined Stack: the block changed its structure while running (new attributes, "
        "sow, removed Variables); a pipelined layer may only update the values of its "
        "non-Param Variables.")
  written = [errors.path_str(p) for (p, v), old in zip(p_new.flat_state(), p_leaves)
             if jax.tree.leaves(v)[0] is not old]
  if written:
    raise errors.TransformError(
        f"pipelined Stack: the block writes its parameters "
        f"{errors.format_paths(written)}; in a pipeline Params are read-only (the "
        "optimizer updates them). Keep running values in another Variable type.",
        paths=written)
