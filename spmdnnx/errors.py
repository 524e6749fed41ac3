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
  """Base class of every error spmdnnx raises on bad input."""


class FilterError(SpmdnnxError, TypeError):
  """A filter is not understood, or filters do not cover every state leaf."""


class MetadataError(SpmdnnxError, ValueError):
  """Variable metadata is invalid (e.g. logical_axes length differs from ndim)."""


class GraphError(SpmdnnxError, ValueError):
  """A graph/State structure problem: merge mismatch, bad node, bad path."""


class TraceContextError(SpmdnnxError, RuntimeError):
  """A traced value is leaking into (or out of) an object outside its transform."""


class TransformError(SpmdnnxError, ValueError):
  """A lifted transform was given arguments it cannot map."""


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
