"""Converting state between a stacked layout and one entry per layer.

A `Stack` keeps every layer's Variables in one array with a leading axis
named ``"layers"``; a model written as a list of blocks keeps one State per
layer. `stack_states` and `unstack_state` convert checkpoints (States of
Variables, or the nested plain dicts of ``State.to_pure_dict()``) between the
two layouts, keeping metadata right: stacking inserts the axis name into
``logical_axes``, unstacking removes it.

>>> import jax.numpy as jnp
>>> from spmdnnx._state import State
>>> from spmdnnx._variables import Param
>>> layers = [State({"w": Param(jnp.full((2,), float(i)), logical_axes=("embed",))})
...           for i in range(3)]
>>> stacked = stack_states(layers)
>>> stacked["w"].shape, stacked["w"].logical_axes
((3, 2), ('layers', 'embed'))
>>> [float(s["w"].value[0]) for s in unstack_state(stacked)]
[0.0, 1.0, 2.0]
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._stacked import LAYERS_AXIS, insert_axis_name, remove_axis_name
from spmdnnx._state import State
from spmdnnx._variables import Variable


def stack_variables(values: Sequence[Any], stack_axis: str) -> Any:
  """One leaf from per-layer leaves: values stacked along a new leading axis.

  Variables keep their type and metadata, with ``stack_axis`` inserted first
  in ``logical_axes`` (unannotated Variables stay unannotated).
  """
  first = values[0]
  if not isinstance(first, Variable):
    return jnp.stack([jnp.asarray(v) for v in values])
  stacked = jnp.stack([v.raw_value for v in values])
  return insert_axis_name(first, 0, stack_axis).replace(stacked)


def slice_variable(leaf: Any, index: int, stack_axis: str) -> Any:
  """Layer ``index`` of a stacked leaf, with the stacked axis name removed."""
  if not isinstance(leaf, Variable):
    return leaf[index]
  return remove_axis_name(leaf, 0, stack_axis).replace(leaf.raw_value[index])


def _flatten(tree: Any) -> list:
  """(path, leaf) pairs of a State or a nested mapping (leaves: non-mappings)."""
  if isinstance(tree, State):
    return list(tree.flat_state())
  if not isinstance(tree, Mapping):
    raise errors.ConfigError(
        f"expected a State or a nested dict of arrays, got {type(tree).__name__}.")
  out = []

  def walk(node, path):
    for k in node:
      v = node[k]
      if isinstance(v, Mapping) and not isinstance(v, Variable):
        walk(v, path + (k,))
      else:
        out.append((path + (k,), v))

  walk(tree, ())
  return out


def _unflatten(pairs: list, like: Any) -> Any:
  if isinstance(like, State):
    return State.from_flat_path(pairs)
  root: dict = {}
  for path, leaf in pairs:
    node = root
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return root


def _signature(leaf: Any) -> tuple:
  value = leaf.raw_value if isinstance(leaf, Variable) else leaf
  meta = leaf.frozen_metadata() if isinstance(leaf, Variable) else ()
  kind = type(leaf).__name__ if isinstance(leaf, Variable) else "array"
  return kind, tuple(jnp.shape(value)), jnp.result_type(value).name, meta


def _show(sig: tuple) -> str:
  kind, shape, dtype, meta = sig
  axes = dict(meta).get("logical_axes")
  return f"{kind} {dtype}{list(shape)}" + (f" axes={axes}" if axes is not None else "")


def check_same_structure(states: Sequence[Any], graphdefs: Sequence[Any] | None,
                         what: str, item: str) -> None:
  """Raises ConfigError listing how each entry differs from entry 0.

  Compares Variable paths, types, shapes, dtypes and metadata; with
  ``graphdefs``, also the static structure (module types and attributes).
  """
  ref = _flatten(states[0])
  ref_sig = {p: _signature(v) for p, v in ref}
  problems = []
  for i, state in enumerate(states[1:], start=1):
    pairs = _flatten(state)
    sig = {p: _signature(v) for p, v in pairs}
    missing = [errors.path_str(p) for p in ref_sig if p not in sig]
    extra = [errors.path_str(p) for p in sig if p not in ref_sig]
    if missing:
      problems.append(f"{item} {i} lacks {errors.format_paths(missing, 3)}")
    if extra:
      problems.append(f"{item} {i} has extra {errors.format_paths(extra, 3)}")
    for p, s in sig.items():
      if p in ref_sig and s != ref_sig[p]:
        problems.append(f"{item} {i} {errors.path_str(p)}: {_show(s)} vs "
                        f"{_show(ref_sig[p])} in {item} 0")
    if graphdefs is not None and not missing and not extra and \
        all(sig[p] == ref_sig[p] for p in sig) and graphdefs[i] != graphdefs[0]:
      problems.append(f"{item} {i} differs from {item} 0 in its static structure "
                      "(module types or non-array attributes such as sizes or rates)")
  if problems:
    raise errors.ConfigError(
        f"{what}: {item}s differ in structure, so they cannot be stacked: "
        f"{errors.format_paths(problems)}. Every {item} must have the same Variables "
        "with the same types, shapes, dtypes and metadata.")


def _layer_list(states: Any, what: str) -> list:
  if isinstance(states, Mapping):
    keys = list(states.keys())
    if sorted(keys, key=repr) != sorted(range(len(keys)), key=repr):
      raise errors.ConfigError(
          f"{what}: a mapping of layers needs the keys 0..{len(keys) - 1} (as a "
          f"List's State has), got {errors.format_paths(sorted(map(repr, keys)))}.")
    return [states[i] for i in range(len(keys))]
  return list(states)


def stack_states(states: Sequence[Any] | Mapping[int, Any], *,
                 stack_axis: str = LAYERS_AXIS) -> Any:
  """Stacks per-layer States (or nested dicts) into one stacked State.

  Args:
    states: one State / nested dict per layer, in layer order, or a mapping
      ``{0: ..., 1: ..., ...}`` (the State of a list of blocks).
    stack_axis: name inserted first into every annotated Variable's
      ``logical_axes``.

  Returns:
    A State (or nested dict, like the inputs) whose leaves have a leading
    axis of size ``len(states)``; load it with ``nnx.update(stack.block, ...)``.

  Raises:
    ConfigError: no layers, bad layer keys, or layers whose structure differs.

  >>> import jax.numpy as jnp
  >>> stack_states({0: {"w": jnp.zeros(2)}, 1: {"w": jnp.ones(2)}})["w"].shape
  (2, 2)
  """
  what = "stack_states"
  layers = _layer_list(states, what)
  if not layers:
    raise errors.ConfigError(f"{what}: got no layers; pass at least one State.")
  check_same_structure(layers, None, what, "layer")
  flat = [_flatten(s) for s in layers]
  index = [dict(f) for f in flat]
  pairs = [(p, stack_variables([d[p] for d in index], stack_axis)) for p, _ in flat[0]]
  return _unflatten(pairs, layers[0])


def unstack_state(state: Any, *, stack_axis: str = LAYERS_AXIS) -> list:
  """Splits a stacked State (or nested dict) into one State per layer.

  Args:
    state: leaves with a common leading (stacked) axis, e.g.
      ``nnx.state(stack.block)`` or a checkpoint of it.
    stack_axis: the name removed from annotated Variables' ``logical_axes``.

  Returns:
    A list of States (or nested dicts, like the input), one per layer.

  Raises:
    ConfigError: leaves without a leading axis, leading axes of different
      sizes, or annotated Variables whose first logical axis is not
      ``stack_axis``.

  >>> import jax.numpy as jnp
  >>> [d["w"].tolist() for d in unstack_state({"w": jnp.arange(4.0).reshape(2, 2)})]
  [[0.0, 1.0], [2.0, 3.0]]
  """
  pairs = _flatten(state)
  sizes: dict[int, list] = {}
  problems = []
  for path, leaf in pairs:
    value = leaf.raw_value if isinstance(leaf, Variable) else leaf
    shape = jnp.shape(value)
    if not shape:
      problems.append(f"{errors.path_str(path)} is a scalar (no stacked axis)")
      continue
    sizes.setdefault(shape[0], []).append(errors.path_str(path))
    if isinstance(leaf, Variable) and leaf.logical_axes is not None \
        and tuple(leaf.logical_axes)[0] != stack_axis:
      problems.append(f"{errors.path_str(path)} has logical_axes {leaf.logical_axes}, "
                      f"not starting with {stack_axis!r}")
  if len(sizes) > 1:
    listed = "; ".join(f"size {n}: {errors.format_paths(p, 3)}" for n, p in sizes.items())
    problems.append(f"leading axes differ ({listed})")
  if problems:
    raise errors.ConfigError(
        f"unstack_state: the state is not stacked along {stack_axis!r}: "
        f"{errors.format_paths(problems)}. Pass the state of a Stack's block (or "
        "stack_axis= the name its Variables use).")
  if not sizes:
    return []
  n = next(iter(sizes))
  return [_unflatten([(p, slice_variable(v, i, stack_axis)) for p, v in pairs], state)
          for i in range(n)]

