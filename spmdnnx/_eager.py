"""Eager sharding: a Variable is placed on the mesh when it is created (Flax's rule).

Flax NNX 0.12 shards a Variable as soon as it is built when its metadata has
``out_sharding`` and a mesh is known (``jax.set_mesh(mesh)``, a ``mesh=``
metadata entry, or a `NamedSharding` given as the ``out_sharding``). This
module holds that rule for `Variable.__init__`:

- `use_eager_sharding` turns it on or off (now, for a block, or per call;
  default on, ``$FLAX_ALWAYS_SHARD_VARIABLE``); a Variable's own
  ``eager_sharding=`` argument wins. `using_eager_sharding` reads it.
- `logical_axis_rules` maps names to mesh axes for a block, as Flax's
  ``nnx.logical_axis_rules``: ``(("embed", "fsdp"), ("mlp", "tensor"))``.
  A name no rule maps must be a mesh axis itself (Flax's convention); an
  unknown name is an error, except spmdnnx's standard logical names (the
  defaults of built-in layers, ``spmd.LOGICAL_AXES``), whose dimension stays
  replicated, as Flax's unannotated layers are.
- Inside ``spmdnnx.use_sharding(mesh, rules)`` (the richer path: T5X-style
  rule priorities and divisibility fallbacks) a Variable's logical axes are
  resolved by that context's rules instead; the spmd layer registers that
  resolver with `set_context_resolver`.

Without a mesh nothing happens (Flax raises there; spmdnnx keeps building
unplaced models, which `sharded_init` or `nnx.jit` place later), and inside a
``shard_map`` body (manual axes) nothing happens either.

>>> with use_eager_sharding(False):
...   using_eager_sharding()
False
>>> with logical_axis_rules([("embed", "fsdp")]):
...   get_logical_axis_rules()
(('embed', 'fsdp'),)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
from jax.experimental.layout import Format
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spmdnnx import errors
from spmdnnx._modes import ScopedSetting


class use_eager_sharding(ScopedSetting):  # noqa: N801 (Flax's name)
  """Sets whether new Variables with sharding metadata are sharded at creation.

  Works three ways, as `set_graph_mode`: ``use_eager_sharding(False)`` from
  now on, ``with use_eager_sharding(False):`` for a block, or as a decorator.

  >>> import spmdnnx as nnx
  >>> with nnx.use_eager_sharding(False):
  ...   nnx.using_eager_sharding()
  False
  >>> nnx.using_eager_sharding()
  True
  """

  env_var = "FLAX_ALWAYS_SHARD_VARIABLE"
  default = True


def using_eager_sharding() -> bool:
  """Whether Variables are sharded at creation by default (see `use_eager_sharding`).

  >>> import spmdnnx as nnx
  >>> nnx.using_eager_sharding()
  True
  """
  return use_eager_sharding.current_value()


# --- logical_axis_rules ----------------------------------------------------------

class _Rules(threading.local):

  def __init__(self):
    self.rules: tuple = ()


_RULES = _Rules()


def _check_rules(rules: Any, where: str) -> tuple:
  try:
    pairs = tuple(tuple(pair) for pair in rules)
  except TypeError:
    pairs = None
  bad = [] if pairs is not None else [rules]
  for pair in pairs or ():
    target = pair[1] if len(pair) == 2 else None
    targets = target if isinstance(target, tuple) else (target,)
    if (len(pair) != 2 or not isinstance(pair[0], str)
        or not all(t is None or isinstance(t, str) for t in targets)):
      bad.append(pair)
  if bad:
    raise errors.AxisRulesError(
        f"{where} must be pairs (logical name, mesh axis or tuple of mesh axes or "
        f"None), e.g. (('embed', 'fsdp'), ('mlp', 'tensor')); got {bad!r}.",
        rules=bad)
  return pairs


@contextlib.contextmanager
def logical_axis_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Maps logical names to mesh axes for Variables created in the block (Flax's API).

  Args:
    rules: pairs ``(logical name, mesh axis | tuple of mesh axes | None)``.

  Raises:
    AxisRulesError: if a rule is not such a pair.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> with nnx.logical_axis_rules([("embed", "data")]):
  ...   nnx.get_partition_spec(nnx.Param(jnp.ones((4, 2)), out_sharding=("embed", None))).value
  P('data', None)
  """
  previous = _RULES.rules
  _RULES.rules = _check_rules(rules, "logical_axis_rules")
  try:
    yield
  finally:
    _RULES.rules = previous


def get_logical_axis_rules() -> tuple:
  """The rules of the innermost `logical_axis_rules` block (``()`` outside any)."""
  return _RULES.rules


def composite_rules(outer: Sequence[tuple], local: Sequence[tuple] | None) -> dict:
  """The block's rules overlaid with a Variable's ``sharding_rules`` metadata.

  Raises:
    AxisRulesError: if both map one name to different mesh axes.
  """
  merged = dict(outer)
  clashes = []
  for name, target in _check_rules(local or (), "sharding_rules"):
    if name in merged and merged[name] != target:
      clashes.append(f"{name!r}: {merged[name]!r} vs {target!r}")
    merged[name] = target
  if clashes:
    raise errors.AxisRulesError(
        f"logical_axis_rules and the Variable's sharding_rules map names "
        f"differently: {', '.join(clashes)}; make them agree or drop one.",
        axes=clashes)
  return merged


def has_flax_rules(metadata: dict) -> bool:
  """Whether Flax-style rules (a block or ``sharding_rules`` metadata) apply."""
  return bool(_RULES.rules) or bool(metadata.get("sharding_rules"))


def map_names(entries: Sequence[Any], rules: dict) -> tuple:
  """Renames each spec entry (a name, a tuple of names or None) by `rules`."""
  out = []
  for entry in entries:
    if isinstance(entry, tuple):
      mapped = []
      for name in entry:
        target = rules.get(name, name)
        mapped.extend(target if isinstance(target, tuple) else (target,))
      out.append(tuple(m for m in mapped if m is not None) or None)
    elif isinstance(entry, str):
      out.append(rules.get(entry, entry))
    else:
      out.append(entry)
  return tuple(out)


# --- physical out_sharding values ---------------------------------------------------

def is_physical(out_sharding: Any) -> bool:
  """Whether an ``out_sharding`` value names mesh axes rather than logical axes.

  PartitionSpecs, NamedShardings and layouts (`Format`) are physical; a tuple
  (or str) of names is logical (it goes through the rules).
  """
  return isinstance(out_sharding, (PartitionSpec, NamedSharding, Format))


def physical_spec(out_sharding: Any) -> PartitionSpec:
  """The PartitionSpec inside a physical ``out_sharding`` value."""
  if isinstance(out_sharding, Format):
    out_sharding = out_sharding.sharding
  if isinstance(out_sharding, NamedSharding):
    return out_sharding.spec
  return out_sharding if isinstance(out_sharding, PartitionSpec) else PartitionSpec()


def physical_mesh(out_sharding: Any) -> Any:
  """The mesh a NamedSharding (or a Format around one) carries, else None."""
  if isinstance(out_sharding, Format):
    out_sharding = out_sharding.sharding
  return out_sharding.mesh if isinstance(out_sharding, NamedSharding) else None


# --- the spmd layer's resolver ------------------------------------------------------

#: ``resolver(logical_axes, shape) -> (mesh, PartitionSpec) | None``: set by the
#: spmd layer; answers when a ``use_sharding`` context is active.
_CONTEXT_RESOLVER: list[Callable[[tuple, tuple], Any]] = []

#: spmdnnx's standard logical names (the defaults of built-in layers), set by
#: the spmd layer. Under Flax's convention such a name, when no rule maps it and
#: the mesh has no axis of that name, leaves its dimension replicated (Flax's
#: layers carry no annotation there); any other unknown name is an error.
_STANDARD_NAMES: set[str] = set()


def set_context_resolver(resolver: Callable[[tuple, tuple], Any],
                         standard_names: Sequence[str] = ()) -> None:
  """Registers how logical axes resolve inside ``use_sharding`` (called by spmd)."""
  _CONTEXT_RESOLVER[:] = [resolver]
  _STANDARD_NAMES.clear()
  _STANDARD_NAMES.update(standard_names)


def to_mesh_axes(entries: Sequence[Any], rules: dict, mesh_axes: Sequence[str]) -> tuple:
  """Flax's convention: spec entries renamed by rules, checked against the mesh.

  Returns:
    ``(entries, unknown)``: the renamed entries, with standard logical names
    the mesh lacks replaced by None, and the other names the mesh lacks.
  """
  names = set(mesh_axes)
  unknown: list[str] = []

  def keep(name):
    if name is None or name in names:
      return name
    if name not in _STANDARD_NAMES:
      unknown.append(name)
    return None

  out = []
  for entry in map_names(entries, rules):
    if isinstance(entry, tuple):
      kept = tuple(n for n in map(keep, entry) if n is not None)
      out.append(kept or None)
    else:
      out.append(keep(entry))
  return tuple(out), sorted(set(unknown))


def ambient_mesh() -> Any:
  """The mesh `jax.set_mesh` made current (its abstract view if only that is set), or None."""
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is None or abstract.empty:
    return None
  try:
    mesh = jax.sharding.get_mesh()  # refuses inside jax.jit: the abstract one then
  except ValueError:
    return abstract
  return abstract if mesh is None or mesh.empty else mesh


def _has_manual_axes(mesh: Any) -> bool:
  types = getattr(mesh, "axis_types", ())
  return any(t == jax.sharding.AxisType.Manual for t in types)


def target_sharding(metadata: dict, shape: tuple) -> Any:
  """The sharding a Variable with this metadata gets at creation, or None.

  Returns None when the metadata has no sharding, or no mesh is known, or the
  mesh has manual axes (a ``shard_map`` body). A `Format` is returned as is.

  Raises:
    ShardingError: when a name is neither mapped by a rule nor a mesh axis,
      or the mesh mixes Auto and Explicit axes.
  """
  physical = metadata.get("out_sharding")
  axes = metadata.get("logical_axes")
  if physical is None and axes is None:
    return None
  flax_rules = has_flax_rules(metadata)
  if physical is not None and physical_mesh(physical) is not None:
    if not flax_rules:
      return physical
    mesh = physical_mesh(physical)
  else:
    mesh = metadata.get("mesh")
    mesh = ambient_mesh() if mesh is None else mesh
  if mesh is None or _has_manual_axes(mesh):
    return None
  if physical is None and not flax_rules and _CONTEXT_RESOLVER:
    resolved = _CONTEXT_RESOLVER[0](tuple(axes), tuple(shape))
    if resolved is not None:
      ctx_mesh, spec = resolved
      if "mesh" not in metadata and isinstance(ctx_mesh, Mesh):
        mesh = ctx_mesh
      return NamedSharding(mesh, spec)
  entries = tuple(physical_spec(physical)) if physical is not None else tuple(axes)
  rules = composite_rules(_RULES.rules, metadata.get("sharding_rules"))
  given = entries
  entries, unknown = to_mesh_axes(entries, rules, mesh.axis_names)
  if unknown:
    raise errors.ShardingError(
        f"Cannot shard a new Variable with sharding {given!r}: the mesh "
        f"{tuple(mesh.axis_names)} has no axis {', '.join(map(repr, unknown))} and no "
        "rule maps that name. Map logical names with "
        "`with nnx.logical_axis_rules([(name, mesh_axis), ...]):` or "
        "`nnx.use_sharding(mesh, rules)`, or create it under "
        "`nnx.use_eager_sharding(False)`.", axes=unknown,
        mesh_axes=tuple(mesh.axis_names))
  spec = PartitionSpec(*entries)
  if isinstance(physical, Format):
    return Format(physical.layout, NamedSharding(mesh, spec))
  return NamedSharding(mesh, spec)


def place(value: Any, sharding: Any) -> Any:
  """Puts a new Variable's value into ``sharding`` (reshard on Explicit meshes).

  A `jax.ShapeDtypeStruct` gets the sharding attached instead.

  Raises:
    ShardingError: when the mesh mixes Auto and Explicit axes (Flax refuses
      those too).
  """
  if isinstance(value, jax.ShapeDtypeStruct):
    sharding = sharding.sharding if isinstance(sharding, Format) else sharding
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
  mesh = (sharding.sharding if isinstance(sharding, Format) else sharding).mesh
  if not (mesh.are_all_axes_explicit or mesh.are_all_axes_auto):
    _mixed(mesh)
  if not isinstance(value, jax.core.Tracer) and isinstance(mesh, Mesh):
    return jax.device_put(value, sharding)
  if isinstance(sharding, Format):
    return jax.lax.with_sharding_constraint(value, sharding)
  if mesh.are_all_axes_explicit:
    return jax.sharding.reshard(value, sharding)
  return jax.lax.with_sharding_constraint(value, sharding)


def _mixed(mesh: Any) -> None:
  raise errors.ShardingError(
      f"Cannot shard a new Variable on a mesh that mixes axis types "
      f"{tuple(mesh.axis_types)}: eager sharding needs all axes Explicit or all "
      "Auto. Build the mesh with one axis type, or pass eager_sharding=False.",
      axis_types=tuple(mesh.axis_types))


def shard_at_creation(value: Any, metadata: dict, eager: bool | None) -> Any:
  """What `Variable.__init__` stores: ``value``, sharded when eager sharding applies.

  Args:
    value: the new Variable's value.
    metadata: its normalized metadata (``logical_axes``, ``out_sharding``,
      ``mesh``, ``sharding_rules``).
    eager: the Variable's ``eager_sharding=`` argument (None: the setting).
  """
  if eager is False:
    return value
  physical = metadata.get("out_sharding")
  if metadata.get("logical_axes") is None and physical is None:
    return value
  if eager is None:
    # Cheap checks first: reading the setting costs more than a Variable.
    if (metadata.get("mesh") is None and not jax.sharding.get_abstract_mesh().axis_names
        and (physical is None or physical_mesh(physical) is None)):
      return value
    if not using_eager_sharding():
      return value
  shape = getattr(value, "shape", None)
  if shape is None or not hasattr(value, "dtype"):
    return value
  sharding = target_sharding(metadata, tuple(shape))
  return value if sharding is None else place(value, sharding)
