"""lm_tiny's train step written with Flax NNX, for comparison with spmdnnx.

Run it with a Python that has flax (it imports no spmdnnx, so a separate
bench venv works): ``/work/flaxvenv/bin/python bench/flax_lm_step.py``, then
``python bench/lm_step.py`` with the same arguments; docs/benchmarks.md
records both. The model is the same math as `spmdnnx.models.DecoderLM` for
lm_tiny (vocab 256, d=128, 4 blocks scanned with `nnx.scan` over stacked
weights, 4 query / 2 key-value heads of width 32, rotary positions, SwiGLU of
width 384, RMSNorm, tied output, f32), trained with the same optax chain
(global-norm clipping, AdamW, warmup + cosine, z-loss 1e-4) on mesh
fsdp=4 x tensor=2 with the same parameter and activation layouts
(``out_sharding`` metadata and `jax.lax.with_sharding_constraint`), donated
state, at most 2 steps in flight. Prints the median step time and the median
time the step call takes to return (Python overhead + dispatch).

Run: python bench/flax_lm_step.py [--batch 16 --seq 128 --rounds 7 --steps 10]
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

V, D, L, N, K, H, M = 256, 128, 4, 4, 2, 32, 384
BATCH = ("data", "fsdp")


def normal(rngs, shape, fan_in, spec):
  value = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
  return nnx.Param(value, out_sharding=spec)


def rms(x, scale):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
  return (y * scale).astype(x.dtype)


def rope(x, positions):
  half = x.shape[-1] // 2
  freq = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  ang = positions[..., None].astype(jnp.float32) * freq           # [B, T, half]
  sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def wsc(x, *spec):
  return jax.lax.with_sharding_constraint(x, P(*spec))


class Block(nnx.Module):

  def __init__(self, rngs):
    self.attn_norm = nnx.Param(jnp.ones((D,)), out_sharding=(None,))
    self.wq = normal(rngs, (D, N, H), D, ("fsdp", "tensor", None))
    self.wk = normal(rngs, (D, K, H), D, ("fsdp", "tensor", None))
    self.wv = normal(rngs, (D, K, H), D, ("fsdp", "tensor", None))
    self.wo = normal(rngs, (N, H, D), N * H, ("tensor", None, "fsdp"))
    self.mlp_norm = nnx.Param(jnp.ones((D,)), out_sharding=(None,))
    self.w_gate = normal(rngs, (D, M), D, ("fsdp", "tensor"))
    self.w_up = normal(rngs, (D, M), D, ("fsdp", "tensor"))
    self.w_down = normal(rngs, (M, D), M, ("tensor", "fsdp"))

  def __call__(self, x, positions):
    h = rms(x, self.attn_norm[...])
    q = wsc(rope(jnp.einsum("btd,dnh->btnh", h, self.wq[...]), positions),
            BATCH, None, "tensor", None)
    k = wsc(rope(jnp.einsum("btd,dkh->btkh", h, self.wk[...]), positions),
            BATCH, None, "tensor", None)
    v = wsc(jnp.einsum("btd,dkh->btkh", h, self.wv[...]), BATCH, None, "tensor", None)
    out = wsc(jax.nn.dot_product_attention(q, k, v, is_causal=True),
              BATCH, None, "tensor", None)
    x = wsc(x + jnp.einsum("btnh,nhd->btd", out, self.wo[...]), BATCH, None, None)
    h = rms(x, self.mlp_norm[...])
    gate = wsc(jnp.einsum("btd,dm->btm", h, self.w_gate[...]), BATCH, None, "tensor")
    up = wsc(jnp.einsum("btd,dm->btm", h, self.w_up[...]), BATCH, None, "tensor")
    y = jnp.einsum("btm,md->btd", wsc(jax.nn.silu(gate) * up, BATCH, None, "tensor"),
                   self.w_down[...])
    return wsc(x + y, BATCH, None, None)


class LM(nnx.Module):

  def __init__(self, rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (V, D)) / math.sqrt(D),
                               out_sharding=("tensor", "fsdp"))

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(rngs):
      return Block(rngs)

    self.layers = make(rngs)
    self.final_norm = nnx.Param(jnp.ones((D,)), out_sharding=(None,))

  def __call__(self, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = wsc(jnp.take(self.embedding[...], tokens, axis=0), BATCH, None, None)

    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: None})
    def body(x, block, positions):
      return block(x, positions)

    x = rms(body(x, self.layers, positions), self.final_norm[...])
    logits = jnp.einsum("btd,vd->btv", x, self.embedding[...],
                        preferred_element_type=jnp.float32)
    return wsc(logits, BATCH, None, "tensor")


def lm_loss(logits, targets, z_loss=1e-4):
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = jnp.mean(lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])
  return nll + z_loss * jnp.mean(lse ** 2)


def make_tx():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 1000, 1e-4)
  mask = lambda p: jax.tree.map(lambda a: jnp.ndim(a) >= 2, p)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                 mask=mask))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.use_eager_sharding(False):
    @nnx.jit
    def create():
      model = LM(nnx.Rngs(0))
      state = nnx.state(model)
      nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
      return model

    model = create()
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, batch):
      loss, grads = nnx.value_and_grad(
          lambda m: lm_loss(m(batch["inputs"]), batch["targets"]))(model)
      grad_norm = optax.tree.norm(grads)
      optimizer.update(model, grads)
      return loss, grad_norm

    tokens = np.random.default_rng(0).integers(1, 256, size=(args.batch, args.seq + 1))
    sh = NamedSharding(mesh, P(BATCH, None))
    batch = {"inputs": jax.device_put(tokens[:, :-1].astype(np.int32), sh),
             "targets": jax.device_put(tokens[:, 1:].astype(np.int32), sh)}

    def timed(n):
      pending, calls = [], []
      start = time.perf_counter()
      for _ in range(n):
        t0 = time.perf_counter()
        pending.append(step(model, optimizer, batch)[0])
        calls.append(time.perf_counter() - t0)
        if len(pending) >= 2:
          jax.block_until_ready(pending.pop(0))
      jax.block_until_ready(pending)
      return (time.perf_counter() - start) / n, statistics.median(calls)

    timed(3)
    samples = [timed(args.steps) for _ in range(args.rounds)]
  t_step = statistics.median(s[0] for s in samples)
  t_call = statistics.median(s[1] for s in samples)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"flax {flax.__version__}, jax {jax.__version__}, {jax.device_count()} "
        f"{jax.default_backend()} devices, mesh fsdp=4 x tensor=2, lm_tiny "
        f"({n_params:,} params), batch {args.batch} x {args.seq}")
  print(f"flax nnx.jit {t_step * 1e3:.2f} ms/step   step call returns in "
        f"{t_call * 1e3:.2f} ms")


if __name__ == "__main__":
  main()
