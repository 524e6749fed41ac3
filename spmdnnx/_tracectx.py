"""Which lifted transform is currently tracing.

Every lifted transform pushes a fresh frame while it runs the user's function.
Objects remember the frame they were created in; a Variable refuses a traced
value assigned from a frame other than its own, which catches tracers leaking
into Modules that live outside the transform.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class TraceFrame:
  """An opaque marker for one activation of a lifted transform."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f"TraceFrame({self.name})"


class _Local(threading.local):

  def __init__(self):
    self.frames: list[TraceFrame] = []


_LOCAL = _Local()


def current_frame() -> TraceFrame | None:
  """The innermost active transform frame, or None outside every transform."""
  frames = _LOCAL.frames
  return frames[-1] if frames else None


def active_names() -> tuple[str, ...]:
  """The names of the active transform frames, outermost first."""
  return tuple(f.name for f in _LOCAL.frames)


@contextlib.contextmanager
def frame(name: str) -> Iterator[TraceFrame]:
  """Runs the body inside a new transform frame."""
  f = TraceFrame(name)
  _LOCAL.frames.append(f)
  try:
    yield f
  finally:
    _LOCAL.frames.pop()
