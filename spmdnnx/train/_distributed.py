"""Multi-process initialization from absl flags, validated before connecting.

``define_flags()`` adds the distributed flags of ``launch.train`` and
``launch.sample``; ``initialize_from_flags(FLAGS)`` turns them into a
``jax.distributed`` job:

- every flag given: use them (validated first; each problem names its flag);
- no flag given, and JAX detects a cluster it knows (SLURM, Open MPI,
  Kubernetes, Cloud TPU): take the missing values from JAX's own detection and
  say which cluster it was;
- neither: a single process, ``jax.distributed`` is not started.

An initialization that does not complete within ``--initialization_timeout``
raises :class:`~spmdnnx.errors.LaunchError` saying which process is missing
(as far as this process can know) and which flags to check, instead of hanging
or aborting inside the runtime.

>>> cfg = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=2,
...                         process_id=1)
>>> cfg.validate()
>>> parse_address("[fe80::1]:8476")
('fe80::1', 8476)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import threading
import time
from typing import Any, Mapping

from absl import flags
import jax
from jax._src import clusters as _jax_clusters  # JAX's own cluster detection

from spmdnnx import errors

#: The flag names this module defines (a contract with users' scripts).
FLAG_NAMES = ("coordinator_address", "num_processes", "process_id", "local_device_ids",
              "initialization_timeout", "heartbeat_timeout", "hang_timeout")

#: Extra seconds JAX's own timeout runs past ours, so ours reports first.
_JAX_TIMEOUT_MARGIN_S = 30

# Environment variables that tell how many hosts a job spans, when a scheduler
# says so (only used to reject a loopback coordinator on a multi-host job).
_HOST_COUNT_VARS = ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")

_CLUSTER_NAMES = {"SlurmCluster": "SLURM", "OmpiCluster": "Open MPI",
                  "K8sCluster": "Kubernetes", "GkeTpuCluster": "GKE Cloud TPU",
                  "GceTpuCluster": "GCE Cloud TPU", "Mpi4pyCluster": "mpi4py"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the distributed flags (idempotent for the same FlagValues).

  Args:
    flag_values: where to define them; absl's global ``FLAGS`` by default.

  Raises:
    LaunchError: another module already defined a flag of the same name.
  """
  clashes = [n for n in FLAG_NAMES if n in flag_values and
             flag_values.find_module_defining_flag(n) != __name__]
  if clashes:
    raise errors.LaunchError(
        f"flags {errors.format_paths(['--' + n for n in clashes])} are already defined by "
        "another module; spmdnnx.train defines them for multi-process launching. Remove the "
        "other definitions.", flags=clashes)
  if "coordinator_address" in flag_values:
    return
  kw = dict(flag_values=flag_values, module_name=__name__)
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0's coordinator, reachable from every host. Unset with "
      "--num_processes/--process_id also unset: detect the cluster (SLURM, Open MPI, "
      "Kubernetes, Cloud TPU) or run one process.", **kw)
  flags.DEFINE_integer("num_processes", None, "Processes in the job (one per host, usually).",
                       **kw)
  flags.DEFINE_integer("process_id", None, "This process's rank, 0 <= id < num_processes.",
                       **kw)
  flags.DEFINE_list("local_device_ids", None,
                    "Comma-separated accelerator ids this process uses (default: all).", **kw)
  flags.DEFINE_integer("initialization_timeout", 300,
                       "Seconds to wait for every process to join before failing.", **kw)
  flags.DEFINE_integer("heartbeat_timeout", 100,
                       "Seconds without a heartbeat after which a process counts as dead "
                       "and the job stops.", **kw)
  flags.DEFINE_float("hang_timeout", 1800.0,
                     "Seconds without a completed training step after which the watchdog "
                     "dumps every thread's stack to DIR/logs and aborts (0 disables; the "
                     "first step, which compiles, gets 5x).", **kw)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """The distributed settings of one process, as given by flags (``None``: unset).

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: processes in the job.
    process_id: this process's rank.
    local_device_ids: accelerator ids this process may use, or ``None`` for all.
    initialization_timeout: seconds to wait for the whole job to join.
    heartbeat_timeout: seconds after which a silent process counts as dead.
    hang_timeout: seconds without a completed step before the watchdog aborts.
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  initialization_timeout: int = 300
  heartbeat_timeout: int = 100
  hang_timeout: float = 1800.0

  @classmethod
  def from_flags(cls, flag_values: Any = flags.FLAGS) -> "DistributedConfig":
    """Reads the flags defined by :func:`define_flags`.

    Raises:
      LaunchError: ``--local_device_ids`` is not a list of integers.
    """
    ids = flag_values.local_device_ids
    if ids is not None:
      try:
        ids = tuple(int(str(i).strip()) for i in ids)
      except ValueError:
        raise errors.LaunchError(
            f"--local_device_ids={','.join(map(str, ids))} must be comma-separated integers, "
            "e.g. --local_device_ids=0,1,2,3", flag="local_device_ids") from None
    return cls(coordinator_address=flag_values.coordinator_address,
               num_processes=flag_values.num_processes, process_id=flag_values.process_id,
               local_device_ids=ids,
               initialization_timeout=flag_values.initialization_timeout,
               heartbeat_timeout=flag_values.heartbeat_timeout,
               hang_timeout=flag_values.hang_timeout)

  @property
  def explicit(self) -> bool:
    """Whether any of the job-shape flags was given."""
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))

  def validate(self, *, num_hosts: int | None = None) -> None:
    """Checks every value given, without connecting; reports all problems at once.

    Args:
      num_hosts: how many hosts the job spans, when known (see
        :func:`host_count_from_env`); with more than one, a loopback
        coordinator is rejected.

    Raises:
      LaunchError: naming each bad flag (``error.flags`` lists them).
    """
    problems: list[tuple[str, str]] = []
    host = None
    if self.coordinator_address is not None:
      try:
        host, _ = parse_address(self.coordinator_address)
      except errors.LaunchError as e:
        problems.append(("coordinator_address", str(e)))
    n, pid = self.num_processes, self.process_id
    if n is not None and n < 1:
      problems.append(("num_processes", f"--num_processes={n} must be at least 1"))
    if pid is not None and (pid < 0 or (n is not None and n >= 1 and pid >= n)):
      problems.append(("process_id", f"--process_id={pid} is outside the job's range "
                       f"0..{(n or 1) - 1} (--num_processes={n}); give each process a "
                       "distinct id in that range"))
    if self.local_device_ids is not None:
      ids = self.local_device_ids
      if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        problems.append(("local_device_ids", f"--local_device_ids={','.join(map(str, ids))} "
                         "must be distinct non-negative integers"))
    for name in ("initialization_timeout", "heartbeat_timeout"):
      if getattr(self, name) <= 0:
        problems.append((name, f"--{name}={getattr(self, name)} must be a positive number "
                         "of seconds"))
    if self.hang_timeout < 0:
      problems.append(("hang_timeout", f"--hang_timeout={self.hang_timeout:g} must be >= 0 "
                       "seconds (0 disables the watchdog)"))
    if host is not None and _is_loopback(host) and num_hosts is not None and num_hosts > 1:
      problems.append(("coordinator_address", (
          f"--coordinator_address={self.coordinator_address} is a loopback address, but this "
          f"job spans {num_hosts} hosts, which cannot reach it; use process 0's hostname or "
          "IP address, or leave the flag unset so that the cluster's detection picks it")))
    if problems:
      names = list(dict.fromkeys(name for name, _ in problems))
      raise errors.LaunchError(
          "invalid distributed flags:\n  " + "\n  ".join(msg for _, msg in problems),
          flags=names)


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands in the job, once initialized.

  Attributes:
    process_index: this process's rank.
    process_count: processes in the job.
    coordinator_address: the coordinator joined (``None`` for a single process).
    source: where the settings came from: ``"flags"``, a cluster name such as
      ``"SLURM"``, or ``"single process"``.
  """
  process_index: int
  process_count: int
  coordinator_address: str | None
  source: str


def parse_address(text: str) -> tuple[str, int]:
  """Splits ``host:port`` (IPv6 hosts in brackets) into ``(host, port)``.

  Raises:
    LaunchError: the text is not ``host:port`` with a port in 1..65535.

  >>> parse_address("node001:1234")
  ('node001', 1234)
  """
  host, sep, port = text.strip().rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  elif ":" in host:
    host = ""  # an unbracketed IPv6 address is ambiguous
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise errors.LaunchError(
        f"--coordinator_address={text!r} is not host:port with a port in 1..65535 "
        "(e.g. 10.0.0.1:1234, node001:1234 or [fe80::1]:1234)",
        flag="coordinator_address", value=text)
  return host, int(port)


def _is_loopback(host: str) -> bool:
  if host.lower() in ("localhost", "localhost.localdomain"):
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def host_count_from_env(environ: Mapping[str, str] | None = None) -> int | None:
  """How many hosts the job spans, if the scheduler's environment says so.

  SLURM gives the node count; Open MPI gives the world and local sizes (more
  than one host when the local size is smaller). ``None`` when unknown.

  >>> host_count_from_env({"SLURM_STEP_NUM_NODES": "4"})
  4
  >>> host_count_from_env({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"})
  1
  """
  environ = os.environ if environ is None else environ
  for var in _HOST_COUNT_VARS:
    if environ.get(var, "").isdigit():
      return int(environ[var])
  world, local = environ.get("OMPI_COMM_WORLD_SIZE"), environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
  if world and local and world.isdigit() and local.isdigit() and int(local) > 0:
    return 1 if int(local) >= int(world) else -(-int(world) // int(local))
  return None


def detect_cluster() -> type | None:
  """The cluster environment JAX detects here (its own rule), or ``None``.

  Uses ``jax.distributed``'s detection classes in JAX's order, skipping the
  opt-in ones (mpi4py), exactly as ``jax.distributed.initialize`` does.
  """
  for env in _jax_clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env
  return None


def cluster_name(env: type) -> str:
  """A readable name for a JAX cluster class (``SlurmCluster`` -> ``SLURM``)."""
  return _CLUSTER_NAMES.get(env.__name__, env.__name__)


def initialize_from_flags(flag_values: Any = flags.FLAGS) -> ProcessInfo:
  """Validates the distributed flags and starts ``jax.distributed`` if needed.

  Must run before any JAX computation. Prints where the settings came from.

  Args:
    flag_values: parsed flags with the names of :data:`FLAG_NAMES`.

  Returns:
    This process's :class:`ProcessInfo`.

  Raises:
    LaunchError: a bad or missing flag (named), a coordinator that does not come
      up, or a job that does not assemble within ``--initialization_timeout``.
  """
  return initialize(DistributedConfig.from_flags(flag_values))


def initialize(config: DistributedConfig) -> ProcessInfo:
  """:func:`initialize_from_flags` for an already-built :class:`DistributedConfig`."""
  config.validate(num_hosts=host_count_from_env())
  env = None if config.explicit and None not in (
      config.coordinator_address, config.num_processes, config.process_id) else detect_cluster()
  if not config.explicit and env is None:
    if config.local_device_ids is not None:
      raise errors.LaunchError(
          "--local_device_ids only applies to a multi-process job: also give "
          "--coordinator_address, --num_processes and --process_id", flag="local_device_ids")
    print("spmdnnx: no --coordinator_address/--num_processes/--process_id and no cluster "
          "detected (SLURM, Open MPI, Kubernetes, Cloud TPU): running as a single process",
          flush=True)
    return ProcessInfo(0, 1, None, "single process")
  source = "flags"
  if env is not None:
    source = cluster_name(env)
    # The detected local device ids are not used: JAX would restrict a SLURM or
    # Open MPI GPU process to one device, but spmdnnx runs one process per host
    # (pass --local_device_ids=$SLURM_LOCALID for one process per device).
    try:
      coordinator, num, pid, _ = (
          _jax_clusters.ClusterEnv.auto_detect_unset_distributed_params(
              config.coordinator_address, config.num_processes, config.process_id,
              config.local_device_ids, None, config.initialization_timeout))
    except Exception as e:  # e.g. a Kubernetes API refusal
      raise errors.LaunchError(
          f"a {source} cluster was detected but reading its settings failed ({e}); fix the "
          "cluster's permissions or give --coordinator_address, --num_processes and "
          "--process_id explicitly", cluster=source) from e
    config = dataclasses.replace(config, coordinator_address=coordinator, num_processes=num,
                                 process_id=pid)
    config.validate(num_hosts=host_count_from_env())
  missing = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
             if getattr(config, name) is None]
  if missing:
    where = (f"the detected {source} environment does not provide it" if env is not None else
             "no cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) was detected to provide it")
    raise errors.LaunchError(
        f"{errors.format_paths(missing)} not set and {where}: a multi-process job needs "
        "--coordinator_address, --num_processes and --process_id on every process",
        flags=[m[2:] for m in missing])
  origin = "settings from flags" if env is None else f"detected a {source} cluster"
  print(f"spmdnnx: process {config.process_id} of {config.num_processes} joining coordinator "
        f"{config.coordinator_address} ({origin})", flush=True)
  _connect(config, source)
  print(f"spmdnnx: process {config.process_id} of {config.num_processes} joined; "
        f"{jax.device_count()} devices, {jax.local_device_count()} local", flush=True)
  return ProcessInfo(config.process_id, config.num_processes, config.coordinator_address,
                     source)


def _connect(config: DistributedConfig, source: str) -> None:
  """Runs ``jax.distributed.initialize`` under our own deadline."""
  host, port = parse_address(config.coordinator_address)
  timeout = config.initialization_timeout
  deadline = time.monotonic() + timeout
  pid, n = config.process_id, config.num_processes
  check = (f"check that process 0 runs and listens on {config.coordinator_address} and that "
           "this host can reach it (a loopback address only works when every process runs "
           "on the same host), that every process got the same --coordinator_address and "
           f"--num_processes={n} and a distinct --process_id, or raise "
           f"--initialization_timeout={timeout}")
  if source != "flags":
    check += f" (values detected from {source})"
  if pid != 0 and not _wait_for_port(host, port, deadline):
    raise errors.LaunchError(
        f"process {pid}: the coordinator (process 0) at {config.coordinator_address} never "
        f"came up within --initialization_timeout={timeout} s; {check}",
        process_id=pid, missing=[0], coordinator_address=config.coordinator_address)
  if jax.config.jax_cpu_collectives_implementation in (None, "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  outcome: list[BaseException | None] = []

  def connect():
    try:
      jax.distributed.initialize(
          config.coordinator_address, num_processes=n, process_id=pid,
          local_device_ids=None if config.local_device_ids is None else
          list(config.local_device_ids),
          cluster_detection_method="deactivate",
          initialization_timeout=int(max(1, deadline - time.monotonic())) +
          _JAX_TIMEOUT_MARGIN_S,
          heartbeat_timeout_seconds=config.heartbeat_timeout)
      outcome.append(None)
    except BaseException as e:  # re-raised below, in the caller's thread
      outcome.append(e)

  # JAX aborts the whole process (a fatal C++ log) when its own timeout
  # passes; waiting in another thread lets us raise a LaunchError first.
  thread = threading.Thread(target=connect, name="spmdnnx-distributed-init", daemon=True)
  thread.start()
  thread.join(max(0.0, deadline - time.monotonic()))
  if thread.is_alive():
    who = ("the other processes" if pid == 0 else
           "process 0's coordinator is reachable, but some other process")
    raise errors.LaunchError(
        f"process {pid} of {n}: the job did not assemble within --initialization_timeout="
        f"{timeout} s: {who} did not join {config.coordinator_address}; {check}. This "
        "process must exit now.", process_id=pid, coordinator_address=config.coordinator_address)
  error = outcome[0]
  if isinstance(error, RuntimeError) and "must be called before" in str(error):
    raise errors.LaunchError(
        "jax.distributed must start before any JAX computation (jax.devices(), an array, "
        "a jit call...): call initialize_from_flags first in main()",
        process_id=pid) from error
  if error is not None:
    raise errors.LaunchError(
        f"process {pid} of {n} could not join {config.coordinator_address}: {error}; {check}",
        process_id=pid, coordinator_address=config.coordinator_address) from error


def _wait_for_port(host: str, port: int, deadline: float) -> bool:
  """Whether a TCP connection to host:port succeeds before the deadline."""
  while True:
    try:
      with socket.create_connection((host, port), timeout=1.0):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
