"""Helpers shared by the layers: parameter creation, dtypes, input checks.

Private module: layers import it, users do not.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._variables import Param, check_logical_axes, initializer_metadata, unbox

Axes = Sequence[str | None] | None


def layer_name(layer: Any) -> str:
  """How errors name a layer: its class, plus a user-given ``name`` if any."""
  name = getattr(layer, "__dict__", {}).get("name")
  cls = type(layer).__name__
  return f"{cls} {name!r}" if isinstance(name, str) else cls


def param_axes(owner: str, pname: str, init: Callable, axes: Axes,
               default: Axes, shape: tuple) -> tuple | None:
  """Chooses and validates the logical axes of one parameter.

  ``axes`` (the layer's ``<param>_axes`` argument) and the initializer's
  ``with_partitioning`` metadata are two ways to say the same thing; giving
  both with different values is an error. With neither, ``default`` is used.

  Raises:
    MetadataError: on a conflict, or when the axes do not match the rank.
  """
  meta_axes = initializer_metadata(init).get("logical_axes")
  if axes is not None and meta_axes is not None and tuple(axes) != tuple(meta_axes):
    raise errors.MetadataError(
        f"{owner}: {pname}_axes={tuple(axes)!r} conflicts with the axes "
        f"{tuple(meta_axes)!r} given by with_partitioning on {pname}_init; "
        "pass the axes only once.")
  chosen = axes if axes is not None else meta_axes if meta_axes is not None else default
  if chosen is None:
    return None
  shaped = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  try:
    return check_logical_axes(chosen, shaped)
  except errors.MetadataError:
    raise errors.MetadataError(
        f"{owner}: {pname}_axes {tuple(chosen)!r} has {len(tuple(chosen))} "
        f"entries but the {pname} has shape {tuple(shape)} ({len(shape)} dims); "
        f"give one logical name (or None) per dimension, e.g. {pname}_axes="
        f"{tuple([None] * len(shape))!r}.") from None


#: Flax's metadata names for the axes of a Variable (aliases of ``logical_axes``).
AXES_KEYS = ("logical_axes", "out_sharding", "sharding", "sharding_names")


def make_param(owner: str, pname: str, init: Callable, key: jax.Array,
               shape: tuple, param_dtype: Any, axes: Axes = None,
               default: Axes = None, metadata: Any = None) -> Param:
  """Initializes a Param of `shape` with logical axes (see `param_axes`).

  ``metadata`` is the layer's ``<pname>_metadata`` mapping (Flax's spelling):
  its entries become the Param's metadata; an axes entry (``out_sharding``,
  ``sharding``, ``sharding_names`` or ``logical_axes``) counts as ``axes``,
  padded with None to the rank when shorter (as a `PartitionSpec` would be).
  """
  extra = dict(metadata or {})
  meta_axes = [extra.pop(k) for k in AXES_KEYS if k in extra]
  if meta_axes:
    given = tuple(meta_axes[0]) if meta_axes[0] is not None else None
    if given is not None and len(given) < len(shape):
      # a PartitionSpec shorter than the rank leaves the trailing dims unsharded;
      # the Param keeps the tuple as given for `out_sharding` (Flax's spelling)
      extra["sharding_names"] = given
      given = given + (None,) * (len(shape) - len(given))
    if axes is not None and given is not None and tuple(axes) != given:
      raise errors.MetadataError(
          f"{owner}: {pname}_axes={tuple(axes)!r} conflicts with the axes {given!r} "
          f"in {pname}_metadata; pass the axes only once.", paths=[pname])
    axes = axes if axes is not None else given
  logical = param_axes(owner, pname, init, axes, default, shape)
  extra.update({k: v for k, v in initializer_metadata(init).items() if k != "logical_axes"})
  value = unbox(init(key, tuple(shape), param_dtype))
  return Param(value, logical_axes=logical, **extra)


def canonicalize_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> Any:
  """The dtype ``args`` are computed in: `dtype`, or their common dtype.

  None entries are ignored. With ``inexact=True`` an integer result is promoted
  with float32 (Flax's rule). Standard jax promotion is used even under
  ``jax.numpy_dtype_promotion("strict")``.

  Raises:
    ConfigError: when ``inexact`` and the given ``dtype`` is not inexact.

  >>> canonicalize_dtype(jnp.ones(2, jnp.int32))
  dtype('float32')
  """
  if dtype is None:
    raw = [v.value if hasattr(v, "raw_value") else v for v in args if v is not None]
    with jax.numpy_dtype_promotion("standard"):
      dtype = jnp.result_type(*raw)
      if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.promote_types(jnp.float32, dtype)
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    raise errors.ConfigError(
        f"dtype must be a floating (inexact) dtype here, got {jnp.dtype(dtype)}; "
        "pass e.g. dtype=jnp.float32.", value=dtype)
  return dtype


def promote_dtypes(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
  """Casts a tuple of arrays to one dtype (see `canonicalize_dtype`); Nones pass.

  This is the default ``promote_dtype=`` of the layers, with Flax's signature:
  one tuple in, a tuple of the same length out.

  >>> x, w = promote_dtypes((jnp.ones(2, jnp.bfloat16), jnp.ones(2)))
  >>> x.dtype, w.dtype
  (dtype('float32'), dtype('float32'))
  """
  dtype = canonicalize_dtype(*args, dtype=dtype, inexact=inexact)
  return tuple(None if v is None else jnp.asarray(
      v.value if hasattr(v, "raw_value") else v, dtype) for v in args)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """``y + bias`` with standard promotion (a ``preferred_element_type`` output
  may differ from the bias dtype), also under strict promotion."""
  bias = _match_explicit(y, bias)
  with jax.numpy_dtype_promotion("standard"):
    return y + bias


def _match_explicit(y: jax.Array, bias: jax.Array) -> jax.Array:
  """On an Explicit-axes mesh, the bias resharded like the output dims it
  broadcasts against (jax refuses an add whose operands shard a dim
  differently, e.g. a bias sharded like its kernel's output axis while the
  caller asked for another ``out_sharding``); elsewhere the bias as is."""
  try:
    y_sharding, b_sharding = jax.typeof(y).sharding, jax.typeof(bias).sharding
  except (AttributeError, TypeError):
    return bias
  mesh = getattr(y_sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True) or not mesh.are_all_axes_explicit:
    return bias
  y_spec = tuple(y_sharding.spec) + (None,) * (y.ndim - len(y_sharding.spec))
  lead = y.ndim - bias.ndim
  want = tuple(y_spec[lead + i] if bias.shape[i] == y.shape[lead + i] else None
               for i in range(bias.ndim))
  have = tuple(b_sharding.spec) + (None,) * (bias.ndim - len(b_sharding.spec))
  if have == want or lead < 0:
    return bias
  return jax.sharding.reshard(bias, jax.sharding.PartitionSpec(*want))


def call_kwargs(out_sharding: Any = None, preferred_element_type: Any = None) -> dict:
  """Keyword arguments for a user-replaceable op (dot_general, einsum, conv).

  Only the ones that are set are passed, so custom ops without them keep working.
  """
  kwargs = {}
  if out_sharding is not None:
    kwargs["out_sharding"] = out_sharding
  if preferred_element_type is not None:
    kwargs["preferred_element_type"] = preferred_element_type
  return kwargs


def result_dtype(*values: Any) -> Any:
  """The dtype arrays combine to (jax's standard promotion, even under strict)."""
  dtypes = [v.dtype for v in values if v is not None]
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def promote_dtype(*values: Any, dtype: Any = None, inexact: bool = True) -> list:
  """Casts arrays to one compute dtype (`dtype`, or their common dtype).

  None entries pass through. Mixed bf16/f32 inputs with ``dtype=None`` are
  computed in f32.
  """
  raw = [v.value if hasattr(v, "raw_value") else v for v in values]
  if dtype is None:
    dtype = result_dtype(*raw)
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.float32
  return [None if v is None else jnp.asarray(v).astype(dtype) for v in raw]


def check_positive(owner: str, **values: Any) -> None:
  """Raises ConfigError for any argument that is not a positive int."""
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise errors.ConfigError(
          f"{owner}: {name} must be a positive int, got {value!r}; pass the "
          f"number of {name.replace('_', ' ')} (e.g. {name}=16).")


def check_features(layer: Any, x: Any, axis: int, expected: int, what: str) -> None:
  """Raises ShapeError when ``x.shape[axis] != expected``."""
  shape = tuple(jnp.shape(x))
  if len(shape) == 0 or -len(shape) > axis or axis >= len(shape) or shape[axis] != expected:
    raise errors.ShapeError(
        f"{layer_name(layer)}: expected an input whose axis {axis} has "
        f"{expected} {what}, got shape {shape}. Check the layer's "
        f"{what.replace(' ', '_')} or reshape the input.")


def canonical_tuple(owner: str, name: str, value: Any, n: int) -> tuple:
  """An int or sequence -> a tuple of n positive ints (ConfigError otherwise)."""
  if isinstance(value, int) and not isinstance(value, bool):
    value = (value,) * n
  try:
    value = tuple(value)
  except TypeError:
    value = None
  if value is None or len(value) != n or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
    raise errors.ConfigError(
        f"{owner}: {name} must be a positive int or a tuple of {n} positive "
        f"ints, got {value!r}.")
  return value


def set_attrs(obj: Any, **attrs: Any) -> None:
  """Sets several (configuration) attributes of a Module at once."""
  for name, value in attrs.items():
    setattr(obj, name, value)


#: Activation names of the leading dimensions of a layer output, by its rank
#: (feature dimensions excluded): batch, then sequence length.
_LEADING = {0: (), 1: ("activation_batch",), 2: ("activation_batch", "activation_length")}

#: The activation name of an output dimension whose parameter axis is named so.
ACTIVATION_OF = {"embed": "activation_embed", "mlp": "activation_mlp",
                 "heads": "activation_heads", "kv_heads": "activation_kv_heads",
                 "kv": "activation_head_dim", "vocab": "activation_vocab"}


def check_activation_axes(owner: str, axes: Any) -> Any:
  """Validates a layer's ``activation_axes`` argument ("default", None or names).

  Raises:
    ConfigError: for anything else.
  """
  if axes is None or (isinstance(axes, str) and axes == "default"):
    return axes
  if isinstance(axes, str) or not isinstance(axes, Sequence) or not all(
      a is None or isinstance(a, str) for a in axes):
    raise errors.ConfigError(
        f"{owner}: activation_axes must be 'default', None (no output constraint) or a "
        f"tuple of logical names (or None) per output dimension, got {axes!r}.",
        axes=axes)
  return tuple(axes)


def output_axes(setting: Any, ndim: int, *features: str | None) -> tuple | None:
  """The logical names a layer output of rank ``ndim`` is constrained to.

  ``setting`` is the layer's ``activation_axes``: a tuple is used as given;
  ``"default"`` puts batch/length names on the leading dimensions before the
  ``features`` names, when the rank fits (else None: no constraint).
  """
  if setting is None or not isinstance(setting, str):
    return setting
  if any(f is None for f in features):
    return None
  leading = _LEADING.get(ndim - len(features))
  return None if leading is None else leading + tuple(features)


def activation_names(param_axes: Sequence[str | None] | None) -> tuple | None:
  """Activation names for output dims annotated ``param_axes`` (None if any is unknown)."""
  if param_axes is None:
    return None
  names = tuple(ACTIVATION_OF.get(a) for a in param_axes)
  return None if any(n is None for n in names) else names
