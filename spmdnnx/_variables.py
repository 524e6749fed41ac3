"""Variables: mutable boxes for arrays, with typed metadata.

A :class:`Variable` holds one value (usually an array) plus metadata. The
typed ``logical_axes`` field names each dimension of the value for the SPMD
planner; it is validated against the value's rank when the Variable is made.
Variables are JAX pytrees (children: the value; aux data: type and metadata),
so a State of Variables maps with ``jax.tree.map`` and keeps its metadata.

>>> import jax.numpy as jnp
>>> w = Param(jnp.zeros((2, 3)), logical_axes=("embed", "mlp"))
>>> w.logical_axes
('embed', 'mlp')
>>> count = BatchStat(jnp.array(0))
>>> count += 1
>>> int(count.value)
1
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Generic, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from spmdnnx import errors
from spmdnnx import _eager
from spmdnnx import _tracectx as tracectx
from spmdnnx import _modes

#: The type variable of ``Variable[A]`` (Flax exports it as ``nnx.A``).
A = TypeVar("A")

#: Flax metadata names accepted as aliases of `logical_axes`.
AXES_ALIASES = ("sharding", "out_sharding", "sharding_names")
#: Metadata entry keeping a Flax axes tuple shorter than the rank as the user
#: gave it (``logical_axes`` holds it padded with None); read by `out_sharding`.
SHORT_AXES = "given_sharding"

#: Bumped whenever metadata or structure of a *watched* object changes, so that
#: cached graph traversals (used by jit) know to rebuild. See `graph.py`.
EPOCH = [0]


def bump_epoch() -> None:
  EPOCH[0] += 1


class _HijaxDefault(_modes.ScopedSetting):
  """Default of the ``hijax`` metadata of new Variables (see `var_defaults`)."""

  default = False


class _RefDefault(_modes.ScopedSetting):
  """Default of the ``ref`` metadata of new Variables (see `var_defaults`)."""

  default = False


@dataclasses.dataclass(frozen=True)
class VarDefaults(Mapping):
  """The Variable defaults in force, as `var_defaults()` returns them."""

  hijax: bool
  ref: bool

  def __getitem__(self, key: str) -> bool:
    return getattr(self, key)

  def __iter__(self):
    return iter(("hijax", "ref"))

  def __len__(self) -> int:
    return 2


class _VarDefaultsScope:
  """What `var_defaults(...)` returns: already set; a context or a decorator."""

  def __init__(self, settings: list):
    self._settings = settings

  def __enter__(self):
    for s in self._settings:
      s.__enter__()
    return self

  def __exit__(self, *exc):
    for s in reversed(self._settings):
      s.__exit__(*exc)
    return False

  def __call__(self, f: Callable) -> Callable:
    for s in reversed(self._settings):
      f = s(f)
    return f


def var_defaults(*, hijax: bool | None = None, ref: bool | None = None) -> Any:
  """Reads or sets the defaults of new Variables' ``hijax`` / ``ref`` metadata.

  With no argument, returns the defaults in force (a `VarDefaults` mapping).
  With arguments, sets them now, and the returned object works as a context
  manager (restoring the previous defaults on exit) or a decorator (applying
  them during each call only), like `set_graph_mode`.

  spmdnnx records ``hijax`` on each Variable for Flax compatibility; its
  Variables behave the same either way (graph-mode transforms already carry
  updates out). ``ref=True`` (jax.Ref-backed Variables) is not supported:
  creating a Variable under it raises MetadataError.

  >>> var_defaults().hijax
  False
  >>> with var_defaults(hijax=True):
  ...   var_defaults().hijax
  True
  >>> var_defaults().hijax
  False
  """
  if hijax is None and ref is None:
    return VarDefaults(hijax=_HijaxDefault.current_value(), ref=_RefDefault.current_value())
  settings = []
  if hijax is not None:
    settings.append(_HijaxDefault(hijax))
  if ref is not None:
    settings.append(_RefDefault(ref))
  return _VarDefaultsScope(settings)


class _Unhashable:
  """Hashable-by-identity stand-in for an unhashable metadata value."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _Unhashable) and other.value is self.value


class _Frozen:
  """Hashable stand-in for a list/dict metadata value; thaws back to the original."""

  __slots__ = ("value", "key")

  def __init__(self, value, key):
    self.value = value
    self.key = key

  def __hash__(self):
    return hash((type(self.value), self.key))

  def __eq__(self, other):
    return (isinstance(other, _Frozen) and type(other.value) is type(self.value)
            and other.key == self.key)


def freeze(value: Any) -> Any:
  """Turns a metadata value into a hashable equivalent that `thaw` undoes.

  Tuples stay tuples; lists and dicts are wrapped so that equal contents give
  equal (hashable) keys while `thaw` still returns the original container.
  """
  if type(value) is tuple:
    return tuple(freeze(v) for v in value)
  if isinstance(value, list):
    return _Frozen(value, tuple(freeze(v) for v in value))
  if isinstance(value, dict):
    items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))
    return _Frozen(value, tuple((k, freeze(v)) for k, v in items))
  try:
    hash(value)
  except TypeError:
    return _Unhashable(value)
  return value


def thaw(value: Any) -> Any:
  """Inverse of `freeze`."""
  if isinstance(value, (_Unhashable, _Frozen)):
    return value.value
  if type(value) is tuple:
    return tuple(thaw(v) for v in value)
  return value


def _describe(value: Any) -> str:
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape is not None and dtype is not None:
    return f"shape {tuple(shape)} ({dtype})"
  return f"value of type {type(value).__name__}"


def check_logical_axes(axes: Any, value: Any, where: str = "") -> tuple | None:
  """Validates logical axes against a value; returns them as a tuple.

  Raises:
    MetadataError: if axes is not a sequence of str/None, or its length differs
      from the value's rank.
  """
  if axes is None:
    return None
  if isinstance(axes, str):
    axes = (axes,)
  try:
    axes = tuple(axes)
  except TypeError:
    raise errors.MetadataError(
        f"{where}logical_axes must be a tuple with one name (str) or None per "
        f"dimension, got {axes!r}.") from None
  bad = [a for a in axes if a is not None and not isinstance(a, str)]
  if bad:
    raise errors.MetadataError(
        f"{where}logical_axes {axes!r} contains {bad!r}; each entry must be "
        "a logical axis name (str) or None.")
  ndim = getattr(value, "ndim", None)
  if ndim is not None and len(axes) != ndim:
    raise errors.MetadataError(
        f"{where}logical_axes {axes!r} has {len(axes)} entries but the "
        f"{_describe(value)} has {ndim} dimensions; give exactly one name "
        "(or None) per dimension.")
  return axes


def _as_names(axes: Any) -> Any:
  """A Flax axes spelling as a tuple (a bare str is one name); else unchanged."""
  if isinstance(axes, str):
    return (axes,)
  try:
    return tuple(axes)
  except TypeError:
    return axes


def _normalize_metadata(metadata: dict, value: Any, cls_name: str) -> dict:
  # Flax's `out_sharding` (and its older spellings) is our `logical_axes` when it
  # is a tuple of names; a PartitionSpec, NamedSharding or layout names mesh axes
  # and is kept as `out_sharding` (see spmdnnx/_eager.py). A Flax spelling
  # follows PartitionSpec rules: shorter than the rank, the trailing dimensions
  # are unsharded (``logical_axes`` is padded with None and the tuple as given
  # is kept as `SHORT_AXES` for `Variable.out_sharding`); with
  # ``eager_sharding=False`` its length is not checked here at all (resolving a
  # sharding refuses a mismatch later), as Flax defers it.
  axes = metadata.pop("logical_axes", None)
  physical = flax_axes = None
  if axes is not None and _eager.is_physical(axes):
    axes, physical = None, axes
  ndim = getattr(value, "ndim", None)
  for alias in AXES_ALIASES + (SHORT_AXES,):
    if alias in metadata:
      alias_axes = metadata.pop(alias)
      if alias_axes is not None and _eager.is_physical(alias_axes):
        physical = alias_axes
        continue
      if alias_axes is None:
        continue
      alias_axes = _as_names(alias_axes)
      flax_axes = alias_axes if flax_axes is None else flax_axes
      if axes is not None and _strip(alias_axes) != _strip(_as_names(axes)):
        raise errors.MetadataError(
            f"{cls_name}: logical_axes={axes!r} conflicts with "
            f"{alias}={alias_axes!r}; pass only one of them.")
      axes = axes if axes is not None else alias_axes
  if axes is not None and physical is not None:
    raise errors.MetadataError(
        f"{cls_name}: logical axes {tuple(axes)!r} and the mesh sharding "
        f"{physical!r} were both given; pass logical names (a tuple, resolved by "
        "rules) or a PartitionSpec/NamedSharding, not both.")
  if axes is not None:
    axes = _as_names(axes) if flax_axes is None else _pad(_as_names(axes), ndim)
    if isinstance(flax_axes, tuple) and isinstance(axes, tuple) and len(flax_axes) < len(axes):
      metadata[SHORT_AXES] = check_logical_axes(flax_axes, None, f"{cls_name}: ")
    elif ndim is not None and isinstance(axes, tuple) and len(axes) != ndim \
        and flax_axes is not None and metadata.get("eager_sharding") is False:
      value = None  # Flax's deferred check: the resolver refuses a mismatch
    metadata["logical_axes"] = check_logical_axes(axes, value, f"{cls_name}: ")
  if physical is not None:
    metadata["out_sharding"] = physical
  return metadata


def _strip(axes: Any) -> Any:
  """`axes` without trailing None entries (equal specs under PartitionSpec rules)."""
  if not isinstance(axes, tuple):
    return axes
  end = len(axes)
  while end and axes[end - 1] is None:
    end -= 1
  return axes[:end]


def _pad(axes: Any, ndim: int | None) -> Any:
  """`axes` padded with None to ``ndim`` entries (PartitionSpec rules)."""
  if ndim is None or not isinstance(axes, tuple) or len(axes) >= ndim:
    return axes
  return axes + (None,) * (ndim - len(axes))


def _drop_axes(meta: dict, new: dict) -> None:
  """Forgets meta's axes/sharding when `new` gives any (set_metadata, replace)."""
  if "logical_axes" in new or any(a in new for a in AXES_ALIASES):
    meta.pop("logical_axes", None)
    meta.pop("out_sharding", None)
    meta.pop(SHORT_AXES, None)


#: "argument not given" (``None`` and ``...`` are meaningful values).
MISSING = type("_Missing", (), {"__repr__": lambda self: "MISSING"})()

#: The entries Flax guarantees in every Variable's metadata, with their
#: defaults. They are stored only when they differ from these (so the
#: metadata of ordinary Variables, and the treedefs built from it, stay as
#: small as before) and `Variable.get_metadata` fills them in.
REQUIRED_METADATA = {"hijax": False, "ref": False, "eager_sharding": True}

#: Flax's (deprecated) Variable hooks: metadata entries or class methods.
HOOK_NAMES = ("on_get_value", "on_set_value", "on_create_value", "on_add_axis",
              "on_remove_axis")

#: Whether any Variable type or metadata ever used a hook (skips hook lookups).
_HOOKS = [False]


def _take_required(metadata: dict, cls_name: str) -> dict:
  """Canonicalises the required entries: keeps only non-default ones.

  Raises:
    MetadataError: for ``ref=True`` (jax.Ref-backed Variables).
  """
  hijax = metadata.pop("hijax", None)
  if hijax is None:
    hijax = _HijaxDefault.current_value()
  if hijax:
    metadata["hijax"] = True
  ref = metadata.pop("ref", None)
  if ref is None:
    ref = _RefDefault.current_value()
  if ref:
    raise errors.MetadataError(
        f"{cls_name}: ref=True (a Variable backed by a jax.Ref) is not supported "
        "by spmdnnx; drop ref=True (or leave nnx.var_defaults(ref=True)): "
        "spmdnnx's graph-mode transforms already carry in-place updates out.",
        argument="ref")
  if metadata.get("eager_sharding", False) is True:
    del metadata["eager_sharding"]
  if not _HOOKS[0] and any(k in metadata for k in HOOK_NAMES):
    _HOOKS[0] = True
  return metadata


def _run_hooks(var: "Variable", hook: str, *args: Any, value_hook: bool = True) -> Any:
  """Applies `var`'s ``hook`` (from its metadata, else its class) to ``args``."""
  fns = var._metadata().get(hook)
  if fns is None:
    method = getattr(type(var), hook, None)
    if method is None:
      return args[0] if value_hook else None
    fns = (method,)
  elif not isinstance(fns, tuple):
    fns = (fns,)
  if not value_hook:
    for fn in fns:
      fn(var, *args)
    return None
  value = args[0]
  for fn in fns:
    value = fn(var, value)
  return value


class Variable(Generic[A]):
  """A mutable box around one value, carrying metadata.

  Args:
    value: the held value (typically a `jax.Array`).
    logical_axes: optional logical axis names, one per dimension of value.
      ``sharding``, ``out_sharding`` and ``sharding_names`` are accepted as
      aliases (the Flax spellings).
    **metadata: arbitrary extra metadata, readable as attributes.

  Raises:
    MetadataError: if logical_axes does not match the value's rank.
  """

  __slots__ = ("raw_value", "_meta", "_frozen", "_trace", "_watched", "__weakref__")

  def __init__(self, value: Any, *, logical_axes: Any = None, **metadata: Any):
    if isinstance(value, Variable):
      metadata = {**value._metadata(), **metadata}
      value = value.raw_value
    elif isinstance(value, VariableMetadata):
      metadata = {**value.metadata, **metadata}
      value = value.raw_value
    if logical_axes is not None:
      metadata["logical_axes"] = logical_axes
    name = type(self).__name__
    eager = metadata.get("eager_sharding")
    metadata = _normalize_metadata(_take_required(metadata, name), value, name)
    _fill(self, value, metadata, None, tracectx.current_frame())
    if _HOOKS[0]:
      value = _run_hooks(self, "on_create_value", value)
      _RAW_SET(self, value)
    if type(self).create_value is not Variable.create_value:
      _RAW_SET(self, self.create_value(value))
    _RAW_SET(self, _eager.shard_at_creation(self.raw_value, metadata, eager))

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if any(hasattr(cls, h) for h in HOOK_NAMES):
      _HOOKS[0] = True
    _register(cls)

  # --- value -----------------------------------------------------------------
  @property
  def value(self) -> Any:
    if _HOOKS[0] or type(self).get_value is not Variable.get_value:
      return self.get_value()
    return self.raw_value  # the common case, without the call

  @value.setter
  def value(self, new: Any) -> None:
    self.set_value(new)

  def get_raw_value(self) -> Any:
    """The stored value, bypassing `get_value` overrides and hooks."""
    return self.raw_value

  def set_raw_value(self, value: Any) -> None:
    """Stores `value` as is, bypassing `set_value` overrides and hooks."""
    self._check_trace(value)
    _RAW_SET(self, value)

  def create_value(self, value: Any) -> Any:
    """Override to transform the value once, when the Variable is created."""
    return value

  def get_value(self, *, index: Any = MISSING) -> Any:
    """The value (``v.value``, ``v[...]`` and operators read through this).

    Subclasses may override it (e.g. to decode a stored form); ``v[index]``
    calls ``get_value(index=index)``.
    """
    value = self.raw_value
    if index is not MISSING and not (index is ... and (isinstance(value, jax.Array)
                                                      or not hasattr(value, "shape"))):
      value = value[index]  # (``...`` on an array or a scalar: the value itself)
    if _HOOKS[0]:
      value = _run_hooks(self, "on_get_value", value)
    return value

  def set_value(self, value: Any, *, index: Any = MISSING) -> None:
    """Stores a value (``v.value = x`` and ``v[index] = x`` write through this).

    With ``index`` on an array value, the update is ``value.at[index].set(x)``
    (so the array keeps its shape and dtype, as in Flax), except that a
    same-shape, same-dtype array given for ``...`` is stored as is.
    """
    if _HOOKS[0]:
      value = _run_hooks(self, "on_set_value", value)
    current = self.raw_value
    if index is not MISSING:
      if isinstance(current, jax.Array):
        if not (index is ... and isinstance(value, jax.Array)
                and value.shape == current.shape and value.dtype == current.dtype):
          value = current.at[index].set(value)
      elif index is ... and not hasattr(current, "shape"):
        pass  # a Python scalar / object: `v[...] = x` replaces it
      else:
        current[index] = value
        value = current
    self._check_trace(value)
    _RAW_SET(self, value)

  def _check_trace(self, new: Any) -> None:
    frame = tracectx.current_frame()
    if (frame is not None and self._trace is not frame
        and any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(new))):
      raise errors.TraceContextError(
          f"Cannot assign a traced value to this {type(self).__name__} inside "
          f"{frame.name}: the Variable was created outside the transform, so the "
          "tracer would leak out of it. Pass the Module (or Variable) that owns it "
          "to the transform as an argument instead of capturing it from an "
          "enclosing scope.")

  # --- metadata --------------------------------------------------------------
  @property
  def logical_axes(self) -> tuple | None:
    return self._metadata().get("logical_axes")

  @logical_axes.setter
  def logical_axes(self, axes: Any) -> None:
    self.set_metadata(logical_axes=axes)

  # Flax spellings. ``v.sharding`` is the value's placement (as in Flax), found
  # through __getattr__; these two read the annotation.
  out_sharding = property(lambda self: _out_sharding(self._metadata()))
  sharding_names = out_sharding

  def _metadata(self) -> dict:
    meta = self._meta
    if meta is None:
      meta = {k: thaw(v) for k, v in self._frozen}
      object.__setattr__(self, "_meta", meta)
    return meta

  def get_metadata(self, name: str | None = None, default: Any = MISSING, *,
                   exclude_required: bool | None = None) -> Any:
    """This Variable's metadata: one entry, or a copy of all of it.

    Args:
      name: the entry to return; None returns a dict of every entry,
        including Flax's required ``hijax``, ``ref`` and ``eager_sharding``
        (unless ``exclude_required``) and ``logical_axes`` when set.
      default: returned when ``name`` is missing.
      exclude_required: drop the required entries from the dict.

    Raises:
      MissingMetadataError: (a KeyError) ``name`` is missing and no default.
      MetadataError: ``default`` or ``exclude_required`` with the wrong form.

    >>> import jax.numpy as jnp
    >>> w = Param(jnp.zeros(2), logical_axes=("embed",), note="x")
    >>> w.get_metadata("note"), w.get_metadata("missing", 0)
    ('x', 0)
    >>> sorted(w.get_metadata(exclude_required=True))
    ['logical_axes', 'note']
    """
    meta = self._metadata()
    if name is not None:
      if exclude_required is not None:
        raise errors.MetadataError(
            "get_metadata: pass either a name or exclude_required, not both.",
            argument="exclude_required")
      if name in meta:
        return meta[name]
      if name in REQUIRED_METADATA:
        return REQUIRED_METADATA[name]
      if default is not MISSING:
        return default
      raise errors.MissingMetadataError(
          f"{type(self).__name__} has no metadata {name!r}; it has "
          f"{sorted(self.get_metadata())}. Pass a default, "
          f"get_metadata({name!r}, None), or check has_metadata({name!r}) first.",
          argument=name)
    if default is not MISSING:
      raise errors.MetadataError(
          f"get_metadata: default={default!r} needs a name to look up.",
          argument="default")
    if exclude_required:
      return {k: v for k, v in meta.items() if k not in REQUIRED_METADATA}
    return {**REQUIRED_METADATA, **meta}

  def set_metadata(self, *args: Any, **metadata: Any) -> None:
    """Updates metadata in place; ``logical_axes`` (or an alias) is validated.

    Three forms, as in Flax: ``set_metadata(name=value, ...)`` updates
    entries, ``set_metadata("name", value)`` sets one, and
    ``set_metadata({...})`` replaces all of it (the required entries are
    kept unless given).

    Raises:
      MetadataError: bad arguments, ``ref=True``, or logical axes that do
        not fit the value.
    """
    name = type(self).__name__
    if args and metadata:
      raise errors.MetadataError(
          f"{name}.set_metadata: pass a dict, a (name, value) pair or keywords, "
          "not positional and keyword arguments together.")
    if len(args) == 1:
      if not isinstance(args[0], Mapping):
        raise errors.MetadataError(
            f"{name}.set_metadata: one positional argument must be a dict of "
            f"metadata, got {type(args[0]).__name__}.")
      meta = dict(args[0])
    elif len(args) == 2:
      if not isinstance(args[0], str):
        raise errors.MetadataError(
            f"{name}.set_metadata(name, value): name must be a str, got {args[0]!r}.")
      meta = self.get_metadata(exclude_required=True)
      metadata = {args[0]: args[1]}
    elif args:
      raise errors.MetadataError(
          f"{name}.set_metadata takes a dict, a (name, value) pair or keywords; "
          f"got {len(args)} positional arguments.")
    else:
      meta = self.get_metadata(exclude_required=True)
    _drop_axes(meta, metadata)
    meta.update(metadata)
    for key in REQUIRED_METADATA:  # kept unless given
      meta.setdefault(key, self.get_metadata(key))
    meta = _normalize_metadata(_take_required(meta, name), self.raw_value, name)
    self._set_meta(meta)

  def _set_meta(self, meta: dict) -> None:
    object.__setattr__(self, "_meta", meta)
    object.__setattr__(self, "_frozen", None)
    if any(k in meta for k in HOOK_NAMES):
      _HOOKS[0] = True
    if self._watched:
      bump_epoch()

  def has_metadata(self, name: str) -> bool:
    """Whether the metadata has ``name`` (the required entries always do)."""
    return name in self._metadata() or name in REQUIRED_METADATA

  def del_metadata(self, name: str) -> None:
    """Removes one metadata entry.

    Raises:
      MetadataError: for ``hijax`` / ``ref``, which every Variable has.
      MissingMetadataError: for a name the Variable does not have.
    """
    if name in ("hijax", "ref"):
      raise errors.MetadataError(
          f"{type(self).__name__}: cannot delete the required {name!r} metadata.",
          argument=name)
    meta = self.get_metadata(exclude_required=True)
    if name not in meta:
      if name == "eager_sharding":
        return
      raise errors.MissingMetadataError(
          f"{type(self).__name__} has no metadata {name!r} to delete; it has "
          f"{sorted(meta)}.", argument=name)
    del meta[name]
    self._set_meta(meta)

  def frozen_metadata(self) -> tuple:
    """Metadata as a hashable, sorted tuple (used in GraphDefs and treedefs)."""
    frozen = self._frozen
    if frozen is None:
      frozen = tuple((k, freeze(v)) for k, v in sorted(self._meta.items()))
      object.__setattr__(self, "_frozen", frozen)
    return frozen

  def __getattr__(self, name: str) -> Any:
    # Only called when normal lookup fails: metadata first, then the value.
    if name.startswith("__") or name in Variable.__slots__:
      raise AttributeError(name)
    meta = self._metadata()
    if name in meta:
      return meta[name]
    if name in REQUIRED_METADATA:
      return REQUIRED_METADATA[name]
    try:
      return getattr(self.raw_value, name)
    except AttributeError:
      raise AttributeError(
          f"{type(self).__name__} has no metadata or value attribute {name!r}"
      ) from None

  def __setattr__(self, name: str, value: Any) -> None:
    cls_attr = getattr(type(self), name, None)
    if isinstance(cls_attr, property) or name in Variable.__slots__ or name.startswith("__"):
      object.__setattr__(self, name, value)
    elif hasattr(self, "__dict__") and name in getattr(self, "__dict__", {}):
      object.__setattr__(self, name, value)
    else:
      self.set_metadata(**{name: value})

  def replace(self, value: Any = ..., **metadata: Any) -> "Variable":
    """A new Variable of the same type, with value and/or metadata replaced.

    Flax's ``copy`` is the same method; the value may also be given as
    ``value=``.

    >>> import jax.numpy as jnp
    >>> w = Param(jnp.zeros(2), note="a")
    >>> w2 = w.replace(jnp.ones(2), note="b")
    >>> float(w2[0]), w2.note, w.note
    (1.0, 'b', 'a')
    """
    name = type(self).__name__
    meta = dict(self._metadata())
    _drop_axes(meta, metadata)
    meta.update(metadata)
    value = self.raw_value if value is ... or value is MISSING else value
    meta = _normalize_metadata(_take_required(meta, name), value, name)
    return new_variable(type(self), value, meta=meta)

  copy = replace

  def to_state(self) -> "Variable":
    """Flax compatibility: a State leaf for this Variable (a detached copy)."""
    return self.replace()

  @classmethod
  def from_metadata(cls, value: Any, metadata: Mapping) -> "Variable":
    """A Variable of this type from a value and a metadata dict (validated)."""
    return cls(value, **dict(metadata))

  def copy_from(self, other: "Variable") -> None:
    """Makes this Variable hold `other`'s value and metadata (in place).

    Raises:
      MetadataError: `other` is of a different Variable type.
    """
    if type(other) is not type(self):
      raise errors.MetadataError(
          f"copy_from: cannot copy a {type(other).__name__} into a "
          f"{type(self).__name__}; both must be the same Variable type.")
    if other is self:
      return
    self.set_raw_value(other.raw_value)
    self._set_meta(dict(other._metadata()))

  def update_from_state(self, state: "Variable") -> None:
    """Writes a State leaf's value (and changed metadata) into this Variable."""
    write_back(self, state)

  def add_axis(self, axis_index: int, axis_name: str | None) -> None:
    """Runs ``on_add_axis`` hooks (a transform added a batch axis)."""
    _run_hooks(self, "on_add_axis", axis_index, axis_name, value_hook=False)

  def remove_axis(self, axis_index: int, axis_name: str | None) -> None:
    """Runs ``on_remove_axis`` hooks (a transform removed a batch axis)."""
    _run_hooks(self, "on_remove_axis", axis_index, axis_name, value_hook=False)

  @property
  def type(self) -> type:
    return type(self)

  # --- array protocol --------------------------------------------------------
  shape = property(lambda self: self.raw_value.shape)
  dtype = property(lambda self: self.raw_value.dtype)
  ndim = property(lambda self: self.raw_value.ndim)
  size = property(lambda self: self.raw_value.size)

  def __jax_array__(self):
    return self.get_value()

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.get_value(), dtype=dtype)

  def __len__(self) -> int:
    return len(self.get_value())

  def __iter__(self):
    return iter(self.get_value())

  def __contains__(self, item) -> bool:
    return item in self.get_value()

  def __call__(self, *args, **kwargs):
    return self.get_value()(*args, **kwargs)

  def __bool__(self) -> bool:
    return bool(self.get_value())

  def __float__(self) -> float:
    return float(self.get_value())

  def __int__(self) -> int:
    return int(self.get_value())

  def __complex__(self) -> complex:
    return complex(self.get_value())

  def __index__(self) -> int:
    return operator.index(self.get_value())

  def __getitem__(self, index):
    return self.get_value(index=index)

  def __setitem__(self, index, new):
    if isinstance(index, tuple) and index == (...,):
      index = ...
    self.set_value(new, index=index)

  def __delitem__(self, index) -> None:
    value = self.get_value()
    del value[index]
    self.set_value(value)

  __hash__ = object.__hash__

  def __repr__(self) -> str:
    return f"{type(self).__name__}({_repr_fields(self)})"

  # Pytree protocol helpers.
  def _tree_flatten(self):
    return (self.raw_value,), self.frozen_metadata()

  def _tree_flatten_with_keys(self):
    return ((_VALUE_KEY, self.raw_value),), self.frozen_metadata()


_RAW_SET = Variable.raw_value.__set__
_VALUE_KEY = jax.tree_util.GetAttrKey("value")

# --- the Variable factory ------------------------------------------------------
# Every Variable is built by `_fill` (from `Variable.__init__`) or by
# `new_variable` (everything else: copies, pytree unflattening, rebuilding a
# graph). No other module writes a Variable's private slots; they call the
# functions below.

_HERE = object()  # "the frame current when the Variable is made"


def _fill(var: Variable, value: Any, meta: dict | None, frozen: tuple | None,
          trace: Any) -> None:
  init = object.__setattr__
  init(var, "raw_value", value)
  init(var, "_meta", meta)
  init(var, "_frozen", frozen)
  init(var, "_trace", trace)
  init(var, "_watched", False)


def new_variable(cls: type, value: Any, *, meta: dict | None = None,
                 frozen: tuple | None = None, trace: Any = _HERE) -> Variable:
  """Builds a Variable of `cls` without validating its metadata.

  Args:
    cls: the Variable type.
    value: the held value.
    meta: metadata as a dict (already validated), or None with `frozen`.
    frozen: metadata as `Variable.frozen_metadata` returns it.
    trace: the transform frame it belongs to (default: the current one).
  """
  var = object.__new__(cls)
  _fill(var, value, meta if meta is not None or frozen is not None else {}, frozen,
        tracectx.current_frame() if trace is _HERE else trace)
  return var


def detach(var: Variable, value: Any = ...) -> Variable:
  """A copy of a Variable sharing its metadata (and value, unless given).

  The copy belongs to the current transform frame and is not watched.
  """
  return new_variable(type(var), var.raw_value if value is ... else value,
                      meta=var._meta, frozen=var._frozen)


def with_logical_axes(var: Variable, axes: tuple | None, **entries: Any) -> Variable:
  """A detached copy whose ``logical_axes`` are `axes`, unchecked against the value.

  Transforms use it where the value's rank changes later (a stacked axis
  removed from the metadata before vmap slices the value). ``axes`` None keeps
  them; ``entries`` replace other metadata entries, unchecked too.
  """
  meta = dict(var._metadata())
  if axes is not None:
    meta["logical_axes"] = tuple(axes)
  meta.update(entries)
  return new_variable(type(var), var.raw_value, meta=meta)


def write_back(var: Variable, leaf: Any) -> None:
  """Writes a State leaf (Variable or raw value) into a live Variable, in place.

  The value always; the metadata too when the leaf is a Variable whose
  metadata differs (validated, and bumping the epoch if `var` is watched).
  """
  if isinstance(leaf, Variable):
    _RAW_SET(var, leaf.raw_value)
    if (leaf._meta is not var._meta or leaf._frozen is not var._frozen) and \
        leaf.frozen_metadata() != var.frozen_metadata():
      var.set_metadata(**leaf.get_metadata(exclude_required=True))
  else:
    _RAW_SET(var, leaf)


def watch_variable(var: Variable) -> None:
  """Marks a Variable so that metadata changes bump the structure epoch."""
  object.__setattr__(var, "_watched", True)


def _out_sharding(meta: dict) -> Any:
  """Flax's ``out_sharding``: the mesh sharding, else the axes as given."""
  for key in ("out_sharding", SHORT_AXES, "logical_axes"):
    if meta.get(key) is not None:
      return meta[key]
  return None


def _repr_value(value: Any) -> str:
  if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
    if value.size <= 8:
      return " ".join(repr(value).split())
    return f"Array(shape={tuple(value.shape)}, dtype={value.dtype})"
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
  return repr(value)


def _repr_fields(var: Variable) -> str:
  parts = [f"value={_repr_value(var.raw_value)}"]
  parts += [f"{k}={v!r}" for k, v in var._metadata().items()]
  return ", ".join(parts)


def _make_unflatten(cls):

  def unflatten(aux, children):
    # A Variable rebuilt from leaves is created here, in the current transform
    # frame (e.g. `merge` of a State that came into `nnx.jit` as an argument).
    return new_variable(cls, children[0], frozen=aux, trace=tracectx.current_frame())

  return unflatten


def _register(cls):
  jax.tree_util.register_pytree_with_keys(
      cls, Variable._tree_flatten_with_keys, _make_unflatten(cls),
      Variable._tree_flatten)


_register(Variable)


def _deleted(e: RuntimeError, op: Callable, self: "Variable") -> Exception:
  """JAX's "Array has been deleted" as the DonatedArrayError that says why; else `e`."""
  if "has been deleted" not in str(e):
    return e
  return errors.DonatedArrayError.build(
      f"{type(self).__name__} {getattr(op, '__name__', 'operation')}", "this Variable")


def _unary(op: Callable):

  def method(self):
    try:
      return op(self.get_value())
    except RuntimeError as e:
      raise _deleted(e, op, self) from e

  return method


def _binary(op: Callable):

  def method(self, other):
    try:
      return op(self.get_value(), _raw(other))
    except RuntimeError as e:
      raise _deleted(e, op, self) from e

  return method


def _rbinary(op: Callable):

  def method(self, other):
    try:
      return op(_raw(other), self.get_value())
    except RuntimeError as e:
      raise _deleted(e, op, self) from e

  return method


def _inplace(op: Callable):

  def method(self, other):
    try:
      self.value = op(self.get_value(), _raw(other))
    except RuntimeError as e:
      raise _deleted(e, op, self) from e
    return self

  return method


def _raw(x: Any) -> Any:
  return x.get_value() if isinstance(x, Variable) else x


for _name, _op in [("add", operator.add), ("sub", operator.sub),
                   ("mul", operator.mul), ("truediv", operator.truediv),
                   ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow), ("matmul", operator.matmul),
                   ("and", operator.and_), ("or", operator.or_),
                   ("xor", operator.xor), ("lshift", operator.lshift),
                   ("rshift", operator.rshift), ("divmod", divmod)]:
  setattr(Variable, f"__{_name}__", _binary(_op))
  setattr(Variable, f"__r{_name}__", _rbinary(_op))
  if _name != "divmod":
    setattr(Variable, f"__i{_name}__", _inplace(_op))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("eq", operator.eq),
                   ("ne", operator.ne), ("gt", operator.gt), ("ge", operator.ge)]:
  setattr(Variable, f"__{_name}__", _binary(_op))
for _name, _op in [("neg", operator.neg), ("pos", operator.pos),
                   ("abs", operator.abs), ("invert", operator.invert)]:
  setattr(Variable, f"__{_name}__", _unary(_op))
Variable.__hash__ = object.__hash__


class Param(Variable[A]):
  """A trainable parameter (what `grad` and `Optimizer` differentiate by default)."""


class BatchStat(Variable[A]):
  """Running statistics (BatchNorm mean/var); updated in training, not by grad."""


class Cache(Variable[A]):
  """Autoregressive decoding caches (attention keys/values, indices)."""


class Intermediate(Variable[A]):
  """Values recorded with `Module.sow`."""


class Perturbation(Intermediate[A]):
  """Zero-valued taps added by `Module.perturb` to read activation gradients."""


class RngState(Variable[A]):
  """Base of the Variables that hold random-stream state."""


class RngKey(RngState[A]):
  """The base key of an Rngs stream."""


class RngCount(RngState[A]):
  """How many keys an Rngs stream has produced."""


class OptState(Variable[A]):
  """Optimizer state (moments, counters) held by `spmdnnx.Optimizer`."""


class OptArrayState(OptState[A]):
  """An array leaf of an optax state."""


class OptVariable(OptState[A]):
  """An optimizer-state leaf that mirrors a parameter (same logical axes)."""


class VariableMetadata:
  """A value and the metadata its Variable gets: what a `with_metadata` (or
  `with_partitioning`) initializer returns, as in Flax.

  ``Variable(box)`` takes the value and the metadata (keywords given to the
  Variable win); `unbox` gives the plain value.

  >>> import jax, jax.numpy as jnp
  >>> init = with_partitioning(jax.nn.initializers.ones, ("embed",))
  >>> Param(init(jax.random.key(0), (2,))).logical_axes
  ('embed',)
  """

  __slots__ = ("raw_value", "metadata")

  def __init__(self, raw_value: Any, metadata: Mapping | None = None):
    self.raw_value = raw_value
    self.metadata = dict(metadata or {})

  def __repr__(self) -> str:
    return f"VariableMetadata({_repr_value(self.raw_value)}, metadata={self.metadata!r})"


def unbox(value: Any) -> Any:
  """The plain value of a `VariableMetadata` (anything else as is)."""
  return value.raw_value if isinstance(value, VariableMetadata) else value


def with_metadata(initializer: Callable, **metadata: Any) -> Callable:
  """Wraps an initializer so the value it makes carries Variable metadata.

  The wrapped initializer returns a `VariableMetadata` (``Param(init(...))``
  gets the metadata; `unbox` gives the array); layers also read
  ``.metadata`` from it when making their Params.

  >>> import jax
  >>> init = with_metadata(jax.nn.initializers.zeros, note="n")
  >>> Param(init(jax.random.key(0), (2,))).note
  'n'
  """
  inner_meta = dict(getattr(initializer, "metadata", {}))
  inner = getattr(initializer, "initializer", initializer)

  def wrapped(*args, **kwargs):
    return VariableMetadata(inner(*args, **kwargs), wrapped.metadata)

  wrapped.initializer = inner
  wrapped.metadata = {**inner_meta, **metadata}
  return wrapped


def with_partitioning(initializer: Callable, sharding: Any, **metadata: Any) -> Callable:
  """Wraps an initializer with logical axis names (Flax's spelling).

  >>> from jax.nn import initializers
  >>> init = with_partitioning(initializers.lecun_normal(), ("embed", "mlp"))
  >>> init.metadata["logical_axes"]
  ('embed', 'mlp')
  """
  if sharding is not None:
    sharding = tuple(sharding) if not isinstance(sharding, str) else (sharding,)
  return with_metadata(initializer, logical_axes=sharding, **metadata)


def initializer_metadata(initializer: Callable) -> dict:
  """The metadata an initializer was wrapped with (empty if none)."""
  return dict(getattr(initializer, "metadata", {}))
