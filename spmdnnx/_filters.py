"""Filters: predicates over (path, value) that select parts of a graph's state.

Anything below converts to a predicate with :func:`to_predicate`:

- a Variable subclass (or any type): ``isinstance(value, cls)``;
- ``...`` or ``True``: everything; ``None`` or ``False``: nothing;
- a string: the value's ``tag`` (Rngs streams) or its type's name;
- ``PathContains(key)``: the path has that key;
- ``All(...)``, ``Any(...)``, ``Not(f)``; a tuple or list means ``Any``;
- a callable ``(path, value) -> bool``.

>>> from spmdnnx._variables import Param, BatchStat
>>> pred = to_predicate(Any(Param, PathContains("mean")))
>>> pred(("bn", "mean"), BatchStat(0.0)), pred(("x",), BatchStat(0.0))
(True, False)
"""

from __future__ import annotations

import builtins
import dataclasses
from typing import Callable

from spmdnnx import errors
from spmdnnx._typing import Filter, PathParts

Predicate = Callable[[PathParts, object], bool]


@dataclasses.dataclass(frozen=True)
class OfType:
  """Matches values that are instances of `type` (Variables by their class)."""
  type: type

  def __call__(self, path, value):
    return isinstance(value, self.type) or (
        isinstance(getattr(value, "type", None), builtins.type)
        and not isinstance(value, builtins.type)
        and _is_subclass(getattr(value, "type"), self.type))

  def __repr__(self):
    return f"OfType({self.type.__name__})"


def _is_subclass(a, b) -> bool:
  try:
    return issubclass(a, b)
  except TypeError:
    return False


@dataclasses.dataclass(frozen=True)
class WithTag:
  """Matches values whose ``tag`` attribute equals the string."""
  tag: str

  def __call__(self, path, value):
    return getattr(value, "tag", None) == self.tag


@dataclasses.dataclass(frozen=True)
class _NamedType:
  """String filter: matches a tag or the name of the value's type (or a base)."""
  name: str

  def __call__(self, path, value):
    if getattr(value, "tag", None) == self.name:
      return True
    return any(c.__name__ == self.name for c in type(value).__mro__)

  def __repr__(self):
    return repr(self.name)


@dataclasses.dataclass(frozen=True)
class PathContains:
  """Matches when `key` is one of the path's parts (compared as given or as str).

  With ``exact=False``, matches when ``str(key)`` is a substring of a part.

  >>> PathContains("att", exact=False)(("layers", "attn", "w"), None)
  True
  >>> PathContains("att")(("layers", "attn", "w"), None)
  False
  """
  key: object
  exact: bool = True

  def __call__(self, path, value):
    if not self.exact:
      key = str(self.key)
      return any(key in str(p) for p in path)
    return self.key in path or str(self.key) in (str(p) for p in path)


class _Combinator:
  __slots__ = ("filters", "predicates")

  def __init__(self, *filters: Filter):
    self.filters = filters
    self.predicates = tuple(to_predicate(f) for f in filters)

  def __eq__(self, other):
    return type(self) is type(other) and self.filters == other.filters

  def __hash__(self):
    return hash((type(self), self.filters))

  def __repr__(self):
    return f"{type(self).__name__}({', '.join(map(repr, self.filters))})"


class All(_Combinator):
  """Matches when every filter matches."""

  def __call__(self, path, value):
    return all(p(path, value) for p in self.predicates)


class Any(_Combinator):
  """Matches when at least one filter matches."""

  def __call__(self, path, value):
    return any(p(path, value) for p in self.predicates)


class Not:
  """Matches when the filter does not."""
  __slots__ = ("filter", "predicate")

  def __init__(self, filter: Filter):
    self.filter = filter
    self.predicate = to_predicate(filter)

  def __call__(self, path, value):
    return not self.predicate(path, value)

  def __eq__(self, other):
    return isinstance(other, Not) and other.filter == self.filter

  def __hash__(self):
    return hash((Not, self.filter))

  def __repr__(self):
    return f"Not({self.filter!r})"


class _Everything:

  def __call__(self, path, value):
    return True

  def __repr__(self):
    return "Everything()"


class _Nothing:

  def __call__(self, path, value):
    return False

  def __repr__(self):
    return "Nothing()"


def Everything() -> _Everything:  # noqa: N802  (Flax spelling)
  """A filter matching every value."""
  return _EVERYTHING


def Nothing() -> _Nothing:  # noqa: N802
  """A filter matching no value."""
  return _NOTHING


_EVERYTHING = _Everything()
_NOTHING = _Nothing()


def to_predicate(filter: Filter) -> Predicate:
  """Converts a filter to a `(path, value) -> bool` predicate.

  Raises:
    FilterError: for objects that are not filters.
  """
  if isinstance(filter, (_Everything, _Nothing, _Combinator, Not, OfType, WithTag,
                         _NamedType, PathContains)):
    return filter
  if filter is ... or filter is True:
    return _EVERYTHING
  if filter is None or filter is False:
    return _NOTHING
  if isinstance(filter, type):
    return OfType(filter)
  if isinstance(filter, str):
    return _NamedType(filter)
  if isinstance(filter, (tuple, list)):
    return Any(*filter)
  if callable(filter):
    return filter
  raise errors.FilterError(
      f"{filter!r} (of type {type(filter).__name__}) is not a filter. Use a "
      "Variable type (e.g. nnx.Param), '...', a string, PathContains(key), "
      "All/Any/Not, or a callable (path, value) -> bool.", value=repr(filter))


def is_everything(filter: Filter) -> bool:
  return to_predicate(filter) is _EVERYTHING


def filters_to_predicates(filters: tuple) -> tuple[Predicate, ...]:
  """Converts many filters; a `...` anywhere but last would swallow the rest.

  Raises:
    FilterError: (a TypeError and a ValueError) a ``...`` is followed by a
      filter other than ``...``.
  """
  for i, f in enumerate(filters[:-1]):
    if is_everything(f) and not all(is_everything(g) for g in filters[i + 1:]):
      raise errors.FilterError(
          "`...` or `True` can only be used as the last filters. "
          f"Filter '...' (Everything) appears at position {i} of {len(filters)}; "
          "it matches all remaining state, so the filters after it would get "
          "nothing. Put '...' last.", argument="filters", value=i)
  return tuple(to_predicate(f) for f in filters)
