"""Per-device memory of a sharded model + AdamW state (issue 5 memory figure).

A 4-block MLP (embed 512, mlp 2048) and its AdamW optimizer are built with
`spmd.sharded_init` on a mesh fsdp=4 x tensor=2 with the `fsdp_tp` rules. The
bytes that device 0 actually holds (summed over its addressable shards) are
compared with total / 8, for parameters and optimizer state, and against the
same state laid out by hand with plain `jax.jit` and the same NamedShardings,
measured in the same run. Target: ratio 1.00.

Run: python bench/sharded_memory.py   (sets 8 fake CPU devices if none given)
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import spmdnnx as nnx  # noqa: E402
from spmdnnx import spmd  # noqa: E402
from spmdnnx.nn import Linear  # noqa: E402
from spmdnnx import Optimizer  # noqa: E402

EMBED, MLP_DIM, BLOCKS = 512, 2048, 4


class Block(nnx.Module):

  def __init__(self, *, rngs):
    self.up = Linear(EMBED, MLP_DIM, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(MLP_DIM, EMBED, kernel_axes=("mlp", "embed"), rngs=rngs)


class MLP(nnx.Module):

  def __init__(self, *, rngs):
    self.blocks = [Block(rngs=rngs) for _ in range(BLOCKS)]


def device0_bytes(arrays) -> tuple[int, int]:
  """(bytes on device 0, total logical bytes) over a pytree of jax.Arrays."""
  dev = jax.devices()[0]
  on_dev = total = 0
  for a in jax.tree.leaves(arrays):
    total += a.size * a.dtype.itemsize
    on_dev += sum(s.data.size * s.data.dtype.itemsize for s in a.addressable_shards
                  if s.device == dev)
  return on_dev, total


def raw(state):
  return [v.value for _, v in state.flat_state()]


def main() -> None:
  mesh = spmd.make_mesh(spmd.MeshConfig(fsdp=4, tensor=2))
  n = mesh.devices.size
  tx = optax.adamw(1e-3)
  with spmd.use_sharding(mesh, "fsdp_tp"):
    opt = spmd.sharded_init(lambda: Optimizer(MLP(rngs=nnx.Rngs(0)), tx, wrt=nnx.Param))
    report = spmd.sharding_report(opt)
  params = nnx.state(opt.model, nnx.Param)
  opt_state = nnx.state(opt, nnx.OptState)
  p_dev, p_total = device0_bytes(raw(params))
  o_dev, o_total = device0_bytes(raw(opt_state))

  # Same layout by hand: plain jax.jit with the same NamedShardings.
  shardings = spmd.get_named_sharding(params, mesh, "fsdp_tp")
  pure_shardings = [s.value for _, s in shardings.flat_state()]
  hand_params = jax.jit(lambda ps: ps, out_shardings=pure_shardings)(raw(params))
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, hand_params), pure_shardings,
      transform_non_params=lambda _: replicated)
  hand_opt = jax.jit(tx.init, out_shardings=opt_shardings)(hand_params)
  hp_dev, _ = device0_bytes(hand_params)
  ho_dev, ho_total = device0_bytes(hand_opt)

  totals = report.totals()["per_device"]
  print(f"mesh {dict(mesh.shape)}; {n} devices")
  print(f"params:    total {p_total} B, device 0 {p_dev} B, total/{n} = {p_total / n:.0f} B, "
        f"ratio {p_dev / (p_total / n):.3f} (plain jax.jit: {hp_dev / (p_total / n):.3f})")
  print(f"opt state: total {o_total} B, device 0 {o_dev} B, total/{n} = {o_total / n:.0f} B, "
        f"ratio {o_dev / (o_total / n):.3f} (plain jax.jit + optax.init: "
        f"{ho_dev / (ho_total / n):.3f})")
  both = (p_dev + o_dev) / ((p_total + o_total) / n)
  print(f"params + opt state per device / (total/{n}): {both:.3f}")
  print(f"sharding_report per device: params {totals['params']} B, "
        f"opt_state {totals['opt_state']} B")


if __name__ == "__main__":
  main()
