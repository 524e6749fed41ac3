"""A bound on the `nnx.jit` executions in flight on the multi-device CPU backend.

XLA:CPU runs the per-device parts of a multi-device program on a shared thread
pool and joins them at every collective. When the host dispatches many such
programs without waiting, the joins starve and XLA aborts the process
("rendezvous termination timeout"). On the CPU backend with more than one
device, `nnx.jit` therefore keeps one output array of each of its recent
executions and, once more than ``max_in_flight`` are pending, waits for the
oldest. Accelerators are never bounded.

The bound is global (all `nnx.jit` functions share it); a jit may set its own
with ``nnx.jit(max_in_flight=n)``. ``0`` or ``None`` means unbounded. The
default is `DEFAULT_MAX_IN_FLIGHT`, or the environment variable
``SPMDNNX_MAX_IN_FLIGHT`` when set.

>>> old = set_max_in_flight(3)
>>> get_max_in_flight()
3
>>> _ = set_max_in_flight(old)
"""

from __future__ import annotations

import collections
import os

import jax

from spmdnnx import errors

DEFAULT_MAX_IN_FLIGHT = 2
ENV_VAR = "SPMDNNX_MAX_IN_FLIGHT"


def _parse(value, what: str) -> int:
  if value is None:
    return 0
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = -1
  if n < 0 or isinstance(value, bool):
    raise errors.ConfigError(
        f"{what} must be a non-negative integer (0 or None: unbounded), got {value!r}.")
  return n


class _InFlight:
  """The global bound and the samples (one output array per pending execution)."""

  __slots__ = ("limit", "active", "pending")

  def __init__(self):
    env = os.environ.get(ENV_VAR)
    self.limit = DEFAULT_MAX_IN_FLIGHT if env is None else _parse(env, ENV_VAR)
    self.active: bool | None = None   # decided at the first execution
    self.pending: collections.deque = collections.deque()


STATE = _InFlight()


def set_max_in_flight(n: int | None) -> int:
  """Sets the global bound on `nnx.jit` executions in flight (CPU, >1 device).

  Args:
    n: the most executions pending at once; ``0`` or ``None`` for no bound.

  Returns:
    The previous bound (0 meaning unbounded), so it can be restored.

  Raises:
    ConfigError: if n is negative or not an integer.
  """
  old = STATE.limit
  STATE.limit = _parse(n, "max_in_flight")
  return old


def get_max_in_flight() -> int:
  """The global bound on `nnx.jit` executions in flight (0: unbounded)."""
  return STATE.limit


def bounded_backend() -> bool:
  """Whether executions are bounded here: the CPU backend with >1 device."""
  active = STATE.active
  if active is None:
    active = STATE.active = jax.default_backend() == "cpu" and jax.device_count() > 1
  return active


def track(sample, limit: int) -> None:
  """Records one execution by an output array; waits while too many are pending.

  Called only with ``limit > 0``. A sample that a later execution consumed by
  donation (deleted) cannot be waited on; that later execution depends on it,
  so the wait goes to the oldest sample still alive instead (a stronger wait).
  """
  pending = STATE.pending
  pending.append(sample)
  while len(pending) > limit:
    oldest = pending.popleft()
    if oldest.is_deleted():
      oldest = next((s for s in pending if not s.is_deleted()), None)
      if oldest is None:
        continue
    oldest.block_until_ready()
