"""Faults with real processes: a killed process, a stuck one, preemption, no coordinator.

Uses tests/e2e/_fault_worker.py (the real flags, watchdog, guard and logs
around a tiny data-parallel loop) so each test takes seconds; the same faults
through launch.train are in test_local_launch.py.
"""

import os
import signal
import socket
import sys
import time

import pytest

import launch_helpers as lh

pytestmark = pytest.mark.slow


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigkill_of_one_process_ends_the_job_fast(tmp_path):
  job = lh.local("--num_processes=2", "--devices_per_process=2", "--",
                 f"--workdir={tmp_path}", "--steps=100000", "--step_sleep=0.05")
  job.wait_for(r"^\[1\] step 3 ")
  victim = job.pid_of(1)
  os.kill(victim, signal.SIGKILL)
  killed = time.monotonic()
  rc = job.finish(timeout=120)
  assert time.monotonic() - killed < 60
  assert rc == 128 + signal.SIGKILL
  assert (f"launch.local: process 1 (pid {victim}) died with signal SIGKILL; stopping the "
          "other processes") in job.text
  assert "job failed: process 1 signal SIGKILL" in job.text


def test_stuck_process_watchdog_dumps_stacks_and_aborts(tmp_path):
  job = lh.local("--num_processes=2", "--devices_per_process=2", "--",
                 f"--workdir={tmp_path}", "--steps=100000", "--hang_timeout=3",
                 env_extra={"SPMDNNX_TEST_HANG_AFTER_STEP": 4, "SPMDNNX_TEST_HANG_PROCESS": 1})
  job.wait_for(r"process 1 hangs after step 4")
  stuck = time.monotonic()
  rc = job.finish(timeout=120)
  assert time.monotonic() - stuck < 60
  assert rc == 124, job.text[-3000:]
  # Both processes stop at step 5 (process 0 waits in the all-reduce); the
  # first watchdog to fire names the step and its stack file, the launcher
  # stops the other.
  reported = [r for r in (0, 1) if f"spmdnnx watchdog: process {r}: step 5 did not complete "
              "within 3 s (the last completed step is 4)" in job.text]
  assert reported, job.text[-3000:]
  stacks = tmp_path / "logs" / f"stacks_process_{reported[0]}.txt"
  assert f"The stacks of every thread are in {stacks}" in job.text
  text = stacks.read_text()
  assert "step 5 did not complete" in text and "most recent call first" in text
  if reported[0] == 1:  # the culprit's own stack shows where it is stuck
    assert "in on_step_end" in text and "_faults.py" in text
  assert f"job failed: process {reported[0]} exit code 124" in job.text or (
      f"died with exit code 124" in job.text)


def _run(tmp_path, steps, *launcher_args, sigterm_after=None):
  job = lh.local(*launcher_args, "--", f"--workdir={tmp_path}", f"--steps={steps}",
                 "--step_sleep=0.1")
  if sigterm_after is not None:
    job.wait_for(rf"step {sigterm_after} ")
    job.proc.send_signal(signal.SIGTERM)
  return job.finish(timeout=240), job


@pytest.mark.parametrize("procs,devices", [(1, 4), (2, 2)])
def test_sigterm_saves_and_resume_is_bit_exact(tmp_path, procs, devices):
  args = (f"--num_processes={procs}", f"--devices_per_process={devices}")
  rc, full = _run(tmp_path / "full", 14, *args)
  assert rc == 0, full.text[-3000:]
  rc, first = _run(tmp_path / "cut", 14, *args, sigterm_after=3)
  assert rc == 0, first.text[-3000:]
  assert "SIGTERM received: sending SIGTERM to every process" in first.text
  stopped = max(lh.losses(first.text))
  assert 3 <= stopped < 14, first.text[-3000:]
  assert f"saved step {stopped}" in first.text
  rc, second = _run(tmp_path / "cut", 14, *args)
  assert rc == 0, second.text[-3000:]
  assert f"restored step {stopped}" in second.text
  expected = lh.losses(full.text, rank=0)
  resumed = {**lh.losses(first.text, rank=0), **lh.losses(second.text, rank=0)}
  assert min(lh.losses(second.text, rank=0)) == stopped + 1
  assert resumed == expected  # printed with every float32 digit: bit for bit
  if procs == 2:
    assert lh.losses(second.text, rank=1) == {s: expected[s] for s in range(stopped + 1, 15)}


def test_sigterm_to_a_single_process_without_launcher(tmp_path):
  job = lh.Job([sys.executable, str(lh.E2E / "_fault_worker.py"), f"--workdir={tmp_path}",
                "--steps=100000", "--step_sleep=0.1"], env_extra={
                    "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  job.wait_for(r"^step 2 ")
  job.proc.send_signal(signal.SIGTERM)
  assert job.finish(timeout=120) == 0
  assert "running as a single process" in job.text
  assert "SIGTERM received: finishing the current step" in job.text
  last = max(lh.losses(job.text))
  assert f"saved step {last}" in job.text and last < 100


def test_coordinator_that_never_comes_up(tmp_path):
  port = _free_port()
  start = time.monotonic()
  job = lh.Job([sys.executable, str(lh.E2E / "_fault_worker.py"), f"--workdir={tmp_path}",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                "--process_id=1", "--initialization_timeout=3"])
  assert job.finish(timeout=120) == 1
  assert 3 <= time.monotonic() - start < 60
  assert (f"LaunchError: process 1: the coordinator (process 0) at 127.0.0.1:{port} never "
          "came up within --initialization_timeout=3 s") in job.text


def test_a_process_that_never_joins(tmp_path):
  port = _free_port()
  start = time.monotonic()
  job = lh.Job([sys.executable, str(lh.E2E / "_fault_worker.py"), f"--workdir={tmp_path}",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                "--process_id=0", "--initialization_timeout=3"])
  assert job.finish(timeout=120) == 1
  assert time.monotonic() - start < 60
  assert ("LaunchError: process 0 of 2: the job did not assemble within "
          f"--initialization_timeout=3 s: the other processes did not join 127.0.0.1:{port}"
          in job.text)
  assert "Check failure" not in job.text  # ours, not JAX's abort
