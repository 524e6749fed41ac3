"""Run a multi-process JAX job on this machine (what ``launch.local`` does).

Each process gets ``--coordinator_address=127.0.0.1:<free port>``,
``--num_processes`` and ``--process_id`` appended to its command, its own fake
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=K``) and gloo
CPU collectives. Output lines are streamed with a ``[rank]`` prefix. The job
never outlives a failure: when a process dies, the others are killed and the
launcher returns that process's status. SIGTERM/SIGINT to the launcher is
forwarded as SIGTERM (preemption: the processes save and exit); a second one
kills them.

>>> import io
>>> cmd = [sys.executable, "-c", "import sys; print(sys.argv[1:])"]
>>> launch_local(cmd, num_processes=2, devices_per_process=1, stream=io.StringIO())
0
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from spmdnnx import errors
from spmdnnx.train import _distributed

#: Flags the launcher sets itself; giving them after ``--`` is an error.
_OWNED_FLAGS = ("coordinator_address", "num_processes", "process_id", "fake_devices")

# Runs first in each child, then execs the real command: a launcher killed
# with SIGKILL must not leave its job running (Linux's parent-death signal).
# A trampoline rather than Popen's preexec_fn, which forks a possibly
# multithreaded (JAX) parent.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "  ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "  pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "  sys.exit('launch.local exited before this process started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def describe_status(returncode: int) -> str:
  """'exit code 3' or 'signal SIGKILL' for a Popen return code.

  >>> describe_status(-9), describe_status(2)
  ('signal SIGKILL', 'exit code 2')
  """
  if returncode < 0:
    try:
      return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
      return f"signal {-returncode}"
  return f"exit code {returncode}"


def shell_status(returncode: int) -> int:
  """A Popen return code as a shell exit status (signals as 128 + n)."""
  return 128 - returncode if returncode < 0 else returncode


def child_env(base: dict[str, str], devices_per_process: int) -> dict[str, str]:
  """The environment of one process: fake CPU devices, gloo, unbuffered output.

  >>> child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --a=1"}, 4)["XLA_FLAGS"]
  '--a=1 --xla_force_host_platform_device_count=4'
  """
  env = dict(base)
  kept = [f for f in env.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(kept + [
      f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  env["PYTHONUNBUFFERED"] = "1"
  return env


@dataclasses.dataclass
class _Process:
  rank: int
  popen: subprocess.Popen
  readers: list[threading.Thread]


def launch_local(command: Sequence[str], *, num_processes: int, devices_per_process: int,
                 port: int | None = None, exit_grace_s: float = 60.0,
                 term_grace_s: float = 300.0, stream: IO[str] | None = None) -> int:
  """Runs ``command`` as ``num_processes`` processes of one JAX job; returns its status.

  Args:
    command: the program and its flags (e.g. ``[python, -m, launch.train, ...]``);
      the distributed flags are appended per process.
    num_processes: processes to start.
    devices_per_process: fake CPU devices each process sees.
    port: the coordinator's port (default: a free one).
    exit_grace_s: how long the others may keep running after one process exited
      cleanly before they count as stuck and are killed.
    term_grace_s: how long processes may take to save and exit after SIGTERM
      before they are killed.
    stream: where prefixed output goes (default: stdout, stderr lines to stderr).

  Returns:
    0 when every process exits 0; otherwise the status (shell convention,
    128 + signal) of the first process that failed.

  Raises:
    LaunchError: bad counts, or the command sets a flag the launcher owns.
  """
  problems = []
  if num_processes < 1:
    problems.append(f"--num_processes={num_processes} must be at least 1")
  if devices_per_process < 1:
    problems.append(f"--devices_per_process={devices_per_process} must be at least 1")
  owned = [a.split("=")[0] for a in command
           if a.startswith("--") and a[2:].split("=")[0] in _OWNED_FLAGS]
  if owned:
    problems.append(f"{errors.format_paths(owned)} after '--' conflict with the launcher, "
                    "which sets them per process; use --num_processes/--devices_per_process "
                    "of launch.local instead")
  if problems:
    raise errors.LaunchError("launch.local: " + "; ".join(problems), flags=owned)
  port = port or free_port()
  address = f"127.0.0.1:{port}"
  _distributed.parse_address(address)
  lock = threading.Lock()
  env = child_env(dict(os.environ), devices_per_process)

  def say(text: str) -> None:
    _write(stream or sys.stderr, f"launch.local: {text}\n", lock)

  procs: list[_Process] = []
  for rank in range(num_processes):
    argv = list(command) + [f"--coordinator_address={address}",
                            f"--num_processes={num_processes}", f"--process_id={rank}"]
    if sys.platform.startswith("linux"):
      argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())] + argv
    popen = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, errors="replace", start_new_session=True)
    procs.append(_Process(rank, popen, []))
  for p in procs:
    say(f"process {p.rank} started (pid {p.popen.pid}), coordinator {address}, "
        f"{devices_per_process} CPU devices")
    for pipe, default in ((p.popen.stdout, sys.stdout), (p.popen.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(pipe, stream or default, f"[{p.rank}] ", lock),
                           daemon=True)
      t.start()
      p.readers.append(t)
  return _supervise(procs, say, exit_grace_s=exit_grace_s, term_grace_s=term_grace_s)


def _pump(pipe: IO[str], out: IO[str], prefix: str, lock: threading.Lock) -> None:
  with pipe:
    for line in pipe:
      _write(out, prefix + line if line.endswith("\n") else prefix + line + "\n", lock)


def _write(out: IO[str], text: str, lock: threading.Lock) -> None:
  # A closed console (e.g. a pipe whose reader died) must not stop supervision.
  with lock:
    try:
      out.write(text)
      out.flush()
    except (OSError, ValueError):
      pass


def _supervise(procs: list[_Process], say, *, exit_grace_s: float,
               term_grace_s: float) -> int:
  """Waits for the job; stops it on the first failure or on a forwarded signal."""
  signals: list[int] = []
  main = threading.current_thread() is threading.main_thread()
  previous = {}
  if main:
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, lambda s, f: signals.append(s))
  failed: _Process | None = None
  first_clean_exit = None
  term_deadline = None
  forwarded = 0
  try:
    while True:
      if len(signals) > forwarded:
        forwarded = len(signals)
        live = [p for p in procs if p.popen.poll() is None]
        if forwarded == 1:
          say(f"{signal.Signals(signals[0]).name} received: sending SIGTERM to every process "
              f"(they finish their step, save a checkpoint and exit; a second signal kills)")
          _send(live, signal.SIGTERM)
          term_deadline = time.monotonic() + term_grace_s
        else:
          say("second signal: killing every process")
          _send(live, signal.SIGKILL)
      codes = [p.popen.poll() for p in procs]
      if failed is None:
        failed = next((p for p, c in zip(procs, codes) if c not in (None, 0)), None)
        if failed is not None and any(c is None for c in codes):
          say(f"process {failed.rank} (pid {failed.popen.pid}) died with "
              f"{describe_status(failed.popen.returncode)}; stopping the other processes")
          _send([p for p in procs if p.popen.poll() is None], signal.SIGKILL)
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      if first_clean_exit is None and any(c == 0 for c in codes):
        first_clean_exit = now
      if failed is None and first_clean_exit is not None and now - first_clean_exit > exit_grace_s:
        stuck = [p for p, c in zip(procs, codes) if c is None]
        say(f"process(es) {', '.join(str(p.rank) for p in stuck)} still running "
            f"{exit_grace_s:g} s after another process finished: killing them")
        _send(stuck, signal.SIGKILL)
        failed = failed or stuck[0]
      if term_deadline is not None and now > term_deadline:
        say(f"processes did not exit within {term_grace_s:g} s of SIGTERM: killing them")
        _send([p for p in procs if p.popen.poll() is None], signal.SIGKILL)
        term_deadline = None
      time.sleep(0.1)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for p in procs:
    for t in p.readers:
      t.join(timeout=5)
  if failed is None:
    failed = next((p for p in procs if p.popen.returncode != 0), None)
  if failed is None:
    say(f"all {len(procs)} processes exited 0")
    return 0
  statuses = ", ".join(f"process {p.rank}: {describe_status(p.popen.returncode)}"
                       for p in procs)
  say(f"job failed: process {failed.rank} {describe_status(failed.popen.returncode)} "
      f"({statuses})")
  return shell_status(failed.popen.returncode) or 1


def _send(procs: list[_Process], sig: int) -> None:
  for p in procs:
    try:
      p.popen.send_signal(sig)
    except ProcessLookupError:
      pass
