"""Error classes raised by spmdnnx.

Every user-facing error in the package is an instance of :class:`SpmdnnxError`.
Messages say what is wrong, name the offending path / shape / axes, and say how
to fix it. Subclasses carry structured fields so callers can react to them.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

#: How many offending items an error lists before summarising the rest.
MAX_LISTED = 10


def format_paths(items: Sequence[Any], limit: int = MAX_LISTED) -> str:
  """Formats a capped, comma-separated list: 'a, b, c (and 7 more)'."""
  items = list(items)
  shown = ", ".join(str(i) for i in items[:limit])
  if len(items) > limit:
    shown += f" (and {len(items) - limit} more)"
  return shown


def path_str(path: Iterable[Any]) -> str:
  """Renders a graph path such as ('layers', 0, 'kernel') as 'layers/0/kernel'."""
  parts = [str(p) for p in path]
  return "/".join(parts) if parts else "<root>"


class SpmdnnxError(Exception):
  """Base class of every error spmdnnx raises on bad input.

  Besides the message, an error carries the facts it names as structured
  keyword fields (``paths``, ``shapes``, ``axes``, ``step``, ...), readable as
  attributes and together as ``error.fields``, so callers can react to them
  without parsing text. A field that was not given reads as ``None``.

  >>> e = ShapeError("bad shape at 'w'", paths=["w"], shapes=[(2, 3)])
  >>> e.paths, e.shapes, e.axes
  (['w'], [(2, 3)], None)
  """

  def __init__(self, message: str = "", **fields: Any):
    super().__init__(message)
    self.fields = dict(fields)

  def __getattr__(self, name: str) -> Any:
    # Only reached for attributes that are not set: unknown fields read None.
    if name.startswith("__") or name == "fields":
      raise AttributeError(name)
    return self.__dict__.get("fields", {}).get(name)

  def __reduce__(self):
    return (_rebuild_error, (type(self), str(self), self.fields))


def _rebuild_error(cls, message, fields):
  return cls(message, **fields)


class FilterError(SpmdnnxError, TypeError, ValueError):
  """A filter is not understood, or filters do not cover every state leaf.

  Both a TypeError and a ValueError: Flax raises either, depending on the case.
  """


class MetadataError(SpmdnnxError, ValueError):
  """Variable metadata is invalid (e.g. logical_axes length differs from ndim)."""


class GraphError(SpmdnnxError, ValueError):
  """A graph/State structure problem: merge mismatch, bad node, bad path."""


class TraceContextError(SpmdnnxError, RuntimeError):
  """A traced value is leaking into (or out of) an object outside its transform."""


class TransformError(SpmdnnxError, ValueError):
  """A lifted transform was given arguments it cannot map."""


class DonatedArrayError(TransformError, RuntimeError):
  """An array used here was deleted: a donating `nnx.jit` step consumed it."""

  @classmethod
  def build(cls, who: str, where: str, **fields: Any) -> "DonatedArrayError":
    """The error for `where` (paths, arguments) holding a deleted array, raised by `who`."""
    return cls(
        f"{who}: {where} holds an array that was deleted. Under `use_sharding`, nnx.jit "
        "donates the state of its graph-object arguments (donate_argnums and donate_state "
        "do so anywhere): after such a step, arrays read from a Module before it (kept "
        "for EMA, logging, a snapshot) are invalid. Keep a copy before the step "
        "(`jnp.copy(v.value)` or `jax.device_get(v.value)`), or pass "
        "`donate_state=False` to nnx.jit to opt out.", **fields)


class ShapeError(SpmdnnxError, ValueError):
  """An input's shape does not match what a layer expects."""


class ConfigError(SpmdnnxError, ValueError):
  """An invalid constructor or configuration argument."""


class AxisRulesError(SpmdnnxError, ValueError):
  """Axis rules are malformed or cannot resolve a logical axis name."""


class MeshError(SpmdnnxError, ValueError):
  """A mesh configuration does not fit the available devices."""


class ShardingError(SpmdnnxError, ValueError):
  """A sharding request cannot be satisfied (strict report, bad spec, ...)."""


class ShardingWarning(UserWarning):
  """A sharding that works but is probably not what was meant."""


class CheckpointError(SpmdnnxError, RuntimeError):
  """A checkpoint cannot be written or restored safely."""


class DataError(SpmdnnxError, ValueError):
  """A data source or pipeline cannot deliver what the config asks for."""


class TrainingError(SpmdnnxError, RuntimeError):
  """A training run cannot go on (non-finite loss, stalled step, ...)."""


class LaunchError(SpmdnnxError, RuntimeError):
  """A (multi-process) job cannot be started or was stopped by a fault."""


class ArgumentError(SpmdnnxError, TypeError):
  """A call is missing a required argument or got one of the wrong type."""


class MissingStreamError(ConfigError, AttributeError, KeyError):
  """An Rngs has no stream of the asked name and no ``default`` stream.

  It is an AttributeError (``rngs.name``) and a KeyError (``rngs["name"]``),
  as Flax programs expect.
  """

  __str__ = Exception.__str__


class MissingMetadataError(MetadataError, KeyError):
  """``Variable.get_metadata(name)`` for a name the Variable does not have."""

  __str__ = Exception.__str__
