"""Step time of the sharded `nnx.jit` train step vs hand-written `jax.jit`.

Both variants train the same 4-block residual MLP (embed/mlp given by flags)
with AdamW on a mesh fsdp=4 x tensor=2 (8 fake CPU devices) using the same
NamedShardings for parameters, optimizer state and batch, with donation. The
`nnx.jit` variant derives those shardings itself from the Variables' logical
axes inside `use_sharding`; the plain variant gets them from
`nnx.get_named_sharding` and passes them to `jax.jit` explicitly. Timings are
interleaved and the median over rounds is reported. Goal: ratio <= 1.02.

As in bench/jit_overhead.py, "the same step" includes the optimizer's update
counter that `nnx.Optimizer` keeps; the plain step without it is shown too.

Run: python bench/sharded_step.py [--embed 128 --mlp 512 --rounds 15 --steps 30]
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

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



def build(args):
  return MLPRegressor(args.embed, embed=args.embed, mlp=args.mlp, num_layers=4,
                      out_features=args.embed, rngs=nnx.Rngs(0))


def nnx_variant(args, mesh, batch):
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(lambda: build(args))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3))

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
      optimizer.update(model, grads)
      return loss

  x, y = batch

  def run():  # the step runs inside the sharding context, like the launcher
    with nnx.use_sharding(mesh, "fsdp_tp"):
      return step(model, optimizer, x, y)

  return run


def jax_variant(args, mesh, batch, counter: bool = True):
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(lambda: build(args))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sh = jax.tree.map(lambda v: v.value, nnx.get_named_sharding(params),
                            is_leaf=lambda v: isinstance(v, nnx.Variable))
  params = jax.tree.map(lambda v: v.value, params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable)).to_pure_dict()
  param_sh = param_sh.to_pure_dict() if hasattr(param_sh, "to_pure_dict") else param_sh
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # Optimizer moments mirror their parameter's sharding; scalars replicate.
  rep = NamedSharding(mesh, P())
  opt_sh = jax.tree.map(lambda _: rep, opt_state)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_sh, param_sh) \
      if hasattr(optax, "tree_map_params") else opt_sh
  opt_state = jax.device_put(opt_state, opt_sh)

  def apply(params, x):
    model = nnx.merge(graphdef, nnx.State(jax.tree.map(
        lambda a: nnx.Param(a), params)), rest)
    return model(x)

  def step(params, opt_state, count, x, y):
    loss, grads = jax.value_and_grad(lambda p: mse(apply(p, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_count = count + 1 if counter else count
    return optax.apply_updates(params, updates), opt_state, new_count, loss

  step = jax.jit(step, in_shardings=(param_sh, opt_sh, rep, None, None),
                 out_shardings=(param_sh, opt_sh, rep, None), donate_argnums=(0, 1, 2))
  state = {"p": params, "o": opt_state,
           "c": jax.device_put(jnp.zeros((), jnp.uint32), rep)}
  x, y = batch

  def run():
    with nnx.use_sharding(mesh, "fsdp_tp"):
      state["p"], state["o"], state["c"], loss = step(state["p"], state["o"], state["c"], x, y)
    return loss

  return run


def timed(run, steps: int) -> float:
  loss = run()
  start = time.perf_counter()
  for _ in range(steps):
    loss = run()
  jax.block_until_ready(loss)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--embed", type=int, default=128)
  parser.add_argument("--mlp", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch, args.embed)).astype(np.float32)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    batch = nnx.shard_batch((x, np.tanh(x)))
  runs = {"jax": jax_variant(args, mesh, batch), "nnx": nnx_variant(args, mesh, batch),
          "jax_nc": jax_variant(args, mesh, batch, counter=False)}
  for run in runs.values():
    timed(run, 5)
  samples = {k: [] for k in runs}
  names = list(runs)
  for r in range(args.rounds):
    # Rotate the order every round so no variant always runs first or last.
    for name in names[r % len(names):] + names[:r % len(names)]:
      run = runs[name]
      samples[name].append(timed(run, args.steps))
  t_jax, t_nnx, t_nc = (statistics.median(samples[k]) for k in ("jax", "nnx", "jax_nc"))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, "
        f"mesh fsdp=4 x tensor=2, embed {args.embed}, mlp {args.mlp}, batch {args.batch}")
  print(f"jax.jit {t_jax * 1e3:.3f} ms/step   nnx.jit {t_nnx * 1e3:.3f} ms/step   "
        f"ratio {t_nnx / t_jax:.3f}   (jax.jit without the update counter "
        f"{t_nc * 1e3:.3f} ms/step)")


if __name__ == "__main__":
  main()
