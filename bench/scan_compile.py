"""Compile time of a grad step through a scanned stack vs an unrolled loop.

A stack of L residual MLP blocks (x + relu(x @ W1 + b1) @ W2 + b2; embed 64,
mlp 256) is created with `nnx.vmap` + `nnx.split_rngs`. The step is
``value_and_grad`` of a mean-squared output, either through `nnx.scan` over
the stack or through a Python loop over the same weights (slice i of every
stacked Variable). For each L the step is lowered and compiled with
``jax.jit(step).lower(state, x).compile()``; every repeat builds a fresh step
function so no trace/lowering cache hides work. Depths are interleaved within
each round (so machine-load drift hits every L alike); the median over rounds
is printed, then the scanned L=max / L=min ratio (goal: <= 1.2).

Run: python bench/scan_compile.py [--layers 4,16,64] [--repeats 7]
     [--unrolled-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import spmdnnx as nnx

EMBED, MLP, BATCH = 64, 256, 8


class Block(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.lecun_normal()
    self.w1 = nnx.Param(init(rngs.params(), (EMBED, MLP)), logical_axes=("embed", "mlp"))
    self.b1 = nnx.Param(jnp.zeros(MLP), logical_axes=("mlp",))
    self.w2 = nnx.Param(init(rngs.params(), (MLP, EMBED)), logical_axes=("mlp", "embed"))
    self.b2 = nnx.Param(jnp.zeros(EMBED), logical_axes=("embed",))

  def __call__(self, x):
    return block_apply(self.w1.value, self.b1.value, self.w2.value, self.b2.value, x)


def block_apply(w1, b1, w2, b2, x):
  return x + jax.nn.relu(x @ w1 + b1) @ w2 + b2


def make_stack(layers: int) -> Block:
  @nnx.split_rngs(splits=layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return Block(rngs=rngs)

  return create(nnx.Rngs(0))


def scanned_loss(stack: Block, x):
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(x, blk):
    return blk(x)

  return (step(x, stack) ** 2).mean()


def unrolled_loss(stack: Block, x):
  for i in range(stack.w1.shape[0]):
    x = block_apply(stack.w1.value[i], stack.b1.value[i], stack.w2.value[i],
                    stack.b2.value[i], x)
  return (x ** 2).mean()


def make_step(graphdef, loss_fn):
  """A fresh functional grad step (new function object every call)."""

  def step(state, x):
    model = nnx.merge(graphdef, state)
    return nnx.value_and_grad(loss_fn)(model, x)

  return step


def compile_seconds(graphdef, state, x, loss_fn) -> float:
  step = make_step(graphdef, loss_fn)
  t0 = time.perf_counter()
  jax.jit(step).lower(state, x).compile()
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="4,16,64")
  parser.add_argument("--repeats", type=int, default=7, help="scanned runs per L")
  parser.add_argument("--unrolled-repeats", type=int, default=3)
  args = parser.parse_args()
  layer_counts = [int(n) for n in args.layers.split(",")]

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; embed {EMBED}, mlp {MLP}, "
        f"batch {BATCH}; lower+compile seconds, median of {args.repeats} (scan) / "
        f"{args.unrolled_repeats} (unrolled) fresh step functions")
  print(f"{'L':>4} {'scan (s)':>10} {'unrolled (s)':>13} {'unrolled/scan':>14}")
  x = jnp.ones((BATCH, EMBED))
  setups = {}
  for layers in layer_counts:
    graphdef, state = nnx.split(make_stack(layers))
    # Same weights, same answer.
    ls, _ = jax.jit(make_step(graphdef, scanned_loss))(state, x)
    lu, _ = jax.jit(make_step(graphdef, unrolled_loss))(state, x)
    assert jnp.allclose(ls, lu, rtol=1e-4), (float(ls), float(lu))
    setups[layers] = (graphdef, state)
  # Interleave depths within each round so load drift hits every L alike.
  ts = {n: [] for n in layer_counts}
  tu = {n: [] for n in layer_counts}
  for r in range(max(args.repeats, args.unrolled_repeats)):
    for layers in layer_counts:
      graphdef, state = setups[layers]
      if r < args.repeats:
        ts[layers].append(compile_seconds(graphdef, state, x, scanned_loss))
      if r < args.unrolled_repeats:
        tu[layers].append(compile_seconds(graphdef, state, x, unrolled_loss))
  scan_times = {}
  for layers in layer_counts:
    s, u = statistics.median(ts[layers]), statistics.median(tu[layers])
    scan_times[layers] = s
    print(f"{layers:>4} {s:>10.3f} {u:>13.3f} {u / s:>13.1f}x")
  lo, hi = min(layer_counts), max(layer_counts)
  ratio = scan_times[hi] / scan_times[lo]
  print(f"scanned L={hi} / L={lo} compile-time ratio: {ratio:.2f} (goal <= 1.2: "
        f"{'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
  main()
