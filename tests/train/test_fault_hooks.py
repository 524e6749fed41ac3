"""Step watchdog, preemption guard, stack dumps and per-process logs (in-process)."""

import logging
import os
import signal
import sys
import threading
import time

import pytest

from spmdnnx.train import _faults
from spmdnnx.train import _logs


def _watch(tmp_path, timeout):
  fired = []
  done = threading.Event()

  def on_hang(message):
    fired.append(message)
    done.set()

  dog = _faults.StepWatchdog(timeout, stacks_path=tmp_path / "logs" / "stacks_process_3.txt",
                             process_index=3, on_hang=on_hang)
  return dog, fired, done


def test_watchdog_names_the_step_and_dumps_every_thread(tmp_path):
  dog, fired, done = _watch(tmp_path, 0.3)
  dog.start()
  dog.on_step_end(7)
  start = time.monotonic()
  assert done.wait(20)
  assert time.monotonic() - start >= 0.3
  dog.stop()
  assert fired == [f"spmdnnx watchdog: process 3: step 8 did not complete within 0.3 s (the "
                   f"last completed step is 7); --hang_timeout=0.3. The stacks of every thread "
                   f"are in {dog.stacks_path}. Aborting the job."]
  text = dog.stacks_path.read_text()
  assert fired[0] in text
  # The main thread (here: waiting on the event in this test) is in the dump.
  assert "test_watchdog_names_the_step_and_dumps_every_thread" in text
  assert "spmdnnx-step-watchdog" not in text or "Thread" in text


def test_watchdog_gives_the_first_step_more_time(tmp_path):
  dog, fired, done = _watch(tmp_path, 0.2)
  dog.start()
  time.sleep(0.5)  # > timeout, < FIRST_STEP_FACTOR * timeout
  assert not fired
  assert done.wait(20)
  dog.stop()
  assert "the first step did not complete within 1 s" in fired[0]


def test_watchdog_is_quiet_while_steps_complete_and_after_stop(tmp_path):
  dog, fired, done = _watch(tmp_path, 0.3)
  with dog:
    for step in range(1, 8):
      time.sleep(0.1)
      dog.on_step_end(step)
  assert not done.wait(0.8)
  assert not fired and not dog.stacks_path.exists()
  assert dog.last_step == 7


def test_watchdog_zero_timeout_is_disabled(tmp_path):
  dog, fired, done = _watch(tmp_path, 0)
  dog.start()
  assert dog._thread is None
  dog.stop()


def test_dump_stacks_appends_with_header(tmp_path):
  path = _faults.dump_stacks(tmp_path / "a" / "s.txt", "first\n")
  _faults.dump_stacks(path, "second\n")
  text = path.read_text()
  assert text.startswith("first\n") and "second\n" in text
  assert text.count("most recent call first") >= 2
  assert _faults.stacks_path("/w", 2) == type(path)("/w/logs/stacks_process_2.txt")


def test_sigterm_stops_a_single_process_after_the_step(capsys):
  before = signal.getsignal(signal.SIGTERM)
  guard = _faults.PreemptionGuard().install()
  try:
    guard.on_step_end(1)
    assert not guard.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs between bytecodes
    guard.on_step_end(2)
    assert guard.should_stop() and guard.requested
    assert guard.should_stop()  # asked twice for the same step: same answer
  finally:
    guard.uninstall()
  assert signal.getsignal(signal.SIGTERM) is before
  assert "SIGTERM received: finishing the current step" in capsys.readouterr().err


def test_fault_hooks_bundle_and_injected_hang(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("SPMDNNX_TEST_HANG_AFTER_STEP", "2")
  monkeypatch.setenv("SPMDNNX_TEST_HANG_PROCESS", "1")
  monkeypatch.setattr(_faults, "_HANG_SECONDS", 0.0)
  other = _faults.FaultHooks(tmp_path, process_index=0, hang_timeout=0)
  assert other._hang_after is None  # another process: no injection
  with _faults.FaultHooks(tmp_path, process_index=1, hang_timeout=60) as hooks:
    hooks.on_step_end(1)
    hooks.on_step_end(2)
    assert not hooks.should_stop()
    assert hooks.watchdog.last_step == 2 and hooks.guard.step == 2
  assert "process 1 hangs after step 2" in capsys.readouterr().err
  assert hooks.watchdog._thread is None


def test_process_log_captures_prints_and_logging(tmp_path, capsys):
  saved = sys.stdout, sys.stderr
  with _logs.process_log(tmp_path, process_index=1) as path:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    logging.getLogger("spmdnnx.test").warning("a warning record")
  assert (sys.stdout, sys.stderr) == saved
  assert path == tmp_path / "logs" / "process_1.log"
  text = path.read_text()
  assert "to stdout\n" in text and "to stderr\n" in text
  assert "WARNING [process 1] spmdnnx.test: a warning record" in text
  out = capsys.readouterr()
  assert "to stdout" in out.out and "to stderr" in out.err
  with _logs.process_log(tmp_path, process_index=1):
    print("appended")
  assert path.read_text().startswith(text)
  print("after")
  assert "after" not in path.read_text()


@pytest.mark.parametrize("name", ["spmdnnx.train._faults", "spmdnnx.train._logs",
                                  "spmdnnx.train._distributed",
                                  "spmdnnx.train._local_launch"])
def test_docstring_examples(name):
  import doctest
  import importlib
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
