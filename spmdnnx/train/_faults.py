"""Faults that must never hang a job: a step watchdog and a preemption guard.

- :class:`StepWatchdog`: when no training step completes for ``timeout_s``
  seconds, writes every thread's stack to ``DIR/logs/stacks_process_<i>.txt``
  and aborts the process with a message naming the step (exit code
  :data:`HANG_EXIT_CODE`). In a multi-process job the other processes then stop
  too (``launch.local`` stops them; on a cluster the coordination service's
  heartbeat does).
- :class:`PreemptionGuard`: SIGTERM asks the loop to stop after the current
  step (``should_stop()``), so it saves a checkpoint and exits 0. With several
  processes it uses JAX's preemption sync point, so every process stops after
  the same step even when the signal reaches only some of them.

Both plug into the loop's hooks: ``on_step_end(step)`` and ``should_stop()``;
:class:`FaultHooks` bundles them for a training run.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with StepWatchdog(60.0, stacks_path=d + "/stacks.txt") as dog:
...   dog.on_step_end(1)
>>> dog.last_step
1
"""

from __future__ import annotations

import faulthandler
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Callable

import jax
from jax.experimental import multihost_utils

#: Exit status of a process the watchdog aborted (the `timeout` tool's code).
HANG_EXIT_CODE = 124

#: The first step compiles, so it gets this many times the hang timeout.
FIRST_STEP_FACTOR = 5

#: Test-only fault injection: sleep this many seconds in ``on_step_end`` of the
#: step named by ``SPMDNNX_TEST_HANG_AFTER_STEP`` (on the process named by
#: ``SPMDNNX_TEST_HANG_PROCESS``, default every process), so the next step hangs.
_HANG_AFTER_STEP_ENV = "SPMDNNX_TEST_HANG_AFTER_STEP"
_HANG_PROCESS_ENV = "SPMDNNX_TEST_HANG_PROCESS"
_HANG_SECONDS = 3600.0
#: Test-only: every step sleeps this many seconds in ``on_step_end`` (a slow
#: job, so a signal sent mid-run reaches every process before the last step).
_STEP_SECONDS_ENV = "SPMDNNX_TEST_STEP_SECONDS"


def stacks_path(workdir: str | os.PathLike, process_index: int) -> pathlib.Path:
  """``DIR/logs/stacks_process_<i>.txt``: where the watchdog writes stacks."""
  return pathlib.Path(workdir) / "logs" / f"stacks_process_{process_index}.txt"


def dump_stacks(path: str | os.PathLike, header: str = "") -> pathlib.Path:
  """Writes every thread's Python stack to ``path`` (appending), after ``header``.

  >>> import tempfile
  >>> p = dump_stacks(tempfile.mkdtemp() + "/s.txt", "why\\n")
  >>> "most recent call first" in p.read_text()
  True
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    f.write(header)
    f.flush()
    faulthandler.dump_traceback(file=f, all_threads=True)
  return path


class StepWatchdog:
  """Aborts the process when no step completes for ``timeout_s`` seconds.

  A daemon thread watches the time since the last ``on_step_end``; the first
  step (compilation) gets ``FIRST_STEP_FACTOR`` times the timeout. When it
  fires it dumps every thread's stack to ``stacks_path`` and calls ``on_hang``
  with the message (default: print it to stderr and exit with
  :data:`HANG_EXIT_CODE`). A C-level fallback (``faulthandler``) aborts too
  should the Python thread itself be starved.

  Args:
    timeout_s: seconds without a completed step; ``0`` disables the watchdog.
    stacks_path: the file the stacks go to.
    process_index: named in the message.
    on_hang: called with the message instead of exiting (tests).
  """

  def __init__(self, timeout_s: float, *, stacks_path: str | os.PathLike,
               process_index: int = 0, on_hang: Callable[[str], None] | None = None):
    self.timeout_s = float(timeout_s)
    self.stacks_path = pathlib.Path(stacks_path)
    self.process_index = process_index
    self.last_step: int | None = None
    self._on_hang = on_hang or _abort
    self._last_time = 0.0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self, last_step: int | None = None) -> "StepWatchdog":
    """Arms the watchdog; ``last_step`` is the step a resumed run starts after."""
    if self.timeout_s <= 0 or self._thread is not None:
      return self
    with self._lock:
      self.last_step, self._last_time, self._first = last_step, time.monotonic(), True
    self._stop.clear()
    self._thread = threading.Thread(target=self._watch, name="spmdnnx-step-watchdog",
                                    daemon=True)
    self._thread.start()
    self._arm_fallback(self.timeout_s * FIRST_STEP_FACTOR)
    return self

  def on_step_end(self, step: int) -> None:
    """Records that ``step`` completed (the loop's ``on_step_end`` hook)."""
    with self._lock:
      self.last_step, self._last_time, self._first = step, time.monotonic(), False
    if self._thread is not None:
      self._arm_fallback(self.timeout_s)

  def stop(self) -> None:
    """Disarms the watchdog (the loop ended)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      faulthandler.cancel_dump_traceback_later()

  def __enter__(self) -> "StepWatchdog":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _arm_fallback(self, seconds: float) -> None:
    # Fires only if the Python thread could not (e.g. the GIL is never released).
    for stream in (sys.stderr, sys.__stderr__):
      try:
        stream.fileno()
      except (AttributeError, OSError, ValueError):
        continue
      faulthandler.dump_traceback_later(seconds + max(30.0, seconds), exit=True, file=stream)
      return

  def _watch(self) -> None:
    while True:
      with self._lock:
        limit = self.timeout_s * (FIRST_STEP_FACTOR if self._first else 1)
        waited = time.monotonic() - self._last_time
        last = self.last_step
      if waited >= limit:
        break
      if self._stop.wait(min(limit - waited, 1.0)):
        return
    step = "the first step" if last is None else f"step {last + 1}"
    after = "" if last is None else f" (the last completed step is {last})"
    message = (f"spmdnnx watchdog: process {self.process_index}: {step} did not complete "
               f"within {limit:g} s{after}; --hang_timeout={self.timeout_s:g}. The stacks of "
               f"every thread are in {self.stacks_path}. Aborting the job.")
    dump_stacks(self.stacks_path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n\n")
    self._on_hang(message)


def _abort(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(HANG_EXIT_CODE)  # pylint: disable=protected-access


class PreemptionGuard:
  """Turns SIGTERM into a clean stop after the current step.

  In a ``jax.distributed`` job, JAX's preemption service catches SIGTERM and
  ``should_stop()`` asks its sync point, so every process stops after the same
  step. In a single process a SIGTERM handler sets a flag. Call
  ``on_step_end(step)`` after every step, then ``should_stop()``.

  >>> guard = PreemptionGuard().install()
  >>> guard.on_step_end(1); guard.should_stop()
  False
  >>> guard.uninstall()
  """

  def __init__(self):
    self.step: int | None = None
    self.requested = False
    self._answer: tuple[int | None, bool] | None = None
    self._previous = None
    self._multiprocess = False

  def install(self) -> "PreemptionGuard":
    """Starts listening for SIGTERM (from the main thread)."""
    self._multiprocess = (jax.distributed.is_initialized() and
                          bool(jax.config.jax_enable_preemption_service))
    if not self._multiprocess:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def uninstall(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.requested = True
    print(f"spmdnnx: {signal.Signals(signum).name} received: finishing the current step, "
          "saving a checkpoint, then exiting", file=sys.stderr, flush=True)

  def on_step_end(self, step: int) -> None:
    """Records the step that just completed."""
    self.step = step

  def should_stop(self) -> bool:
    """Whether the loop must save and stop now (same answer on every process)."""
    if self._answer is not None and self._answer[0] == self.step:
      return self._answer[1]
    if self._multiprocess:
      # Must be called once per step on every process, with increasing steps.
      stop = multihost_utils.reached_preemption_sync_point(self.step or 0)
      if stop:
        self.requested = True
        print(f"spmdnnx: preemption: every process stops after step {self.step}",
              file=sys.stderr, flush=True)
    else:
      stop = self.requested
    self._answer = (self.step, stop)
    return stop


class FaultHooks:
  """The watchdog and preemption guard of one training run, as loop hooks.

  Args:
    workdir: the run's directory; stacks go to ``DIR/logs``.
    process_index: this process's rank.
    hang_timeout: seconds for :class:`StepWatchdog` (``0`` disables it).
  """

  def __init__(self, workdir: str | os.PathLike, *, process_index: int = 0,
               hang_timeout: float = 0.0):
    self.process_index = process_index
    self.watchdog = StepWatchdog(hang_timeout, stacks_path=stacks_path(workdir, process_index),
                                 process_index=process_index)
    self.guard = PreemptionGuard()
    self._hang_after = _injected_hang_step(process_index)
    self._step_seconds = float(os.environ.get(_STEP_SECONDS_ENV) or 0.0)

  def start(self, last_step: int | None = None) -> "FaultHooks":
    """Arms the watchdog and installs the SIGTERM guard."""
    self.guard.install()
    self.watchdog.start(last_step)
    return self

  def on_step_end(self, step: int) -> None:
    """The loop's per-step hook."""
    self.watchdog.on_step_end(step)
    self.guard.on_step_end(step)
    if self._hang_after is not None and step == self._hang_after:
      print(f"spmdnnx: test fault injection: process {self.process_index} hangs after step "
            f"{step}", file=sys.stderr, flush=True)
      time.sleep(_HANG_SECONDS)
    if self._step_seconds > 0:
      time.sleep(self._step_seconds)

  def should_stop(self) -> bool:
    """The loop's stop predicate (preemption)."""
    return self.guard.should_stop()

  def close(self) -> None:
    """Disarms both."""
    self.watchdog.stop()
    self.guard.uninstall()

  def __enter__(self) -> "FaultHooks":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()


def _injected_hang_step(process_index: int) -> int | None:
  step = os.environ.get(_HANG_AFTER_STEP_ENV)
  who = os.environ.get(_HANG_PROCESS_ENV)
  if not step or (who is not None and who != "" and int(who) != process_index):
    return None
  return int(step)
