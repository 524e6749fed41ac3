"""Pipeline bubble and memory: a pipelined `nnx.Stack` against plain-JAX FSDP.

An 8-layer residual MLP stack (``embed`` x ``hidden``, tokens ``[B, T, embed]``)
takes a full forward + backward step (jitted ``value_and_grad`` of a sum of
squares) in three ways, in the same process, on 8 fake CPU devices:

* ``plain``: hand-written `jax.jit` + `lax.scan` over the stacked weights,
  FSDP-sharded 8 ways (``fsdp=8``): the non-pipelined baseline;
* ``pipelined M``: `nnx.Stack(..., pipeline=nnx.PipelineConfig(M, R))` on a
  ``stage=4, fsdp=2`` mesh, for several microbatch counts M (and repeats R).

Fake CPU devices share the machine's cores, so stages do not overlap in
time: a bubble iteration costs the same compute as a useful one (the
vmap-over-stages formulation runs every stage every iteration). The model
predicts a step time of ``(R*M + S - 1) / (R*M)`` = ``1 / (1 - bubble)`` times
the work of the non-pipelined step; the bench prints the measured ratio
pipelined / plain next to that prediction. On real accelerators the same
ratio is the idle share instead.

Memory: ``compile().memory_analysis()`` of each step (arguments and
temporaries, per device), pipelined vs plain FSDP.

Run: python bench/pipeline.py [--rounds 5] [--embed 128] [--hidden 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import spmdnnx as nnx  # noqa: E402
from spmdnnx import spmd  # noqa: E402
from spmdnnx.nn import Linear  # noqa: E402

LAYERS, STAGES = 8, 4


class Block(nnx.Module):

  def __init__(self, embed, hidden, rngs):
    self.up = Linear(embed, hidden, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(hidden, embed, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


def timed(f, *args, rounds):
  jax.block_until_ready(f(*args))     # compile + warm up
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def memory(lowered):
  m = lowered.compile().memory_analysis()
  return m.argument_size_in_bytes, m.temp_size_in_bytes


def plain_step(args, x):
  """Plain JAX: scan over FSDP-sharded stacked weights (fsdp=8)."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  stack = nnx.Stack(lambda r: Block(args.embed, args.hidden, r), LAYERS, rngs=nnx.Rngs(0))
  w = {k: getattr(getattr(stack.block, a), b).value for k, (a, b) in
       dict(wu=("up", "kernel"), bu=("up", "bias"), wd=("down", "kernel"),
            bd=("down", "bias")).items()}
  specs = dict(wu=P(None, "fsdp", None), bu=P(None, "fsdp"), wd=P(None, None, "fsdp"),
               bd=P(None, "fsdp"))
  w = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in w.items()}
  xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))

  def loss(w, x):
    def layer(h, p):
      u = jax.nn.gelu(h @ p["wu"] + p["bu"])
      return h + u @ p["wd"] + p["bd"], None
    h, _ = jax.lax.scan(layer, x, w)
    return jnp.sum(h ** 2)

  f = jax.jit(jax.value_and_grad(loss))
  return f, (w, xs), f.lower(w, xs)


def pipelined_step(args, x, micro, repeats):
  mesh = spmd.make_mesh(spmd.MeshConfig(stage=STAGES, fsdp=2))
  rules = spmd.AxisRules.load("fsdp").override(layers="stage")
  stack = nnx.Stack(lambda r: Block(args.embed, args.hidden, r), LAYERS, rngs=nnx.Rngs(0),
                    pipeline=nnx.PipelineConfig(micro, repeats))
  ctx = spmd.use_sharding(mesh, rules)
  ctx.__enter__()
  f = nnx.jit(lambda s, x: nnx.value_and_grad(lambda s, x: jnp.sum(s(x) ** 2))(s, x),
              donate_state=False)
  lowered = f.lower(stack, x)
  return f, (stack, x), lowered, ctx


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--embed", type=int, default=128)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=16)
  parser.add_argument("--micro", default="4,8,16,32")
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(1), (args.batch, args.length, args.embed))
  f, fargs, lowered = plain_step(args, x)
  t_plain = timed(f, *fargs, rounds=args.rounds)
  a_plain, tmp_plain = memory(lowered)
  print(f"plain jax fsdp=8: {t_plain * 1e3:.1f} ms/step; per device: args "
        f"{a_plain / 2**20:.2f} MiB, temp {tmp_plain / 2**20:.2f} MiB", flush=True)
  print(f"{'M':>3} {'R':>2} {'bubble':>7} {'model':>6} {'measured':>9} {'ms/iter':>8} "
        f"{'args':>8} {'temp':>8}   (model, measured: step time / plain step time)")
  configs = [(int(m), 1) for m in args.micro.split(",")] + [(8, 2)]
  for micro, repeats in configs:
    f, fargs, lowered, ctx = pipelined_step(args, x, micro, repeats)
    try:
      t = timed(f, *fargs, rounds=args.rounds)
      a, tmp = memory(lowered)
    finally:
      ctx.__exit__(None, None, None)
    bubble = nnx.bubble_fraction(STAGES, micro, repeats)
    iters = repeats * micro + STAGES - 1
    print(f"{micro:>3} {repeats:>2} {bubble:>7.3f} {1 / (1 - bubble):>6.2f} "
          f"{t / t_plain:>9.2f} {t / iters * 1e3:>8.1f} {a / 2**20:>7.2f}M "
          f"{tmp / 2**20:>7.2f}M", flush=True)


if __name__ == "__main__":
  main()
