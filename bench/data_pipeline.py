"""Time the lm_tiny train step waits for its input, with and without prefetch.

Runs the runtime's lm_tiny train step (mesh fsdp=4 x tensor=2, 8 fake CPU
devices, batch 16 x 128 bytes) fed by the real input pipeline (stdlib corpus,
grain shuffle/batch, `global_batch_from_local`) in two ways, in one process:

* prefetch: `spmdnnx.train.Prefetcher` (background thread, depth 2), as
  `spmdnnx.train.run` uses it; the wait is the time `next()` blocks;
* inline: the same pipeline read synchronously before each step (what a loop
  without prefetch pays).

Reports wait / step time for both. Goal: <= 2% with prefetch.

Run: python bench/data_pipeline.py [--steps 40]
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

import spmdnnx as nnx  # noqa: E402
from spmdnnx import models  # noqa: E402
from spmdnnx import train  # noqa: E402

RULES = "fsdp_tp"


def loop(step, model, optimizer, next_batch, steps: int) -> tuple[float, float]:
  """Runs ``steps`` steps with at most 2 in flight; returns (total s, wait s)."""
  pending = collections.deque()
  waited = 0.0
  start = time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = next_batch()
    waited += time.perf_counter() - t0
    pending.append(step(model, optimizer, batch)["loss"])
    if len(pending) >= 2:
      jax.block_until_ready(pending.popleft())
  jax.block_until_ready(list(pending))
  return time.perf_counter() - start, waited


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  args = parser.parse_args()
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  corpus = train.Corpus.load("", args.seq, 0.05)
  dataset = train.train_dataset(corpus.train, global_batch=args.batch, seed=0)
  rules = nnx.AxisRules.load(RULES)
  place = lambda b: nnx.global_batch_from_local(b, mesh, rules, axes=("batch", "length"))
  with nnx.use_sharding(mesh, RULES):
    model = nnx.sharded_init(lambda: models.build_model(models.PRESETS["lm_tiny"],
                                                        rngs=nnx.Rngs(0)))
    tx = train.make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=1000,
                              min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                              eps=1e-8, grad_clip=1.0)[0]
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = train.make_train_step(microbatches=1, z_loss=1e-4)
    inline_iter = iter(dataset.to_iter_dataset())
    inline = lambda: place(next(inline_iter))
    loop(step, model, optimizer, inline, 3)  # compile
    prefetcher = train.Prefetcher(dataset, place, depth=2)
    try:
      results = {"prefetch": [], "inline": []}
      for r in range(3):
        for name in (("prefetch", "inline") if r % 2 == 0 else ("inline", "prefetch")):
          fn = (lambda: next(prefetcher)) if name == "prefetch" else inline
          results[name].append(loop(step, model, optimizer, fn, args.steps))
    finally:
      prefetcher.close()
  print(f"lm_tiny, batch {args.batch} x {args.seq}, mesh fsdp=4 x tensor=2, "
        f"{jax.device_count()} {jax.default_backend()} devices, {args.steps} steps x 3 rounds")
  for name, runs in results.items():
    total = sum(t for t, _ in runs)
    waited = sum(w for _, w in runs)
    print(f"{name:8s}: {1e3 * total / (3 * args.steps):7.1f} ms/step, waiting for data "
          f"{1e3 * waited / (3 * args.steps):6.2f} ms/step = {100 * waited / total:.2f}% "
          "of step time")


if __name__ == "__main__":
  main()
