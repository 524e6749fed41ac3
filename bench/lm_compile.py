"""Compile and step time of the lm_tiny train step (DecoderLM, Stack vs list).

The step is ``value_and_grad`` of `lm_loss` plus an AdamW update, under
`nnx.jit`, on one device (batch 8 x 128 tokens). For each variant the first
call (trace + compile + run) and the median of later steps are timed, with a
fresh model and step function each time. Variants: ``scan_layers`` True
(`nnx.Stack`) / False (Python list), 4 and 16 layers, remat "none"/"full".
Printed: seconds and the scanned / list compile ratio at each depth.

Run: PYTHONPATH=. python bench/lm_compile.py [--layers 4,16] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import spmdnnx as nnx
from spmdnnx import models


def measure(cfg: models.LMConfig, steps: int) -> tuple[float, float, float]:
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  batch = jax.random.randint(jax.random.key(0), (8, 129), 0, cfg.vocab_size, jnp.int32)

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      return models.lm_loss(m(batch[:, :-1]), batch[:, 1:])[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  t0, c0 = time.perf_counter(), time.process_time()
  step(model, opt, batch).block_until_ready()
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step(model, opt, batch).block_until_ready()
    times.append(time.perf_counter() - t0)
  return first, first_cpu, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="4,16")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  base = models.PRESETS["lm_tiny"]
  print(f"lm_tiny step (batch 8 x 128), {jax.devices()[0].platform}; seconds; first = "
        "trace + compile + one step (wall, and process CPU)")
  print("layers remat  scan_first(cpu) list_first(cpu) scan/list(cpu) scan_step list_step")
  for layers in [int(x) for x in args.layers.split(",")]:
    for remat in ("none", "full"):
      cfg = base.replace(num_layers=layers, remat=remat)
      s_first, s_cpu, s_step = measure(cfg, args.steps)
      l_first, l_cpu, l_step = measure(cfg.replace(scan_layers=False), args.steps)
      print(f"{layers:6d} {remat:6s} {s_first:6.2f} ({s_cpu:5.2f}) {l_first:7.2f} ({l_cpu:5.2f})"
            f" {s_cpu / l_cpu:13.2f} {s_step:10.3f} {l_step:9.3f}", flush=True)


if __name__ == "__main__":
  main()
