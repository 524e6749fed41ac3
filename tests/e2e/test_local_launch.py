"""launch.local: spawning, prefixed output, failure propagation, signal forwarding."""

import io
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
