"""Cost of one graph walk (`nnx.split`, `graphdef`, `iter_graph`, `update`).

Every graph function and lifted transform reads one `graph.Walk` of the
model, so its cost is paid by every `nnx.split`, by `update`, and by each call
of a lifted transform that re-walks its arguments (vmap, scan, grad, jit's
general path). The model is `depth` small layers (two Params and a static
string each) in a list. The plain-JAX reference is what a functional program
does for the same job: `jax.tree_util.tree_flatten_with_path` over a nested
dict holding the same arrays (paths and leaves, no objects). Medians over
interleaved rounds.

Run: python bench/graph_walk.py [--depths 16,64] [--calls 200] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import spmdnnx as nnx


class Layer(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.ones((4, 4)), logical_axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.zeros(4), logical_axes=("mlp",))
    self.act = "relu"


class Model(nnx.Module):

  def __init__(self, depth: int):
    self.layers = [Layer() for _ in range(depth)]


def _time(fn, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--depths", default="16,64")
  parser.add_argument("--calls", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, calls/round {args.calls}, rounds {args.rounds}")
  print("depth  plain flatten us  split us  ratio  graphdef us  iter_graph us  update us")
  for depth in [int(d) for d in args.depths.split(",")]:
    model = Model(depth)
    tree = {"layers": {i: {"w": l.w.value, "b": l.b.value} for i, l in enumerate(model.layers)}}
    state = nnx.state(model)
    fns = {
        "plain": lambda: jax.tree_util.tree_flatten_with_path(tree),
        "split": lambda: nnx.split(model),
        "graphdef": lambda: nnx.graphdef(model),
        "iter_graph": lambda: list(nnx.iter_graph(model)),
        "update": lambda: nnx.update(model, state),
    }
    times: dict = {k: [] for k in fns}
    for _ in range(args.rounds):
      for name, fn in fns.items():
        fn()
        times[name].append(_time(fn, args.calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{depth:5d}  {med['plain']:16.1f}  {med['split']:8.1f}  "
          f"{med['split'] / med['plain']:5.1f}  {med['graphdef']:11.1f}  "
          f"{med['iter_graph']:13.1f}  {med['update']:9.1f}")


if __name__ == "__main__":
  main()
