"""Per-step cost of `nnx.jit` vs a hand-written `jax.jit` functional step.

Both variants run the same SGD train step (value_and_grad + optax update) on an
MLP of `depth` 16x16 Linear layers, batch 4, in the same process. "The same
step" includes the optimizer's update counter: `nnx.Optimizer` keeps `step`
(as Flax's does), so the hand-written step carries and increments the same
uint32 counter. For transparency the hand-written step without the counter is
timed too (column "no counter"): on CPU that one extra scalar op costs a few
microseconds per step in XLA's runtime, whoever writes it. Timings are
interleaved and the median over rounds is reported.

Run: python bench/jit_overhead.py [--depths 1,8,32] [--steps 200] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import spmdnnx as nnx


class Linear(nnx.Module):

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) * 0.1)
    self.bias = nnx.Param(jnp.zeros((dout,)))

  def __call__(self, x):
    return x @ self.kernel.value + self.bias.value


class MLP(nnx.Module):

  def __init__(self, depth: int, *, rngs: nnx.Rngs):
    self.layers = [Linear(16, 16, rngs=rngs) for _ in range(depth)]

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return x


def make_nnx_step(depth: int):
  model = MLP(depth, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  def run(x, y):
    return train_step(model, optimizer, x, y)

  return run


def make_jax_step(depth: int, counter: bool = True):
  model = MLP(depth, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = params.to_pure_dict()
  tx = optax.sgd(1e-2)
  opt_state = tx.init(params)

  def apply(params, x):
    for i in range(depth):
      layer = params["layers"][i]
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x

  @jax.jit
  def train_step(params, opt_state, step, x, y):
    def loss_fn(params):
      return jnp.mean((apply(params, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, step + 1, loss

  @jax.jit
  def train_step_no_counter(params, opt_state, x, y):
    def loss_fn(params):
      return jnp.mean((apply(params, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = {"params": params, "opt": opt_state, "step": jnp.zeros((), jnp.uint32)}

  def run(x, y):
    state["params"], state["opt"], state["step"], loss = train_step(
        state["params"], state["opt"], state["step"], x, y)
    return loss

  def run_no_counter(x, y):
    state["params"], state["opt"], loss = train_step_no_counter(
        state["params"], state["opt"], x, y)
    return loss

  if not counter:
    return run_no_counter

  return run


def time_steps(run, x, y, steps: int) -> float:
  loss = run(x, y)
  start = time.perf_counter()
  for _ in range(steps):
    loss = run(x, y)
  jax.block_until_ready(loss)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", default="1,8,32")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  x = jnp.ones((4, 16))
  y = jnp.zeros((4, 16))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"steps/round {args.steps}, rounds {args.rounds}")
  print(f"{'depth':>5} {'jax.jit us':>11} {'nnx.jit us':>11} {'ratio':>7}"
        f" {'no counter us':>14}")
  for depth in (int(d) for d in args.depths.split(",")):
    runs = {"jax": make_jax_step(depth), "nnx": make_nnx_step(depth),
            "jax_nc": make_jax_step(depth, counter=False)}
    for run in runs.values():  # compile + warm up
      time_steps(run, x, y, 20)
    samples = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
      # Rotate the order every round so no variant always runs first or last.
      for name in names[r % len(names):] + names[:r % len(names)]:
        run = runs[name]
        samples[name].append(time_steps(run, x, y, args.steps))
    t_jax = statistics.median(samples["jax"])
    t_nnx = statistics.median(samples["nnx"])
    t_nc = statistics.median(samples["jax_nc"])
    print(f"{depth:>5} {t_jax * 1e6:>11.1f} {t_nnx * 1e6:>11.1f} {t_nnx / t_jax:>7.3f}"
          f" {t_nc * 1e6:>14.1f}")


if __name__ == "__main__":
  main()
