"""The runtime's LM train step vs the same step hand-written with `jax.jit`.

Both variants train lm_tiny (byte-level Llama-style LM) with the runtime's
optimizer (global-norm clipping + AdamW with warmup/cosine) on mesh
fsdp=4 x tensor=2 (8 fake CPU devices), on the same token batch, with
donation and the same NamedShardings for parameters, optimizer state and
batch. The runtime variant is `spmdnnx.train.make_train_step` (what
`spmdnnx.train.run` calls); the plain variant is a `jax.jit` of a function on
pure arrays with explicit in/out shardings taken from `nnx.get_named_sharding`.
Both return the loss and the gradient norm and count updates. Timings are
interleaved (order rotated every round); medians are reported, with the
median time the step call takes to return (Python overhead + dispatch).
Goal: ratio <= 1.02.

Run: python bench/lm_step.py [--batch 16 --seq 128 --rounds 7 --steps 10]
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
from spmdnnx import models  # noqa: E402
from spmdnnx import train  # noqa: E402

RULES = "fsdp_tp"


def make_tx():
  return train.make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=1000,
                              min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                              eps=1e-8, grad_clip=1.0)[0]


def build(cfg):
  return nnx.sharded_init(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))


def runtime_variant(cfg, mesh, batch):
  with nnx.use_sharding(mesh, RULES):
    model = build(cfg)
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  step = train.make_train_step(microbatches=1, z_loss=1e-4)

  def run():
    with nnx.use_sharding(mesh, RULES):  # as in spmdnnx.train.run
      return step(model, optimizer, batch)["loss"]

  return run


def jax_variant(cfg, mesh, batch):
  with nnx.use_sharding(mesh, RULES):
    model = build(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sh = jax.tree.map(lambda v: v.value, nnx.get_named_sharding(params),
                            is_leaf=lambda v: isinstance(v, nnx.Variable)).to_pure_dict()
  params = jax.tree.map(lambda v: v.value, params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable)).to_pure_dict()
  tx = make_tx()
  opt_state = tx.init(params)
  rep = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.tree.map(lambda _: rep, opt_state),
                                 param_sh)
  opt_state = jax.device_put(opt_state, opt_sh)
  batch_sh = jax.tree.map(lambda a: a.sharding, batch)

  def loss_of(p, inputs, targets):
    m = nnx.merge(graphdef, nnx.State(jax.tree.map(lambda a: nnx.Param(a), p)), rest)
    return models.lm_loss(m(inputs), targets, z_loss=1e-4)[0]

  def step(params, opt_state, count, batch):
    loss, grads = jax.value_and_grad(loss_of)(params, batch["inputs"], batch["targets"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, count + 1, loss, grad_norm

  step = jax.jit(step, in_shardings=(param_sh, opt_sh, rep, batch_sh),
                 out_shardings=(param_sh, opt_sh, rep, rep, rep), donate_argnums=(0, 1, 2))
  state = {"p": params, "o": opt_state, "c": jax.device_put(jnp.zeros((), jnp.uint32), rep)}

  def run():
    with nnx.use_sharding(mesh, RULES):
      state["p"], state["o"], state["c"], loss, _ = step(state["p"], state["o"], state["c"],
                                                         batch)
    return loss

  return run


def timed(run, steps: int) -> tuple[float, float]:
  """(seconds per step, median seconds for the step call to return)."""
  jax.block_until_ready(run())
  start = time.perf_counter()
  pending, calls = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    pending.append(run())
    calls.append(time.perf_counter() - t0)
    if len(pending) >= 2:  # at most 2 steps in flight, as the runtime's default
      jax.block_until_ready(pending.pop(0))
  jax.block_until_ready(pending)
  return (time.perf_counter() - start) / steps, statistics.median(calls)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  cfg = models.PRESETS["lm_tiny"]
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  tokens = np.random.default_rng(0).integers(1, 256, size=(args.batch, args.seq + 1))
  host = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  with nnx.use_sharding(mesh, RULES):
    batch = nnx.global_batch_from_local(host, axes=("batch", "length"))
  runs = {"jax": jax_variant(cfg, mesh, batch), "runtime": runtime_variant(cfg, mesh, batch)}
  for run in runs.values():
    timed(run, 3)
  samples = {k: [] for k in runs}
  names = list(runs)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      samples[name].append(timed(runs[name], args.steps))
  t_jax, t_rt = (statistics.median(s[0] for s in samples[k]) for k in ("jax", "runtime"))
  c_jax, c_rt = (statistics.median(s[1] for s in samples[k]) for k in ("jax", "runtime"))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, mesh "
        f"fsdp=4 x tensor=2, lm_tiny ({models.param_count(cfg):,} params), batch "
        f"{args.batch} x {args.seq} tokens")
  print(f"jax.jit {t_jax * 1e3:.2f} ms/step   runtime {t_rt * 1e3:.2f} ms/step   "
        f"ratio {t_rt / t_jax:.3f}")
  print(f"step call returns in: jax.jit {c_jax * 1e3:.2f} ms   runtime {c_rt * 1e3:.2f} ms")


if __name__ == "__main__":
  main()
