"""A tiny stand-in for launch.train, used by the fault and launcher tests.

It uses the real distributed flags, per-process logs, watchdog and preemption
guard around a small data-parallel loop (one scalar weight, a global batch
built from per-process rows, an all-reduce per step) and a numpy checkpoint.
Prints `step S loss L rows R` per step (R: the global rows this process fed).
"""

import os
import pathlib
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from spmdnnx.train import _distributed  # noqa: E402
from spmdnnx.train import _faults  # noqa: E402
from spmdnnx.train import _logs  # noqa: E402

_distributed.define_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps to run.")
_STEP_SLEEP = flags.DEFINE_float("step_sleep", 0.0, "Seconds of host work per step.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  info = _distributed.initialize_from_flags(FLAGS)
  import jax  # noqa: E402  (after initialize: the backend must not start earlier)
  import jax.numpy as jnp  # noqa: E402
  import numpy as np  # noqa: E402
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

  workdir = pathlib.Path(_WORKDIR.value)
  with _logs.process_log(workdir, process_index=info.process_index):
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    rows_per_process = 2 * jax.local_device_count()
    ckpt = workdir / "ckpt.npz"
    start, w = 0, np.float32(1.0)
    if ckpt.exists():
      saved = np.load(ckpt)
      start, w = int(saved["step"]), np.float32(saved["w"])
      print(f"restored step {start}")

    @jax.jit
    def step_fn(w, x):
      loss = jnp.mean((x * w - 1.0) ** 2)
      return w - 0.1 * jax.grad(lambda w: jnp.mean((x * w - 1.0) ** 2))(w), loss

    w = jnp.asarray(w)
    hooks = _faults.FaultHooks(workdir, process_index=info.process_index,
                               hang_timeout=FLAGS.hang_timeout).start(start or None)
    try:
      for step in range(start + 1, _STEPS.value + 1):
        first = (step - 1) * rows_per_process * info.process_count
        mine = first + info.process_index * rows_per_process
        local = (np.arange(mine, mine + rows_per_process, dtype=np.float32) % 7 + 1) / 7
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
        w, loss = step_fn(w, x)
        time.sleep(_STEP_SLEEP.value)
        print(f"step {step} loss {float(loss):.9e} rows {mine}..{mine + rows_per_process - 1}",
              flush=True)
        hooks.on_step_end(step)
        if hooks.should_stop():
          break
    finally:
      hooks.close()
    if info.process_index == 0:
      np.savez(ckpt, step=step, w=np.asarray(jax.device_get(w)))
    print(f"saved step {step}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
