"""Compile time of the lm_tiny grad step: spmdnnx DecoderLM vs the same LM in plain JAX.

Part 1 (ratio): ``jax.jit(jax.value_and_grad(loss))`` lowered and compiled
for (a) `DecoderLM` from ``PRESETS["lm_tiny"]`` through ``nnx.merge`` of its
split state and (b) the same network hand-written in plain JAX with
``lax.scan`` over stacked weights (same shapes, RoPE, GQA through
`jax.nn.dot_product_attention`, SwiGLU, tied output). Process CPU seconds of
trace+lower and of XLA compile; rounds alternate the two; medians and the
spmdnnx / plain ratio are printed. CPU time, not wall time, because the
shared benchmark machine is heavily oversubscribed.

Part 2 (depth): the whole first call of an ``nnx.jit`` train step (grad +
AdamW) for ``scan_layers`` True (`nnx.Stack`) and False (a list of blocks)
at several depths, wall and CPU seconds, and the median later step.

Run: PYTHONPATH=. python bench/lm_compile.py [--rounds 3] [--layers 4,16] [--steps 3]
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

CFG = models.PRESETS["lm_tiny"]


def _rms(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + CFG.norm_eps) * w


def _rope(x, pos):
  half = x.shape[-1] // 2
  inv = 1.0 / (CFG.rope_theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
  ang = (pos[..., None].astype(jnp.float32) * inv)[:, :, None, :]
  s, c = jnp.sin(ang), jnp.cos(ang)
  return jnp.concatenate([x[..., :half] * c - x[..., half:] * s,
                          x[..., half:] * c + x[..., :half] * s], -1)


def plain_loss(p, batch):
  tokens, targets = batch[:, :-1], batch[:, 1:]
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  x = p["emb"][tokens]

  def block(x, w):
    y = _rms(x, w["n1"])
    q = _rope(jnp.einsum("btd,dnh->btnh", y, w["wq"]), pos)
    k = _rope(jnp.einsum("btd,dkh->btkh", y, w["wk"]), pos)
    v = jnp.einsum("btd,dkh->btkh", y, w["wv"])
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + jnp.einsum("btnh,nhd->btd", o, w["wo"])
    y = _rms(x, w["n2"])
    return x + (jax.nn.silu(y @ w["wg"]) * (y @ w["wu"])) @ w["wd"], None

  x, _ = jax.lax.scan(block, x, p["layers"])
  logits = _rms(x, p["nf"]) @ p["emb"].T
  return models.lm_loss(logits, targets)[0]


def plain_params():
  d, n, k, h, m, v, L = (CFG.embed_dim, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim,
                         CFG.mlp_dim, CFG.vocab_size, CFG.num_layers)
  keys = iter(jax.random.split(jax.random.key(0), 8))
  r = lambda *s: jax.random.normal(next(keys), s) * 0.05
  return {"emb": r(v, d), "nf": jnp.ones(d), "layers": {
      "wq": r(L, d, n, h), "wk": r(L, d, k, h), "wv": r(L, d, k, h), "wo": r(L, n, h, d),
      "wg": r(L, d, m), "wu": r(L, d, m), "wd": r(L, m, d),
      "n1": jnp.ones((L, d)), "n2": jnp.ones((L, d))}}


def compile_cpu(loss, params, batch) -> tuple[float, float]:
  c0 = time.process_time()
  lowered = jax.jit(jax.value_and_grad(loss)).lower(params, batch)
  c1 = time.process_time()
  lowered.compile()
  return c1 - c0, time.process_time() - c1


def part1(rounds: int) -> None:
  batch = jax.random.randint(jax.random.key(1), (8, 129), 0, CFG.vocab_size, jnp.int32)
  graphdef, state = nnx.split(models.build_model(CFG, rngs=nnx.Rngs(0)))

  def ours(st, b):
    model = nnx.merge(graphdef, st)
    return models.lm_loss(model(b[:, :-1]), b[:, 1:])[0]

  res = {"spmdnnx": [], "plain": []}
  for _ in range(rounds):
    res["spmdnnx"].append(compile_cpu(ours, state, batch))
    res["plain"].append(compile_cpu(plain_loss, plain_params(), batch))
  med = {k: tuple(statistics.median(x[i] for x in v) for i in range(2)) for k, v in res.items()}
  for k, (tr, co) in med.items():
    print(f"{k:8s} trace+lower {tr:5.2f}s  compile {co:5.2f}s  (CPU, median of {rounds})")
  print(f"ratio spmdnnx/plain: trace {med['spmdnnx'][0] / med['plain'][0]:.2f}, compile "
        f"{med['spmdnnx'][1] / med['plain'][1]:.2f}, total "
        f"{sum(med['spmdnnx']) / sum(med['plain']):.2f}", flush=True)


def first_call(cfg: models.LMConfig, steps: int) -> tuple[float, float, float]:
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
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step(model, opt, batch).block_until_ready()
    times.append(time.perf_counter() - t0)
  return wall, cpu, statistics.median(times)


def part2(layers: list[int], steps: int) -> None:
  print("layers remat  stack_first wall (cpu)  list_first wall (cpu)  stack_step list_step")
  for n in layers:
    for remat in ("none", "full"):
      cfg = CFG.replace(num_layers=n, remat=remat)
      sw, sc, ss = first_call(cfg, steps)
      lw, lc, ls = first_call(cfg.replace(scan_layers=False), steps)
      print(f"{n:6d} {remat:6s} {sw:14.2f} ({sc:5.2f}) {lw:14.2f} ({lc:5.2f}) {ss:11.3f}"
            f" {ls:9.3f}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--layers", default="4,16")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  print(f"lm_tiny grad step, batch 8 x 128, {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)")
  part1(args.rounds)
  if args.layers:
    part2([int(x) for x in args.layers.split(",")], args.steps)


if __name__ == "__main__":
  main()
