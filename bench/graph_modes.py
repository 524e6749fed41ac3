"""Tree mode vs graph mode: `nnx.split` / `nnx.merge` on a deep model.

The model is an MLP of `depth` small Linear layers (kept in a list) plus a
BatchNorm; both modes split it into the same State and merge it back. Graph
mode walks Objects with identity tracking (`Walk`); tree mode flattens the
model as a JAX pytree (Objects are pytrees). The plain-JAX reference is
`jax.tree_util.tree_flatten` / `tree_unflatten` of the same model (what tree
mode builds on), timed in the same process. Timings are interleaved; the
best round is reported (microseconds per call): on a shared, loaded machine
the minimum is the least noisy estimate of the cost itself.

Run: python bench/graph_modes.py [--depths 4,32,128] [--calls 50] [--rounds 9]
"""

from __future__ import annotations

import argparse
import time

import jax

import spmdnnx as nnx


class Deep(nnx.Module):
  """`depth` Linear layers and a BatchNorm."""

  def __init__(self, depth: int, rngs: nnx.Rngs):
    self.layers = [nnx.Linear(8, 8, rngs=rngs) for _ in range(depth)]
    self.norm = nnx.BatchNorm(8, rngs=rngs)


def _per_call(fn, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return (time.perf_counter() - start) / calls * 1e6


def measure(depth: int, calls: int, rounds: int) -> dict:
  model = Deep(depth, nnx.Rngs(0))
  g_def, g_state = nnx.split(model, graph=True)
  t_def, t_state = nnx.split(model, graph=False)
  leaves, treedef = jax.tree_util.tree_flatten(model)
  cases = {
      "graph split": lambda: nnx.split(model, graph=True),
      "tree split": lambda: nnx.split(model, graph=False),
      "jax flatten": lambda: jax.tree_util.tree_flatten(model),
      "graph merge": lambda: nnx.merge(g_def, g_state),
      "tree merge": lambda: nnx.merge(t_def, t_state),
      "jax unflatten": lambda: jax.tree_util.tree_unflatten(treedef, leaves),
  }
  samples = {k: [] for k in cases}
  for _ in range(rounds):
    for name, fn in cases.items():
      samples[name].append(_per_call(fn, calls))
  return {k: min(v) for k, v in samples.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", default="4,32,128")
  parser.add_argument("--calls", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=9)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices: {jax.devices()[0].platform}")
  print("| depth | graph split | tree split | jax flatten | tree/graph split "
        "| graph merge | tree merge | jax unflatten | tree/graph merge |")
  print("|---|---|---|---|---|---|---|---|---|")
  for depth in (int(d) for d in args.depths.split(",")):
    r = measure(depth, args.calls, args.rounds)
    print(f"| {depth} | {r['graph split']:.0f} us | {r['tree split']:.0f} us | "
          f"{r['jax flatten']:.0f} us | {r['tree split'] / r['graph split']:.2f} | "
          f"{r['graph merge']:.0f} us | {r['tree merge']:.0f} us | "
          f"{r['jax unflatten']:.0f} us | {r['tree merge'] / r['graph merge']:.2f} |")


if __name__ == "__main__":
  main()
