"""One process of the multi-process test (run by test_multiprocess.py).

Each process owns 4 fake CPU devices; two processes form one 8-device mesh
over gloo. The process feeds its own rows, builds the global batch, runs a
sharded nnx.jit train step and prints a JSON line with what it saw.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, num, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num, process_id=pid)

import numpy as np  # noqa: E402
import optax  # noqa: E402

import spmdnnx as nnx  # noqa: E402
# (spmdnnx.train no longer ships this regression model; defined here.)

class MLPBlock(nnx.Module):
  """Pre-norm residual MLP block: x + W2 gelu(W1 norm(x))."""

  def __init__(self, embed: int, mlp: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(embed, rngs=rngs)
    self.up = nnx.Linear(embed, mlp, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(mlp, embed, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    h = nnx.spmd.constrain(jax.nn.gelu(self.up(self.norm(x))), ("batch", "mlp"))
    return x + self.down(h)


class MLPRegressor(nnx.Module):
  """In-projection, residual MLP blocks, head (the former spmdnnx.train model)."""

  def __init__(self, in_features: int, *, embed: int, mlp: int, num_layers: int,
               out_features: int, rngs: nnx.Rngs):
    self.embed = nnx.Linear(in_features, embed, kernel_axes=(None, "embed"), rngs=rngs)
    self.blocks = nnx.List([MLPBlock(embed, mlp, rngs=rngs) for _ in range(num_layers)])
    self.head = nnx.Linear(embed, out_features, kernel_axes=("embed", None), rngs=rngs)

  def __call__(self, x):
    x = nnx.spmd.constrain(self.embed(x), ("batch", "embed"))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def mse(pred, target):
  return jnp.mean((pred - target) ** 2)


mesh = nnx.make_mesh(nnx.MeshConfig(ici={"fsdp": 2, "tensor": 2}, dcn={"data": num}))
with nnx.use_sharding(mesh, "fsdp_tp"):
  model = nnx.sharded_init(lambda: MLPRegressor(
      4, embed=8, mlp=16, num_layers=2, out_features=2, rngs=nnx.Rngs(0)))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2))
  rng = np.random.default_rng(pid)
  local_x = rng.normal(size=(4, 4)).astype(np.float32) + 3.0 * pid
  local_y = np.tanh(local_x[:, :2] - 3.0 * pid)
  x, y = nnx.global_batch_from_local((local_x, local_y))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x, y)) for _ in range(3)]
  # Rows this process holds: its own (offset by 3 * pid), never the other's.
  row_means = [float(np.asarray(s.data).mean()) for s in x.addressable_shards]
print(json.dumps({
    "pid": pid, "devices": jax.device_count(), "local": jax.local_device_count(),
    "x_shape": list(x.shape), "losses": losses,
    "kernel_spec": str(model.blocks[0].up.kernel.value.sharding.spec),
    "row_means": row_means,
}), flush=True)
jax.distributed.shutdown()
