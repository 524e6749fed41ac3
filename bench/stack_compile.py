"""Compile time of a grad step through a `Stack` vs the same blocks in a Python list.

A `Stack` of L residual MLP blocks (embed 64, mlp 256, `nn.Linear` layers;
``--remat`` policy, default none) is applied by scanning over its ``layers`` axis; the
reference is ``stack.to_blocks()`` (the same weights) applied in a Python
loop, which XLA sees unrolled. The step is ``jax.jit(jax.grad(loss))`` over
the split state, built fresh for every measurement (no trace or executable
cache hides work); ``.lower()`` and ``.compile()`` are timed separately.
Depths are interleaved within each round and the median over rounds is
printed, then the scanned L=max / L=min ratio (goal: <= 1.2).

Run: python bench/stack_compile.py [--layers 4,16,64] [--repeats 5]
     [--unrolled-repeats 2] [--remat full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import spmdnnx as nnx
from spmdnnx.nn import Linear
from spmdnnx import Stack

EMBED, MLP, BATCH = 64, 256, 8


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = Linear(EMBED, MLP, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(MLP, EMBED, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.relu(self.up(x)))


class Unrolled(nnx.Module):

  def __init__(self, blocks):
    self.blocks = list(blocks)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def grad_step(graphdef):
  """A fresh jitted grad step (a new function object every call)."""

  def loss(state, x):
    return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

  return jax.jit(jax.value_and_grad(loss))


def time_compile(graphdef, state, x) -> tuple[float, float]:
  step = grad_step(graphdef)
  t0 = time.perf_counter()
  lowered = step.lower(state, x)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="4,16,64")
  parser.add_argument("--repeats", type=int, default=5, help="Stack runs per L")
  parser.add_argument("--unrolled-repeats", type=int, default=2)
  parser.add_argument("--remat", default="none", help="Stack remat policy name")
  args = parser.parse_args()
  depths = [int(n) for n in args.layers.split(",")]

  x = jnp.ones((BATCH, EMBED))
  models = {}
  for n in depths:
    stack = Stack(Block, n, rngs=nnx.Rngs(0), remat=args.remat)
    unrolled = Unrolled(stack.to_blocks())
    ls, _ = grad_step(nnx.graphdef(stack))(nnx.state(stack), x)
    lu, _ = grad_step(nnx.graphdef(unrolled))(nnx.state(unrolled), x)
    assert jnp.allclose(ls, lu, rtol=1e-5), (float(ls), float(lu))  # same weights
    models[n] = [nnx.split(stack), nnx.split(unrolled)]

  times = {(n, k): [] for n in depths for k in (0, 1)}
  for r in range(max(args.repeats, args.unrolled_repeats)):
    for n in depths:
      for k, reps in ((0, args.repeats), (1, args.unrolled_repeats)):
        if r < reps:
          times[(n, k)].append(time_compile(*models[n][k], x))

  def med(n, k, part=None):
    rows = times[(n, k)]
    if part is None:
      return statistics.median(lo + co for lo, co in rows)
    return statistics.median(row[part] for row in rows)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Stack of residual MLP "
        f"blocks (embed {EMBED}, mlp {MLP}, remat={args.remat!r}), batch {BATCH}; grad step "
        f"lower + compile seconds, median of {args.repeats} (Stack) / "
        f"{args.unrolled_repeats} (unrolled list)")
  print(f"{'L':>4} {'stack lower':>12} {'compile':>8} {'total':>7}   "
        f"{'unrolled lower':>14} {'compile':>8} {'total':>7}   {'unrolled/stack':>14}")
  for n in depths:
    print(f"{n:>4} {med(n, 0, 0):>12.3f} {med(n, 0, 1):>8.3f} {med(n, 0):>7.3f}   "
          f"{med(n, 1, 0):>14.3f} {med(n, 1, 1):>8.3f} {med(n, 1):>7.3f}   "
          f"{med(n, 1) / med(n, 0):>13.1f}x")
  lo, hi = min(depths), max(depths)
  ratio = med(hi, 0) / med(lo, 0)
  print(f"Stack L={hi} / L={lo} lower+compile ratio: {ratio:.2f} "
        f"(goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
  main()
