"""launch.local: spawning, prefixed output, failure propagation, signal forwarding."""

import io
import os
import re
import shutil
import signal
import sys
import time

import pytest

from spmdnnx import errors
from spmdnnx.train import _local_launch as ll

import launch_helpers as lh

_PY = sys.executable


def _run(code, n=2, **kw):
  out = io.StringIO()
  rc = ll.launch_local([_PY, "-c", code], num_processes=n, devices_per_process=3, stream=out,
                       **kw)
  return rc, out.getvalue()


def test_each_process_gets_its_flags_devices_and_gloo():
  code = ("import os, sys; print(sys.argv[1:]); print(os.environ['XLA_FLAGS'], "
          "os.environ['JAX_PLATFORMS'], os.environ['JAX_CPU_COLLECTIVES_IMPLEMENTATION'])")
  rc, out = _run(code, port=12345)
  assert rc == 0
  for rank in (0, 1):
    assert (f"[{rank}] ['--coordinator_address=127.0.0.1:12345', '--num_processes=2', "
            f"'--process_id={rank}']") in out
    assert f"[{rank}] --xla_force_host_platform_device_count=3 cpu gloo" in out
  assert "launch.local: all 2 processes exited 0" in out


def test_a_failing_process_stops_the_others_and_sets_the_status():
  code = ("import sys, time\n"
          "if sys.argv[-1] == '--process_id=1': sys.exit(3)\n"
          "time.sleep(600)")
  start = time.monotonic()
  rc, out = _run(code, n=3)
  assert rc == 3
  assert time.monotonic() - start < 60
  assert "launch.local: process 1 (pid" in out and "died with exit code 3" in out
  assert "job failed: process 1 exit code 3 (process 0: signal SIGKILL" in out


def test_a_process_left_running_after_the_others_finished_is_stopped():
  code = ("import sys, time\n"
          "if sys.argv[-1] == '--process_id=1': time.sleep(600)")
  rc, out = _run(code, exit_grace_s=1.0)
  assert rc == 128 + signal.SIGKILL
  assert "process(es) 1 still running 1 s after another process finished" in out


def test_flags_the_launcher_owns_are_rejected():
  with pytest.raises(errors.LaunchError, match=r"--num_processes, --fake_devices after '--' "
                     "conflict with the launcher") as e:
    ll.launch_local([_PY, "--num_processes=2", "--fake_devices=8"], num_processes=2,
                    devices_per_process=4)
  assert e.value.flags == ["--num_processes", "--fake_devices"]
  with pytest.raises(errors.LaunchError, match="--devices_per_process=0 must be at least 1"):
    ll.launch_local([_PY], num_processes=1, devices_per_process=0)


def test_status_helpers():
  assert ll.describe_status(-15) == "signal SIGTERM"
  assert ll.shell_status(-9) == 137 and ll.shell_status(4) == 4
  env = ll.child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, 2)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.slow
def test_cli_forwards_sigterm_and_exits_with_the_jobs_status(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(
      "import signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), "
      "sys.exit(0)))\n"
      "print('ready', flush=True)\n"
      "time.sleep(600)\n")
  job = lh.Job([_PY, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1",
                f"--module=worker"], env_extra={"PYTHONPATH": str(tmp_path)})
  job.wait_for(r"^\[0\] ready")
  job.wait_for(r"^\[1\] ready")
  job.proc.send_signal(signal.SIGTERM)
  assert job.finish(timeout=60) == 0
  assert "[0] got SIGTERM" in job.text and "[1] got SIGTERM" in job.text
  assert "launch.local: all 2 processes exited 0" in job.text


@pytest.mark.slow
def test_cli_usage_error_for_owned_flags():
  job = lh.Job([_PY, "-m", "launch.local", "--num_processes=2", "--", "--process_id=1"])
  assert job.finish(timeout=60) == 1
  assert "LaunchError: launch.local: --process_id after '--' conflict" in job.text


# --- launch.train through launch.local (the real runtime) ------------------

STEPS = 6


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
  """One uninterrupted run of 1 x 8 and one of 2 x 4 (same config)."""
  runs = {}
  for procs, devices in ((1, 8), (2, 4)):
    workdir = tmp_path_factory.mktemp(f"ref_{procs}x{devices}")
    job = lh.train_local(procs, devices, workdir, steps=STEPS)
    assert job.finish(timeout=600) == 0, job.text[-4000:]
    runs[procs] = (workdir, job)
  return runs


@pytest.mark.slow
def test_2x4_matches_1x8_and_each_process_loads_half(reference_runs):
  (one_dir, one), (two_dir, two) = reference_runs[1], reference_runs[2]
  single, double = lh.metrics(one_dir), lh.metrics(two_dir)
  assert sorted(single) == sorted(double) == list(range(2, STEPS + 1))
  assert double == pytest.approx(single, rel=1e-4)
  b1, b2 = lh.batch_lines(one.text), lh.batch_lines(two.text)
  for step in range(1, STEPS + 1):
    rows, n, whole = b1[(0, step)]
    assert (rows, n) == ("0..7", 8)
    (r0, n0, c0), (r1, n1, c1) = b2[(0, step)], b2[(1, step)]
    # Each process read only its own half of the global batch, and the halves
    # together are the single process's batch.
    assert (r0, r1, n0, n1) == ("0..3", "4..7", 8, 8)
    assert c0 + c1 == whole and c0 != c1
  # Progress and metrics come from process 0 only; every process has a log.
  assert re.search(r"(?m)^\[0\] step +3/6 \| loss", two.text)
  assert not re.search(r"(?m)^\[1\] step +3/6", two.text)
  for rank in (0, 1):
    log = (two_dir / "logs" / f"process_{rank}.log").read_text()
    assert f"process {rank} of 2: step 2 batch rows" in log
  assert re.search(r"step +3/6 \| loss", (two_dir / "logs" / "process_0.log").read_text())
  assert "| loss" not in (two_dir / "logs" / "process_1.log").read_text()


def _resume_from_step_2(src, dst):
  shutil.copytree(src, dst)
  for step_dir in (dst / "checkpoints").iterdir():
    if step_dir.name.isdigit() and int(step_dir.name) > 2:
      shutil.rmtree(step_dir)
  (dst / "metrics.jsonl").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("writer,reader", [(2, 1), (1, 2)])
def test_checkpoint_restores_across_process_counts(reference_runs, tmp_path, writer, reader):
  src, _ = reference_runs[writer]
  workdir = tmp_path / "resumed"
  _resume_from_step_2(src, workdir)
  job = lh.train_local(reader, 8 // reader, workdir, steps=STEPS)
  assert job.finish(timeout=600) == 0, job.text[-4000:]
  assert "resumed from checkpoint step 2" in job.text
  resumed = lh.metrics(workdir)
  assert sorted(resumed) == list(range(4, STEPS + 1))  # the first step after resuming compiles
  reference = lh.metrics(src)
  assert resumed == pytest.approx({s: reference[s] for s in resumed}, rel=1e-4)
  # The data position carried over: step 3 read the same global batch.
  ref_lines, lines = lh.batch_lines(reference_runs[writer][1].text), lh.batch_lines(job.text)
  assert (sum(lines[(p, 3)][2] for p in range(reader)) ==
          sum(ref_lines[(p, 3)][2] for p in range(writer)))


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_sigterm_then_rerun_is_bit_exact(reference_runs, tmp_path, procs):
  ref_dir, _ = reference_runs[procs]
  # Slow steps (1 s each, values unchanged) leave the signal time to reach every
  # process's preemption sync point before the last step.
  job = lh.train_local(procs, 8 // procs, tmp_path, steps=STEPS,
                       env_extra={"SPMDNNX_TEST_STEP_SECONDS": 1})
  job.wait_for(r"^\[0\] step +2/6 \| loss")
  job.proc.send_signal(signal.SIGTERM)
  assert job.finish(timeout=600) == 0, job.text[-4000:]
  m = job.wait_for(r"stop requested: checkpointed step (\d+) and stopping")
  stopped = int(m.group(1))
  assert 2 <= stopped < STEPS
  rerun = lh.train_local(procs, 8 // procs, tmp_path, steps=STEPS)
  assert rerun.finish(timeout=600) == 0, rerun.text[-4000:]
  assert f"resumed from checkpoint step {stopped}" in rerun.text
  got, expected = lh.metrics(tmp_path), lh.metrics(ref_dir)
  # Every logged step: the first after resuming compiles and is not logged,
  # unless it is the last step (always logged, with its eval).
  unlogged = {stopped + 1} if stopped + 1 < STEPS else set()
  assert set(got) == set(expected) - unlogged
  assert got == {s: expected[s] for s in got}  # exact float equality: bit for bit


@pytest.mark.slow
def test_launch_train_stuck_process_aborts_the_job(tmp_path):
  job = lh.train_local(2, 4, tmp_path, steps=1000, flags=["--hang_timeout=5"],
                       env_extra={"SPMDNNX_TEST_HANG_AFTER_STEP": 3,
                                  "SPMDNNX_TEST_HANG_PROCESS": 0}, checkpoint_every=0)
  job.wait_for(r"process 0 hangs after step 3")
  stuck = time.monotonic()
  assert job.finish(timeout=300) == 124, job.text[-4000:]
  assert time.monotonic() - stuck < 60
  m = job.wait_for(r"spmdnnx watchdog: process (\d): step (\d+) did not complete within 5 s")
  assert int(m.group(2)) >= 4
  stacks = tmp_path / "logs" / f"stacks_process_{m.group(1)}.txt"
  assert "did not complete" in stacks.read_text()


@pytest.mark.slow
def test_launch_train_sigkill_of_one_process(tmp_path):
  job = lh.train_local(2, 4, tmp_path, steps=1000, checkpoint_every=0)
  job.wait_for(r"^\[0\] step +2/1000 \| loss")
  os.kill(job.pid_of(1), signal.SIGKILL)
  killed = time.monotonic()
  assert job.finish(timeout=300) == 128 + signal.SIGKILL
  assert time.monotonic() - killed < 60
  assert "process 1 (pid" in job.text and "died with signal SIGKILL" in job.text
