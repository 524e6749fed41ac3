"""Per-step cost of `nnx.jit` vs a hand-written `jax.jit` functional step.

Both variants run the same SGD train step (value_and_grad + optax update) on an
MLP of `depth` 16x16 Linear layers, batch 4, in the same process. "The same
step" includes the optimizer's update counter: `nnx.Optimizer` keeps `step`
(as Flax's does), so the hand-written step carries and increments the same
uint32 counter. For transparency the hand-written step without the counter is
timed too (column "no counter"): on CPU that one extra scalar op costs a few
microseconds per step in XLA's runtime, whoever writes it. Timings are
interleaved and the median over rounds is reported.

The depth table also times the same step under ``nnx.jit(graph=False,
graph_updates=False)`` (tree mode) and prints its ratio to jax.jit and to
the graph-mode nnx.jit.

Two more tables:

- alternating instances: a train step written as a jitted *method* of a
  Trainer, called on two instances in turn (nnx.jit keeps one plan per
  instance), next to one instance called repeatedly and to `jax.jit`
  alternating two parameter sets;
- in-flight bound (run with ``--devices 8``): a data-parallel step on 8 fake
  CPU devices under ``use_sharding(mesh, "dp")``; nnx.jit with the default
  bound on executions in flight, with a looser one and unbounded, next to
  `jax.jit` given the same shardings. Each round runs ``--flight_steps``
  steps without waiting (kept small: unbounded loops can abort XLA:CPU).

Run: python bench/jit_overhead.py [--depths 1,8,32] [--steps 200] [--rounds 15]
     [--devices 8]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", default="1,8,32")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--devices", type=int, default=0,
                      help="fake CPU devices (set before JAX starts); >1 adds the "
                      "in-flight table")
  parser.add_argument("--flight_steps", type=int, default=24)
  parser.add_argument("--tables", default="depth,alternate,flight")
  return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 1:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import spmdnnx as nnx  # noqa: E402


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


def make_nnx_step(depth: int, graph: bool = True):
  model = MLP(depth, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  # Tree mode refuses aliasing: our Optimizer holds its model, so the tree-mode
  # step takes the optimizer alone and reaches the model through it.
  @nnx.jit(graph=False, graph_updates=False)
  def tree_step(optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(optimizer.model)
    optimizer.update(optimizer.model, grads)
    return loss

  def run(x, y):
    return train_step(model, optimizer, x, y)

  def run_tree(x, y):
    return tree_step(optimizer, x, y)

  return run if graph else run_tree


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


class Trainer(nnx.Module):
  """Model + optimizer with the train step as a jitted method."""

  def __init__(self, depth: int, seed: int):
    self.model = MLP(depth, rngs=nnx.Rngs(seed))
    self.optimizer = nnx.Optimizer(self.model, optax.sgd(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(self, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(self.model)
    self.optimizer.update(self.model, grads)
    return loss


def make_alternating(depth: int):
  a, b = Trainer(depth, 0), Trainer(depth, 1)
  turn = [0]

  def run(x, y):
    turn[0] ^= 1
    return (a if turn[0] else b).step(x, y)

  return run


def make_single_method(depth: int):
  a = Trainer(depth, 0)
  return a.step


def make_jax_alternating(depth: int):
  runs = [make_jax_step(depth), make_jax_step(depth)]
  turn = [0]

  def run(x, y):
    turn[0] ^= 1
    return runs[turn[0]](x, y)

  return run


def make_flight_steps(bound: int | None):
  """Data-parallel step on all devices under use_sharding(mesh, "dp")."""
  mesh = nnx.make_mesh(nnx.MeshConfig(data=-1))
  with nnx.use_sharding(mesh, "dp"):
    model = nnx.sharded_init(lambda: MLP(4, rngs=nnx.Rngs(0)))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

  kw = {"max_in_flight": bound} if hasattr(nnx, "set_max_in_flight") else {}

  @nnx.jit(**kw)
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  def run(x, y):
    return train_step(model, optimizer, x, y)   # called inside use_sharding (main)

  return run, mesh


def make_jax_flight_step(mesh):
  from jax.sharding import NamedSharding, PartitionSpec as P
  replicated = NamedSharding(mesh, P())
  model = MLP(4, rngs=nnx.Rngs(0))
  _, params = nnx.split(model)
  params = jax.device_put(params.to_pure_dict(), replicated)
  tx = optax.sgd(1e-2)
  state = {"params": params, "opt": tx.init(params),
           "step": jax.device_put(jnp.zeros((), jnp.uint32), replicated)}

  def apply(params, x):
    for layer in params["layers"].values() if isinstance(params["layers"], dict) \
        else params["layers"]:
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, opt_state, step, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, step + 1, loss

  def run(x, y):
    state["params"], state["opt"], state["step"], loss = train_step(
        state["params"], state["opt"], state["step"], x, y)
    return loss

  return run


def measure(runs: dict, x, y, steps: int, rounds: int) -> dict:
  for run in runs.values():  # compile + warm up
    time_steps(run, x, y, min(steps, 20))
  samples = {k: [] for k in runs}
  names = list(runs)
  for r in range(rounds):
    # Rotate the order every round so no variant always runs first or last.
    for name in names[r % len(names):] + names[:r % len(names)]:
      samples[name].append(time_steps(runs[name], x, y, steps))
  return {k: statistics.median(v) for k, v in samples.items()}


def main():
  args = ARGS
  tables = args.tables.split(",")
  x = jnp.ones((4, 16))
  y = jnp.zeros((4, 16))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.device_count()}, steps/round {args.steps}, rounds {args.rounds}")
  depths = [int(d) for d in args.depths.split(",")]
  if "depth" in tables:
    print("(nnx.jit: graph mode, the default; tree: nnx.jit(graph=False, graph_updates=False))")
    print(f"{'depth':>5} {'jax.jit us':>11} {'nnx.jit us':>11} {'ratio':>7}"
          f" {'no counter us':>14} {'tree us':>9} {'tree/jax':>9} {'tree/graph':>11}")
    for depth in depths:
      t = measure({"jax": make_jax_step(depth), "nnx": make_nnx_step(depth),
                   "jax_nc": make_jax_step(depth, counter=False),
                   "tree": make_nnx_step(depth, graph=False)}, x, y, args.steps,
                  args.rounds)
      print(f"{depth:>5} {t['jax'] * 1e6:>11.1f} {t['nnx'] * 1e6:>11.1f} "
            f"{t['nnx'] / t['jax']:>7.3f} {t['jax_nc'] * 1e6:>14.1f} "
            f"{t['tree'] * 1e6:>9.1f} {t['tree'] / t['jax']:>9.3f} "
            f"{t['tree'] / t['nnx']:>11.3f}")
  if "alternate" in tables:
    print("\nalternating two instances of a jitted method (per step)")
    print(f"{'depth':>5} {'jax.jit alt us':>15} {'nnx one us':>11} {'nnx alt us':>11}"
          f" {'alt/jax':>8} {'alt/one':>8}")
    for depth in depths:
      t = measure({"jax": make_jax_alternating(depth), "one": make_single_method(depth),
                   "alt": make_alternating(depth)}, x, y, args.steps, args.rounds)
      print(f"{depth:>5} {t['jax'] * 1e6:>15.1f} {t['one'] * 1e6:>11.1f} "
            f"{t['alt'] * 1e6:>11.1f} {t['alt'] / t['jax']:>8.3f} {t['alt'] / t['one']:>8.3f}")
  if "flight" in tables and jax.device_count() > 1:
    print(f"\nin-flight bound: data-parallel MLP(4) step on {jax.device_count()} devices, "
          f"{args.flight_steps} steps/round without waiting")
    run2, mesh = make_flight_steps(None)
    run8, _ = make_flight_steps(8)
    run0, _ = make_flight_steps(0)
    from jax.sharding import NamedSharding, PartitionSpec as P
    batch = NamedSharding(mesh, P("data"))
    xb = jax.device_put(jnp.ones((16, 16)), batch)
    yb = jax.device_put(jnp.zeros((16, 16)), batch)
    with nnx.use_sharding(mesh, "dp"):
      t = measure({"jax": make_jax_flight_step(mesh), "nnx_default": run2, "nnx_8": run8,
                   "nnx_unbounded": run0}, xb, yb, args.flight_steps, args.rounds)
    default = nnx.get_max_in_flight() if hasattr(nnx, "get_max_in_flight") else "(none)"
    print(f"{'variant':>22} {'us/step':>9} {'vs jax.jit':>10}")
    for name, label in (("jax", "jax.jit (unbounded)"),
                        ("nnx_default", f"nnx.jit bound {default}"),
                        ("nnx_8", "nnx.jit bound 8"), ("nnx_unbounded", "nnx.jit unbounded")):
      print(f"{label:>22} {t[name] * 1e6:>9.1f} {t[name] / t['jax']:>10.3f}")


if __name__ == "__main__":
  main()
