"""`Optimizer`: applies an optax transformation to a Module's parameters.

The optax state is kept in Variables inside the optimizer, so splitting the
optimizer (or passing it to a lifted transform) carries it like any other
state. Leaves that mirror a parameter (Adam's moments, momentum, ...) are
`OptVariable`s with that parameter's logical axes, so they shard like it,
stacked ``layers`` axis included; other leaves (step counts, schedule state)
are `OptArrayState`s. ``optimizer_axes`` renames the axes of the mirrored
leaves to shard optimizer state differently from the parameters (ZeRO-style).

>>> import jax, jax.numpy as jnp, optax
>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.nn._linear import Linear
>>> from spmdnnx import _graph as graph
>>> from spmdnnx._variables import Param
>>> model = Linear(2, 1, kernel_axes=("embed", "mlp"), rngs=Rngs(0))
>>> opt = Optimizer(model, optax.adam(1e-2), wrt=Param)
>>> opt.opt_state[0]["mu"]["kernel"].logical_axes
('embed', 'mlp')
>>> grads = jax.tree.map(jnp.ones_like, graph.state(model, Param))
>>> _ = opt.update(model, grads)
>>> int(opt.step.value)
1
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._object import Object
from spmdnnx._state import State
from spmdnnx._variables import OptArrayState, OptState, OptVariable, Param, Variable

AxesOverride = Callable[[tuple, Any], Any] | Mapping[Any, Any] | None


def _key_name(key: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _raw(leaf: Any) -> Any:
  return leaf.raw_value if isinstance(leaf, Variable) else leaf


def pure(state: Any) -> State:
  """A State (or mapping) of Variables -> a State of their raw values."""
  if not isinstance(state, State):
    state = State(state)
  return State.from_flat_path([(p, _raw(v)) for p, v in state.flat_state()])


def _override_axes(override: AxesOverride, path: tuple, axes: Any, ndim: int) -> Any:
  if override is None:
    return axes
  if callable(override):
    return override(path, axes)
  if axes is None:
    if None not in override:
      return None
    axes = (None,) * ndim
  return tuple(override.get(a, a) for a in axes)


def _sharding_metadata(param: Variable, axes: Any) -> dict:
  """The sharding metadata of a parameter's optimizer state: ``axes`` plus Flax's keys.

  ``mesh`` and ``sharding_rules`` are kept; a PartitionSpec/NamedSharding
  ``out_sharding`` is kept when there are no logical axes; Flax's
  ``optimizer_sharding`` replaces the parameter's sharding for its state.
  """
  meta = param.get_metadata()
  out = {k: meta[k] for k in ("mesh", "sharding_rules") if k in meta}
  if meta.get("optimizer_sharding") is not None:
    out["out_sharding"] = meta["optimizer_sharding"]
  elif axes is None and meta.get("out_sharding") is not None:
    out["out_sharding"] = meta["out_sharding"]
  else:
    out["logical_axes"] = axes
  return out


def _optax_promotion():
  """optax mixes Python floats with int32 counts, which strict promotion rejects;
  run it under jax's standard promotion whatever the user's setting."""
  return jax.numpy_dtype_promotion("standard")


def _nest(pairs: list) -> dict:
  """Nested plain dicts from (path, leaf) pairs (tuple indices become keys)."""
  root: dict = {}
  for path, leaf in pairs:
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return root


def _get(root: Any, path: tuple) -> Any:
  for key in path:
    root = root[key]
  return root


class Optimizer(Object):
  """Holds a model, an optax transformation and its state.

  ``update(model, grads)`` steps the model given, which may be another
  object than ``optimizer.model`` with the same parameters (paths and
  shapes): a model rebuilt with `merge`, as Flax NNX's functional style does.
  ``update(grads)`` steps ``optimizer.model``.

  Args:
    model: the Module to optimize (kept as ``optimizer.model``).
    tx: any optax ``GradientTransformation`` (chains, schedules, masks...).
    wrt: filter selecting the Variables to optimize (default `Param`).
    optimizer_axes: optional override of the mirrored leaves' logical axes:
      a mapping renaming axis names (``{"embed": "embed_zero"}``; a ``None``
      key renames unannotated dims) or a callable
      ``(param_path, param_axes) -> axes``.

  Attributes:
    step: an `OptState` counting applied updates.
    opt_state: the optax state as nested dicts of `OptVariable` /
      `OptArrayState` (read the optax pytree with `optax_state`).

  Raises:
    ConfigError: when ``wrt`` selects no Variables of the model.
  """

  def __init__(self, model: Any, tx: optax.GradientTransformation, *, wrt: Any = Param,
               optimizer_axes: AxesOverride = None):
    params = graph.state(model, wrt)
    if not params.flat_state():
      raise errors.ConfigError(
          f"Optimizer: wrt={wrt!r} selects no Variables of the "
          f"{type(model).__name__}; check the filter (default nnx.Param).",
          argument="wrt", value=repr(wrt))
    self.step = OptState(jnp.array(0, dtype=jnp.uint32))
    self.model = model
    self.tx = tx
    self.wrt = wrt
    with _optax_promotion():
      state = tx.init(pure(params))
    keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
    by_path = {p: v for p, v in params.flat_state()}
    lengths = sorted({len(p) for p in by_path}, reverse=True)
    pairs = []
    for keypath, leaf in keyed:
      path = tuple(_key_name(k) for k in keypath)
      pairs.append((path, self._wrap(path, leaf, by_path, lengths, optimizer_axes)))
    self._opt_paths = tuple(p for p, _ in pairs)
    self._param_paths = tuple(p for p, _ in params.flat_state())
    self._opt_treedef = treedef
    self.opt_state = _nest(pairs)

  @staticmethod
  def _wrap(path: tuple, leaf: Any, by_path: dict, lengths: list,
            override: AxesOverride) -> Variable:
    for n in lengths:
      param = by_path.get(path[-n:]) if len(path) >= n else None
      if param is not None and jnp.shape(leaf) == param.shape:
        axes = _override_axes(override, path[-n:], param.logical_axes, param.ndim)
        return OptVariable(leaf, **_sharding_metadata(param, axes))
    return OptArrayState(leaf)

  def _leaves(self) -> list:
    return [_get(self.opt_state, p) for p in self._opt_paths]

  def optax_state(self) -> Any:
    """The optax state pytree (raw arrays), as ``tx.update`` expects it."""
    return jax.tree_util.tree_unflatten(self._opt_treedef,
                                        [v.value for v in self._leaves()])

  def update(self, *args: Any, **kwargs: Any) -> State:
    """Applies one optimizer step: ``update(model, grads)`` or ``update(grads)``.

    Args:
      *args: ``(model, grads)`` or ``(grads,)`` (steps ``optimizer.model``);
        ``model`` must have the parameters the optimizer was built for.
        grads holds the gradients of the ``wrt`` parameters: a State (or nested mapping) as ``nnx.grad`` returns, or
        an object shaped like the model (tree-mode ``nnx.grad``,
        ``jax.grad`` of a Module). Extra entries (gradients of Variables
        outside ``wrt``) are ignored.
      **kwargs: passed to ``tx.update`` (e.g. ``value=`` for optax
        transformations that need the loss; ``value_fn=`` and ``grad=`` for
        line searches such as ``optax.lbfgs``).

    Returns:
      the updates applied (a State of raw arrays shaped like the parameters).

    Raises:
      ConfigError: for a wrong number of arguments or a model that is not a
        graph object.
      GraphError: when the model's parameters are not the ones the optimizer
        was built for, or grads miss parameters.
      ShapeError: when a gradient's shape differs from its parameter's.
      DonatedArrayError: when an array was deleted by a donating `nnx.jit` step.
    """
    if len(args) == 2:
      model, grads = args
    elif len(args) == 1:
      model, grads = self.model, args[0]
    else:
      raise errors.ConfigError(
          f"Optimizer.update takes (model, grads) or (grads,), got {len(args)} "
          "positional arguments.", argument="args", value=len(args))
    if model is not self.model:
      self._check_model(model)
    params = pure(graph.state(model, self.wrt))
    grads = self._match_grads(params, grads)
    # Line searches take the gradient again (``grad=``): same raw-array form.
    kwargs = {k: (self._match_grads(params, v) if k == "grad" else
                  pure(v) if isinstance(v, State) else v) for k, v in kwargs.items()}
    with _optax_promotion():
      try:
        updates, new_state = self.tx.update(grads, self.optax_state(), params, **kwargs)
        new_params = optax.apply_updates(params, updates)
      except RuntimeError as e:
        if "has been deleted" not in str(e):
          raise
        raise errors.DonatedArrayError.build(
            "Optimizer.update", "the model, the gradients or the optimizer state") from e
    graph.update(model, new_params)
    leaves = jax.tree_util.tree_leaves(new_state)
    for var, value in zip(self._leaves(), leaves, strict=True):
      var.value = value
    self.step.value = self.step.value + jnp.uint32(1)
    return updates

  def _check_model(self, model: Any) -> None:
    """The model's ``wrt`` parameters must be the ones the state was built for."""
    if not graph.is_graph_node(model):
      raise errors.ConfigError(
          f"Optimizer.update: the model must be a Module (or graph object), got "
          f"{type(model).__name__}: call optimizer.update(model, grads).",
          argument="model", value=type(model).__name__)
    have = {p for p, _ in graph.state(model, self.wrt).flat_state()}
    want = set(self._param_paths)
    if have != want:
      missing = sorted(errors.path_str(p) for p in want - have)
      extra = sorted(errors.path_str(p) for p in have - want)
      detail = []
      if missing:
        detail.append(f"missing {errors.format_paths(missing)}")
      if extra:
        detail.append(f"not in the optimizer state {errors.format_paths(extra)}")
      raise errors.GraphError(
          f"Optimizer.update: the {type(model).__name__} passed does not have the "
          f"parameters this optimizer was built for (wrt={self.wrt!r}): "
          f"{'; '.join(detail)}. Pass the model the optimizer was created with (or "
          "one of the same structure).", paths=missing + extra)

  @staticmethod
  def _match_grads(params: State, grads: Any) -> State:
    if graph.is_graph_node(grads) and not isinstance(grads, Variable):
      grads = graph.state(grads)  # a Module-shaped gradient (tree mode, jax.grad)
    if not isinstance(grads, Mapping):
      raise errors.GraphError(
          f"Optimizer.update: grads must be a State (e.g. from nnx.grad) or an object "
          f"shaped like the model, got "
          f"{type(grads).__name__}.", argument="grads", value=type(grads).__name__)
    given = dict(pure(grads).flat_state())
    wanted = dict(params.flat_state())
    missing = [errors.path_str(p) for p in wanted if p not in given]
    if missing:
      raise errors.GraphError(
          f"Optimizer.update: grads have no entry for {len(missing)} optimized "
          f"Variable(s): {errors.format_paths(missing)}. Differentiate with respect "
          "to the same Variables as the optimizer's wrt filter.", paths=missing)
    mismatched = [(p, tuple(v.shape), tuple(jnp.shape(given[p])))
                  for p, v in wanted.items() if tuple(jnp.shape(given[p])) != tuple(v.shape)]
    if mismatched:
      bad = [f"{errors.path_str(p)} (param {ps}, grad {gs})" for p, ps, gs in mismatched]
      raise errors.ShapeError(
          f"Optimizer.update: {len(bad)} gradient(s) differ in shape from their "
          f"parameter: {errors.format_paths(bad)}.",
          paths=[errors.path_str(p) for p, _, _ in mismatched],
          shapes=[(ps, gs) for _, ps, gs in mismatched])
    return State.from_flat_path([(p, given[p]) for p in wanted])


class ModelAndOptimizer(Optimizer):
  """An `Optimizer` whose ``update`` takes only the gradients.

  Flax NNX's convenience form: ``state.update(grads)`` steps
  ``state.model``. `Optimizer` accepts ``update(grads)`` too, so this class
  only fixes that signature.

  >>> import jax, jax.numpy as jnp, optax
  >>> from spmdnnx._rngs import Rngs
  >>> from spmdnnx.nn._linear import Linear
  >>> from spmdnnx import _graph as graph
  >>> state = ModelAndOptimizer(Linear(2, 1, rngs=Rngs(0)), optax.sgd(0.1))
  >>> updates = state.update(jax.tree.map(jnp.ones_like, graph.state(state.model, Param)))
  >>> int(state.step.value), updates["kernel"].shape
  (1, (2, 1))
  """

  def update(self, grads: Any, /, **kwargs: Any) -> State:  # type: ignore[override]
    return super().update(self.model, grads, **kwargs)
