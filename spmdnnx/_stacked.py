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

from spmdnnx._variables import Variable, with_logical_axes

#: Default logical name of a stacked (per-layer) axis.
LAYERS_AXIS = "layers"
#: Flax's key for the stacked-axis name in a transform's ``transform_metadata``.
PARTITION_NAME = "partition_name"


def stack_axis_name(stack_axis: str | None, transform_metadata: Mapping | None) -> str | None:
  """The stacked-axis name a transform records: Flax's ``partition_name`` wins."""
  if transform_metadata and PARTITION_NAME in transform_metadata:
    return transform_metadata[PARTITION_NAME]
  return stack_axis


def _axes_of(leaf: Any, axis: Any, name: str | None) -> tuple | None:
  """A Variable's logical axes when a name move applies to it, else None."""
  if not isinstance(leaf, Variable) or name is None or isinstance(axis, bool) \
      or not isinstance(axis, int):
    return None
  return leaf.logical_axes


def remove_axis_name(leaf: Any, axis: Any, name: str | None) -> Any:
  """The per-layer view of a stacked Variable's metadata (entry ``axis`` removed).

  Leaves that are not annotated Variables, a non-int ``axis`` (None, Carry) or
  ``name`` None come back unchanged. The value is not touched (the caller
  slices it), so the metadata is not re-checked against it.
  """
  axes = _axes_of(leaf, axis, name)
  if axes is None:
    return leaf
  a = axis % len(axes)
  return with_logical_axes(leaf, axes[:a] + axes[a + 1:])


def insert_axis_name(leaf: Any, axis: Any, name: str | None) -> Any:
  """The stacked view of a per-layer Variable's metadata (``name`` at ``axis``).

  Unchanged in the same cases as `remove_axis_name`.
  """
  axes = _axes_of(leaf, axis, name)
  if axes is None:
    return leaf
  a = axis if axis >= 0 else len(axes) + 1 + axis
  return with_logical_axes(leaf, axes[:a] + (name,) + axes[a:])
