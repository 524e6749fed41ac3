"""Grad-step compile time vs depth for each normalization layer (issue 9, item 11).

A model is an unrolled stack of L residual blocks ``x + layer(x)`` (features
64, input ``(8, 8, 64)``), one column per layer kind: `Linear`, `LayerNorm`,
`RMSNorm`, `BatchNorm`, `GroupNorm`, and a hand-written plain-JAX LayerNorm
(the baseline; ``--kinds "textbook LN"`` adds the two-pass textbook formula,
which is quadratic). The step is ``jax.jit(jax.grad(loss))`` over the split state,
built fresh for every measurement, and ``.lower()`` + ``.compile()`` are timed
together; the median over rounds is printed, then the growth L=max / L=min for
each kind (goal: <= 5x for 8 -> 32, i.e. at most ~linear in depth). The size of
the optimized HLO (lines) is printed too: it is what grows when XLA duplicates
work, and unlike seconds it does not depend on the machine's load.

Run: python bench/compile_depth.py [--depths 8,16,32] [--repeats 2] [--kinds ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import spmdnnx as nnx
from spmdnnx import nn

FEATURES = 64
SHAPE = (8, 8, FEATURES)


def _layer(kind: str, rngs: nnx.Rngs):
  if kind == "Linear":
    return nn.Linear(FEATURES, FEATURES, rngs=rngs)
  if kind == "LayerNorm":
    return nn.LayerNorm(FEATURES, rngs=rngs)
  if kind == "RMSNorm":
    return nn.RMSNorm(FEATURES, rngs=rngs)
  if kind == "BatchNorm":
    return nn.BatchNorm(FEATURES, rngs=rngs)
  if kind == "GroupNorm":
    return nn.GroupNorm(FEATURES, num_groups=8, rngs=rngs)
  raise ValueError(kind)


class Residual(nnx.Module):
  """L blocks ``x + layer(x)`` applied in a Python loop (unrolled for XLA)."""

  def __init__(self, kind: str, depth: int, rngs: nnx.Rngs):
    self.layers = [_layer(kind, rngs) for _ in range(depth)]

  def __call__(self, x):
    for layer in self.layers:
      x = x + layer(x)
    return x


def _plain_layer_norm(params, x):
  """LayerNorm in the formulation spmdnnx uses (see docs/layers.md)."""
  scale, bias = params
  square = jnp.square(x)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.maximum(jnp.mean(square, -1, keepdims=True) - jnp.square(mean), 0.0)
  return (x - mean) * (lax.rsqrt(var + 1e-6) * scale) + bias


def _plain_layer_norm_textbook(params, x):
  """The textbook two-pass LayerNorm: its grad step compiles in quadratic time."""
  scale, bias = params
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + 1e-6) * scale + bias


def _step_and_args(kind: str, depth: int, x):
  """A fresh jitted grad step (new function object) and its arguments."""
  if kind in PLAIN:
    params = [(jnp.ones(FEATURES), jnp.zeros(FEATURES)) for _ in range(depth)]
    norm = PLAIN[kind]

    def plain_loss(params, x):
      for p in params:
        x = x + norm(p, x)
      return jnp.mean(x ** 2)

    return jax.jit(jax.grad(plain_loss)), (params, x)
  graphdef, state = nnx.split(Residual(kind, depth, nnx.Rngs(0)))

  def loss(state, x):
    return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

  return jax.jit(jax.grad(loss)), (state, x)


def time_compile(kind: str, depth: int, x) -> tuple[float, int]:
  step, args = _step_and_args(kind, depth, x)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  seconds = time.perf_counter() - t0
  return seconds, compiled.as_text().count("\n")


PLAIN = {"plain-jax LN": _plain_layer_norm, "textbook LN": _plain_layer_norm_textbook}
KINDS = ("Linear", "LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "plain-jax LN")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="8,16,32")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--kinds", default=",".join(KINDS),
                      help=f"comma-separated, from {', '.join(KINDS + ('textbook LN',))}")
  args = parser.parse_args()
  depths = [int(n) for n in args.depths.split(",")]
  kinds = args.kinds.split(",")
  x = jax.random.normal(jax.random.key(0), SHAPE)

  seconds = {(k, n): [] for k in kinds for n in depths}
  lines = {}
  for _ in range(args.repeats):
    for kind in kinds:
      for n in depths:
        s, lines[(kind, n)] = time_compile(kind, n, x)
        seconds[(kind, n)].append(s)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; residual blocks x + layer(x), "
        f"input {SHAPE}; grad step lower+compile seconds, median of {args.repeats}; "
        "optimized HLO lines in brackets")
  lo, hi = min(depths), max(depths)
  print(f"{'kind':>13} " + " ".join(f"{'L=' + str(n):>15}" for n in depths)
        + f" {'growth':>8} {'HLO growth':>11}")
  worst = 0.0
  for kind in kinds:
    med = {n: statistics.median(seconds[(kind, n)]) for n in depths}
    growth = med[hi] / med[lo]
    worst = max(worst, growth)
    cells = " ".join(f"{med[n]:>7.2f}s [{lines[(kind, n)]:>5}]" for n in depths)
    print(f"{kind:>13} {cells} {growth:>7.2f}x "
          f"{lines[(kind, hi)] / lines[(kind, lo)]:>10.2f}x")
  print(f"worst growth L={hi} / L={lo}: {worst:.2f}x "
        f"(goal <= {hi / lo:.0f}x linear, <= 5x required: {'met' if worst <= 5 else 'NOT met'})")


if __name__ == "__main__":
  main()
