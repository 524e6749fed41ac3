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
from spmdnnx import _tracectx as tracectx
from spmdnnx import _modes

#: The type variable of ``Variable[A]`` (Flax exports it as ``nnx.A``).
A = TypeVar("A")

#: Flax metadata names accepted as aliases of `logical_axes`.
AXES_ALIASES = ("sharding", "out_sharding", "sharding_names")

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


def _normalize_metadata(metadata: dict, value: Any, cls_name: str) -> dict:
  axes = metadata.pop("logical_axes", None)
  for alias in AXES_ALIASES:
    if alias in metadata:
      alias_axes = metadata.pop(alias)
      if axes is not None and alias_axes is not None and tuple(alias_axes) != tuple(axes):
        raise errors.MetadataError(
            f"{cls_name}: logical_axes={axes!r} conflicts with "
            f"{alias}={alias_axes!r}; pass only one of them.")
      axes = axes if axes is not None else alias_axes
  if axes is not None:
    metadata["logical_axes"] = check_logical_axes(axes, value, f"{cls_name}: ")
  return metadata


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
      metadata = {**value.get_metadata(), **metadata}
      value = value.raw_value
    if logical_axes is not None:
      metadata["logical_axes"] = logical_axes
    _fill(self, value, _normalize_metadata(metadata, value, type(self).__name__), None,
          tracectx.current_frame())

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    _register(cls)

  # --- value -----------------------------------------------------------------
  @property
  def value(self) -> Any:
    return self.raw_value

  @value.setter
  def value(self, new: Any) -> None:
    self._check_trace(new)
    _RAW_SET(self, new)

  def get_value(self) -> Any:
    return self.raw_value

  def set_value(self, new: Any) -> None:
    self.value = new

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

  # Flax spellings, read-only views of logical_axes.
  sharding = property(lambda self: self.logical_axes)
  sharding_names = property(lambda self: self.logical_axes)
  out_sharding = property(lambda self: self.logical_axes)

  def _metadata(self) -> dict:
    meta = self._meta
    if meta is None:
      meta = {k: thaw(v) for k, v in self._frozen}
      object.__setattr__(self, "_meta", meta)
    return meta

  def get_metadata(self) -> dict:
    """A copy of this Variable's metadata (``logical_axes`` included)."""
    return dict(self._metadata())

  def set_metadata(self, **metadata: Any) -> None:
    """Updates metadata in place; ``logical_axes`` (or an alias) is validated."""
    meta = self.get_metadata()
    if "logical_axes" in metadata or any(a in metadata for a in AXES_ALIASES):
      meta.pop("logical_axes", None)
    meta.update(metadata)
    meta = _normalize_metadata(meta, self.raw_value, type(self).__name__)
    object.__setattr__(self, "_meta", meta)
    object.__setattr__(self, "_frozen", None)
    if self._watched:
      bump_epoch()

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
    """A new Variable of the same type, with value and/or metadata replaced."""
    meta = self.get_metadata()
    if "logical_axes" in metadata or any(a in metadata for a in AXES_ALIASES):
      meta.pop("logical_axes", None)
    meta.update(metadata)
    value = self.raw_value if value is ... else value
    return new_variable(type(self), value,
                        meta=_normalize_metadata(meta, value, type(self).__name__))

  def copy(self) -> "Variable":
    return self.replace()

  def to_state(self) -> "Variable":
    """Flax compatibility: a State leaf for this Variable (a detached copy)."""
    return self.copy()

  @property
  def type(self) -> type:
    return type(self)

  # --- array protocol --------------------------------------------------------
  shape = property(lambda self: self.raw_value.shape)
  dtype = property(lambda self: self.raw_value.dtype)
  ndim = property(lambda self: self.raw_value.ndim)
  size = property(lambda self: self.raw_value.size)

  def __jax_array__(self):
    return self.raw_value

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.raw_value, dtype=dtype)

  def __len__(self) -> int:
    return len(self.raw_value)

  def __iter__(self):
    return iter(self.raw_value)

  def __bool__(self) -> bool:
    return bool(self.raw_value)

  def __float__(self) -> float:
    return float(self.raw_value)

  def __int__(self) -> int:
    return int(self.raw_value)

  def __index__(self) -> int:
    return operator.index(self.raw_value)

  def __getitem__(self, index):
    return self.raw_value[index]

  def __setitem__(self, index, new):
    if index is ... or (isinstance(index, tuple) and index == (...,)):
      current = self.raw_value
      if hasattr(current, "shape") and hasattr(new, "shape") and current.shape != new.shape:
        new = jnp.broadcast_to(new, current.shape)
      self.value = new
    elif isinstance(self.raw_value, jax.Array):
      self.value = self.raw_value.at[index].set(new)
    else:
      self.raw_value[index] = new

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


def with_logical_axes(var: Variable, axes: tuple) -> Variable:
  """A detached copy whose ``logical_axes`` are `axes`, unchecked against the value.

  Transforms use it where the value's rank changes later (a stacked axis
  removed from the metadata before vmap slices the value).
  """
  meta = var.get_metadata()
  meta["logical_axes"] = tuple(axes)
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
      var.set_metadata(**leaf.get_metadata())
  else:
    _RAW_SET(var, leaf)


def watch_variable(var: Variable) -> None:
  """Marks a Variable so that metadata changes bump the structure epoch."""
  object.__setattr__(var, "_watched", True)


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
    return new_variable(cls, children[0], frozen=aux, trace=None)

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
      return op(self.raw_value)
    except RuntimeError as e:
      raise _deleted(e, op, self) from e

  return method


def _binary(op: Callable):

  def method(self, other):
    try:
      return op(self.raw_value, _raw(other))
    except RuntimeError as e:
      raise _deleted(e, op, self) from e

  return method


def _rbinary(op: Callable):

  def method(self, other):
    try:
      return op(_raw(other), self.raw_value)
    except RuntimeError as e:
      raise _deleted(e, op, self) from e

  return method


def _inplace(op: Callable):

  def method(self, other):
    try:
      self.value = op(self.raw_value, _raw(other))
    except RuntimeError as e:
      raise _deleted(e, op, self) from e
    return self

  return method


def _raw(x: Any) -> Any:
  return x.raw_value if isinstance(x, Variable) else x


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


def with_metadata(initializer: Callable, **metadata: Any) -> Callable:
  """Wraps an initializer so layers attach metadata to the Variable they create.

  The returned callable behaves exactly like ``initializer``; layers read
  ``.metadata`` from it when making the Param.
  """
  inner_meta = dict(getattr(initializer, "metadata", {}))
  inner = getattr(initializer, "initializer", initializer)

  def wrapped(*args, **kwargs):
    return inner(*args, **kwargs)

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
