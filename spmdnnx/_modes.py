"""Process-wide API modes: graph mode vs tree mode, graph updates.

spmdnnx's graph APIs and transforms work in one of two ways:

- *graph mode* (``graph=True``, the default): arguments are graphs of objects
  with shared references and cycles; a transform writes Variable updates and
  structure changes (new sub-modules, ``sow``) back into the caller's objects
  when ``graph_updates=True`` (the default), and only Variable values when
  ``graph_updates=False``.
- *tree mode* (``graph=False``): Modules are treated as pytrees; a Variable or
  object reachable twice is an error, and nothing but Variable values flows
  back to the caller.

The defaults come from ``$NNX_GRAPH_MODE`` / ``$NNX_GRAPH_UPDATES`` (``0``,
``false``, ``no``, ``off`` read as False) and can be changed with
`set_graph_mode` / `set_graph_updates`, which work three ways::

  nnx.set_graph_mode(False)          # from now on (until changed again)
  with nnx.set_graph_mode(False):    # inside the block only
    ...
  @nnx.set_graph_mode(False)         # during each call of the function
  def f(): ...

Every API with a ``graph=`` / ``graph_updates=`` argument resolves ``None``
through `resolve_graph` / `resolve_graph_updates`.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
  """Reads a boolean environment variable (unset: `default`)."""
  raw = os.environ.get(name)
  if raw is None or not raw.strip():
    return default
  return raw.strip().lower() not in _FALSE


class ScopedSetting:
  """A boolean setting that is set now, for a block, or per call.

  Subclasses give `env_var` and `default`. Constructing one sets the value
  immediately (process-wide for this thread); using it as a context manager
  restores the previous value on exit; using it as a decorator applies it
  during each call of the function only.
  """

  env_var: str = ""
  default: bool = True
  _stacks: threading.local

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls._stacks = threading.local()

  @classmethod
  def _stack(cls) -> list[bool]:
    stack = getattr(cls._stacks, "stack", None)
    if stack is None:
      stack = cls._stacks.stack = []
    return stack

  @classmethod
  def current_value(cls) -> bool:
    """The value in force: the innermost setting, else the environment default."""
    stack = cls._stack()
    if stack:
      return stack[-1]
    return env_flag(cls.env_var, cls.default) if cls.env_var else cls.default

  def __init__(self, value: bool, /):
    stack = self._stack()
    self._had_previous = bool(stack)
    self._previous = stack[-1] if stack else None
    if stack:
      stack[-1] = bool(value)
    else:
      stack.append(bool(value))
    self.value = bool(value)

  def __enter__(self):
    stack = self._stack()
    # The constructor replaced the top; keep the previous value underneath.
    if self._had_previous:
      stack.insert(len(stack) - 1, self._previous)
    return self

  def __exit__(self, *exc):
    self._stack().pop()
    return False

  def __call__(self, f: F) -> F:
    # Used as a decorator: undo the immediate set, apply per call instead.
    stack = self._stack()
    stack.pop()
    if self._had_previous:
      stack.append(self._previous)
    value = self.value

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
      stack = self._stack()
      stack.append(value)
      try:
        return f(*args, **kwargs)
      finally:
        stack.pop()

    return wrapper  # type: ignore[return-value]


class set_graph_mode(ScopedSetting):  # noqa: N801 (Flax's name)
  """Sets whether APIs default to graph mode (True) or tree mode (False).

  >>> import spmdnnx as nnx
  >>> with nnx.set_graph_mode(False):
  ...   nnx.set_graph_mode.current_value()
  False
  >>> nnx.set_graph_mode.current_value()
  True
  """

  env_var = "NNX_GRAPH_MODE"
  default = True


class set_graph_updates(ScopedSetting):  # noqa: N801 (Flax's name)
  """Sets whether graph-mode transforms write structure changes back (True).

  >>> import spmdnnx as nnx
  >>> with nnx.set_graph_updates(False):
  ...   nnx.set_graph_updates.current_value()
  False
  """

  env_var = "NNX_GRAPH_UPDATES"
  default = True


def resolve_graph(graph: bool | None) -> bool:
  """`graph` if given, else the mode in force."""
  return set_graph_mode.current_value() if graph is None else bool(graph)


def resolve_graph_updates(graph_updates: bool | None) -> bool:
  """`graph_updates` if given, else the setting in force."""
  if graph_updates is None:
    return set_graph_updates.current_value()
  return bool(graph_updates)
