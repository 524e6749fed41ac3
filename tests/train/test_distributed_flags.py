"""Distributed flags: definition, validation before connecting, cluster detection."""

import re
import socket
import time

from absl import flags
import pytest

from spmdnnx import errors
from spmdnnx.train import _distributed as dist

_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]",
          "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
          "SLURM_STEP_NUM_NODES": "2"}
_CLUSTER_VARS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                 "JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES",
                 "SLURM_NNODES", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)


def _flags(*argv):
  fv = flags.FlagValues()
  dist.define_flags(fv)
  fv(["prog", *argv])
  return fv


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_define_flags_defaults_and_parse():
  fv = _flags("--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=3",
              "--local_device_ids=0,1", "--hang_timeout=2.5")
  cfg = dist.DistributedConfig.from_flags(fv)
  assert cfg == dist.DistributedConfig("10.0.0.1:1234", 4, 3, (0, 1), 300, 100, 2.5)
  assert cfg.explicit
  assert not dist.DistributedConfig.from_flags(_flags()).explicit
  assert set(dist.FLAG_NAMES) <= set(fv)


def test_define_flags_twice_is_a_no_op_but_a_foreign_flag_clashes():
  fv = flags.FlagValues()
  dist.define_flags(fv)
  dist.define_flags(fv)
  other = flags.FlagValues()
  flags.DEFINE_integer("num_processes", 1, "someone else's", flag_values=other)
  with pytest.raises(errors.LaunchError, match="--num_processes are already defined") as e:
    dist.define_flags(other)
  assert e.value.flags == ["num_processes"]


def test_local_device_ids_must_be_integers():
  with pytest.raises(errors.LaunchError, match=r"--local_device_ids=0,x must be comma-sep"):
    dist.DistributedConfig.from_flags(_flags("--local_device_ids=0,x"))


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:", ":1234", "host:0", "host:70000",
                                     "host:12a", "fe80::1:1234"])
def test_malformed_address_names_the_flag(address):
  with pytest.raises(errors.LaunchError, match="--coordinator_address=.* is not host:port") as e:
    dist.DistributedConfig(address, 2, 0).validate()
  assert e.value.flags == ["coordinator_address"]


def test_parse_address_forms():
  assert dist.parse_address("node001:1234") == ("node001", 1234)
  assert dist.parse_address("[::1]:80") == ("::1", 80)


@pytest.mark.parametrize("pid,n", [(2, 2), (-1, 2), (5, 1)])
def test_process_id_out_of_range(pid, n):
  with pytest.raises(errors.LaunchError, match=rf"--process_id={pid} is outside the job's "
                     rf"range 0..{n - 1} \(--num_processes={n}\)") as e:
    dist.DistributedConfig("h:1", n, pid).validate()
  assert e.value.flags == ["process_id"]


def test_every_problem_is_reported_at_once():
  cfg = dist.DistributedConfig("nohost", 0, 0, (1, 1), initialization_timeout=0,
                               heartbeat_timeout=-1, hang_timeout=-2)
  with pytest.raises(errors.LaunchError) as e:
    cfg.validate()
  assert e.value.flags == ["coordinator_address", "num_processes", "local_device_ids",
                           "initialization_timeout", "heartbeat_timeout", "hang_timeout"]
  for text in ("is not host:port", "--num_processes=0 must be at least 1",
               "must be distinct non-negative", "--initialization_timeout=0 must be a positive",
               "--heartbeat_timeout=-1", "--hang_timeout=-2 must be >= 0"):
    assert text in str(e.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.1.1"])
def test_loopback_coordinator_on_several_hosts(host):
  cfg = dist.DistributedConfig(f"{host}:1234", 8, 3)
  cfg.validate(num_hosts=1)  # one host: loopback is fine
  cfg.validate()             # unknown host count: allowed
  with pytest.raises(errors.LaunchError, match=r"is a loopback address, but this job spans 2 "
                     "hosts") as e:
    cfg.validate(num_hosts=2)
  assert e.value.flags == ["coordinator_address"]


def test_host_count_from_env():
  assert dist.host_count_from_env({}) is None
  assert dist.host_count_from_env({"SLURM_JOB_NUM_NODES": "3"}) == 3
  assert dist.host_count_from_env({"OMPI_COMM_WORLD_SIZE": "16",
                                   "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}) == 2
  assert dist.host_count_from_env({"OMPI_COMM_WORLD_SIZE": "4",
                                   "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 1


def test_no_flags_no_cluster_is_a_single_process(capsys):
  assert dist.detect_cluster() is None
  info = dist.initialize_from_flags(_flags())
  assert info == dist.ProcessInfo(0, 1, None, "single process")
  assert "running as a single process" in capsys.readouterr().out


def test_local_device_ids_alone_is_an_error():
  with pytest.raises(errors.LaunchError, match="--local_device_ids only applies to a multi"):
    dist.initialize_from_flags(_flags("--local_device_ids=0"))


def test_partial_flags_without_cluster_name_the_missing_ones():
  with pytest.raises(errors.LaunchError, match=r"--coordinator_address, --process_id not set "
                     "and no cluster .* was detected") as e:
    dist.initialize_from_flags(_flags("--num_processes=2"))
  assert e.value.flags == ["coordinator_address", "process_id"]


def test_slurm_is_detected_and_named(monkeypatch, capsys):
  for k, v in _SLURM.items():
    monkeypatch.setenv(k, v)
  env = dist.detect_cluster()
  assert env is not None and dist.cluster_name(env) == "SLURM"
  # The detected coordinator (node001) does not exist here: the error after
  # --initialization_timeout names it and says the values came from SLURM.
  start = time.monotonic()
  with pytest.raises(errors.LaunchError, match=r"process 1: the coordinator \(process 0\) at "
                     r"node001:\d+ never came up within --initialization_timeout=1 s.*values "
                     "detected from SLURM") as e:
    dist.initialize_from_flags(_flags("--initialization_timeout=1"))
  assert time.monotonic() - start < 30
  assert e.value.missing == [0]
  assert re.search(r"process 1 of 2 joining coordinator node001:\d+ \(detected a SLURM "
                   r"cluster\)", capsys.readouterr().out)


def test_slurm_multi_host_rejects_loopback_coordinator(monkeypatch):
  for k, v in _SLURM.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(errors.LaunchError, match="loopback address, but this job spans 2 hosts"):
    dist.initialize_from_flags(_flags("--coordinator_address=127.0.0.1:1234",
                                      "--initialization_timeout=1"))


def test_coordinator_never_comes_up_in_process():
  port = _free_port()
  start = time.monotonic()
  with pytest.raises(errors.LaunchError, match=rf"process 1: the coordinator \(process 0\) at "
                     rf"127.0.0.1:{port} never came up within --initialization_timeout=1 s"):
    dist.initialize_from_flags(_flags(f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", "--process_id=1",
                                      "--initialization_timeout=1"))
  assert 1 <= time.monotonic() - start < 30


def test_initialize_after_jax_started_is_a_launch_error():
  # conftest already started the backend (8 fake devices).
  with pytest.raises(errors.LaunchError, match="jax.distributed must start before any JAX"):
    dist.initialize_from_flags(_flags(f"--coordinator_address=127.0.0.1:{_free_port()}",
                                      "--num_processes=1", "--process_id=0"))


def test_a_failing_cluster_detection_is_a_launch_error(monkeypatch):
  for k, v in _SLURM.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv("SLURM_STEP_NODELIST", "")

  def broken(*args, **kwargs):
    raise RuntimeError("Kubernetes API Error: 403 - Forbidden")

  monkeypatch.setattr(dist._jax_clusters.ClusterEnv, "auto_detect_unset_distributed_params",
                      broken)
  with pytest.raises(errors.LaunchError, match=r"a SLURM cluster was detected but reading its "
                     r"settings failed \(Kubernetes API Error: 403"):
    dist.initialize_from_flags(_flags())
