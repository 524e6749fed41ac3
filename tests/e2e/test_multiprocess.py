"""Two local processes over gloo form one 8-device mesh (multi-host simulation)."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_global_mesh():
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), "2", str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  for o in outs:
    assert o["devices"] == 8 and o["local"] == 4
    assert o["x_shape"] == [8, 4]          # 4 local rows x 2 processes
    assert o["kernel_spec"] == "P('fsdp', 'tensor')"
    assert o["losses"][2] < o["losses"][0]
  # Both processes computed the same global losses.
  assert outs[0]["losses"] == pytest.approx(outs[1]["losses"])
  # Each process's addressable shards hold its own rows (offset 3 * pid).
  assert all(abs(m) < 1.5 for m in outs[0]["row_means"])
  assert all(abs(m - 3) < 1.5 for m in outs[1]["row_means"])
