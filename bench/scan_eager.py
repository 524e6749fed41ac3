"""Eager (un-jitted) call time of `nnx.scan` over a stack vs `jax.lax.scan`.

A stack of L Linear layers (embed 16) is created with `nnx.vmap` +
`nnx.split_rngs`; one call applies ``tanh(layer(x))`` over the stack. The
spmdnnx side is a module-level ``nnx.scan`` over the stack (graph mode); the
plain side is ``jax.lax.scan`` of the same step written on the raw stacked
arrays, with the step function defined once (so JAX reuses its trace).
Rounds alternate the two sides; the median per-call time is printed with the
ratio nnx/jax. Before the trace reuse (issue 14, session 4) every eager
`nnx.scan` call traced and lowered its step again.

Run: python bench/scan_eager.py [--layers 8] [--rounds 7] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import spmdnnx as nnx


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args()

  @nnx.split_rngs(splits=args.layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return nnx.Linear(16, 16, rngs=rngs)

  stack = create(nnx.Rngs(0))
  x = jnp.ones((4, 16), jnp.float32)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def nnx_forward(layer, h):
    return jnp.tanh(layer(h))

  def plain_step(h, wb):
    w, b = wb
    return jnp.tanh(h @ w + b), None

  weights = (stack.kernel.value, stack.bias.value)

  def run_nnx():
    return nnx_forward(stack, x)

  def run_jax():
    return jax.lax.scan(plain_step, x, weights)[0]

  assert jnp.allclose(run_nnx(), run_jax(), atol=1e-6)
  times = {"nnx": [], "jax": []}
  for r in range(args.rounds):
    order = [("nnx", run_nnx), ("jax", run_jax)]
    for name, fn in (order if r % 2 == 0 else order[::-1]):
      fn().block_until_ready()
      start = time.perf_counter()
      for _ in range(args.calls):
        fn().block_until_ready()
      times[name].append((time.perf_counter() - start) / args.calls)
  nnx_ms = statistics.median(times["nnx"]) * 1e3
  jax_ms = statistics.median(times["jax"]) * 1e3
  print(f"layers={args.layers}: nnx.scan {nnx_ms:.3f} ms/call, jax.lax.scan "
        f"{jax_ms:.3f} ms/call, ratio nnx/jax {nnx_ms / jax_ms:.2f}")


if __name__ == "__main__":
  main()
