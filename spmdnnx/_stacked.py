"""The stacked axis: its default logical name and how Variables' metadata carries it.

A stacked Variable (built by `vmap` over a constructor, a `Stack`, or
`stack_states`) has one extra array axis holding one slice per layer, named
`LAYERS_AXIS` (``"layers"``) in its ``logical_axes`` unless told otherwise.
This module is the one home of that name and of the two metadata moves every
stacking path makes: `insert_axis_name` (a per-layer Variable becomes
stacked) and `remove_axis_name` (a stacked Variable seen one layer at a time).

>>> import jax.numpy as jnp
>>> from spmdnnx._variables import Param
>>> w = Param(jnp.zeros((3, 2)), logical_axes=(LAYERS_AXIS, "embed"))
>>> remove_axis_name(w, 0, LAYERS_AXIS).logical_axes
('embed',)
>>> insert_axis_name(remove_axis_name(w, 0, LAYERS_AXIS), 0, LAYERS_AXIS).logical_axes
('layers', 'embed')
"""

from __future__ import annotations

from typing import Any, Mapping

from spmdnnx._variables import _HOOKS, SHORT_AXES, Variable, with_logical_axes

#: Default logical name of a stacked (per-layer) axis.
LAYERS_AXIS = "layers"
#: Flax's key for the stacked-axis name in a transform's ``transform_metadata``.
PARTITION_NAME = "partition_name"


class StackName(str):
  """A stacked-axis name with Flax's other ``transform_metadata`` entries.

  ``transform_metadata={"partition_name": "layers", "nickname": "nick"}``
  names the axis ``"layers"`` in ``logical_axes`` and also inserts ``"nick"``
  into a Variable's tuple-valued ``nickname`` metadata, as Flax does.

  >>> n = StackName("layers", {"nickname": "nick"})
  >>> n == "layers", n.fields
  (True, {'nickname': 'nick'})
  """

  fields: dict

  def __new__(cls, name: str, fields: Mapping) -> "StackName":
    self = super().__new__(cls, name)
    self.fields = dict(fields)
    return self


def stack_axis_name(stack_axis: str | None, transform_metadata: Mapping | None) -> str | None:
  """The stacked-axis name a transform records: Flax's ``partition_name`` wins.

  With other ``transform_metadata`` entries the name is a `StackName`.
  """
  name = stack_axis
  if transform_metadata and PARTITION_NAME in transform_metadata:
    name = transform_metadata[PARTITION_NAME]
  fields = {k: v for k, v in (transform_metadata or {}).items() if k != PARTITION_NAME}
  return StackName(name, fields) if fields and name is not None else name


def _insert(names: tuple, index: int, name: Any) -> tuple:
  """``name`` inserted at ``index`` (a shorter tuple is padded with None first)."""
  names = names + (None,) * (index - len(names))
  return names[:index] + (name,) + names[index:]


def move_axis(leaf: Any, axis: Any, name: str | None, insert: bool) -> Any:
  """A Variable's metadata with the entry at ``axis`` inserted (as ``name``,
  None allowed) or removed; its ``add_axis``/``remove_axis`` hook runs.

  Leaves that are not Variables and a non-int ``axis`` come back unchanged.

  >>> import jax.numpy as jnp
  >>> from spmdnnx._variables import Param
  >>> move_axis(Param(jnp.zeros((3, 2)), logical_axes=("a", "b")), 0, None, False).logical_axes
  ('b',)
  """
  if not isinstance(leaf, Variable) or isinstance(axis, bool) or not isinstance(axis, int):
    return leaf
  hook = "add_axis" if insert else "remove_axis"
  hooked = getattr(type(leaf), hook) is not getattr(Variable, hook) or _HOOKS[0]
  axes, meta = leaf.logical_axes, leaf._metadata()
  plain = None if name is None else str(name)
  entries: dict = {}
  if axes is not None:
    a = (axis if axis >= 0 else len(axes) + 1 + axis) if insert else axis % len(axes)
    axes = axes[:a] + (plain,) + axes[a:] if insert else axes[:a] + axes[a + 1:]
    short = meta.get(SHORT_AXES)
    if short is not None:
      entries[SHORT_AXES] = _insert(short, a, plain) if insert else \
          short[:a] + short[a + 1:]
  for key, value in getattr(name, "fields", {}).items():
    names = meta.get(key)
    if isinstance(names, tuple) and names:
      i = axis if axis >= 0 else len(names) + (1 if insert else 0) + axis
      entries[key] = _insert(names, i, value) if insert else names[:i] + names[i + 1:]
  if axes is None and not entries and not hooked:
    return leaf
  moved = with_logical_axes(leaf, axes, **entries)
  if hooked:
    getattr(moved, hook)(axis, plain)
  return moved


def remove_axis_name(leaf: Any, axis: Any, name: str | None) -> Any:
  """The per-layer view of a stacked Variable's metadata (entry ``axis`` removed).

  Leaves that are not Variables, a non-int ``axis`` (None, Carry) or ``name``
  None come back unchanged. The value is not touched (the caller slices it),
  so the metadata is not re-checked against it. The Variable's
  ``remove_axis(axis, name)`` hook runs on the returned copy.
  """
  return leaf if name is None else move_axis(leaf, axis, name, False)


def insert_axis_name(leaf: Any, axis: Any, name: str | None) -> Any:
  """The stacked view of a per-layer Variable's metadata (``name`` at ``axis``).

  Unchanged in the same cases as `remove_axis_name`; the Variable's
  ``add_axis(axis, name)`` hook runs on the returned copy.
  """
  return leaf if name is None else move_axis(leaf, axis, name, True)
