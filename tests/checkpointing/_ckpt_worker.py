"""Subprocess side of the checkpointing tests that need a real process.

Modes (argv[1]):
  unwritable DIR        a background save into a directory that became
                        unwritable; prints a JSON report of what was raised.
  kill DIR              saves step 1, then starts an async save of step 2 and
                        prints "started" (the test SIGKILLs it then).
  mp-save PORT N PID DIR NPZ     one of N processes (4 devices each) trains
                        and saves; process 0 writes the global values to NPZ.
  mp-restore PORT N PID DIR NPZ  one of N processes restores DIR (abstract
                        target) and checks the values against NPZ.
"""

import json
import os
import shutil
import sys
import tempfile
import time

mode = sys.argv[1]
if mode.startswith("mp-"):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
else:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if mode.startswith("mp-"):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  port, num, pid = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num, process_id=pid)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import spmdnnx as nnx  # noqa: E402
import spmdnnx.checkpointing  # noqa: E402,F401  (loaded as root: the unwritable case drops to nobody)
from spmdnnx.models import MLPRegressor, mse  # noqa: E402


def report(**kw):
  print(json.dumps(kw), flush=True)


def make_model():
  return MLPRegressor(4, embed=8, mlp=16, num_layers=2, out_features=2, rngs=nnx.Rngs(0))


class Counter:
  """A minimal data iterator: its state is a dict."""

  def __init__(self, start=0):
    self.i = start

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def unwritable(directory):
  if os.getuid() == 0:
    # Root ignores permissions: act as 'nobody' from here on, in a directory
    # nobody can reach (the test's tmp_path is private to root).
    base = tempfile.mkdtemp(prefix="spmdnnx-unwritable-")
    os.chmod(base, 0o777)
    directory = os.path.join(base, "ckpt")
    os.setgid(65534)
    os.setuid(65534)
  model = nnx.Linear(64, 256, rngs=nnx.Rngs(0))
  out = {}
  with nnx.checkpointing.CheckpointManager(directory) as mngr:
    mngr.save(1, model=model)
    mngr.wait_until_finished()
    os.chmod(directory, 0o555)
    out["save2_returned"] = mngr.save(2, model=model)
    try:
      mngr.save(3, model=model)
      out["save3_error"] = None
    except nnx.errors.CheckpointError as e:
      out["save3_error"], out["save3_step"] = str(e), e.step
    out["save4_returned"] = mngr.save(4, model=model)
    try:
      mngr.wait_until_finished()
      out["wait_error"] = None
    except nnx.errors.CheckpointError as e:
      out["wait_error"], out["wait_step"] = str(e), e.step
    os.chmod(directory, 0o755)
    out["save5_returned"] = mngr.save(5, model=model)
    mngr.wait_until_finished()
    out["steps"] = mngr.all_steps()
    target = nnx.eval_shape(lambda: nnx.Linear(64, 256, rngs=nnx.Rngs(1)))
    out["restored_step"] = mngr.restore(model=target).step
    out["restored_equal"] = bool(np.array_equal(target.kernel.value, model.kernel.value))
  shutil.rmtree(directory)
  report(**out)


def kill(directory):
  # ~64 MB of float32 so that writing takes a while.
  model = nnx.Linear(4096, 4096, rngs=nnx.Rngs(0))
  mngr = nnx.checkpointing.CheckpointManager(directory)
  mngr.save(1, model=model, metadata={"note": "good"})
  mngr.wait_until_finished()
  model.kernel.value = model.kernel.value + 1.0
  mngr.save(2, model=model, metadata={"note": "partial"})
  # Report once step 2's temporary directory exists: the write is under way.
  deadline = time.time() + 120
  while not any(n.startswith("2.") for n in os.listdir(directory)):
    if time.time() > deadline:
      break
    time.sleep(0.001)
  report(started=True)
  time.sleep(600)


def _mesh():
  return nnx.make_mesh(nnx.MeshConfig(ici={"fsdp": 2, "tensor": 2}, dcn={"fsdp": num}))


def _gathered(obj):
  out = {}
  for path, leaf in nnx.state(obj).flat_state():
    out["/".join(map(str, path))] = np.asarray(
        multihost_utils.process_allgather(leaf.value, tiled=True))
  return out


def mp_save(directory, npz):
  with nnx.use_sharding(_mesh(), "fsdp_tp"):
    model = nnx.sharded_init(make_model)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    xs, ys = nnx.shard_batch((x, np.tanh(x[:, :2])))

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
      optimizer.update(model, grads)
      return loss

    for _ in range(2):
      float(step(model, optimizer, xs, ys))
    with nnx.checkpointing.CheckpointManager(directory) as mngr:
      mngr.save(2, model=model, optimizer=optimizer, data=Counter(10 + pid),
                metadata={"writers": num})
    values = {"model/" + k: v for k, v in _gathered(model).items()}
    values.update({"optimizer/" + k: v for k, v in _gathered(optimizer).items()
                   if not k.startswith("model/")})
  if pid == 0:
    np.savez(npz, **values)
  report(pid=pid, saved=True)


def mp_restore(directory, npz):
  expected = np.load(npz)
  with nnx.use_sharding(_mesh(), "fsdp_tp"):
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(make_model(), optax.adamw(1e-2)))
    data = Counter()
    with nnx.checkpointing.CheckpointManager(directory) as mngr:
      try:
        mngr.restore(model=optimizer.model, optimizer=optimizer, data=data)
        data_error = None
      except nnx.errors.CheckpointError as e:
        data_error = str(e)
      info = mngr.restore(model=optimizer.model, optimizer=optimizer)
    got = {"model/" + k: v for k, v in _gathered(optimizer.model).items()}
    got.update({"optimizer/" + k: v for k, v in _gathered(optimizer).items()
                if not k.startswith("model/")})
  mismatched = [k for k in expected.files
                if k not in got or not np.array_equal(got[k], expected[k])]
  spec = str(optimizer.model.blocks[0].up.kernel.value.sharding.spec)
  report(pid=pid, step=info.step, metadata=info.metadata, mismatched=mismatched,
         n=len(expected.files), data_error=data_error, kernel_spec=spec,
         data_state=info.data_state)


if __name__ == "__main__":
  if mode == "unwritable":
    unwritable(sys.argv[2])
  elif mode == "kill":
    kill(sys.argv[2])
  elif mode == "mp-save":
    mp_save(sys.argv[5], sys.argv[6])
  elif mode == "mp-restore":
    mp_restore(sys.argv[5], sys.argv[6])
  if mode.startswith("mp-"):
    jax.distributed.shutdown()
